"""``rtreg train glide``: GlideReg's contrast-invariant global feature encoder, resumable, and its weights.

Sources: :mod:`rtreg.train.sources` (3 mm; phantoms, real CT and MR, IBSI STS CT with its T1 MR; DCPT,
TotalSegmentator example_ct and STS_001 held out).

Every step draws per sample, seeded by (seed, step), two world-axis cubic views of ``size`` voxels (3 mm) of
one source: view A around a body point; view B around a point up to 20 mm away, of the same anatomy moved by
a rotation (up to 10 degrees per axis) and a smooth random deformation (up to 9 mm), showing the source's
other-modality partner (IBSI STS T1 MR) when it has one, half of the time. Both views get independent
intensity changes (:func:`rtreg.train.sources.augment_intensity`: gamma, contrast, a random non-monotonic
intensity map imitating another modality, CBCT-like artefacts, blur), so that only anatomy, not contrast,
identifies a point.

Loss: a dense contrastive loss with soft targets. For ``POINTS`` body voxels of view B, the features of B
at those voxels and of A where the same anatomy lies are compared (dot products of unit vectors over a
temperature ``TEMPERATURE``); the target of each point is a Gaussian (``SIGMA_MM``) over the anatomical
distances to the others, so that near points may look alike and far ones must not. Symmetric (B to A and
A to B). The result is a feature whose squared differences are small for corresponding anatomy and grow
with anatomical distance: what the convex stage's SSD cost needs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from ..device import resolve_device
from ..methods.glide import ENCODER_WEIGHTS
from ..nets.glide import DEFAULT, FeatureEncoder, build_encoder
from .loop import cosine_schedule, export_weights, resumable_training, training_command
from .sources import (DATA, SPACING_MM, augment_intensity, describe_sources, ensure_sources, rotation_matrix,
                      sample_world, view_points)

SIZE = 48              # voxels per view side (144 mm at 3 mm)
BATCH = 4
POINTS = 512
TEMPERATURE = 0.1
SIGMA_MM = 6.0
MAX_DEFORMATION_MM = 9.0


def _smooth_deformation(gen: torch.Generator, size: int, amplitude_mm: float) -> torch.Tensor:
    """(size, size, size, 3) smooth random displacement (mm): 4^3 random control values, cubic-like upsampling."""
    control = (2 * torch.rand(1, 3, 4, 4, 4, generator=gen) - 1) * amplitude_mm
    field = F.interpolate(control, size=(size,) * 3, mode="trilinear", align_corners=True)
    return field[0].permute(1, 2, 3, 0)


def draw(source: Dict[str, torch.Tensor], gen: torch.Generator, size: int, points: int) -> Dict[str, torch.Tensor]:
    """One training pair: views ``a`` and ``b`` (size^3 each), ``b_index`` (points, 3) voxel indices (i, j, k)
    in B, ``a_index`` where A shows the same anatomy, and ``anatomy_mm`` (points, 3) its world position."""
    image, affine, pts = source["image"], source["affine"].float(), source["body_points"]
    dev = image.device                # random numbers from the CPU generator, the same on every device
    u = lambda *s: torch.rand(s, generator=gen).to(dev)  # noqa: E731
    side = size * SPACING_MM
    centre_a = pts[int(torch.randint(len(pts), (1,), generator=gen))]
    centre_b = centre_a + (2 * u(3) - 1) * 20.0
    rot = rotation_matrix(math.radians(10) * (2 * u(3) - 1))
    y_b = view_points(centre_b, side, size)                                            # B's voxel centres
    bend = _smooth_deformation(gen, size, MAX_DEFORMATION_MM * float(u(1))).to(dev)
    anatomy = (y_b - centre_b) @ rot.T + centre_b + bend
    partner = "partner" in source and float(u(1)) < 0.5
    a_image, b_image = (source["partner"], image) if partner and float(u(1)) < 0.5 else \
        (image, source["partner"] if partner else image)
    x_a = view_points(centre_a, side, size)
    a_raw = sample_world(a_image, affine, x_a)
    b_raw = sample_world(b_image, affine, anatomy)
    lo_a = centre_a - side / 2
    a_index = (anatomy - lo_a) / SPACING_MM - 0.5                                      # (i, j, k) in A
    seen = ((a_index >= 0) & (a_index <= size - 1)).all(-1) & (sample_world(image, affine, anatomy) > 0.02)
    candidates = torch.nonzero(seen.reshape(-1)).squeeze(1)
    if len(candidates) < points:
        candidates = torch.arange(size ** 3, device=dev)
    pick = candidates[torch.randint(len(candidates), (points,), generator=gen).to(dev)]
    k, j, i = pick // (size * size), (pick // size) % size, pick % size
    b_index = torch.stack([i, j, k], 1).float()
    a = augment_intensity(a_raw, a_raw > 0, gen, strong=float(u(1)) < 0.5)
    b = augment_intensity(b_raw, b_raw > 0, gen, strong=True)
    return {"a": a, "b": b, "b_index": b_index, "a_index": a_index.reshape(-1, 3)[pick],
            "anatomy_mm": anatomy.reshape(-1, 3)[pick]}


def features_at(features: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Features (1, C, h, h, h) of a view of ``size`` voxels at its voxel indices (N, 3) (i, j, k) -> (N, C)."""
    norm = (index + 0.5) / size * 2 - 1             # both grids span the same extent (align_corners=False)
    out = F.grid_sample(features, norm.reshape(1, -1, 1, 1, 3), mode="bilinear", padding_mode="border",
                        align_corners=False)
    return F.normalize(out.reshape(features.shape[1], -1).T, dim=1)


def losses(net: FeatureEncoder, samples: List[Dict[str, torch.Tensor]], size: int) -> Dict[str, torch.Tensor]:
    """The soft dense contrastive loss (see the module docstring) and the top-1 match accuracy within
    ``SIGMA_MM`` (a readable progress number)."""
    views = torch.stack([s[k] for s in samples for k in ("a", "b")])[:, None]
    feats = net(views)
    total, hits = torch.zeros((), device=feats.device), torch.zeros((), device=feats.device)
    for n, s in enumerate(samples):
        fa = features_at(feats[2 * n:2 * n + 1], s["a_index"], size)
        fb = features_at(feats[2 * n + 1:2 * n + 2], s["b_index"], size)
        logits = fb @ fa.T / TEMPERATURE
        d2 = torch.cdist(s["anatomy_mm"], s["anatomy_mm"]) ** 2
        target = torch.softmax(-d2 / (2 * SIGMA_MM ** 2), 1)
        total = total - 0.5 * ((target * F.log_softmax(logits, 1)).sum(1).mean()
                               + (target * F.log_softmax(logits.T, 1)).sum(1).mean())
        hits = hits + (d2.gather(1, logits.argmax(1, keepdim=True)) <= SIGMA_MM ** 2).float().mean()
    return {"total": total / len(samples), "match_accuracy": hits.detach() / len(samples)}


def train(work: Path, steps: int, seed: int = 0, lr: float = 1e-3, export: bool = True,
          models_dir: Optional[Path] = None, command: str = "", threads: Optional[int] = None,
          stop_at: Optional[int] = None, data: Path = DATA, device: str = "cpu",
          log: Callable[[str], None] = print) -> Dict:
    """Train (resuming from ``<work>/checkpoint.pt``) on ``device``, then write the weights and their manifest
    entry."""
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    named = ensure_sources(Path(work), log, data, dev)
    sources = list(named.values())
    if not sources:
        raise RuntimeError("no training sources")
    config = dict(DEFAULT, spacing_mm=SPACING_MM)
    net = build_encoder(config).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = cosine_schedule(opt, steps)

    def step_losses(step: int) -> Dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        picks = torch.randint(len(sources), (BATCH,), generator=gen).tolist()
        return losses(net, [draw(sources[k], gen, SIZE, POINTS) for k in picks], SIZE)

    done = resumable_training(Path(work), net, opt, sched, steps, step_losses, stop_at, log=log)
    if done < steps:
        return {"steps_done": done, "steps": steps}
    summary = {"steps": steps, "seed": seed, "lr": lr, "size": SIZE, "batch": BATCH, "points": POINTS,
               "temperature": TEMPERATURE, "sigma_mm": SIGMA_MM}
    if export:
        export_weights(ENCODER_WEIGHTS, net, config, work, summary, command,
                       describe_sources(list(named)), models_dir, log)
    return summary


def main(args) -> int:
    """Entry point of ``rtreg train glide`` (arguments from :mod:`rtreg.cli`)."""
    summary = train(Path(args.work), args.steps, args.seed, args.lr, export=not args.no_export,
                    models_dir=Path(args.models_dir) if args.models_dir else None, command=training_command(),
                    threads=args.threads, stop_at=args.stop_at, data=Path(args.data) if args.data else DATA,
                    device=args.device, log=lambda m: print(m, flush=True))
    print(json.dumps(summary, indent=2))
    return 0
