"""Baseline deformable method ``io``: multi-resolution instance optimisation with Adam.

After the pre-alignment A (fixed -> moving, rigid by default), a displacement u
(LPS mm, fixed grid) is optimised coarse to fine so that moving(A(x + u(x)))
matches fixed(x). The field is parameterised on a control grid at half the
working resolution, upsampled trilinearly and box-smoothed (a smoothed grid).
Similarity: local NCC (same modality) or MIND-SSC SSD (multimodal), inside the
fixed mask (given, or the body); regulariser: diffusion or bending energy.
Each level stops when its objective has converged (the last :data:`CONVERGENCE_WINDOW` iterations lowered
it by less than ``convergence_tolerance`` of what the level has lowered it by so far), at its iteration
count, or at the time budget, whichever comes first.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..case import Progress, RegisterOptions, RegistrationCase, RegistrationResult, no_progress, option_number
from ..device import resolve_device, seed_everything
from ..errors import InputError
from ..field import SpatialTransform, coverage, moving_view, resample_field
from ..image import Grid, Volume, normalize_intensity, resample, smooth_for_downsampling
from ..losses import bending_energy, diffusion, mind_ssc, ncc_local
from ..memory import check_memory
from ..prealign import prealign
from ..priors import body_mask
from ..spatial import field_to_array, resize_field, smooth, to_tensor, warp_through

NAME = "io"
ITERATIONS_PER_LEVEL = [80, 60]     # at twice the working spacing, then at the working spacing (at most)
CONVERGENCE_TOLERANCE = 0.01        # a level stops when its last CONVERGENCE_WINDOW iterations lowered the
CONVERGENCE_WINDOW = 10             # objective by less than this fraction of the level's decrease so far
DEFAULT_WEIGHTS = {("ncc", "diffusion"): 5.0, ("ncc", "bending"): 20.0,
                   ("mind", "diffusion"): 0.5, ("mind", "bending"): 10.0}


def same_modality(case: RegistrationCase) -> bool:
    a = case.fixed.meta.get("modality", "").upper()
    b = case.moving.meta.get("modality", "").upper()
    return a == b or not a or not b


def prealign_similarity(case: RegistrationCase, similarity: str) -> str:
    """The pre-alignment's similarity ("ncc" or "mi") for a method run with ``similarity`` (its option):
    "ncc" asks for one modality, "auto" follows the images' modalities (:func:`same_modality`), and any
    multimodal choice (mind, mi) asks for mutual information. An image read from NIfTI carries no modality,
    so the option is what tells an MR from a CT there."""
    if similarity == "auto":
        return "ncc" if same_modality(case) else "mi"
    return "ncc" if similarity == "ncc" else "mi"


@dataclass
class Level:
    """One resolution level: the fixed image on ``grid`` (the fixed frame at this level's spacing), the
    moving image on ``moving_grid`` (:func:`rtreg.field.moving_view`: its own field of view where the fixed
    grid maps onto it, on axes that run like the fixed grid's at the same spacing; resampled the same way as
    the fixed one), the pre-alignment ``affine`` (fixed LPS mm -> moving LPS mm) and where similarity counts."""
    grid: Grid
    fixed: torch.Tensor      # (1, 1, z, y, x) normalised fixed image on grid
    moving: torch.Tensor     # (1, 1, z', y', x') normalised moving image on moving_grid
    moving_grid: Grid
    affine: np.ndarray
    mask: torch.Tensor       # (1, 1, z, y, x) on grid
    iterations: int

    def warped(self, moving: torch.Tensor, u: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``moving`` (1, C, ...) on ``moving_grid`` (the image or features of it) at A(x + u(x)) on ``grid``:
        one interpolation (:func:`rtreg.spatial.warp_through`); u (1, 3, z, y, x) LPS mm, None: zero."""
        return warp_through(moving, self.moving_grid, self.affine, u, self.grid)


def normalised_images(case: RegistrationCase, fixed_mask: np.ndarray, moving_mask: np.ndarray
                      ) -> Tuple[Volume, Volume]:
    """The fixed and moving images scaled robustly to [0, 1] inside their masks, on their own grids."""
    return (case.fixed.with_array(normalize_intensity(case.fixed, fixed_mask)),
            case.moving.with_array(normalize_intensity(case.moving, moving_mask)))


def pyramid(f_norm: Volume, m_norm: Volume, fixed_mask: np.ndarray, affine: np.ndarray, spacing_mm: float,
            iterations: List[int], device: torch.device) -> List[Level]:
    """One level per entry of ``iterations``, coarsest first, ending at ``spacing_mm`` (each level halves the
    spacing): the normalised images, anti-aliased, each on a grid of its own at the level's spacing (the fixed
    one on the fixed frame's grid, the moving one on its own field of view, :func:`rtreg.field.moving_view`:
    the pre-alignment ``affine`` is applied with the field, in :meth:`Level.warped`), and the fixed mask
    widened by 2 voxels where the pre-aligned moving image has data (:func:`rtreg.field.coverage`);
    :func:`check_overlap` on the finest level's mask."""
    levels = []
    n = len(iterations)
    for i, n_it in enumerate(iterations):
        sp = spacing_mm * 2 ** (n - 1 - i)
        g = f_norm.grid.with_spacing(sp)
        mg = moving_view(m_norm.grid, affine, g)
        f = resample(smooth_for_downsampling(f_norm, sp), g)
        m = resample(smooth_for_downsampling(m_norm, sp), mg)
        mk = resample(f_norm.with_array(fixed_mask), g, "mask").array
        mk_t = F.max_pool3d(to_tensor(mk, device), 5, stride=1, padding=2)  # a 2-voxel margin around the mask
        mk_t = mk_t * to_tensor(coverage(m_norm.grid, affine, g), device)
        levels.append(Level(g, to_tensor(f.array, device), to_tensor(m.array, device), mg,
                            np.asarray(affine, np.float64), mk_t, n_it))
    check_overlap(float(levels[-1].mask.sum()))
    return levels


def check_overlap(counted_voxels: float) -> None:
    """InputError when the similarity would count nowhere (``counted_voxels``: the sum of its mask on the
    working grid, after the pre-alignment): the repeat does not overlap the planning image's body, and a
    method would return a near-zero field as if it had registered."""
    if not counted_voxels > 0:
        raise InputError("after the pre-alignment the repeat (moving) image does not overlap the planning (fixed) "
                         "image's body anywhere, so there is nothing to register; check that both images show "
                         "the same region, or choose another pre-alignment (--prealign)")


def registration_masks(case: RegistrationCase) -> Tuple[np.ndarray, np.ndarray]:
    """(fixed, moving) masks where similarity counts: the given fixed mask or the body, and the moving body;
    an image without a body found counts everywhere (all ones)."""
    fixed_mask = case.fixed_mask.array if case.fixed_mask is not None else body_mask(case.fixed)
    moving_mask = body_mask(case.moving)
    return tuple(m if m.any() else np.ones(m.shape, np.uint8) for m in (fixed_mask, moving_mask))


def convergence_tolerance(options: RegisterOptions) -> float:
    """``options.extra["convergence_tolerance"]`` (default :data:`CONVERGENCE_TOLERANCE`) checked: a number in
    [0, 1); see :func:`converged`."""
    return option_number("the convergence tolerance (--convergence-tolerance)",
                         options.extra.get("convergence_tolerance", CONVERGENCE_TOLERANCE), lambda t: 0 <= t < 1,
                         f"a number in [0, 1), e.g. {CONVERGENCE_TOLERANCE:g} (the default) or 0 to run every "
                         "iteration of each level")


def register(case: RegistrationCase, options: RegisterOptions, progress: Progress = no_progress
             ) -> RegistrationResult:
    """Register ``case.moving`` to ``case.fixed``; see the module docstring."""
    t0 = time.perf_counter()
    case.validate(options.prealign)
    device = resolve_device(options.device)
    seed_everything(options.seed)
    same = same_modality(case)
    similarity = options.similarity if options.similarity != "auto" else ("ncc" if same else "mind")
    if similarity not in ("ncc", "mind"):
        raise ValueError(f"io supports similarity ncc or mind, not {similarity!r}")
    if options.regularization not in ("diffusion", "bending"):
        raise ValueError(f"unknown regularization {options.regularization!r}; use diffusion or bending")
    weight = options.regularization_weight
    if weight is None:
        weight = DEFAULT_WEIGHTS[(similarity, options.regularization)]
    iterations = list(options.extra.get("iterations_per_level", ITERATIONS_PER_LEVEL if options.iterations is None
                                        else [options.iterations] * 2))
    tolerance = convergence_tolerance(options)
    check_memory(case.fixed.grid, options.working_spacing_mm, device, channels=12 if similarity == "mind" else 1)

    fixed_mask, moving_mask = registration_masks(case)
    progress(0.0, f"pre-alignment ({options.prealign})")
    affine = prealign(case.fixed, case.moving, options.prealign, fixed_mask, moving_mask,
                      prealign_similarity(case, similarity), device, options.seed,
                      lambda f, m: progress(0.2 * f, m))
    t_pre = time.perf_counter()

    levels = pyramid(*normalised_images(case, fixed_mask, moving_mask), fixed_mask, affine,
                     options.working_spacing_mm, iterations, device)
    u, qa = optimise(levels, similarity, options.regularization, weight, options.time_budget_s,
                     lambda f, m: progress(0.2 + 0.75 * f, m), tolerance=tolerance)
    t_opt = time.perf_counter()
    finest = levels[-1].grid
    field = Volume(field_to_array(u), finest.affine.copy(), {"units": "mm"})
    full = resample_field(field, case.fixed.grid)
    progress(1.0, "done")
    qa.update({"similarity": similarity, "regularization": options.regularization,
               "regularization_weight": weight, "working_spacing_mm": options.working_spacing_mm})
    return RegistrationResult(NAME, SpatialTransform(affine, full), affine, str(device),
                              {"prealign_s": t_pre - t0, "deformable_s": t_opt - t_pre,
                               "total_s": time.perf_counter() - t0}, qa)


def _similarity(kind: str, fixed_feat: torch.Tensor, warped_feat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if kind == "ncc":
        return ncc_local(fixed_feat, warped_feat, 5, mask)
    d = ((fixed_feat - warped_feat) ** 2).mean(1, keepdim=True)
    return -(d * mask).sum() / mask.sum().clamp_min(1.0)


def converged(losses: List[float], tolerance: float, window: int = CONVERGENCE_WINDOW) -> bool:
    """Whether a level's objective (``losses``, one per iteration, lower is better) has converged: the last
    ``window`` iterations lowered it by less than ``tolerance`` times the decrease since the level's first
    iteration. Never before ``2 * window + 1`` iterations, never while the objective is above its start, and
    never with ``tolerance`` 0 (every iteration runs). Relative, so the same tolerance serves NCC and MIND,
    a start from the pre-alignment and one from a network's field."""
    if tolerance <= 0 or len(losses) <= 2 * window:
        return False
    decrease = losses[0] - losses[-1]
    return decrease > 0 and losses[-1 - window] - losses[-1] < tolerance * decrease


def optimise(levels: List[Level], similarity: str, regularization: str, weight: float,
             time_budget_s: Optional[float], progress: Progress = no_progress,
             u_init: Optional[torch.Tensor] = None, tolerance: float = CONVERGENCE_TOLERANCE):
    """Coarse-to-fine Adam on a smoothed control grid; returns the finest (1, 3, z, y, x) mm field and QA.

    Each level runs at most its ``iterations`` and stops earlier once :func:`converged` with ``tolerance``
    (0: all of them); QA records the iterations of each level and why it stopped.
    ``u_init``: a starting field (1, 3, z, y, x) mm on the grid of ``levels[0]`` (all levels span the same
    extent); Adam then optimises a smoothed residual added to it, so the start keeps its detail."""
    start = time.perf_counter()
    reg_fn = diffusion if regularization == "diffusion" else bending_energy
    total = sum(lv.iterations for lv in levels)
    done = 0
    residual = None
    qa = {"iterations": 0, "stopped_by": "iterations"}
    for li, lv in enumerate(levels):
        spacing = [float(s) for s in lv.grid.spacing]
        shape = lv.fixed.shape[2:]
        ctrl_shape = [max(2, (n + 1) // 2) for n in shape]
        base = 0.0 if u_init is None else resize_field(u_init.detach(), shape)
        init = torch.zeros(1, 3, *ctrl_shape, device=lv.fixed.device) if residual is None else \
            resize_field(residual, ctrl_shape)
        params = init.clone().requires_grad_(True)
        opt = torch.optim.Adam([params], lr=0.25 * float(np.mean(spacing)))
        if similarity == "mind":
            f_feat, m_feat = mind_ssc(lv.fixed), mind_ssc(lv.moving)   # each on its own grid
        else:
            f_feat, m_feat = lv.fixed, lv.moving
        losses: List[float] = []
        stopped_by = "iterations"
        for _ in range(lv.iterations):
            if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
                stopped_by = "time budget"
                break
            opt.zero_grad()
            u_l = base + smooth(resize_field(params, shape))
            sim = _similarity(similarity, f_feat, lv.warped(m_feat, u_l), lv.mask)
            loss = -sim + weight * reg_fn(u_l, spacing)
            loss.backward()
            opt.step()
            done += 1
            qa["iterations"] += 1
            losses.append(loss.item())
            progress(done / total, f"level {li + 1}/{len(levels)} ({spacing[0]:.1f} mm): {similarity} "
                                   f"{sim.item():.4f}")
            if converged(losses, tolerance):
                stopped_by = "convergence"
                break
        done = sum(level.iterations for level in levels[:li + 1])    # the progress bar goes on from here
        qa[f"iterations_level{li + 1}"] = len(losses)
        qa[f"stopped_by_level{li + 1}"] = qa["stopped_by"] = stopped_by   # overall: as the finest level
        with torch.no_grad():
            residual = smooth(resize_field(params.detach(), shape))
            u = base + residual
            qa[f"similarity_after_level{li + 1}"] = _similarity(similarity, f_feat, lv.warped(m_feat, u),
                                                               lv.mask).item()
    qa["similarity_after"] = qa[f"similarity_after_level{len(levels)}"]
    qa["convergence_tolerance"] = tolerance
    with torch.no_grad():  # on the finest level, after pre-alignment only
        qa["similarity_before"] = _similarity(similarity, f_feat, levels[-1].warped(m_feat), levels[-1].mask).item()
    qa["optimisation_s"] = time.perf_counter() - start
    return u.detach(), qa
