"""Run methods on cases, each in its own process, and score every output the same way.

For every (case, method): the method runs in a child process (``bench.run_one``)
with 2 threads; its wall time and its peak resident memory (with the programs it
starts) come from the child. The harness
then carries the case's fixed-image structures onto the moving grid through the
inverse of the method's mapping (the same code ``rtreg register`` uses) and
scores the output with ``rtreg.evaluation.evaluate_result``. A method that
fails or is missing is recorded as such, never silently dropped.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from rtreg.evaluation import evaluate_result
from rtreg.field import invert, read_transform, warp, write_field
from rtreg.image import read_volume
from rtreg.pipeline import SimilarityReport, load_structures, propagate_structures
from rtreg.priors import body_mask, signed_distance_mm
from rtreg.roles import guess_roles

from .methods import Method
from .suites import CaseSpec, build_case, describe

REPO = Path(__file__).resolve().parent.parent
THREADS = 2
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")


@dataclass
class Row:
    """One method on one case: status, accuracy, cost."""

    suite: str
    case: str
    method: str
    status: str                         # ok | failed | unavailable | not applicable
    message: str = ""
    seconds: Optional[float] = None
    peak_mb: Optional[float] = None
    tre: Dict = field(default_factory=dict)                 # mean, median, p95, max, n (mm)
    point_errors: List[float] = field(default_factory=list)
    structures: Dict = field(default_factory=dict)          # name -> dice, hd95_mm, relative_volume_difference
    jacobian: Dict = field(default_factory=dict)
    similarity: Dict = field(default_factory=dict)          # ncc, ssim, mse inside the planning body
    target_point_errors: List[float] = field(default_factory=list)   # TRE of points within 20 mm of the target
    translation_error_mm: Optional[float] = None   # |mean over the points of (mapped - true position)|


def thread_environment(threads: int = THREADS) -> Dict[str, str]:
    env = dict(os.environ)
    env.update({k: str(threads) for k in THREAD_VARIABLES})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def machine() -> Dict:
    """What the timings were measured on."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores_available": os.cpu_count(), "threads_per_method": THREADS,
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def _run_child(method: Method, case_dir: Path, out: Path, timeout_s: float) -> tuple:
    """(returncode, tail of its log) of ``bench.run_one`` for this method and case; -9 when it timed out."""
    log = out / "child.log"
    out.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "bench.run_one", "--method", method.name,
                                 "--case", str(case_dir.resolve()), "--out", str(out.resolve())], cwd=out,
                                env=thread_environment(), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            return -9, f"timed out after {timeout_s:.0f} s"
    return code, log.read_text()[-1500:]


NEAR_TARGET_MM = 20.0


def _score(spec: CaseSpec, case_dir: Path, result: Path) -> Dict:
    """Propagate the case's structures with the method's mapping, then ``evaluate_result``; add the image
    similarity in the planning body and the errors of the points within 20 mm of the target."""
    transform = read_transform(result / "displacement.mha")
    planning = read_volume(case_dir / "planning_ct.nii.gz")
    repeat = read_volume(case_dir / "repeat_ct.nii.gz")
    structures = load_structures(case_dir / "structures", planning)
    inverse = invert(transform, repeat.grid)
    propagate_structures(structures, planning, inverse.transform, repeat, result / "structures_on_moving")
    ev = evaluate_result(case_dir, result)
    body = body_mask(planning)
    ev["similarity"] = SimilarityReport(planning, body)(warp(repeat, transform, planning.grid,
                                                             fill=float(repeat.array.min())))
    ev["target_point_errors"] = []
    if not (case_dir / "points_planning.csv").exists():      # a pair whose truth is contours only
        return ev
    points = np.loadtxt(case_dir / "points_planning.csv", delimiter=",", ndmin=2)
    truth = np.loadtxt(case_dir / "points_repeat_truth.csv", delimiter=",", ndmin=2)
    ev["translation_error_mm"] = float(np.linalg.norm((transform.transform_points(points) - truth).mean(0)))
    target, _, _ = guess_roles([st.name for st in structures])
    errors = ev.get("tre_mm", {}).get("errors", [])
    if target and errors:
        mask = next(st.mask for st in structures if st.name == target)
        distance = signed_distance_mm(mask, planning.grid.spacing)
        idx = np.clip(np.round(planning.grid.world_to_index(points)).astype(int), 0,
                      np.array(planning.grid.size_xyz) - 1)
        near = distance[idx[:, 2], idx[:, 1], idx[:, 0]] <= NEAR_TARGET_MM
        ev["target_point_errors"] = [float(e) for e, n in zip(errors, near) if n]
    return ev


def _row(spec: CaseSpec, method: str, ev: Dict, **kw) -> Row:
    tre = {k: v for k, v in ev.get("tre_mm", {}).items() if k != "errors"}
    return Row(spec.suite, spec.name, method, point_errors=ev.get("tre_mm", {}).get("errors", []), tre=tre,
               structures=ev.get("structures", {}), jacobian=ev.get("jacobian", {}),
               similarity=ev.get("similarity", {}), target_point_errors=ev.get("target_point_errors", []),
               translation_error_mm=ev.get("translation_error_mm"), **kw)


def before_row(spec: CaseSpec, case_dir: Path, out: Path) -> Row:
    """The case as it stands before any registration (identity mapping)."""
    result = out / "before"
    planning = read_volume(case_dir / "planning_ct.nii.gz")
    write_field(planning.with_array(np.zeros(planning.array.shape + (3,), np.float32)),
                result / "displacement.mha")
    return _row(spec, "before", _score(spec, case_dir, result), status="ok", seconds=0.0)


def run_case(spec: CaseSpec, methods: List[Method], cases_dir: Path, results_dir: Path, spacing_mm: float,
             timeout_s: float = 1800.0, log=None) -> List[Row]:
    """Build (or reuse) the case, then run and score every method on it."""
    log = log or (lambda text: print(text, flush=True))
    case_dir = build_case(spec, cases_dir / spec.suite / spec.name, spacing_mm)
    out = results_dir / spec.suite / spec.name
    rows = [before_row(spec, case_dir, out)]
    multimodal = bool(describe(case_dir)["multimodal"])
    for method in methods:
        if method.suites and spec.suite not in method.suites:
            continue
        if not method.available():
            rows.append(Row(spec.suite, spec.name, method.name, "unavailable",
                            f"the module {method.package} is not installed: run `python3 -m bench setup`"))
        elif multimodal and method.same_modality_only:
            rows.append(Row(spec.suite, spec.name, method.name, "not applicable",
                            "assumes the same modality (intensity differences drive it)"))
        else:
            result = out / method.name
            code, tail = _run_child(method, case_dir, result, timeout_s)
            run = json.loads((result / "run.json").read_text()) if (result / "run.json").exists() else {}
            if code != 0 or "seconds" not in run:
                msg = run.get("error") or tail.strip().splitlines()[-1:] or [f"exit {code}"]
                rows.append(Row(spec.suite, spec.name, method.name, "failed", str(msg if isinstance(msg, str)
                                                                                    else msg[0])[:300],
                                peak_mb=run.get("peak_mb")))
            else:
                rows.append(_row(spec, method.name, _score(spec, case_dir, result), status="ok",
                                 seconds=run["seconds"], peak_mb=run["peak_mb"]))
        r = rows[-1]
        log(f"  {spec.suite:13s} {spec.name:22s} {r.method:12s} {r.status:8s} "
            + (f"TRE {r.tre['mean']:6.2f} mm  " if r.status == "ok" and r.tre else "")
            + (f"Dice {np.mean([m['dice'] for m in r.structures.values()]):.3f}  " if r.status == "ok" and r.structures
               else "")
            + (f"{r.seconds:7.1f} s  {r.peak_mb or 0:7.0f} MB" if r.status == "ok" else r.message[:90]))
    return rows


def save_rows(rows: List[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(asdict(r)) for r in rows) + "\n")


def load_rows(path: Path) -> List[Row]:
    return [Row(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
