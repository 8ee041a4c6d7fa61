"""Working grids of the network methods (ProtonDIR, TTORegister) and the images the networks see there.

A working grid is isotropic, has the fixed image's direction, covers the fixed image's body (bounding box
plus a margin) and has each axis a multiple of 16 voxels, as the 5-level networks need. A field computed
on it is tapered to zero towards its faces so that it meets the zero field outside without a jump.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .field import affine_to_sitk
from .image import Grid, Volume, resample, smooth_for_downsampling

BODY_MARGIN_MM = 20.0             # the working grid covers the fixed body's bounding box and this margin


def working_grid(grid: Grid, spacing_mm: float, multiple: int = 16, minimum: int = 32,
                 region: Optional[np.ndarray] = None, margin_mm: float = BODY_MARGIN_MM) -> Grid:
    """An isotropic grid of ``spacing_mm`` with ``grid``'s direction, each axis a multiple of ``multiple``
    voxels and at least ``minimum`` (what the 5-level network needs), centred on ``grid``'s extent or, with a
    ``region`` mask (z, y, x) on ``grid``, on that region's bounding box widened by ``margin_mm``."""
    if region is not None and np.any(region):
        idx = np.argwhere(region)[:, ::-1]                                  # (i, j, k)
        lo = np.maximum(idx.min(0) - margin_mm / grid.spacing, 0)
        hi = np.minimum(idx.max(0) + margin_mm / grid.spacing, np.array(grid.size_xyz) - 1)
    else:
        lo, hi = np.zeros(3), np.array(grid.size_xyz, float) - 1
    extent = (hi - lo) * grid.spacing                                       # mm along i, j, k
    n = np.floor(extent / spacing_mm).astype(int) + 1
    n = np.maximum(minimum, -(-n // multiple) * multiple)
    axes = grid.direction * spacing_mm
    centre = grid.index_to_world(((lo + hi) / 2)[None])[0]
    a = np.eye(4)
    a[:3, :3] = axes
    a[:3, 3] = centre - axes @ ((n - 1) / 2.0)
    return Grid(tuple(int(v) for v in n[::-1]), a)


def edge_taper(shape_zyx, width_voxels: float) -> np.ndarray:
    """(z, y, x) weights: 1 inside, falling linearly to 0 over ``width_voxels`` at every face of the grid, so a
    field computed on a cropped grid meets the zero field outside it without a jump."""
    ramps = [np.clip(np.minimum(np.arange(n), n - 1 - np.arange(n)) / max(width_voxels, 1e-6), 0, 1)
             for n in shape_zyx]
    return (ramps[0][:, None, None] * ramps[1][None, :, None] * ramps[2][None, None, :]).astype(np.float32)


def network_images(f_norm: Volume, m_norm: Volume, affine: np.ndarray, grid: Grid) -> Tuple[np.ndarray, np.ndarray]:
    """(fixed, moving) (z, y, x) float32 in [0, 1] on ``grid`` from the normalised images
    (:func:`rtreg.methods.io.normalised_images`): anti-aliased, the moving image resampled through the
    pre-alignment ``affine``."""
    sp = float(grid.spacing[0])
    f = resample(smooth_for_downsampling(f_norm, sp), grid, "linear", None, 0.0).array
    m = resample(smooth_for_downsampling(m_norm, sp), grid, "linear", affine_to_sitk(affine), 0.0).array
    return f.astype(np.float32), m.astype(np.float32)


def spacing_for_budget(grid: Grid, max_voxels: int, min_spacing_mm: float, region: Optional[np.ndarray] = None,
                       margin_mm: float = BODY_MARGIN_MM, multiple: int = 16, minimum: int = 32) -> float:
    """The finest isotropic spacing (mm, at least ``min_spacing_mm``) whose :func:`working_grid` over ``region``
    has at most ``max_voxels`` voxels, or the first at which every axis is down to ``minimum`` voxels (coarser
    spacings would not shrink the grid). An axis held at ``minimum`` (a thin slab) does not stop the others
    from coarsening."""
    spacing = float(min_spacing_mm)
    for _ in range(200):
        g = working_grid(grid, spacing, multiple, minimum, region, margin_mm)
        if int(np.prod(g.shape)) <= max_voxels or max(g.shape) <= minimum:
            return spacing
        spacing *= 1.05
    return spacing
