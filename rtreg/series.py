"""Motion correction of a 4D series: every frame registered to a reference frame (``rtreg register-series``).

Each frame is the moving image and the reference frame the fixed one; every frame gets the outputs of
``rtreg register`` in ``<out>/frame_<k>/`` and the warped frames are joined into
``<out>/warped_series.nii.gz`` (the reference frame as it is), with ``<out>/series.json`` summarising the
similarity before and after per frame.

With TTORegister (``tto``) one network is adapted frame after frame, starting at the frames next to the
reference and going outwards, so each frame starts from weights already fitted to its neighbour (the
paper's DCE-MRI motion correction); other methods register each frame on its own.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .case import Progress, RegisterOptions, RegistrationCase, no_progress
from .errors import InputError
from .device import resolve_device
from .image import Volume, read_frames, read_volume, write_frames
from .methods import get_method, tto
from .pipeline import check_writable, read_mask, run_registration


def frame_order(n_frames: int, reference: int) -> List[List[int]]:
    """The chains of frames registered one after the other: after the reference going up, before it going
    down (each chain starts from the shipped network)."""
    return [c for c in (list(range(reference + 1, n_frames)), list(range(reference - 1, -1, -1))) if c]


def register_series(frames: List[Volume], reference: int, method: str, options: RegisterOptions, out: Path,
                    fixed_mask: Optional[Volume] = None, progress: Progress = no_progress, command: str = "") -> Dict:
    """Register every frame of ``frames`` to ``frames[reference]``; write the outputs described above."""
    if len(frames) < 2:
        raise InputError(f"the series has {len(frames)} frame; motion correction needs at least 2")
    if not 0 <= reference < len(frames):
        raise InputError(f"reference frame {reference} does not exist; the series has frames 0 to {len(frames) - 1}")
    out = Path(out)
    check_writable(out)
    t0 = time.perf_counter()
    fixed = frames[reference]
    warped: Dict[int, Volume] = {reference: fixed}
    summary: Dict[str, object] = {"method": method, "reference_frame": reference, "n_frames": len(frames),
                                  "command": command, "frames": {}}
    done, total = 0, len(frames) - 1
    for chain in frame_order(len(frames), reference):
        register = get_method(method)
        if method == tto.NAME:
            net = tto.load_network(str(options.extra.get("network", "student")), resolve_device(options.device))
            register = (lambda n: lambda c, o, p: tto.register_with(n, c, o, p))(net)
        for k in chain:
            case = RegistrationCase(fixed, frames[k], fixed_mask=fixed_mask, same_frame=True)
            folder = out / f"frame_{k:03d}"
            metrics = run_registration(case, method, options, folder,
                                       lambda f, m, k=k, d=done: progress((d + f) / total, f"frame {k}: {m}"),
                                       command, register)
            warped[k] = read_volume(folder / "warped_moving.nii.gz")
            summary["frames"][str(k)] = {"similarity_before": metrics["similarity_before"],
                                         "similarity_after": metrics["similarity_after"],
                                         "seconds": metrics["timings_s"]["total"],
                                         "method_qa": metrics["method_qa"], "messages": metrics["messages"]}
            done += 1
    integer = np.issubdtype(fixed.array.dtype, np.integer)
    write_frames([warped[k].with_array((np.round(warped[k].array) if integer else warped[k].array)
                                       .astype(fixed.array.dtype)) for k in range(len(frames))],
                 out / "warped_series.nii.gz")
    summary["seconds"] = time.perf_counter() - t0
    (out / "series.json").write_text(json.dumps(summary, indent=2, default=str))
    progress(1.0, f"done: {len(frames) - 1} frames registered to frame {reference}")
    return summary


def register_series_file(series: str, reference: int, method: str, options: RegisterOptions, out: Path,
                         fixed_mask: Optional[str] = None, progress: Progress = no_progress, command: str = "") -> Dict:
    """:func:`register_series` on a 4D image file (and an optional 3D mask on the reference frame)."""
    frames = read_frames(series)
    mask = read_mask(fixed_mask, frames[reference]) if fixed_mask and 0 <= reference < len(frames) else None
    return register_series(frames, reference, method, options, out, mask, progress, command)
