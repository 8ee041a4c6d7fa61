"""Accuracy of a registration against a known truth (synthetic or applied deformations).

Point errors use fixed-image points x and their true moving positions; structure
metrics compare structures carried onto the moving grid with the true ones.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Sequence

import numpy as np

from .dicomrt import Structure
from .errors import InputError
from .field import SpatialTransform, jacobian_determinant, read_transform
from .image import Grid, read_volume
from .metrics import jacobian_stats, point_distances, structure_metrics, tre


def point_errors(transform: SpatialTransform, points_fixed: np.ndarray, points_moving_true: np.ndarray) -> Dict:
    """TRE (mm) of ``transform`` at ``points_fixed`` (LPS, fixed image) against the true moving positions:
    the summary (mean, median, p95, max, n) and ``errors``, the distance of every point."""
    estimated = transform.transform_points(points_fixed)
    return dict(tre(estimated, points_moving_true), errors=point_distances(estimated, points_moving_true).tolist())


def structure_errors(on_moving: Dict[str, np.ndarray], truth: Sequence[Structure], grid: Grid) -> Dict[str, Dict]:
    """Dice, HD95, MSD and RVD of each propagated structure against the true one (moving grid)."""
    out = {}
    for s in truth:
        if s.name in on_moving and s.mask.any():
            out[s.name] = structure_metrics(on_moving[s.name], s.mask, grid.spacing)
    return out


def _read_points(path: Path) -> np.ndarray:
    return np.loadtxt(path, delimiter=",", comments="#", ndmin=2)


def evaluate_result(case_dir: Path, result_dir: Path) -> Dict:
    """Metrics of a registration output folder against a case folder with a ground truth.

    ``case_dir`` (as ``synth.write_case`` writes it): ``planning_ct.nii.gz``, ``points_planning.csv`` and
    ``points_repeat_truth.csv`` (LPS mm) and/or ``truth_structures_on_repeat/<ROI>.nii.gz``.
    ``result_dir`` (as ``rtreg register`` writes it): ``transform.h5`` (or ``displacement.mha``) and
    ``structures_on_moving/<ROI>.nii.gz``. Returns TRE (mm; with every point's error), per-structure Dice/HD95/MSD/RVD and the
    Jacobian statistics of the mapping inside the planning body.
    """
    case_dir, result_dir = Path(case_dir), Path(result_dir)
    for p in (case_dir, result_dir):
        if not p.is_dir():
            raise InputError(f"{p} is not a folder; give the case folder and the result folder of a registration")
    tx_path = result_dir / "transform.h5"
    if not tx_path.exists():
        tx_path = result_dir / "displacement.mha"
    if not tx_path.exists():
        raise InputError(f"{result_dir} has neither transform.h5 nor displacement.mha: not a registration output")
    transform = read_transform(tx_path)
    out: Dict = {"case": str(case_dir), "result": str(result_dir)}
    pts, truth = case_dir / "points_planning.csv", case_dir / "points_repeat_truth.csv"
    if pts.exists() and truth.exists():
        out["tre_mm"] = point_errors(transform, _read_points(pts), _read_points(truth))
    truth_dir = case_dir / "truth_structures_on_repeat"
    if truth_dir.is_dir():
        from .pipeline import structure_filename
        truth_structs, on_moving, grid = [], {}, None
        for i, f in enumerate(sorted(truth_dir.glob("*.nii.gz")), start=1):
            vol = read_volume(f)
            name = f.name[:-len(".nii.gz")]
            grid = vol.grid
            truth_structs.append(Structure(name, i, (255, 0, 0), (vol.array > 0).astype(np.uint8)))
            est = result_dir / "structures_on_moving" / structure_filename(name)
            if est.exists():
                on_moving[name] = (read_volume(est).array > 0).astype(np.uint8)
        if grid is not None:
            out["structures"] = structure_errors(on_moving, truth_structs, grid)
    jac_path = result_dir / "jacobian.nii.gz"
    if jac_path.exists():
        jac = read_volume(jac_path)
    else:
        planning = read_volume(case_dir / "planning_ct.nii.gz")
        jac = jacobian_determinant(transform.total_field(planning.grid))
    body_path = case_dir / "structures" / "BODY.nii.gz"
    body = read_volume(body_path).array if body_path.exists() else None
    out["jacobian"] = jacobian_stats(jac, body if body is not None and body.shape == jac.array.shape else None)
    if "tre_mm" not in out and "structures" not in out:
        raise InputError(f"{case_dir} holds no ground truth (points_*.csv or truth_structures_on_repeat/)")
    (result_dir / "eval.json").write_text(json.dumps(out, indent=2))
    return out
