"""Training sources shared by ``rtreg train quiz`` and ``rtreg train glide``, and their augmentations.

Sources (built once into ``<work>/sources.pt``: 3 mm isotropic, scaled to [0, 1] inside the body):

* synthetic RT phantoms (pelvis, thorax, head and neck; seeds 300-303, none of the benchmark's);
* the real thorax CT (``../shared/data/thorax_ct``), the second TotalSegmentator subject (``example_ct_dicom``)
  and the TotalSegmentator abdominal MR (``example_mr_sm``);
* the IBSI soft-tissue-sarcoma patients STS_002 and STS_003: their CT and their T1 MR (same frame of reference)
  as its ``partner``, a real multimodal pair taken as aligned (two rigid MI registrations move the MR 3 mm
  and 6-8 mm from identity at the tumour: ``bench/sts_frame_check.py``).

Held out (:data:`HELD_OUT`): the DCPT head phantom and the TotalSegmentator abdominal CT ``example_ct`` (benchmark
cases) and STS_001 (a multimodal benchmark case).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..image import Volume, crop_to_mask, normalize_intensity, read_volume, resample
from ..priors import body_mask
from ..synth import rt_phantom

SPACING_MM = 3.0
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
HELD_OUT = ("DCPT head phantom, TotalSegmentator example_ct (the large-offset benchmark's cases), IBSI STS_001 (a "
            "multimodal benchmark case)")


def prepare_source(volume: Volume, partner: Optional[Volume] = None) -> Dict[str, torch.Tensor]:
    """One training source: the image (and a same-frame partner of another modality) on a 3 mm grid cropped
    to the body, scaled to [0, 1] inside it; the index->world affine; up to 20k body points (LPS mm)."""
    grid = volume.grid.with_spacing(SPACING_MM)
    vol = resample(volume, grid, fill=float(volume.array.min()))
    body = body_mask(vol)
    vol = crop_to_mask(vol, body, margin_mm=6.0)
    body = body_mask(vol)
    out = {"image": torch.as_tensor(normalize_intensity(vol, body)), "affine": torch.as_tensor(vol.grid.affine)}
    if partner is not None:
        p = resample(partner, vol.grid, fill=float(partner.array.min()))
        pb = body_mask(p)
        out["partner"] = torch.as_tensor(normalize_intensity(p, pb if pb.any() else None))
    idx = np.argwhere(body)[:, ::-1].astype(np.float64)
    idx = idx[np.random.default_rng(0).permutation(len(idx))[:20_000]]
    out["body_points"] = torch.as_tensor(vol.grid.index_to_world(idx), dtype=torch.float32)
    return out


def as_ct(v: Volume) -> Volume:
    v.meta.update(modality="CT", units="HU")
    return v


def source_builders(data: Path = DATA) -> Dict[str, Callable[[], Dict[str, torch.Tensor]]]:
    """Name -> builder of every training source whose data is present."""
    out: Dict[str, Callable[[], Dict[str, torch.Tensor]]] = {}
    for site in ("pelvis", "thorax", "headneck"):
        for seed in (300, 301, 302, 303):
            out[f"phantom-{site}-{seed}"] = lambda s=site, sd=seed: prepare_source(rt_phantom(s, seed=sd).planning)
    thorax = data / "thorax_ct" / "ct_phase00.nii.gz"
    if thorax.exists():
        out["thorax-ct"] = lambda: prepare_source(as_ct(read_volume(thorax)))
    ts_dicom = data / "totalsegmentator" / "example_ct_dicom"
    if ts_dicom.exists():
        out["totalseg-ct-dicom"] = lambda: prepare_source(as_ct(read_volume(ts_dicom)))
    ts_mr = data / "totalsegmentator" / "example_mr_sm.nii.gz"
    if ts_mr.exists():
        out["totalseg-mr"] = lambda: prepare_source(read_volume(ts_mr))
    for patient in ("STS_002", "STS_003"):       # STS_001 stays out: a multimodal benchmark case
        folder = data / "ibsi_sts" / "nifti" / patient
        if folder.exists():
            out[f"sts-{patient}"] = lambda f=folder: prepare_source(as_ct(read_volume(f / "CT_image.nii.gz")),
                                                               read_volume(f / "MR_T1_image.nii.gz"))
    return out


def ensure_sources(work: Path, log: Callable[[str], None], data: Path = DATA,
                   device: torch.device = torch.device("cpu")) -> Dict[str, Dict[str, torch.Tensor]]:
    """Name -> source (in name order) on ``device``, built once into ``<work>/sources.pt`` (a rerun reads them
    back, so the names are those the run trains on, whatever ``data`` holds now)."""
    path = Path(work) / "sources.pt"
    if path.exists():
        blob = torch.load(path, map_location=device, weights_only=True)
        return {k: blob[k] for k in sorted(blob)}
    blob = {}
    for name, build_source in source_builders(data).items():
        log(f"building source {name}")
        blob[name] = build_source()
    Path(work).mkdir(parents=True, exist_ok=True)
    torch.save(blob, path)
    return {k: {name: t.to(device) for name, t in blob[k].items()} for k in sorted(blob)}


def describe_sources(names: List[str]) -> str:
    """The manifest's ``data`` text: the sources trained on and what was held out."""
    return f"sources: {', '.join(sorted(names))}; held out: {HELD_OUT}"


def sample_world(image: torch.Tensor, affine: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``image`` (z, y, x) with index->world ``affine`` (4x4) at world ``points`` (..., 3): trilinear, 0
    outside the image (beyond half a voxel from the edge voxels' centres, as SimpleITK's resampling does);
    differentiable in ``points``."""
    inv = torch.linalg.inv(affine.double()).float()
    idx = points @ inv[:3, :3].T + inv[:3, 3]
    n = torch.tensor(image.shape[::-1], dtype=torch.float32, device=points.device)
    norm = (idx + 0.5) / n * 2 - 1                  # align_corners=False
    out = F.grid_sample(image[None, None].float(), norm.reshape(1, -1, 1, 1, 3), mode="bilinear",
                        padding_mode="border", align_corners=False).reshape(points.shape[:-1])
    return out * ((idx >= -0.5) & (idx <= n - 0.5)).all(-1)



def augment_intensity(x: torch.Tensor, inside: torch.Tensor, gen: torch.Generator, strong: bool) -> torch.Tensor:
    """Intensity changes of a cubic view ``x`` (n, n, n) in [0, 1] inside its field of view ``inside`` (outside
    stays 0): gamma and contrast; ``strong``: also, at random, another modality (a random non-monotonic
    intensity map) and CBCT-like cupping, streaks and noise; and at random a 3-voxel blur. Random numbers come
    from the CPU generator ``gen`` whatever the device of ``x``, so a seed gives the same draws on CPU and GPU."""
    u = lambda: float(torch.rand((), generator=gen))  # noqa: E731
    x = x.clamp(0, 1) ** math.exp(0.8 * u() - 0.4)
    x = x * (0.8 + 0.4 * u())
    if strong and u() < 0.3:                         # another modality: a random non-monotonic intensity map
        knots = torch.rand(6, generator=gen).to(x.device)
        pos = x.clamp(0, 1) * 5
        k = pos.floor().clamp(max=4).long()
        x = knots[k] + (knots[k + 1] - knots[k]) * (pos - k)
    n = x.shape[0]
    if strong and u() < 0.3:                         # CBCT-like: cupping, streaks and noise
        c = torch.linspace(-1, 1, n, device=x.device)
        zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
        x = x * (1 - 0.3 * u() * (xx ** 2 + yy ** 2))
        angle = 3.1416 * u()
        x = x + 0.08 * u() * torch.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 40 * u())
        x = x + 0.06 * u() * torch.randn(x.shape, generator=gen).to(x.device)
    if u() < 0.3:
        x = F.avg_pool3d(x[None, None], 3, 1, 1, count_include_pad=False)[0, 0]
    return torch.where(inside, x, torch.zeros_like(x))


def view_points(center: torch.Tensor, side: float, size: int) -> torch.Tensor:
    """(n, n, n, 3) LPS mm voxel centres of a world-axis cube (array order z, y, x; components x, y, z)."""
    axis = (torch.arange(size, dtype=torch.float32, device=center.device) + 0.5) / size * side - side / 2
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    return torch.stack([x, y, z], -1) + center


def rotation_matrix(angles_rad: torch.Tensor) -> torch.Tensor:
    """3x3 rotation about x, then y, then z by ``angles_rad`` (3,) radians, on the device of ``angles_rad``."""
    cx, cy, cz = torch.cos(angles_rad.cpu())
    sx, sy, sz = torch.sin(angles_rad.cpu())
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return (rz @ ry @ rx).to(angles_rad.device)
