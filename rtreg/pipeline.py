"""From files to files: load a case, run a method, write the outputs the CLI promises.

Outputs (in ``out``): ``transform.h5`` (fixed->moving ITK composite, LPS),
``displacement.mha`` (total field on the fixed grid), ``warped_moving.nii.gz``,
``structures_on_moving/<ROI>.nii.gz`` and ``dose_on_moving.nii.gz`` (fixed-image
structures and dose carried onto the moving grid through the inverse mapping),
``jacobian.nii.gz``, ``metrics.json``, ``qa/*.png``, and for a method that matches points (QuizRigid)
``matched_points.csv``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .case import MatchedPoints, Progress, RegisterOptions, RegistrationCase, RegistrationResult, no_progress
from .dicomrt import Structure, read_dataset, read_rtdose, read_rtplan, read_rtstruct, write_rtstruct
from .errors import InputError
from .field import SpatialTransform, invert, jacobian_determinant, warp, write_field, write_transform
from .image import Volume, read_volume, resample, write_volume
from .methods import Register, get_method
from .metrics import jacobian_stats, mse, ncc, ssim
from .priors import body_mask
from .roles import guess_roles, safe_name
from . import qa

_PALETTE = [(255, 0, 0), (0, 255, 0), (0, 128, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
            (255, 128, 0), (128, 0, 255)]
_IMAGE_RE = re.compile(r"\.(nii|nii\.gz|nrrd|mha|mhd)$", re.I)


def check_writable(out: Path) -> None:
    """Create ``out`` and prove we can write there, before any work is done."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise InputError(f"the output folder {out} is not writable ({exc.strerror}); choose another --out") from None


def load_structures(path: Path, fixed: Volume, allow_frame_mismatch: bool = False) -> List[Structure]:
    """An RTSTRUCT file, a folder holding one, or a folder / file of binary masks -> structures on the fixed grid.

    Empty structures are kept (a run uses what is valid; ``run_registration`` says which ones are empty)."""
    if not path.exists():
        raise InputError(f"structures {path} do not exist")
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    dicoms = [f for f in files if f.suffix.lower() == ".dcm" or (path.is_file() and not _IMAGE_RE.search(f.name))]
    rts = [f for f in dicoms if str(read_dataset(f, stop_before_pixels=True).get("Modality", "")) == "RTSTRUCT"]
    if rts:
        return read_rtstruct(rts[0], fixed, check_frame=not allow_frame_mismatch)
    masks = [f for f in files if _IMAGE_RE.search(f.name)]
    if not masks:
        raise InputError(f"no RTSTRUCT or mask images in {path}")
    out = []
    for i, f in enumerate(masks):
        vol = read_volume(f)
        if vol.grid.same_as(fixed.grid):
            m = (vol.array > 0).astype(np.uint8)
        else:
            m = resample(vol, fixed.grid, "mask").array
        name = vol.meta.get("name", f.stem)
        out.append(Structure(name, i + 1, _PALETTE[i % len(_PALETTE)], m))
    return out


def load_dose(path: Path) -> Volume:
    """An RTDOSE (Gy, scaled) or a dose image taken to be in Gy."""
    if path.suffix.lower() == ".dcm":
        return read_rtdose(path)
    dose = read_volume(path)
    dose.meta.update(units="Gy", modality="RTDOSE")
    dose.array = dose.array.astype(np.float32)
    return dose


def load_plan(plan: str):
    """An RTPLAN file, a text file, or the text itself -> (PlanSummary or None, text)."""
    p = Path(plan)
    if len(plan) < 4096 and p.exists() and p.is_file():
        if p.suffix.lower() == ".dcm":
            summary = read_rtplan(p)
            return summary, summary.text()
        return None, p.read_text().strip()
    return None, plan.strip()


def read_mask(path: str, fixed: Volume) -> Volume:
    """A mask image (non-zero = inside) on the fixed grid (resampled there if it has another grid)."""
    mk = read_volume(path)
    arr = mk.array > 0 if mk.grid.same_as(fixed.grid) else resample(mk, fixed.grid, "mask").array > 0
    return fixed.with_array(arr.astype(np.uint8), name="fixed mask")


def load_case(fixed: str, moving: str, fixed_mask: Optional[str] = None, structures: Optional[str] = None,
              dose: Optional[str] = None, plan: Optional[str] = None, same_frame: Optional[bool] = None,
              allow_frame_mismatch: bool = False, target: Optional[str] = None,
              oars: Optional[List[str]] = None, query_points: Optional[str] = None) -> RegistrationCase:
    """Read every input named on the command line into a RegistrationCase (inputs are only read).

    ``target``/``oars`` name structures by role; without them the roles are guessed from the names
    (:func:`rtreg.roles.guess_roles`: the CTV, else GTV, is the target, the other organs are at risk)."""
    f, m = read_volume(fixed), read_volume(moving)
    case = RegistrationCase(f, m, same_frame=same_frame)
    if fixed_mask:
        case.fixed_mask = read_mask(fixed_mask, f)
    if structures:
        case.structures = load_structures(Path(structures), f, allow_frame_mismatch)
        names = [st.name for st in case.structures]
        guessed_target, guessed_oars, _ = guess_roles(names)
        case.target = target or guessed_target          # named roles are matched in RegistrationCase.validate
        case.oars = list(oars) if oars is not None else guessed_oars
    elif target or oars:
        raise InputError("--target/--oars name structures, but no --fixed-structures were given; add them")
    if dose:
        if not Path(dose).exists():
            raise InputError(f"dose {dose} does not exist")
        try:
            case.dose = load_dose(Path(dose))
        except InputError as exc:   # unusable content: the run goes on without it, and says so
            case.notes.append(f"the dose was left out (no risk map, no mapped dose): {exc}")
    if case.dose is not None:
        ffor, dfor = f.meta.get("frame_of_reference", ""), case.dose.meta.get("frame_of_reference", "")
        if ffor and dfor and ffor != dfor and not allow_frame_mismatch:
            raise InputError(f"the dose is in frame of reference {dfor}, the fixed image in {ffor}: the dose "
                             "belongs to another image; give the planning CT's dose (or --allow-frame-mismatch)")
    if plan:
        case.plan, case.plan_text = load_plan(plan)
    if query_points:
        case.query_points = read_points(Path(query_points))
    return case


def read_points(path: Path) -> np.ndarray:
    """(N, 3) LPS mm points from a CSV (a header row naming columns x, y, z, in LPS mm), a Slicer markups
    JSON (``.mrk.json``, LPS or RAS) or a Slicer fiducial list (``.fcsv``, LPS or RAS as its header says)."""
    if not path.is_file():
        raise InputError(f"the points file {path} does not exist")
    name = path.name.lower()
    try:
        if name.endswith(".json"):
            doc = json.loads(path.read_text())
            rows = []
            for markup in doc.get("markups", []):
                ras = markup.get("coordinateSystem", "LPS") == "RAS"
                for cp in markup.get("controlPoints", []):
                    p = np.asarray(cp["position"], np.float64)
                    rows.append(p * [-1, -1, 1] if ras else p)
            pts = np.array(rows, np.float64).reshape(-1, 3)
        elif name.endswith(".fcsv"):
            lines = path.read_text().splitlines()
            ras = not any("CoordinateSystem" in ln and ("LPS" in ln or "= 1" in ln) for ln in lines if ln.startswith("#"))
            rows = [[float(v) for v in ln.split(",")[1:4]] for ln in lines if ln.strip() and not ln.startswith("#")]
            pts = np.array(rows, np.float64).reshape(-1, 3) * ([-1, -1, 1] if ras else 1)
        else:
            import csv
            with open(path, newline="") as fh:
                table = list(csv.DictReader(fh))
            pts = np.array([[float(r["x"]), float(r["y"]), float(r["z"])] for r in table], np.float64).reshape(-1, 3)
    except (KeyError, ValueError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read points from {path}: {exc}; give a CSV with columns x,y,z (LPS mm) or a "
                         "Slicer markups file") from None
    if len(pts) == 0:
        raise InputError(f"{path} holds no points")
    return pts


class SimilarityReport:
    """NCC, SSIM and MSE inside a mask on the fixed grid coarsened to 2 mm (for speed); the fixed image and
    the mask are resampled once, each moving image once."""

    def __init__(self, fixed: Volume, mask: np.ndarray):
        self.grid = fixed.grid.with_spacing(2.0)
        self.fixed = resample(fixed, self.grid).array
        self.mask = resample(fixed.with_array(mask.astype(np.uint8)), self.grid, "mask").array

    def __call__(self, moving_on_fixed: Volume) -> Dict[str, float]:
        m = resample(moving_on_fixed, self.grid).array
        return {"ncc": ncc(self.fixed, m, self.mask), "ssim": ssim(self.fixed, m, self.mask),
                "mse": mse(self.fixed, m, self.mask)}


# everything a registration writes into its output folder, and what ``rtreg eval`` and ``--report`` add to it
OUTPUTS = ("transform.h5", "displacement.mha", "warped_moving.nii.gz", "structures_on_moving",
           "rtstruct_on_moving.dcm", "dose_on_moving.nii.gz", "jacobian.nii.gz", "metrics.json", "qa",
           "matched_points.csv", "report.html", "eval.json")


def run_registration(case: RegistrationCase, method: str, options: RegisterOptions, out: Path,
                     progress: Progress = no_progress, command: str = "",
                     register: Optional[Register] = None) -> Dict:
    """Register, write all outputs into ``out`` and return the metrics dictionary (also metrics.json).

    ``register``: the function that registers (default: ``method``'s), e.g. one that holds a network across
    the frames of a series. The outputs are written into a hidden folder inside ``out`` and moved into ``out``
    only when every one is written: a run that fails (bad input found by the method, an error while writing)
    leaves ``out`` as it was, and removes it if this run created it. A run that succeeds first removes every
    earlier output of ours (:data:`OUTPUTS`: e.g. a mapped dose or a report this run does not write); other
    files in ``out`` are kept."""
    out = Path(out)
    created = not out.exists()
    check_writable(out)
    staging = Path(tempfile.mkdtemp(prefix=".rtreg-partial-", dir=out))
    try:
        metrics = _register_into(case, method, options, staging, progress, command, register)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    for name in OUTPUTS:      # an earlier run's outputs that this run does not write would pass for its own
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    for item in staging.iterdir():     # same file system: each move is a rename
        target = out / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)
    staging.rmdir()
    progress(1.0, f"done: outputs in {out}")
    return metrics


def _register_into(case: RegistrationCase, method: str, options: RegisterOptions, out: Path, progress: Progress,
                   command: str, register: Optional[Register]) -> Dict:
    """:func:`run_registration`'s work: register, then write every output into ``out``."""
    register = register or get_method(method)
    t0 = time.perf_counter()
    result: RegistrationResult = register(case, options, lambda f, m: progress(0.05 + 0.7 * f, m))
    t_reg = time.perf_counter()
    progress(0.76, "writing the transform")
    fixed, moving = case.fixed, case.moving
    write_transform(result.transform, out / "transform.h5")
    total = result.transform.total_field(fixed.grid)
    write_field(total, out / "displacement.mha")
    fill = float(moving.array.min())
    warped = warp(moving, result.transform, fixed.grid, fill=fill)
    write_volume(warped, out / "warped_moving.nii.gz", np.int16 if moving.meta.get("units") == "HU" else None)
    progress(0.82, "inverting the transform for structures and dose")
    inverse = invert(result.transform, moving.grid)
    on_moving = propagate_structures(case.structures, fixed, inverse.transform, moving, out / "structures_on_moving")
    if on_moving:
        write_rtstruct([Structure(s.name, s.number, s.color, on_moving[s.name], s.roi_type) for s in case.structures
                        if on_moving[s.name].any()], moving, out / "rtstruct_on_moving.dcm", f"rtreg {method}",
                       f"Planning structures propagated to the repeat image by rtreg ({method}); check before use")
    if case.dose is not None:
        dose_m = warp(case.dose, inverse.transform, moving.grid, "linear", fill=0.0)
        dose_m.meta.update(units="Gy", modality="RTDOSE")
        write_volume(dose_m, out / "dose_on_moving.nii.gz", np.float32)
    progress(0.88, "QA")
    jac = jacobian_determinant(total)
    write_volume(jac, out / "jacobian.nii.gz", np.float32)
    body = case.fixed_mask.array if case.fixed_mask is not None else body_mask(fixed)
    body = body if body.any() else np.ones(fixed.array.shape, np.uint8)
    before = resample(moving, fixed.grid, fill=fill)
    pre = warp(moving, SpatialTransform(result.prealignment), fixed.grid, fill=fill)
    similarity = SimilarityReport(fixed, body)
    metrics = {
        "method": method, "device": result.device, "command": command,
        "fixed": fixed.meta.get("path", ""), "moving": moving.meta.get("path", ""),
        "options": {k: v for k, v in vars(options).items()},
        "timings_s": dict(result.timings, registration_total=t_reg - t0),
        "similarity_before": similarity(before),
        "similarity_after_prealignment": similarity(pre),
        "similarity_after": similarity(warped),
        "jacobian": jacobian_stats(jac, body),
        "inverse_residual_mm": {"mean": inverse.residual_mean_mm, "max": inverse.residual_max_mm,
                                "iterations": inverse.iterations},
        "prealignment_matrix_lps": result.prealignment.tolist(),
        "transform_kind": "linear" if result.transform.displacement is None else "deformable",
        "method_qa": result.qa,
        "messages": case.notes + [f"structure {s.name!r} is empty on the planning image; it is carried as an "
                                  "empty structure" for s in case.structures if s.empty] + result.messages,
        "structures_on_moving": sorted(on_moving), "dose_mapped": case.dose is not None,
        "roles": {"target": case.target, "oars": case.oars,
                  "body": "fixed mask" if case.fixed_mask is not None else "CT threshold (body_mask)"},
        "structure_volumes_cc": _volumes_cc(case.structures, fixed, on_moving, moving),
        "plan_text": case.plan_text,
    }
    _qa_figures(case, before, warped, jac, total, on_moving, out / "qa", body)
    _method_maps(result.maps, out / "qa")
    if result.matched_points is not None:
        write_matched_points(result.matched_points, out / "matched_points.csv")
        metrics["matched_points"] = "matched_points.csv"
    metrics["timings_s"]["total"] = time.perf_counter() - t0
    (out / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=2))
    return metrics


def _volumes_cc(structures: List[Structure], fixed: Volume, on_moving: Dict[str, np.ndarray],
               moving: Volume) -> Dict[str, Dict[str, float]]:
    """Volume (cm3) of each structure on the planning image and carried onto the repeat image."""
    vf, vm = float(np.prod(fixed.grid.spacing)) / 1000.0, float(np.prod(moving.grid.spacing)) / 1000.0
    return {s.name: {"planning": float(s.mask.sum()) * vf, "on_moving": float(on_moving[s.name].sum()) * vm}
            for s in structures}


def _qa_figures(case, before, warped, jac, total, on_moving, qa_dir: Path, body) -> None:
    fixed = case.fixed
    ctv_name = case.target
    focus = next(s.mask for s in case.structures if s.name == ctv_name) if ctv_name else body
    centre = np.argwhere(focus).mean(0)
    qa.overlay_figure(fixed, before, qa_dir / "overlay_before.png", "before", centre)
    qa.overlay_figure(fixed, warped, qa_dir / "overlay_after.png", "after", centre)
    qa.checkerboard_figure(fixed, warped, qa_dir / "checkerboard_after.png", centre)
    qa.map_figure(jac, qa_dir / "jacobian.png", "Jacobian determinant", centre, "RdBu_r", 0.0, 2.0, "|J|")
    mag = total.with_array(np.linalg.norm(total.array, axis=-1))
    qa.map_figure(mag, qa_dir / "displacement_magnitude.png", "displacement", centre, "magma", 0.0,
                  max(float(np.percentile(mag.array, 99.5)), 1e-3), "mm")
    if on_moving:
        moving = case.moving
        target = on_moving.get(ctv_name) if ctv_name else None
        m_centre = np.argwhere(target).mean(0) if target is not None and target.any() else \
            (np.array(moving.array.shape) - 1) / 2
        qa.contours_figure(moving, on_moving, {s.name: s.color for s in case.structures},
                           qa_dir / "structures_on_moving.png", "propagated structures", m_centre)


def _method_maps(maps: Dict[str, Volume], qa_dir: Path) -> None:
    """A method's QA volumes: ``qa/<name>.nii.gz`` and a figure ``qa/<name>.png`` through their centre, all on
    one colour scale."""
    if not maps:
        return
    top = max(max(float(v.array.max()) for v in maps.values()), 1e-6)
    for name, vol in maps.items():
        write_volume(vol, qa_dir / f"{name}.nii.gz", np.float32)
        qa.map_figure(vol, qa_dir / f"{name}.png", f"{vol.meta.get('name', name)} ({name.split('_')[-1]})",
                      (np.array(vol.array.shape) - 1) / 2, "viridis", 0.0, top, vol.meta.get("units", ""))


def write_matched_points(points: MatchedPoints, path: Path) -> None:
    """One CSV row per point: fixed and moving position (LPS mm), displacement (mm), confidence, inlier."""
    rows = points.rows()
    with open(path, "w") as fh:
        fh.write(",".join(rows[0]) + "\n")
        for r in rows:
            fh.write(",".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + "\n")


def propagate_structures(structures: List[Structure], fixed: Volume, inverse: SpatialTransform, moving: Volume,
                         folder: Optional[Path] = None) -> Dict[str, np.ndarray]:
    """Carry fixed-image structures onto the moving grid through ``inverse`` (moving point -> fixed point);
    with ``folder``, also write each as ``<folder>/<ROI>.nii.gz``."""
    on_moving: Dict[str, np.ndarray] = {}
    for s in structures:
        m = warp(fixed.with_array(s.mask), inverse, moving.grid, "mask").array
        on_moving[s.name] = m
        if folder is not None:
            write_volume(moving.with_array(m), folder / structure_filename(s.name), np.uint8)
    return on_moving


def structure_filename(name: str) -> str:
    """File name of a propagated structure: the ROI name with unsafe characters replaced, + .nii.gz."""
    return safe_name(name) + ".nii.gz"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    return obj
