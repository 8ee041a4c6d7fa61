"""ProtonDIR's speed and memory: network inference on a 256x256x128 pair and peak memory on a 512x512x200 pair.

Each size runs ``rtreg.methods.protondir.register`` without refinement (the network path: pre-alignment,
priors, text, network, field at full resolution) in its own process with 2 threads, on a pelvis RT phantom
(structures, dose, plan) resampled to the size over the phantom's 384x288x192 mm extent. Printed per size:
the network's own time (forward pass), the time to resample its inputs, the whole call, the network's grid, the process's peak resident memory, and the
goals of the ProtonDIR issue (network <= 5 s for 256x256x128 on 2 CPU cores; peak <= 6 GB for 512x512x200).
With a GPU the same runs are repeated on it.

    python3 bench/protondir_speed.py
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

SIZES = {"256x256x128": (128, 256, 256), "512x512x200": (200, 512, 512)}    # (z, y, x)
GOALS = {"256x256x128": ("network_s", 5.0, "s"), "512x512x200": ("peak_gb", 6.0, "GB")}


def one(label: str, device: str) -> dict:
    """Run in the child: build the pair, register once to load the weights, then once timed."""
    import numpy as np
    import torch
    from rtreg.case import RegisterOptions, RegistrationCase
    from rtreg.image import Grid, resample
    from rtreg.methods import protondir
    from rtreg.roles import guess_roles
    from rtreg.synth import rt_phantom
    c = rt_phantom("pelvis", seed=0, spacing_mm=3.0)
    shape = SIZES[label]
    extent = (np.array(c.planning.grid.size_xyz) - 1) * c.planning.grid.spacing
    spacing = extent / (np.array(shape[::-1]) - 1)

    def on(volume, fill):
        g = Grid.from_geometry(shape, spacing, volume.grid.origin, volume.grid.direction)
        return resample(volume, g, "linear", None, fill)

    planning, repeat = on(c.planning, -1000.0), on(c.repeat, -1000.0)
    structures = [type(s)(s.name, s.number, s.color, resample(c.planning.with_array(s.mask), planning.grid,
                                                              "mask").array) for s in c.planning_structures]
    target, oars, _ = guess_roles([s.name for s in structures])
    case = RegistrationCase(planning, repeat, structures=structures, dose=c.dose, plan=c.plan, target=target,
                            oars=oars)
    options = RegisterOptions(device=device, extra={"refine": False})
    protondir.register(case, options)                       # loads the weights and the text encoder once
    if device == "cuda":
        torch.cuda.synchronize()
    result = protondir.register(case, options)
    return {"size": label, "device": result.device, "network_s": result.timings["network_s"],
            "inputs_s": result.timings["network_inputs_s"],
            "total_s": result.timings["total_s"], "grid": result.qa["network_grid"],
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2], sys.argv[3])))
        return 0
    import torch
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS="2")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("| pair | device | network | its inputs (resampling) | whole call (no refinement) | network grid "
          "| peak memory | goal |")
    print("|---|---|---|---|---|---|---|---|")
    for device in devices:
        for label in SIZES:
            run = subprocess.run([sys.executable, __file__, "--one", label, device], env=env, capture_output=True,
                                 text=True, cwd=Path(__file__).resolve().parent.parent)
            if run.returncode != 0:
                print(f"| {label} | {device} | failed: {run.stderr.strip().splitlines()[-1:]} | | | | | |")
                continue
            r = json.loads(run.stdout.strip().splitlines()[-1])
            key, limit, unit = GOALS[label]
            met = "met" if r[key] <= limit else "NOT met"
            print(f"| {label} | {r['device']} | {r['network_s']:.2f} s | {r['inputs_s']:.1f} s | {r['total_s']:.1f} s | "
                  f"{'x'.join(map(str, r['grid']))} | {r['peak_gb']:.2f} GB | {key.split('_')[0]} <= {limit:g} {unit}: "
                  f"{met} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
