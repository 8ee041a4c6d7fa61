"""Differentiable sampling on working grids (torch), used inside the methods.

Tensors are (batch, channel, z, y, x). A displacement tensor ``u`` has shape
(1, 3, z, y, x) with components (x, y, z) in LPS mm, like ``field.py``'s fields.
``torch.nn.functional.grid_sample`` is used with ``align_corners=True``, so a
normalised coordinate of -1 / +1 is the centre of the first / last voxel.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .image import Grid


def to_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """(z, y, x) array -> (1, 1, z, y, x) float32 tensor; (z, y, x, c) -> (1, c, z, y, x)."""
    t = torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32, device=device)
    return t[None, None] if t.ndim == 3 else t.permute(3, 0, 1, 2)[None]


def field_to_array(u: torch.Tensor) -> np.ndarray:
    """(1, 3, z, y, x) tensor -> (z, y, x, 3) float32 array (LPS mm)."""
    return u[0].permute(1, 2, 3, 0).detach().cpu().numpy().astype(np.float32)


def _index_to_normalised(shape_zyx, device) -> torch.Tensor:
    """Per-component scale turning an index (i, j, k) into grid_sample units (x, y, z)."""
    n = torch.tensor([shape_zyx[2], shape_zyx[1], shape_zyx[0]], dtype=torch.float32, device=device)
    return 2.0 / torch.clamp(n - 1, min=1.0)


def identity_index(shape_zyx, device: torch.device) -> torch.Tensor:
    """(1, z, y, x, 3) voxel indices (i, j, k) of a grid."""
    k, j, i = torch.meshgrid(*[torch.arange(n, dtype=torch.float32, device=device) for n in shape_zyx],
                             indexing="ij")
    return torch.stack([i, j, k], dim=-1)[None]


def sample_at_index(volume: torch.Tensor, index: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """Sample (1, C, z, y, x) at continuous indices (1, ..., 3) (i, j, k) -> (1, C, ...), trilinear."""
    shape = volume.shape[2:]
    norm = index * _index_to_normalised(shape, volume.device) - 1.0
    lead = norm.shape[1:-1]
    g = norm.reshape(1, -1, 1, 1, 3) if len(lead) != 3 else norm
    out = F.grid_sample(volume, g, mode="bilinear", padding_mode=padding, align_corners=True)
    return out.reshape(volume.shape[0], volume.shape[1], *lead)


def world_to_index_torch(points: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(..., 3) LPS mm -> (..., 3) continuous indices of ``grid``."""
    inv = np.linalg.inv(grid.affine)
    m = torch.as_tensor(inv[:3, :3], dtype=torch.float32, device=points.device)
    t = torch.as_tensor(inv[:3, 3], dtype=torch.float32, device=points.device)
    return points @ m.T + t


def mm_to_index_matrix(grid: Grid, device: torch.device) -> torch.Tensor:
    """3x3 matrix turning an LPS mm vector into an index-space vector on ``grid``."""
    return torch.as_tensor(np.linalg.inv(grid.affine[:3, :3]), dtype=torch.float32, device=device)


def warp(moving: torch.Tensor, u_mm: torch.Tensor, grid: Grid, padding: str = "border") -> torch.Tensor:
    """moving(x + u(x)) for a moving image already on ``grid`` (1, C, z, y, x); u (1, 3, z, y, x) LPS mm."""
    shape = moving.shape[2:]
    m = mm_to_index_matrix(grid, moving.device)
    du = torch.einsum("rc,bczyx->bzyxr", m, u_mm)
    return sample_at_index(moving, identity_index(shape, moving.device) + du, padding)


def _index_through(moving_grid: Grid, affine: np.ndarray, u_mm: Optional[torch.Tensor], grid: Grid,
                   device: torch.device) -> torch.Tensor:
    """(1, z, y, x, 3) continuous indices (i, j, k) on ``moving_grid`` of A(x + u(x)) for the voxel centres x
    of ``grid``: the 4x4 ``affine`` A (fixed LPS mm -> moving LPS mm), the field u (1, 3, z, y, x) LPS mm on
    ``grid`` (None: zero)."""
    to_index = np.linalg.inv(moving_grid.affine) @ np.asarray(affine, np.float64)   # moving index of fixed mm
    m = to_index @ grid.affine                                                       # fixed index -> moving index
    rot = torch.as_tensor(m[:3, :3], dtype=torch.float32, device=device)
    shift = torch.as_tensor(m[:3, 3], dtype=torch.float32, device=device)
    index = identity_index(grid.shape, device) @ rot.T + shift
    if u_mm is not None:
        per_mm = torch.as_tensor(to_index[:3, :3], dtype=torch.float32, device=device)
        index = index + torch.einsum("rc,bczyx->bzyxr", per_mm, u_mm)
    return index


def warp_through(moving: torch.Tensor, moving_grid: Grid, affine: np.ndarray, u_mm: Optional[torch.Tensor],
                 grid: Grid, padding: str = "border") -> torch.Tensor:
    """moving(A(x + u(x))) at the voxel centres x of ``grid`` (the fixed frame) for a moving image (1, C, ...)
    on its own ``moving_grid``: the 4x4 pre-alignment ``affine`` A (fixed LPS mm -> moving LPS mm) and the
    field u (1, 3, z, y, x) LPS mm on ``grid`` (None: zero) applied in one trilinear interpolation, so the
    moving image is not first resampled through A and then interpolated again (which blurs it unlike the
    fixed image wherever A is not a whole-voxel shift, and costs accuracy)."""
    return sample_at_index(moving, _index_through(moving_grid, affine, u_mm, grid, moving.device), padding)


def inside_through(image_grid: Grid, affine: np.ndarray, u_mm: Optional[torch.Tensor], grid: Grid,
                   device: torch.device) -> torch.Tensor:
    """(1, 1, z, y, x) weights in [0, 1] on ``grid``: 1 where A(x + u(x)) (as in :func:`warp_through`) lies
    inside ``image_grid``'s buffer (continuous index in [-0.5, n - 0.5] on each axis, as
    :func:`rtreg.field.coverage`), falling linearly to 0 over one voxel of ``image_grid`` beyond it: where a
    sample reads the image and not the edge value repeated past a cropped field of view."""
    index = _index_through(image_grid, affine, u_mm, grid, device)
    size = torch.as_tensor(image_grid.size_xyz, dtype=index.dtype, device=device)
    outside = torch.maximum(-0.5 - index, index - (size - 0.5)).clamp_min(0.0)     # voxels past the buffer
    return (1.0 - outside).clamp_min(0.0).prod(-1)[:, None]


def warp_voxels(image: torch.Tensor, u_voxels: torch.Tensor) -> torch.Tensor:
    """image(i + u(i)) for (B, C, z, y, x) images and (B, 3, z, y, x) displacements in voxels (i, j, k)."""
    idx = identity_index(image.shape[2:], image.device) + u_voxels.permute(0, 2, 3, 4, 1)
    return torch.cat([sample_at_index(image[k:k + 1], idx[k:k + 1]) for k in range(image.shape[0])], 0)


def voxels_to_mm(u_voxels: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(B, 3, z, y, x) displacement in voxels (i, j, k) of ``grid`` -> LPS mm (its direction and spacing)."""
    axes = torch.as_tensor(grid.affine[:3, :3], dtype=u_voxels.dtype, device=u_voxels.device)
    return torch.einsum("rc,bczyx->brzyx", axes, u_voxels)


def resample_on_grid(volume: torch.Tensor, source: Grid, target: Grid, padding: str = "border") -> torch.Tensor:
    """(1, C, z, y, x) values on ``source`` -> (1, C, Z, Y, X) on ``target``, trilinear at the target's voxel
    centres (world LPS mm, so any two grids in one frame work; mm fields keep their values)."""
    return warp_through(volume, source, np.eye(4), None, target, padding)


def compose_fields(u_first: torch.Tensor, u_second: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The field of warping by ``u_second`` an image already warped by ``u_first`` (both (1, 3, z, y, x) mm on
    ``grid``): m(x + w(x)) with w(x) = u_second(x) + u_first(x + u_second(x))."""
    return u_second + warp(u_first, u_second, grid)


def resize_field(u: torch.Tensor, shape_zyx) -> torch.Tensor:
    """Trilinear resize of a (1, 3, z, y, x) mm field to another grid over the same extent (values kept: mm)."""
    if tuple(u.shape[2:]) == tuple(shape_zyx):
        return u
    return F.interpolate(u, size=tuple(shape_zyx), mode="trilinear", align_corners=True)


def box_filter(x: torch.Tensor, size: int) -> torch.Tensor:
    """Separable moving average over ``size``^3 voxels (odd ``size``), edge-replicated, same shape.

    Each axis is summed as ``size`` shifted views: whole-array additions, 1.6 to 5 times faster forward and
    backward on 2 CPU threads than ``avg_pool3d`` with a one-axis kernel, as exact in float32
    (``bench/inverse_and_box_speed.py``)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"box_filter needs an odd size, not {size}")
    pad = size // 2
    x = F.pad(x, (pad, pad, pad, pad, pad, pad), mode="replicate")
    for axis in (2, 3, 4):
        n = x.shape[axis] - size + 1
        total = x.narrow(axis, 0, n)
        for shift in range(1, size):
            total = total + x.narrow(axis, shift, n)
        x = total
    return x / float(size ** 3)


def smooth(x: torch.Tensor, passes: int = 2, kernel: int = 3) -> torch.Tensor:
    """Repeated box filtering (approximately Gaussian), edge-replicated; keeps the shape."""
    for _ in range(passes):
        x = box_filter(x, kernel)
    return x
