"""Shared fixtures: the real data folder (../shared/data) and small synthetic volumes."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from rtreg.image import Grid, Volume

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("RTREG_DATA", REPO.parent / "shared" / "data"))


def data_path(*parts: str) -> Path:
    """Path inside ../shared/data, or skip the test with the reason."""
    p = DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data {p} is absent (tests on real data need ../shared/data beside the repo "
                    "or RTREG_DATA pointing to it)")
    return p


def oblique_grid(shape=(12, 14, 16), spacing=(1.3, 0.9, 2.1), origin=(-20.0, 11.0, 5.0), deg=(12.0, -8.0, 20.0)):
    """An oblique, anisotropic grid (rotation about x, y, z by ``deg``)."""
    from rtreg.synth import rigid_matrix
    r = rigid_matrix(deg, (0, 0, 0), (0, 0, 0))[:3, :3]
    return Grid.from_geometry(shape, spacing, origin, r)


def smooth_image(grid: Grid, seed: int = 0) -> Volume:
    """A smooth random image with blobs (float32) on ``grid``."""
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.standard_normal(grid.shape), 1.5).astype(np.float32)
    return Volume(a * 100 / a.std(), grid.affine.copy(), {"name": "smooth"})


def smooth_field(grid: Grid, amplitude_mm: float = 2.0, seed: int = 1) -> Volume:
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    u = np.stack([ndimage.gaussian_filter(rng.standard_normal(grid.shape), 3.0) for _ in range(3)], -1)
    u *= amplitude_mm / np.abs(u).max()
    return Volume(u.astype(np.float32), grid.affine.copy(), {"units": "mm"})
