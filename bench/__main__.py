"""``python3 -m bench setup | run | report`` (run from the repository root).

* ``setup``: a virtual environment ``bench/.venv`` that sees this Python's
  packages (rtreg, torch) and adds the peers from PyPI, pinned, with torch held
  at the installed version.
* ``run``: build the cases, run every method on them, print and write the
  tables and plots (default: the rt-phantom and real-anatomy suites, their
  default cases and methods, about 50 minutes on 2 cores; ``--suites`` picks
  others, ``--full`` every suite, case and method). ``--update-readme`` puts
  the tables into ``bench/README.md``.
* ``report``: re-render the report from the saved rows.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
VENV = BENCH / ".venv"
PEERS = ("antspyx==0.6.3", "itk-elastix==0.25.4", "plastimatch==1.10.0", "convexadam==0.2.0")
README_BEGIN, README_END = "<!-- bench:begin -->", "<!-- bench:end -->"


def setup(_args) -> int:
    import torch
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(VENV)], check=True)
    constraints = VENV / "constraints.txt"
    constraints.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(constraints), *PEERS],
                   check=True)
    print(f"peers installed in {VENV}; run the benchmark with\n  {VENV / 'bin' / 'python'} -m bench run")
    return 0


def _update_readme(text: str) -> None:
    readme = BENCH / "README.md"
    content = readme.read_text()
    a, b = content.index(README_BEGIN) + len(README_BEGIN), content.index(README_END)
    readme.write_text(content[:a] + "\n" + text.replace("](", "](results/") + "\n" + content[b:])


def run(args) -> int:
    from .harness import machine, run_case, save_rows
    from .methods import METHODS
    from .report import write_report
    from .suites import DEFAULT_SUITES, SUITES, select
    named = args.methods.split(",") if args.methods else []
    methods = [m for m in METHODS if m.name in named or (not named and (args.full or m.in_default))]
    unknown = set(named) - {m.name for m in METHODS}
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}; choose from {[m.name for m in METHODS]}")
    suites = args.suites.split(",") if args.suites else list(SUITES if args.full else DEFAULT_SUITES)
    specs = select(suites, args.full, args.cases.split(",") if args.cases else None)
    work, report = Path(args.work), Path(args.out)
    spacing = args.spacing or (2.0 if args.full else 3.0)
    t0 = time.perf_counter()
    rows = []
    for spec in specs:
        if not spec.available:
            print(f"  skipped {spec.suite}/{spec.name}: {spec.needs} is absent (see ../shared/data/README.md)")
            continue
        rows += run_case(spec, methods, work / "cases", work / "results", spacing, args.timeout)
        save_rows(rows, report / "rows.jsonl")
    if not rows:
        print("no case could be built: the data is absent")
        return 1
    info = machine()
    (report / "machine.json").write_text(json.dumps(info, indent=2))
    python = "bench/.venv/bin/python" if Path(sys.prefix).resolve() == VENV.resolve() else "python3"
    command = f"{python} -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = write_report(rows, report, command, info, time.perf_counter() - t0)
    print(text)
    if args.update_readme:
        _update_readme(text)
    return 0


def report(args) -> int:
    from .harness import load_rows
    from .report import write_report
    folder = Path(args.out)
    info = json.loads((folder / "machine.json").read_text())
    print(write_report(load_rows(folder / "rows.jsonl"), folder, "(re-rendered)", info, 0.0))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("setup", help="install the peers from PyPI into bench/.venv").set_defaults(func=setup)
    r = sub.add_parser("run", help="run the suites and write the report")
    r.add_argument("--suites", default="", help="comma-separated suites (default: rt-phantom,real-anatomy, about "
                   "50 minutes on 2 cores; --full: all five, adding multimodal,large-offset,inter-subject)")
    r.add_argument("--methods", default="", help="comma-separated method names (default: the default set; "
                   "--full: all)")
    r.add_argument("--cases", default="", help="comma-separated case names (default: all of the suites)")
    r.add_argument("--full", action="store_true", help="every case and every method, real images at 2 mm (default: the subset at 3 mm)")
    r.add_argument("--spacing", type=float, default=None, help="resample real images to this spacing (mm)")
    r.add_argument("--work", default="bench_work", help="cases and method outputs (large; not committed)")
    r.add_argument("--out", default=str(BENCH / "results"), help="report folder (tables, plots, rows)")
    r.add_argument("--timeout", type=float, default=900.0, help="seconds before a method run is stopped (and "
                   "recorded as failed)")
    r.add_argument("--update-readme", action="store_true", help="write the tables into bench/README.md")
    r.set_defaults(func=run)
    p = sub.add_parser("report", help="re-render the report from rows.jsonl")
    p.add_argument("--out", default=str(BENCH / "results"))
    p.set_defaults(func=report)
    args = ap.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
