"""QA figures of one registration (PNG): overlays before/after, checkerboard, Jacobian, contours.

Slices are shown in radiological convention for axis-aligned grids: axial with
the patient's left on the right of the image and anterior at the top; coronal
with superior at the top.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .image import Volume


def display_range(volume: Volume, mask: Optional[np.ndarray] = None) -> Tuple[float, float]:
    """Soft-tissue window for CT (-160..240 HU), 1st-99th percentile otherwise."""
    if volume.meta.get("modality", "").upper() == "CT" or volume.meta.get("units") == "HU":
        return -160.0, 240.0
    a = volume.array[mask > 0] if mask is not None and mask.any() else volume.array
    lo, hi = np.percentile(a, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1)


def _scale(a: np.ndarray, rng: Tuple[float, float]) -> np.ndarray:
    return np.clip((a.astype(np.float32) - rng[0]) / (rng[1] - rng[0]), 0, 1)


def _views(shape, centre_index) -> List[Tuple[str, tuple]]:
    k, j, _ = [int(np.clip(c, 0, n - 1)) for c, n in zip(centre_index, shape)]
    return [("axial", (k, slice(None), slice(None))), ("coronal", (slice(None), j, slice(None)))]


def _show(ax, img, spacing, view, **kw):
    sx, sy, sz = spacing
    if view == "axial":
        ax.imshow(img, aspect=sy / sx, interpolation="nearest", **kw)
    else:
        ax.imshow(img, aspect=sz / sx, origin="lower", interpolation="nearest", **kw)
    ax.set_axis_off()


def overlay_figure(fixed: Volume, moving_on_fixed: Volume, path: Path, title: str, centre_index,
                   moving_range: Optional[Tuple[float, float]] = None) -> Path:
    """Fixed in magenta, moving in green: grey where they agree."""
    f_rng = display_range(fixed)
    m_rng = moving_range or display_range(moving_on_fixed)
    fig, axes = _figure()
    for ax, (view, sl) in zip(axes, _views(fixed.array.shape, centre_index)):
        f, m = _scale(fixed.array[sl], f_rng), _scale(moving_on_fixed.array[sl], m_rng)
        _show(ax, np.stack([f, m, f], -1), fixed.grid.spacing, view)
        ax.set_title(f"{title} ({view})")
    return _save(fig, path)


def checkerboard_figure(fixed: Volume, moving_on_fixed: Volume, path: Path, centre_index, tiles: int = 8) -> Path:
    f_rng, m_rng = display_range(fixed), display_range(moving_on_fixed)
    fig, axes = _figure()
    for ax, (view, sl) in zip(axes, _views(fixed.array.shape, centre_index)):
        f, m = _scale(fixed.array[sl], f_rng), _scale(moving_on_fixed.array[sl], m_rng)
        r, c = np.indices(f.shape)
        board = ((r * tiles // f.shape[0]) + (c * tiles // f.shape[1])) % 2 == 0
        _show(ax, np.where(board, f, m), fixed.grid.spacing, view, cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"checkerboard after ({view})")
    return _save(fig, path)


def map_figure(volume: Volume, path: Path, title: str, centre_index, cmap: str, vmin: float, vmax: float,
               label: str) -> Path:
    """A scalar map (Jacobian determinant, displacement magnitude) with its colour bar."""
    fig, axes = _figure()
    for ax, (view, sl) in zip(axes, _views(volume.array.shape, centre_index)):
        _show(ax, volume.array[sl], volume.grid.spacing, view, cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_title(f"{title} ({view})")
    fig.colorbar(axes[-1].images[0], ax=axes, shrink=0.7, label=label)
    return _save(fig, path, tight=False)


def contours_figure(image: Volume, masks: Dict[str, np.ndarray], colors: Dict[str, Sequence[int]], path: Path,
                    title: str, centre_index) -> Path:
    """Structures (on ``image``'s grid) drawn as contours over the image."""
    rng = display_range(image)
    fig, axes = _figure()
    for ax, (view, sl) in zip(axes, _views(image.array.shape, centre_index)):
        _show(ax, _scale(image.array[sl], rng), image.grid.spacing, view, cmap="gray", vmin=0, vmax=1)
        for name, m in masks.items():
            s = m[sl].astype(float)
            if s.any():
                ax.contour(s, levels=[0.5], colors=[np.asarray(colors.get(name, (255, 0, 0))) / 255.0],
                           linewidths=1.0, origin="lower" if view == "coronal" else None)
        ax.set_title(f"{title} ({view})")
    return _save(fig, path)


def _figure():
    """(figure, its two axes side by side), 10 x 5 inches. A bare matplotlib Figure, not pyplot's: no global
    backend is set and no GUI is touched (inside Slicer's Python too), and matplotlib is imported only when a
    figure is drawn (about 0.3 s that a registration without QA figures does not pay)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 5))
    return fig, fig.subplots(1, 2)


def _save(fig, path: Path, tight: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path
