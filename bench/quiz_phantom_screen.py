"""QuizRigid on 12 synthetic phantoms moved by 60 mm (up to 15 degrees), 100 % or 80 % field of view.

``python3 bench/quiz_phantom_screen.py`` prints, per case, the mean TRE (mm) of the full method (matching +
refinement), of the paper's translation without refinement, and of the rigid fit without refinement, or
``refused`` when QuizRigid found no reliable correspondence; then the counts and the time per run of the full
method (2 threads). Seeds 60-71 are used by no training source and no benchmark case.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from rtreg.case import RegisterOptions, RegistrationCase
from rtreg.errors import InputError
from rtreg.methods import quiz
from rtreg.synth import large_offset_case, rt_phantom

VARIANTS = {"full": {}, "translation, no refinement": {"mode": "translation", "refine": False},
            "rigid fit, no refinement": {"refine": False}}


def main() -> None:
    torch.set_num_threads(2)
    sites = ("pelvis", "thorax", "headneck")
    print(f"{'case':18s}" + "".join(f"{v:>28s}" for v in VARIANTS))
    full, seconds = [], []
    for i, seed in enumerate(range(60, 72)):
        site, keep = sites[i % 3], (1.0, 0.8)[i // 3 % 2]
        case = large_offset_case(rt_phantom(site, seed=seed).planning, seed=seed, keep_fraction=keep, n_points=100)
        cells = []
        for name, extra in VARIANTS.items():
            t0 = time.perf_counter()
            try:
                r = quiz.register(RegistrationCase(case.planning, case.repeat), RegisterOptions(device="cpu",
                                                                                              extra=extra))
                tre = float(np.linalg.norm(r.transform.transform_points(case.points_planning) - case.points_repeat,
                                           axis=1).mean())
                cells.append(f"{tre:26.1f} mm")
            except InputError:
                tre = None
                cells.append(f"{'refused':>28s}")
            if name == "full":
                full.append(tre)
                seconds.append(time.perf_counter() - t0)
        print(f"{site + ' ' + str(seed) + ' ' + str(int(keep * 100)) + '%':18s}" + "".join(cells), flush=True)
    ok = [t for t in full if t is not None]
    print(f"full method: {sum(t < 10 for t in ok)} accurate (< 10 mm; {min(ok):.1f}-{max(ok):.1f} mm), "
          f"{sum(t >= 10 for t in ok)} wrong, {full.count(None)} refused; {min(seconds):.2f}-{max(seconds):.2f} s a run")


if __name__ == "__main__":
    main()
