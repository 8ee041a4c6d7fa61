"""How TTORegister's accuracy moves with its iterations across modalities, for multi-axis MI of 16 and of 32
intensity bins. One test-time optimisation of 100 iterations per case and bin count (the shipped student, the
default loss, learning rate and pre-alignment; by MI, as the benchmark runs it across modalities); every 10
iterations, the mean TRE (mm) of the case's 300 points with the running average of the weights (what
:func:`rtreg.methods.tto.adapt` returns if stopped there). Cases: the multimodal suite's T1-like MRs of the
thorax and the abdomen, where the truth is exact (the same anatomy in the same frame), built as the
benchmark builds them (3 mm, into ``bench_work/cases``; they need ``../shared/data``).

    python3 -m bench.tto_iterations          (about 6 minutes on 2 cores)
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import torch

from rtreg.case import RegisterOptions
from rtreg.device import seed_everything
from rtreg.methods import tto
from rtreg.metrics import tre
from rtreg.pipeline import load_case

from .suites import build_case, cases

CASES = ("thorax-t1-like", "abdomen-t1-like")
BINS = (16, 32)
ITERATIONS, EVERY = 100, 10
SPACING_MM = 3.0                    # the benchmark's default spacing


def trace(case_dir: Path, bins: int) -> list:
    """TRE (mm) of the running-average weights after 0, EVERY, 2 EVERY, ... ITERATIONS iterations."""
    case = load_case(str(case_dir / "planning_ct.nii.gz"), str(case_dir / "repeat_ct.nii.gz"))
    points = np.loadtxt(case_dir / "points_planning.csv", delimiter=",", ndmin=2)
    truth = np.loadtxt(case_dir / "points_repeat_truth.csv", delimiter=",", ndmin=2)
    options = RegisterOptions(device="cpu", similarity="mi")
    cpu = torch.device("cpu")
    seed_everything(options.seed)
    pair = tto.working_pair(case, options, cpu, [])
    net = tto.load_network("student", cpu)
    average = copy.deepcopy(net)

    def error() -> float:
        return tre(tto.network_transform(average, pair, case.fixed.grid).transform_points(points), truth)["mean"]

    errors = [error()]

    def after_step(fraction: float, _message: str) -> None:
        it = int(round(fraction * ITERATIONS))
        with torch.no_grad():
            for avg, p in zip(average.parameters(), net.parameters()):
                avg.lerp_(p, 1.0 - tto.WEIGHT_AVERAGING)
        if it % EVERY == 0:
            errors.append(error())
            net.train()

    tto.adapt(net, pair.fixed, pair.moving, pair.mask, pair.use_ncc, ITERATIONS, 1e9, weight_averaging=0.0,
              warp_moving=pair.warped, inside=pair.inside, mi_bins=bins, progress=after_step)
    return errors


def main() -> int:
    torch.set_num_threads(2)
    specs = {spec.name: spec for spec in cases()}
    stops = list(range(0, ITERATIONS + 1, EVERY))
    print("TRE (mm) of TTORegister's running-average weights after n iterations\n")
    print("| case | MI bins | " + " | ".join(f"n = {n}" for n in stops) + " |\n|---|---|" + "---|" * len(stops))
    for name in CASES:
        spec = specs[name]
        if not spec.available:
            print(f"{name} needs {spec.needs}, which is absent (see ../shared/data/README.md)", file=sys.stderr)
            return 1
        case_dir = build_case(spec, Path("bench_work/cases") / spec.suite / spec.name, SPACING_MM)
        for bins in BINS:
            print(f"| {name} | {bins} | " + " | ".join(f"{e:.2f}" for e in trace(case_dir, bins)) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
