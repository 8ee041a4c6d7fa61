"""Run one method on one case in a process of its own (the harness measures its peak memory).

``python -m bench.run_one --method NAME --case DIR --out DIR``: writes
``displacement.mha`` (the total fixed->moving field on the fixed grid, LPS mm)
and ``run.json`` (``seconds``: the method's wall time from reading its inputs to
returning the field; ``peak_mb``: the largest resident memory of this process
and the programs it starts, together; or ``error``). Exit status 0 on success,
1 on failure.

Peak memory is sampled from ``/proc`` (this process's ``VmHWM`` and the resident
size of its descendants every 0.1 s), not taken from ``getrusage``: after
``exec`` Linux keeps the parent's high-water mark in the child's ``ru_maxrss``,
which would charge every method with the harness's own memory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Dict, List

from rtreg.field import write_field

from .methods import by_name
from .suites import describe


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _descendants(root: int) -> List[int]:
    parents: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


class PeakMemory(threading.Thread):
    """Largest resident memory (MB) of this process plus its descendants, sampled every ``interval_s``."""

    def __init__(self, interval_s: float = 0.1):
        super().__init__(daemon=True)
        self.interval_s, self.peak_kb, self.running = interval_s, 0, True

    def run(self) -> None:
        me = os.getpid()
        while self.running:
            total = _status_kb(me, "VmRSS") + sum(_status_kb(p, "VmRSS") for p in _descendants(me))
            self.peak_kb = max(self.peak_kb, total)
            time.sleep(self.interval_s)

    def stop(self) -> float:
        self.running = False
        self.join()
        return max(self.peak_kb, _status_kb(os.getpid(), "VmHWM")) / 1024.0


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
    memory = PeakMemory()
    memory.start()
    t0 = time.perf_counter()
    try:
        field = method.run(case / "planning_ct.nii.gz", case / "repeat_ct.nii.gz", out, bool(info["multimodal"]))
    except Exception as exc:  # a peer's failure is a result of the benchmark, recorded and reported
        (out / "run.json").write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}", "peak_mb": memory.stop(),
                                                  "traceback": traceback.format_exc()[-4000:]}))
        return 1
    seconds = time.perf_counter() - t0
    peak_mb = memory.stop()
    write_field(field, out / "displacement.mha")
    (out / "run.json").write_text(json.dumps({"seconds": seconds, "peak_mb": peak_mb}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
