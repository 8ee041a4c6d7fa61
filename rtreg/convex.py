"""Coupled convex discrete optimisation of a displacement field from feature maps, then Adam (torch).

The stage GlideReg runs on its global and its local features (after Heinrich's
ConvexAdam, written here as small functions with units in the names):

1. :func:`patch_features`: features averaged over cubic patches of ``step``
   working voxels, one patch per control point of a coarse grid;
2. :func:`ssd_cost_volume`: the sum of squared feature differences for every
   candidate displacement of a control point, a cube of ``(2 r + 1)^3`` whole
   control-grid steps;
3. :func:`coupled_convex`: alternately the best candidate per control point and
   a smoothed field, the two coupled ever more strongly, so that the result is
   both data-driven and smooth (a global regulariser without gradient descent);
4. :func:`control_field_mm`: the field in LPS mm on the working grid;
5. :func:`adam_refine`: instance optimisation of that field on a smoothed
   half-resolution control grid (weighted feature SSD + bending energy), which
   reaches what the discrete candidates cannot (sub-step motion).

Shapes: features (1, C, z, y, x); cost (D, Z, Y, X) with D candidates;
displacements (1, 3, ...) with components (x, y, z) in LPS mm, as
:mod:`rtreg.spatial` uses them.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .image import Grid
from .spatial import box_filter, resize_field

COUPLINGS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)   # per mm^2 of disagreement with the smoothed field


def patch_features(features: torch.Tensor, step: int) -> torch.Tensor:
    """(1, C, z, y, x) -> (1, C, z // step, y // step, x // step): the mean of each ``step``^3 patch."""
    return F.avg_pool3d(features, step, stride=step)


def candidate_offsets(radius: int, device: torch.device) -> torch.Tensor:
    """(D, 3) integer offsets (dx, dy, dz) in control-grid steps, D = (2 radius + 1)^3, z slowest."""
    r = torch.arange(-radius, radius + 1, device=device)
    dz, dy, dx = torch.meshgrid(r, r, r, indexing="ij")
    return torch.stack([dx.reshape(-1), dy.reshape(-1), dz.reshape(-1)], 1)


def ssd_cost_volume(fixed_patches: torch.Tensor, moving_patches: torch.Tensor, radius: int) -> torch.Tensor:
    """(D, Z, Y, X) mean squared feature difference between each fixed patch and the moving patch displaced by
    each candidate of :func:`candidate_offsets` (moving patches outside the image repeat the edge), smoothed
    over 3^3 neighbouring control points so that one noisy patch does not decide."""
    _, c, nz, ny, nx = fixed_patches.shape
    padded = F.pad(moving_patches, (radius,) * 6, mode="replicate")
    costs = []
    for dx, dy, dz in candidate_offsets(radius, fixed_patches.device).tolist():
        shifted = padded[:, :, radius + dz:radius + dz + nz, radius + dy:radius + dy + ny,
                         radius + dx:radius + dx + nx]
        costs.append(((fixed_patches - shifted) ** 2).mean(1))
    cost = torch.cat(costs, 0)
    return box_filter(cost[None], 3)[0]


def coupled_convex(cost: torch.Tensor, offsets_mm: torch.Tensor, couplings: Sequence[float] = COUPLINGS
                   ) -> torch.Tensor:
    """(D, Z, Y, X) cost and (D, 3) candidate displacements (LPS mm) -> (1, 3, Z, Y, X) smooth field (mm).

    Starts from the best candidate of every control point; then, for each coupling weight w (increasing),
    picks per point the candidate minimising cost + w |d - smooth(u)|^2 and smooths the choice again.
    """
    d, nz, ny, nx = cost.shape
    flat_cost = cost.reshape(d, -1)

    def smoothed(choice: torch.Tensor) -> torch.Tensor:
        u = offsets_mm[choice].T.reshape(1, 3, nz, ny, nx)
        return box_filter(u, 3)

    u_smooth = smoothed(flat_cost.argmin(0))
    for w in couplings:
        disagreement = ((offsets_mm[:, :, None] - u_smooth.reshape(1, 3, -1)) ** 2).sum(1)   # (D, N) mm^2
        u_smooth = smoothed((flat_cost + w * disagreement).argmin(0))
    return u_smooth


def control_field_mm(fixed_features: torch.Tensor, moving_features: torch.Tensor, grid: Grid, step: int,
                     radius: int, couplings: Sequence[float] = COUPLINGS) -> torch.Tensor:
    """The convex stage on one pair of feature maps on the working ``grid`` (axis-aligned or oblique):
    (1, 3, z, y, x) LPS mm field on that grid, searching up to ``radius * step`` voxels along each axis."""
    f_p, m_p = patch_features(fixed_features, step), patch_features(moving_features, step)
    if min(f_p.shape[2:]) < 2:
        raise ValueError(f"the image ({tuple(fixed_features.shape[2:])} voxels) is smaller than two control "
                         f"points of {step} voxels along an axis")
    cost = ssd_cost_volume(f_p, m_p, radius)
    steps = candidate_offsets(radius, cost.device).to(torch.float64) * step           # working voxels (i, j, k)
    offsets_mm = (steps @ torch.as_tensor(grid.affine[:3, :3]).T).to(torch.float32)   # LPS mm
    u_coarse = coupled_convex(cost, offsets_mm.to(cost.device), couplings)
    return _upsample_patch_field(u_coarse, fixed_features.shape[2:], step)


def _upsample_patch_field(u_coarse: torch.Tensor, shape_zyx, step: int) -> torch.Tensor:
    """Patch-centred coarse field -> the working grid (patch centres sit at (step - 1) / 2 + k step)."""
    nz, ny, nx = u_coarse.shape[2:]
    full = [n * step for n in (nz, ny, nx)]
    u = F.interpolate(u_coarse, size=full, mode="trilinear", align_corners=False)
    pad = [0, shape_zyx[2] - full[2], 0, shape_zyx[1] - full[1], 0, shape_zyx[0] - full[0]]
    u = F.pad(u, pad, mode="replicate")
    return resize_field(u, shape_zyx)


def adam_refine(pairs: Sequence[tuple], u_init: torch.Tensor, grid: Grid, weights: Sequence[float],
                bending_weight: float, iterations: int, lr_mm: float = 0.5) -> torch.Tensor:
    """Instance optimisation after the convex stage: Adam on a half-resolution control field, smoothed and
    upsampled to ``grid``, minimising sum_k weights[k] * SSD(fixed_k, moving_k(x + u)) + bending_weight *
    bending energy (1/mm). ``pairs``: (fixed, moving) feature maps (1, C, z, y, x) on ``grid``;
    ``u_init`` (1, 3, z, y, x) LPS mm. Returns the refined (1, 3, z, y, x) field (mm, detached)."""
    from .losses import bending_energy
    from .spatial import smooth, warp
    shape = u_init.shape[2:]
    half = [max(2, (n + 1) // 2) for n in shape]
    control = resize_field(u_init.detach(), half).clone().requires_grad_(True)
    opt = torch.optim.Adam([control], lr=lr_mm)
    spacing = [float(s) for s in grid.spacing]
    for _ in range(iterations):
        opt.zero_grad()
        u = smooth(resize_field(control, shape))
        loss = bending_weight * bending_energy(u, spacing)
        for w, (fixed, moving) in zip(weights, pairs):
            loss = loss + w * ((fixed - warp(moving, u, grid)) ** 2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return smooth(resize_field(control, shape))
