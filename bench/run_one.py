"""Run one method on one case in a process of its own (the harness measures its peak memory).

``python -m bench.run_one --method NAME --case DIR --out DIR``: writes
``displacement.mha`` (the total fixed->moving field on the fixed grid, LPS mm)
and ``run.json`` (``seconds``: the method's wall time from reading its inputs to
returning the field; or ``error``). Exit status 0 on success, 1 on failure.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from rtreg.field import write_field

from .methods import by_name
from .suites import describe


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", required=True)
    ap.add_argument("--case", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "2")))
    case, out = Path(args.case), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    method = by_name()[args.method]
    info = describe(case)
    t0 = time.perf_counter()
    try:
        field = method.run(case / "planning_ct.nii.gz", case / "repeat_ct.nii.gz", out, bool(info["multimodal"]))
    except Exception as exc:  # a peer's failure is a result of the benchmark, recorded and reported
        (out / "run.json").write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}",
                                                  "traceback": traceback.format_exc()[-4000:]}))
        return 1
    seconds = time.perf_counter() - t0
    write_field(field, out / "displacement.mha")
    (out / "run.json").write_text(json.dumps({"seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
