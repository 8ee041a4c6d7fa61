"""Peak memory when the repeat image's field of view is much larger than the planning image's.

The planning image (fixed) is the pelvis RT phantom (384x288x192 mm at 2 mm); the repeat (moving) is its
deformed repeat extended to 3 times its length along z by mirroring (a longer body, 576 mm). Each method
registers the pair at its defaults in its own process with 2 threads, twice: holding the moving image at the
working spacing only where the fixed grid maps onto it (:func:`rtreg.field.moving_view`, 50 mm margin; the
default) and over its whole field of view (the margin set to 10 m, as before the view). Printed per method:
peak resident memory and time of both, their ratio, and the mean TRE of both (the same points; the view must
not change the answer).

    python3 bench/moving_view_memory.py [--methods io,glide,tto]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def one(method: str, margin_mm: float) -> dict:
    """Run in the child: build the pair, register it once, report peak memory, time and TRE."""
    import numpy as np
    import torch
    from rtreg import field
    from rtreg.case import RegisterOptions, RegistrationCase
    from rtreg.image import Volume
    from rtreg.methods import get_method
    from rtreg.metrics import tre
    from rtreg.synth import rt_phantom
    torch.set_num_threads(2)
    field.VIEW_MARGIN_MM = margin_mm                                   # every caller's margin
    c = rt_phantom("pelvis", seed=11, spacing_mm=2.0)
    a = c.repeat.array
    longer = np.concatenate([a[::-1], a, a[::-1]], axis=0)            # z: mirrored above and below
    affine = c.repeat.affine.copy()
    affine[:3, 3] -= affine[:3, 2] * a.shape[0]                         # the original slab stays in place
    repeat = Volume(longer, affine, dict(c.repeat.meta))
    t0 = time.perf_counter()
    result = get_method(method)(RegistrationCase(c.planning, repeat), RegisterOptions(device="cpu"))
    return {"method": method, "seconds": time.perf_counter() - t0,
            "tre_mm": tre(result.transform.transform_points(c.points_planning), c.points_repeat)["mean"],
            "moving_voxels": int(np.prod(longer.shape)), "fixed_voxels": int(c.planning.array.size),
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2], float(sys.argv[3]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="io,glide,tto")
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS="2")
    print("| method | peak memory: view / whole moving image | ratio | time: view / whole | mean TRE: view / whole |")
    print("|---|---|---|---|---|")
    for method in args.methods.split(","):
        rows = []
        for margin in (50.0, 10_000.0):
            run = subprocess.run([sys.executable, __file__, "--one", method, str(margin)], env=env,
                                 capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
            if run.returncode != 0:
                rows.append(None)
                print(f"# {method} (margin {margin:g} mm) failed: {run.stderr.strip().splitlines()[-1:]}")
                continue
            rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
        if None in rows:
            continue
        view, whole = rows
        print(f"| {method} | {view['peak_gb']:.2f} / {whole['peak_gb']:.2f} GB | {view['peak_gb'] / whole['peak_gb']:.2f} "
              f"| {view['seconds']:.1f} / {whole['seconds']:.1f} s | {view['tre_mm']:.2f} / {whole['tre_mm']:.2f} mm |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
