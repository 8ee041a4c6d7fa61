"""Accuracy of a registration against a known truth (synthetic or applied deformations).

Point errors use fixed-image points x and their true moving positions; structure
metrics compare structures carried onto the moving grid with the true ones.
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from .dicomrt import Structure
from .field import SpatialTransform
from .image import Grid
from .metrics import structure_metrics, tre


def point_errors(transform: SpatialTransform, points_fixed: np.ndarray, points_moving_true: np.ndarray) -> Dict:
    """TRE (mm) of ``transform`` at ``points_fixed`` (LPS, fixed image) against the true moving positions."""
    return tre(transform.transform_points(points_fixed), points_moving_true)


def structure_errors(on_moving: Dict[str, np.ndarray], truth: Sequence[Structure], grid: Grid) -> Dict[str, Dict]:
    """Dice, HD95, MSD and RVD of each propagated structure against the true one (moving grid)."""
    out = {}
    for s in truth:
        if s.name in on_moving and s.mask.any():
            out[s.name] = structure_metrics(on_moving[s.name], s.mask, grid.spacing)
    return out
