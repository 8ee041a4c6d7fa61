"""The QA report of one registration: a self-contained HTML page (``report.html``) in the output folder.

It shows what a physicist checks before accepting a deformable registration:
the similarity before and after, the folding (Jacobian) and inverse
consistency, the timings, and the figures of ``qa/`` (overlays before and
after, checkerboard, propagated contours over the moving image, Jacobian map,
displacement magnitude, and the method's own QA maps where it writes them),
embedded so that the page can be mailed or archived alone.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Dict

from .errors import InputError

# figure file (qa/) -> caption; figures not listed here (a method's own maps) follow with their file name
CAPTIONS = {
    "overlay_before.png": "Before registration: fixed in magenta, moving in green (grey where they agree)",
    "overlay_after.png": "After registration: fixed in magenta, warped moving in green",
    "checkerboard_after.png": "Checkerboard of fixed and warped moving: edges must continue across tiles",
    "structures_on_moving.png": "Fixed-image structures propagated onto the moving image",
    "jacobian.png": "Jacobian determinant of the mapping (1: volume kept; below 1: shrinking; <= 0: folding)",
    "displacement_magnitude.png": "Displacement magnitude (mm)",
}


def _row(name: str, *cells) -> str:
    return "<tr><th>" + html.escape(name) + "</th>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"


def _figure(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _g(value, spec: str = ".4g") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def write_html_report(out: Path) -> Path:
    """Write ``out/report.html`` from ``out/metrics.json`` and ``out/qa/*.png`` (as ``rtreg register`` writes
    them); returns its path."""
    out = Path(out)
    metrics_path = out / "metrics.json"
    if not metrics_path.exists():
        raise InputError(f"{out} has no metrics.json: run `rtreg register` into it first")
    m: Dict = json.loads(metrics_path.read_text())
    b, p, a = m["similarity_before"], m["similarity_after_prealignment"], m["similarity_after"]
    sim = "".join(_row(k.upper(), _g(b[k]), _g(p[k]), _g(a[k])) for k in ("ncc", "ssim", "mse"))
    j, inv = m["jacobian"], m["inverse_residual_mm"]
    checks = "".join([
        _row("Jacobian min / max", f"{j['jacobian_min']:.3f} / {j['jacobian_max']:.3f}"),
        _row("Folded voxels (J <= 0) in the body", f"{j['percent_nonpositive_jacobian']:.4f} %"),
        _row("Inverse residual mean / max", f"{inv['mean']:.3f} / {inv['max']:.3f} mm"),
        _row("Device", m.get("device", "")),
        _row("Time (total)", f"{m['timings_s'].get('total', 0.0):.1f} s"),
        _row("Structures propagated", ", ".join(m.get("structures_on_moving", [])) or "none"),
        _row("Dose mapped", "yes" if m.get("dose_mapped") else "no"),
    ] + [_row(f"Method QA: {k}", _g(v)) for k, v in (m.get("method_qa") or {}).items()
         if isinstance(v, (int, float, str))])
    messages = "".join(f"<li>{html.escape(str(x))}</li>" for x in m.get("messages", []))
    qa_dir = out / "qa"
    pngs = sorted(qa_dir.glob("*.png")) if qa_dir.is_dir() else []
    known = [qa_dir / n for n in CAPTIONS if (qa_dir / n).exists()]
    figures = "".join(_figure(f, CAPTIONS[f.name]) for f in known)
    figures += "".join(_figure(f, f.stem.replace("_", " ")) for f in pngs if f.name not in CAPTIONS)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Registration QA: {html.escape(m['method'])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #bbb;padding:4px 10px;text-align:left}}figure{{margin:1.5em 0}}
img{{max-width:100%}}figcaption{{color:#444}}code{{background:#eee;padding:2px 4px}}</style></head><body>
<h1>Registration QA ({html.escape(m['method'])})</h1>
<p>Fixed (planning): <code>{html.escape(m.get('fixed', ''))}</code><br>
Moving (repeat): <code>{html.escape(m.get('moving', ''))}</code><br>
Command: <code>{html.escape(m.get('command', ''))}</code></p>
<h2>Similarity inside the body (fixed grid at 2 mm)</h2>
<table><tr><th></th><th>before</th><th>after pre-alignment</th><th>after</th></tr>{sim}</table>
<h2>Checks</h2><table>{checks}</table>
{f'<h2>Messages</h2><ul>{messages}</ul>' if messages else ''}
<h2>Figures</h2>{figures or '<p>No QA figures were written.</p>'}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path
