"""TTORegister's test-time optimisation on a CPU in three set-ups of the network, in the same run (2 threads):
float32 with the weights in the default layout, float32 in the channels-last 3D layout
(:func:`rtreg.nets.tto.on_device`), and channels-last with the passes in mixed bfloat16
(:func:`rtreg.device.network_precision`; what ``--precision auto`` picks on a CPU with AMX).

It prints the seconds per iteration of :func:`rtreg.methods.tto.adapt` (multi-axis MI + local NCC +
smoothness + divergence, the shipped student and teacher) on the pelvis phantom's planning and repeat CT,
resampled to the CPU working grid's size (64 x 48 x 48 voxels), each set-up's ratio to the default, and how
far each set-up's float32 field after the iterations lies from the default's.

    python3 bench/tto_network_speed.py          (about 3 minutes; no data needed)
"""
from __future__ import annotations

import time

import numpy as np
import torch

from rtreg.device import network_precision
from rtreg.image import Grid, normalize_intensity, resample
from rtreg.methods import tto
from rtreg.spatial import to_tensor
from rtreg.synth import rt_phantom

ITERATIONS = 10
REPEATS = 2
SETUPS = (("float32, default layout", False, torch.float32), ("float32, channels-last", True, torch.float32),
          ("bfloat16 mixed, channels-last", True, torch.bfloat16))


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


def run(role: str, channels_last: bool, precision: torch.dtype, fixed, moving, mask) -> tuple:
    """(seconds per iteration, the float32 field after the iterations) of one set-up."""
    net = tto.load_network(role, torch.device("cpu"))             # channels-last on a CPU (on_device)
    if not channels_last:
        net = net.to(memory_format=torch.contiguous_format)
    torch.manual_seed(0)
    start = time.perf_counter()
    tto.adapt(net, fixed, moving, mask, True, ITERATIONS, 1e9, precision=precision)
    seconds = (time.perf_counter() - start) / ITERATIONS
    with torch.no_grad():
        return seconds, net(fixed, moving).contiguous()


def main() -> None:
    torch.set_num_threads(2)
    fixed, moving, mask = pair()
    auto = network_precision(torch.device("cpu"), "auto")
    print(f"{ITERATIONS} iterations of the test-time optimisation, {tuple(fixed.shape[2:])} voxels, 2 threads, "
          f"best of {REPEATS}; --precision auto picks {str(auto).replace('torch.', '')} on this CPU\n")
    print("| network | set-up | s / iteration | ratio to the default | max field difference to the default "
          "(voxels) |\n|---|---|---|---|---|")
    for role in ("student", "teacher"):
        times = {name: [] for name, _, _ in SETUPS}
        fields = {}
        for _ in range(REPEATS):
            for name, layout, precision in SETUPS:
                seconds, fields[name] = run(role, layout, precision, fixed, moving, mask)
                times[name].append(seconds)
        base = SETUPS[0][0]
        for name, _, _ in SETUPS:
            diff = float((fields[name] - fields[base]).abs().max())
            print(f"| {role} | {name} | {min(times[name]):.3f} | {min(times[name]) / min(times[base]):.2f} | "
                  f"{diff:.2e} |")


if __name__ == "__main__":
    main()
