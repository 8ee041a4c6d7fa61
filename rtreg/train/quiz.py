"""``rtreg train quiz``: QuizRigid's network, resumable, and its weights.

Sources: :mod:`rtreg.train.sources` (phantoms, real CT and MR, IBSI STS CT with its T1 MR as the search image
half of the time; DCPT, TotalSegmentator example_ct and STS_001 held out).

Every step draws, per sample and seeded by (seed, step): a reference field of view (the whole source or a
box of 60-100 % per axis); a similarity transform (rotations up to 15 degrees per axis, a translation of
up to 60 mm, scale 0.92-1.08); a search field of view of 35-100 % per axis around a body point the
reference sees (the local-to-global case); intensity changes (gamma, contrast) and, at random, a
different modality (a random non-monotonic intensity map), CBCT-like noise, cupping and streaks, and blur.
Views are sampled as :mod:`rtreg.methods.quiz` samples them (world-axis cubes over both bodies, one side).
Axis permutations and flips of the storage need no augmentation: the views are in world axes.

Loss (the paper's, in two phases): the point loss (Huber, 4 mm, over the points the search image sees)
plus the visibility loss (binary cross-entropy) and (ours, for a strong early signal on a CPU budget) the
cross-entropy of the matching logits against the search token that holds each point, while the quizzer learns (the first 70 % of the steps);
then the position reset is trained too: the search image is moved by the mean predicted displacement
(differentiable grid sampling), the network answers again, and the loss adds that second point loss and
``alpha`` x (-NCC) between the reference and the reset search view.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from ..device import resolve_device
from ..methods.quiz import MARGIN_MM, WEIGHTS
from ..nets.quiz import DEFAULT, QuizNet, build
from .loop import cosine_schedule, export_weights, resumable_training, training_command
from .sources import (DATA, SPACING_MM, augment_intensity, describe_sources, ensure_sources, rotation_matrix,
                      sample_world, view_points)

SIZE = 96                 # the shipped views (the paper's 128 with --size 128: about 3x slower to train)
BATCH = 4
QUERIES = 256            # per sample: the encoder's cost dominates, so many points cost little
QUIZZER_FRACTION = 0.7    # the first 70 % of the steps train the quizzer alone; then the position reset too
ALPHA = 0.5               # weight of -NCC after the reset


# ---------------------------------------------------------------- one training sample
def _inside(points: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return ((points >= lo) & (points <= hi)).all(-1)


def draw(source: Dict[str, torch.Tensor], gen: torch.Generator, size: int, queries: int
         ) -> Dict[str, torch.Tensor]:
    """One sample from ``source``: the two views, the query points and where the search view shows them."""
    image, affine, pts = source["image"], source["affine"].float(), source["body_points"]
    dev = image.device                # random numbers from the CPU generator, the same on every device
    u = lambda *s: torch.rand(s, generator=gen).to(dev)  # noqa: E731
    search_image = source["partner"] if "partner" in source and float(u(1)) < 0.5 else image
    lo, hi = pts.min(0).values - 3, pts.max(0).values + 3
    ext = hi - lo
    # the reference field of view
    if float(u(1)) < 0.5:
        f_lo, f_hi = lo, hi
    else:
        frac = 0.6 + 0.4 * u(3)
        f_lo = lo + (ext * (1 - frac)) * u(3)
        f_hi = f_lo + ext * frac
    f_pts = pts[_inside(pts, f_lo, f_hi)]
    if len(f_pts) < 50:
        f_lo, f_hi, f_pts = lo, hi, pts
    # the pose difference (reference world -> search world): x -> s R (x - c) + c + t
    centre = pts.mean(0)
    rot = rotation_matrix(math.radians(15) * (2 * u(3) - 1)) * (0.92 + 0.16 * float(u(1)))
    direction = torch.randn(3, generator=gen).to(dev)
    shift = direction / direction.norm() * 60 * float(u(1))
    def to_search(x: torch.Tensor) -> torch.Tensor:
        return (x - centre) @ rot.T + centre + shift
    inv_rot = torch.linalg.inv(rot)
    def to_reference(y: torch.Tensor) -> torch.Tensor:
        return (y - centre - shift) @ inv_rot.T + centre
    # the search field of view: a box around a body point the reference sees
    s_pts_all = to_search(pts)
    if float(u(1)) < 0.3:
        s_lo, s_hi = s_pts_all.min(0).values - 3, s_pts_all.max(0).values + 3
    else:
        frac = 0.35 + 0.65 * u(3)
        middle = to_search(f_pts[int(torch.randint(len(f_pts), (1,), generator=gen))])
        s_ext = s_pts_all.max(0).values - s_pts_all.min(0).values
        s_lo, s_hi = middle - s_ext * frac / 2, middle + s_ext * frac / 2
    s_pts = s_pts_all[_inside(s_pts_all, s_lo, s_hi)]
    if len(s_pts) < 50:
        s_lo, s_hi = s_pts_all.min(0).values - 3, s_pts_all.max(0).values + 3
        s_pts = s_pts_all
    # views as QuizRigid makes them: centred on each body's box, one side
    f_box = (f_pts.min(0).values, f_pts.max(0).values)
    s_box = (s_pts.min(0).values, s_pts.max(0).values)
    side = float(max((f_box[1] - f_box[0]).max(), (s_box[1] - s_box[0]).max())) + 2 * MARGIN_MM
    f_center, s_center = (f_box[0] + f_box[1]) / 2, (s_box[0] + s_box[1]) / 2
    x = view_points(f_center, side, size)
    ref = sample_world(image, affine, x)
    ref = augment_intensity(ref, _inside(x, f_lo, f_hi), gen, strong=False)
    y = view_points(s_center, side, size)
    search = sample_world(search_image, affine, to_reference(y))
    search = augment_intensity(search, _inside(y, s_lo, s_hi), gen, strong=True)
    # query points: body points the reference sees, jittered by up to half a voxel of the source
    q = f_pts[torch.randint(len(f_pts), (queries,), generator=gen).to(dev)] + (u(queries, 3) - 0.5) * SPACING_MM
    truth = to_search(q)
    return {"reference": ref[None], "search": search[None], "queries": (q - f_center) / (side / 2),
            "truth_mm": truth, "visible": _inside(truth, s_lo, s_hi).float(), "side": torch.tensor(side, device=dev),
            "f_center": f_center, "s_center": s_center, "to_reference_rot": inv_rot, "centre": centre,
            "shift": shift, "s_lo": s_lo, "s_hi": s_hi, "search_image": search_image, "affine": affine}


# ---------------------------------------------------------------- losses
def _point_loss(pred_mm: torch.Tensor, truth_mm: torch.Tensor, visible: torch.Tensor):
    err = (pred_mm - truth_mm).norm(dim=-1)
    huber = F.huber_loss(pred_mm, truth_mm, reduction="none", delta=4.0).sum(-1)
    n = visible.sum().clamp_min(1)
    return (huber * visible).sum() / n / 10.0, (err * visible).sum() / n


def _token_loss(logits: torch.Tensor, truth_norm: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the matching logits (B, Q, t^3) against the search token that holds each visible
    point's true position (normalised (x, y, z), B x Q x 3): a strong early signal for the soft-argmax."""
    t = round(logits.shape[-1] ** (1 / 3))
    ijk = ((truth_norm.clamp(-1, 1 - 1e-6) + 1) / 2 * t).floor().long()
    target = (ijk[..., 2] * t + ijk[..., 1]) * t + ijk[..., 0]
    ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(visible.shape)
    return (ce * visible).sum() / visible.sum().clamp_min(1)


def _ncc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Global NCC of (B, n, n, n) images inside (B, n, n, n) masks, averaged over the batch."""
    w = mask.float()
    n = w.flatten(1).sum(1).clamp_min(1)
    ma = (a * w).flatten(1).sum(1) / n
    mb = (b * w).flatten(1).sum(1) / n
    da, db = (a - ma.view(-1, 1, 1, 1)) * w, (b - mb.view(-1, 1, 1, 1)) * w
    cov = (da * db).flatten(1).sum(1)
    return (cov / ((da ** 2).flatten(1).sum(1) * (db ** 2).flatten(1).sum(1)).sqrt().clamp_min(1e-6)).mean()


def losses(net: QuizNet, samples: List[Dict[str, torch.Tensor]], reset: bool) -> Dict[str, torch.Tensor]:
    """The point, visibility and (with ``reset``) position-reset losses of a batch of samples."""
    size = net.config["size"]
    ref = torch.stack([s["reference"] for s in samples])
    search = torch.stack([s["search"] for s in samples])
    queries = torch.stack([s["queries"] for s in samples])
    truth = torch.stack([s["truth_mm"] for s in samples])
    visible = torch.stack([s["visible"] for s in samples])
    half = torch.stack([s["side"] for s in samples]).view(-1, 1, 1) / 2
    s_center = torch.stack([s["s_center"] for s in samples])[:, None]
    pos, vis_logit, logits = net(ref, search, queries)
    pred = s_center + pos * half
    point, err = _point_loss(pred, truth, visible)
    vis = F.binary_cross_entropy_with_logits(vis_logit, visible)
    token = _token_loss(logits, (truth - s_center) / half, visible)
    terms = {"point": point, "token": token, "visibility": vis, "error_mm": err.detach()}
    total = point + token + 0.5 * vis
    if reset:
        # the position reset: sample the search image at x + t for the reference view's points x, with t the
        # mean predicted displacement of the points it sees (differentiable in t)
        f_center = torch.stack([s["f_center"] for s in samples])[:, None]
        q_mm = f_center + queries * half
        t = ((pred - q_mm) * visible[..., None]).sum(1) / visible.sum(1, keepdim=True).clamp_min(1)
        resets, sees = [], []
        for k, s in enumerate(samples):
            y = view_points(s["f_center"], float(s["side"]), size) + t[k]
            src = (y - s["centre"] - s["shift"]) @ s["to_reference_rot"].T + s["centre"]
            inside = _inside(y, s["s_lo"], s["s_hi"])
            resets.append(sample_world(s["search_image"], s["affine"], src) * inside)
            sees.append(inside & (s["reference"][0] > 0))
        reset_view = torch.stack(resets)[:, None]
        pos2, vis2, _ = net(ref, reset_view, queries)
        pred2 = f_center + pos2 * half + t[:, None]
        point2, err2 = _point_loss(pred2, truth, visible)
        ncc = _ncc(ref[:, 0], reset_view[:, 0], torch.stack(sees))
        terms.update(point_reset=point2, ncc_reset=ncc, error_reset_mm=err2.detach())
        total = total + point2 + 0.5 * F.binary_cross_entropy_with_logits(vis2, visible) - ALPHA * ncc
    terms["total"] = total
    return terms


def train(work: Path, steps: int, seed: int = 0, lr: float = 5e-4, size: int = SIZE, export: bool = True,
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
    config = dict(DEFAULT, size=size)
    net = build(config).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = cosine_schedule(opt, steps)
    first_reset = int(QUIZZER_FRACTION * steps)

    def step_losses(step: int) -> Dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        picks = torch.randperm(len(sources), generator=gen)[:BATCH].tolist()
        samples = [draw(sources[k], gen, size, QUERIES) for k in picks]
        terms = losses(net, samples, reset=step >= first_reset)
        if step < first_reset:     # the same keys in every logged line
            zero = torch.zeros((), device=dev)
            terms.update(point_reset=zero, ncc_reset=zero, error_reset_mm=zero)
        return terms

    done = resumable_training(Path(work), net, opt, sched, steps, step_losses, stop_at, log=log)
    if done < steps:
        return {"steps_done": done, "steps": steps}
    summary = {"steps": steps, "seed": seed, "lr": lr, "size": size, "batch": BATCH, "queries": QUERIES,
               "quizzer_steps": first_reset, "alpha": ALPHA}
    if export:
        export_weights(WEIGHTS, net, config, work, summary, command,
                       describe_sources(list(named)), models_dir, log)
    return summary


def main(args) -> int:
    """Entry point of ``rtreg train quiz`` (arguments from :mod:`rtreg.cli`)."""
    summary = train(Path(args.work), args.steps, args.seed, args.lr, args.size, export=not args.no_export,
                    models_dir=Path(args.models_dir) if args.models_dir else None, command=training_command(),
                    threads=args.threads, stop_at=args.stop_at,
                    data=Path(args.data) if args.data else DATA, device=args.device,
                    log=lambda m: print(m, flush=True))
    print(json.dumps(summary, indent=2))
    return 0
