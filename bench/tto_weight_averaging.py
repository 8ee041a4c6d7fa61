"""Does where TTORegister's budget stops decide its result? One test-time optimisation of 100 iterations per
phantom (the shipped student, the default loss and learning rate); after every second iteration from the 60th
on (where the 60 s budget stops it on 2 CPU cores), the mean TRE (mm) of the phantom's points with

* the last iterate's weights (``weight_averaging`` 0, what TTORegister returned before), and
* their running average, as :func:`rtreg.methods.tto.adapt` keeps it (``WEIGHT_AVERAGING`` 0.9, the default),

on three RT phantoms that the benchmark does not use (pelvis seed 13, thorax seed 5, head and neck seed 7;
4 mm). Printed: the mean, the spread (max - min) and the largest change between two stops two iterations
apart, over the 21 stops.

    python3 bench/tto_weight_averaging.py          (about 6 minutes on 2 cores; no data needed)
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from rtreg.case import RegisterOptions, RegistrationCase
from rtreg.device import seed_everything
from rtreg.field import SpatialTransform
from rtreg.methods import tto
from rtreg.metrics import tre
from rtreg.synth import rt_phantom

PHANTOMS = (("pelvis", 13), ("thorax", 5), ("headneck", 7))
ITERATIONS, FIRST_STOP, EVERY = 100, 60, 2


def trace(site: str, seed: int) -> dict:
    """TRE at each stop, for the last iterate and for the running average; and the TRE after the rigid fit."""
    phantom = rt_phantom(site, seed=seed, spacing_mm=4.0, n_points=200)
    case = RegistrationCase(phantom.planning, phantom.repeat)
    options = RegisterOptions(device="cpu")
    cpu = torch.device("cpu")
    seed_everything(options.seed)
    pair = tto.working_pair(case, options, cpu, [])
    net = tto.load_network("student", cpu)
    average = copy.deepcopy(net)
    errors = {"last iterate": [], "running average": []}

    def error(model) -> float:
        moved = tto.network_transform(model, pair, case.fixed.grid).transform_points(phantom.points_planning)
        return tre(moved, phantom.points_repeat)["mean"]

    def after_step(fraction: float, _message: str) -> None:
        it = int(round(fraction * ITERATIONS))
        with torch.no_grad():
            for avg, p in zip(average.parameters(), net.parameters()):
                avg.lerp_(p, 1.0 - tto.WEIGHT_AVERAGING)
        if it >= FIRST_STOP and (it - FIRST_STOP) % EVERY == 0:
            errors["last iterate"].append(error(net))
            errors["running average"].append(error(average))
            net.train()

    tto.adapt(net, pair.fixed, pair.moving, pair.mask, pair.use_ncc, ITERATIONS, 1e9, weight_averaging=0.0,
              warp_moving=pair.warped, progress=after_step)
    rigid = tre(SpatialTransform(pair.affine).transform_points(phantom.points_planning), phantom.points_repeat)
    return {"rigid": rigid["mean"], **errors}


def main() -> None:
    torch.set_num_threads(2)
    print(f"TRE (mm) at {len(range(FIRST_STOP, ITERATIONS + 1, EVERY))} stops, iterations {FIRST_STOP}-{ITERATIONS} "
          f"every {EVERY}\n")
    print("| phantom | after rigid | weights returned | mean | spread | largest change between stops | at 60 / 80 / 100 "
          "|\n|---|---|---|---|---|---|---|")
    for site, seed in PHANTOMS:
        result = trace(site, seed)
        for name in ("last iterate", "running average"):
            e = np.array(result[name])
            picks = " / ".join(f"{e[(n - FIRST_STOP) // EVERY]:.2f}" for n in (60, 80, 100))
            print(f"| {site}-{seed} | {result['rigid']:.2f} | {name} | {e.mean():.2f} | {np.ptp(e):.2f} | "
                  f"{np.abs(np.diff(e)).max():.2f} | {picks} |", flush=True)


if __name__ == "__main__":
    main()
