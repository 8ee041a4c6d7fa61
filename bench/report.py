"""Tables, time ratios and plots from the harness rows.

Per suite: TRE pooled over every point of every case the method completed (where the suite has points)
(mean, median, 95th percentile, mm) and of the points within 20 mm of the target,
the mean Dice and HD95 of the propagated
structures, the mean absolute relative volume difference of the target
(CTV or GTV), NCC/SSIM/MSE of the warped repeat image in the planning body (2 mm
grid), the mean percentage of folded voxels (Jacobian <= 0 inside the
body), the mean wall time per case and the largest peak memory. Time ratios
put each of our methods beside each peer on the cases both completed. The
inter-subject suite, whose truth is organ contours, adds Dice per organ.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .harness import Row  # noqa: E402
from .methods import by_name  # noqa: E402
from .suites import SUITES  # noqa: E402

TARGETS = ("ctv", "gtv")


def _label(method: str) -> str:
    m = by_name().get(method)
    return m.label if m else "before registration"


def _mean(values) -> Optional[float]:
    v = [x for x in values if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else None


def summarise(rows: List[Row]) -> Dict[str, Dict]:
    """method -> summary numbers for the rows of one suite."""
    out: Dict[str, Dict] = {}
    for method in dict.fromkeys(r.method for r in rows):
        mine = [r for r in rows if r.method == method]
        ok = [r for r in mine if r.status == "ok"]
        errors = np.concatenate([np.asarray(r.point_errors, float) for r in ok if r.point_errors] or [np.zeros(0)])
        structs = [m for r in ok for m in r.structures.values()]
        targets = [m for r in ok for n, m in r.structures.items() if n.lower() in TARGETS]
        out[method] = {
            "cases": len(mine), "ok": len(ok),
            "status": sorted({r.status for r in mine if r.status != "ok"}),
            "messages": sorted({r.message for r in mine if r.message}),
            "tre_mean": float(errors.mean()) if errors.size else None,
            "tre_median": float(np.median(errors)) if errors.size else None,
            "tre_p95": float(np.percentile(errors, 95)) if errors.size else None,
            "tre_target": _mean(e for r in ok for e in r.target_point_errors),
            "ncc": _mean(r.similarity.get("ncc") for r in ok),
            "ssim": _mean(r.similarity.get("ssim") for r in ok),
            "mse": _mean(r.similarity.get("mse") for r in ok),
            "errors": errors,
            "dice": _mean(m["dice"] for m in structs),
            "hd95": _mean(m.get("hd95_mm") for m in structs),
            "target_abs_rvd_pct": _mean(100 * abs(m["relative_volume_difference"]) for m in targets),
            "folding_pct": _mean(r.jacobian.get("percent_nonpositive_jacobian") for r in ok),
            "seconds": _mean(r.seconds for r in ok) if method != "before" else None,
            "peak_mb": max((r.peak_mb for r in ok if r.peak_mb), default=None),
        }
    return out


def _fmt(v, spec: str = ".2f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def suite_table(summary: Dict[str, Dict]) -> str:
    head = ("| method | cases | TRE mean | TRE median | TRE p95 | TRE near target | Dice | HD95 | target RVD (abs) "
            "| NCC | SSIM | MSE | % J <= 0 | time / case | peak memory |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for method, s in summary.items():
        cases = f"{s['ok']}/{s['cases']}" + (f" ({', '.join(s['status'])})" if s["status"] else "")
        lines.append(f"| {_label(method)} | {cases} | {_fmt(s['tre_mean'])} mm | {_fmt(s['tre_median'])} mm "
                     f"| {_fmt(s['tre_p95'])} mm | {_fmt(s.get('tre_target'))} mm | {_fmt(s['dice'], '.3f')} "
                     f"| {_fmt(s['hd95'])} mm | {_fmt(s['target_abs_rvd_pct'], '.1f')} % "
                     f"| {_fmt(s.get('ncc'), '.3f')} | {_fmt(s.get('ssim'), '.3f')} | {_fmt(s.get('mse'), '.0f')} "
                     f"| {_fmt(s['folding_pct'], '.3f')} | {_fmt(s['seconds'], '.1f')} s | {_fmt(s['peak_mb'], '.0f')} MB |")
    return head + "\n".join(lines) + "\n"


FAILURE_MM = 10.0


def offset_table(rows: List[Row]) -> str:
    """The large-offset suite's own figures per method: translation error, TRE and failures (a case that did
    not run, or whose mean TRE is above 10 mm), over the same cases."""
    head = (f"| method | failures (TRE > {FAILURE_MM:g} mm or no result) | translation error mean | translation "
            "error max | TRE mean (cases without failure) | time / case |\n|---|---|---|---|---|---|\n")
    lines = []
    for method in dict.fromkeys(r.method for r in rows):
        mine = [r for r in rows if r.method == method]
        ok = [r for r in mine if r.status == "ok" and r.tre]
        good = [r for r in ok if r.tre["mean"] <= FAILURE_MM]
        failed = [r.case for r in mine if r not in good]
        moves = [r.translation_error_mm for r in ok if r.translation_error_mm is not None]
        lines.append(f"| {_label(method)} | {len(failed)}/{len(mine)}" + (f" ({', '.join(failed)})" if failed else "")
                     + f" | {_fmt(_mean(moves))} mm | {_fmt(max(moves) if moves else None)} mm "
                     f"| {_fmt(_mean(r.tre['mean'] for r in good))} mm "
                     f"| {_fmt(_mean(r.seconds for r in ok) if method != 'before' else None, '.1f')} s |")
    return head + "\n".join(lines) + "\n"


def structure_table(rows: List[Row]) -> str:
    """Dice of each structure per method (mean over the cases that hold it), the mean over the organs (every
    structure but BODY) and their mean HD95: the inter-subject suite's own figures, whose truth is contours."""
    names = list(dict.fromkeys(n for r in rows if r.status == "ok" for n in r.structures))
    organs = [n for n in names if n.upper() != "BODY"]
    if not names:
        return ""
    head = ("| method | " + " | ".join(names) + " | organs: mean Dice | organs: mean HD95 |\n"
            "|---|" + "---|" * (len(names) + 2) + "\n")
    lines = []
    for method in dict.fromkeys(r.method for r in rows):
        ok = [r for r in rows if r.method == method and r.status == "ok"]
        if not ok:
            continue
        cells = [_fmt(_mean(r.structures[n]["dice"] for r in ok if n in r.structures), ".3f") for n in names]
        dice = _mean(r.structures[n]["dice"] for r in ok for n in organs if n in r.structures)
        hd95 = _mean(r.structures[n].get("hd95_mm") for r in ok for n in organs if n in r.structures)
        lines.append(f"| {_label(method)} | " + " | ".join(cells) + f" | {_fmt(dice, '.3f')} | {_fmt(hd95)} mm |")
    return head + "\n".join(lines) + "\n"


def ratio_table(rows: List[Row]) -> str:
    """Our time / peer time, on the cases both completed (below 1: ours is faster)."""
    methods = by_name()
    ours = [m for m in dict.fromkeys(r.method for r in rows) if m in methods and methods[m].ours]
    peers = [m for m in dict.fromkeys(r.method for r in rows) if m in methods and not methods[m].ours]
    times = {(r.case, r.method): r.seconds for r in rows if r.status == "ok" and r.seconds}
    if not ours or not peers:
        return ""
    head = "| ours / peer time | " + " | ".join(methods[p].label for p in peers) + " |\n"
    head += "|---|" + "---|" * len(peers) + "\n"
    lines = []
    for o in ours:
        cells = []
        for p in peers:
            both = [c for (c, m) in times if m == o and (c, p) in times]
            cells.append(f"{np.mean([times[(c, o)] for c in both]) / np.mean([times[(c, p)] for c in both]):.2f}"
                         if both else "-")
        lines.append(f"| {methods[o].label} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def plots(suite: str, summary: Dict[str, Dict], folder: Path) -> List[Path]:
    """TRE box plot per method and mean TRE against mean time; PNG files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    have = {m: s for m, s in summary.items() if s["errors"].size}
    if not have:
        return []
    fig, ax = plt.subplots(figsize=(1.4 * len(have) + 2, 4.2))
    ax.boxplot([s["errors"] for s in have.values()], showfliers=False)
    ax.set_xticks(range(1, len(have) + 1), [_label(m).replace(" ", "\n", 1) for m in have], fontsize=8)
    ax.set_ylabel("TRE (mm)")
    ax.set_title(f"{suite}: TRE per method (all points of all cases; whiskers 1.5 IQR)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    box = folder / f"{suite}_tre_box.png"
    fig.savefig(box, dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for m, s in have.items():
        if s["seconds"]:
            ax.scatter(s["seconds"], s["tre_mean"], s=40)
            ax.annotate(_label(m), (s["seconds"], s["tre_mean"]), fontsize=8, xytext=(4, 4),
                        textcoords="offset points")
    if "before" in have:
        ax.axhline(have["before"]["tre_mean"], color="grey", ls="--", lw=1, label="before registration")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("wall time per case (s, 2 threads)")
    ax.set_ylabel("mean TRE (mm)")
    ax.set_title(f"{suite}: accuracy against time")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    scatter = folder / f"{suite}_accuracy_vs_time.png"
    fig.savefig(scatter, dpi=90)
    plt.close(fig)
    return [box, scatter]


def write_report(rows: List[Row], folder: Path, command: str, machine: Dict, elapsed_s: float) -> str:
    """Markdown report (tables, ratios, plot links, failures) written to ``folder/report.md``; returned."""
    parts = [f"Command: `{command}`  \n"
             f"Machine: {machine['cpu']}, {machine['threads_per_method']} threads per method "
             f"({machine['cores_available']} cores), Python {machine['python']}, torch {machine['torch']}  \n"
             f"Whole run: {elapsed_s / 60:.1f} min\n"]
    for suite in SUITES:
        mine = [r for r in rows if r.suite == suite]
        if not mine:
            continue
        summary = summarise(mine)
        n_cases = len({r.case for r in mine})
        parts.append(f"\n### {suite} ({n_cases} case{'s' if n_cases > 1 else ''}: "
                     f"{', '.join(dict.fromkeys(r.case for r in mine))})\n\n" + suite_table(summary))
        if suite == "large-offset":
            parts.append("\nRigid alignment figures (translation error: the mean mapped point's distance from the "
                         "mean true point):\n\n" + offset_table(mine))
        if suite == "inter-subject":
            parts.append("\nDice per structure (mean over the cases; the organs are TotalSegmentator's labels of "
                         "each subject):\n\n" + structure_table(mine))
        ratios = ratio_table(mine)
        if ratios:
            parts.append("\nTime ratios (ours / peer, same cases, same run; below 1: ours is faster):\n\n" + ratios)
        for p in plots(suite, summary, folder):
            parts.append(f"\n![{p.stem}]({p.name})\n")
        failures = [r for r in mine if r.status != "ok"]
        if failures:
            parts.append("\n" + "\n".join(f"- {r.case} / {_label(r.method)}: {r.status}: {r.message}"
                                          for r in failures) + "\n")
    text = "".join(parts)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.md").write_text(text)
    return text
