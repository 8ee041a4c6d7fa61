"""TTORegister's test-time optimisation on a CPU with the network in the default and in the channels-last 3D
layout (:func:`rtreg.nets.tto.on_device`), in the same run (2 threads):

the seconds per iteration of :func:`rtreg.methods.tto.adapt` (multi-axis MI + local NCC + smoothness +
divergence, the shipped student and teacher) on the pelvis phantom's planning and repeat CT, resampled to
the CPU working grid's size (64 x 48 x 48 voxels), and how far the two layouts' fields differ after it.

    python3 bench/tto_layout_speed.py          (about 2 minutes; no data needed)
"""
from __future__ import annotations

import time

import numpy as np
import torch

from rtreg.image import Grid, normalize_intensity, resample
from rtreg.methods import tto
from rtreg.spatial import to_tensor
from rtreg.synth import rt_phantom

ITERATIONS = 10
REPEATS = 2


def pair() -> tuple:
    """(fixed, moving, mask) (1, 1, 64, 48, 48) tensors in [0, 1]: the pelvis phantom's planning and repeat
    CT (seed 13) over the planning CT's extent, and where the planning CT is above 5 % of its range (its body)."""
    case = rt_phantom("pelvis", seed=13, spacing_mm=4.0)
    g = case.planning.grid
    shape = (64, 48, 48)
    spacing = g.spacing * np.array(g.shape[::-1]) / np.array(shape[::-1])
    grid = Grid.from_geometry(shape, spacing, g.affine[:3, 3], g.direction)
    cpu = torch.device("cpu")
    images = [to_tensor(normalize_intensity(resample(v, grid, fill=float(v.array.min()))), cpu)
              for v in (case.planning, case.repeat)]
    return images[0], images[1], (images[0] > 0.05).float()


def run(role: str, channels_last: bool, fixed, moving, mask) -> tuple:
    net = tto.load_network(role, torch.device("cpu"))             # channels-last on a CPU (on_device)
    if not channels_last:
        net = net.to(memory_format=torch.contiguous_format)
    torch.manual_seed(0)
    start = time.perf_counter()
    tto.adapt(net, fixed, moving, mask, True, ITERATIONS, 1e9)
    seconds = (time.perf_counter() - start) / ITERATIONS
    with torch.no_grad():
        return seconds, net(fixed, moving).contiguous()


def main() -> None:
    torch.set_num_threads(2)
    fixed, moving, mask = pair()
    print(f"{ITERATIONS} iterations of the test-time optimisation, {tuple(fixed.shape[2:])} voxels, 2 threads, "
          f"best of {REPEATS}\n")
    print("| network | default layout, s / iteration | channels-last 3D, s / iteration | ratio | max field difference "
          "(voxels) |\n|---|---|---|---|---|")
    for role in ("student", "teacher"):
        times = {False: [], True: []}
        fields = {}
        for _ in range(REPEATS):
            for layout in (False, True):
                seconds, fields[layout] = run(role, layout, fixed, moving, mask)
                times[layout].append(seconds)
        a, b = min(times[False]), min(times[True])
        diff = float((fields[False] - fields[True]).abs().max())
        print(f"| {role} | {a:.3f} | {b:.3f} | {b / a:.2f} | {diff:.2e} |")


if __name__ == "__main__":
    main()
