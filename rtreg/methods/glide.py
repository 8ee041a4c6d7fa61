"""GlideReg (``glide``): global-to-local deformable registration, after GLIDE-Reg.

After the pre-alignment A (fixed -> moving, rigid by default), on the fixed image's working grid W (the
working spacing) and a grid C of half its resolution:

1. **Local features**: MIND-SSC (12 channels) of the fixed image on W and of the moving image on its own
   grid at W's spacing (both resampled alike: :func:`rtreg.methods.io.pyramid`); the convex stages read the
   moving features through A on W, the Adam stage samples them at A(x + u(x)) in one interpolation.
2. **Global features** (:mod:`rtreg.global_features`): the shipped contrast-invariant encoder's features (or
   SAM2 slice features, with the ``sam2`` package and a checkpoint), reduced to 12 channels by a small VAE
   fitted on the fixed and moving features of this case (or by PCA, the ablation), scaled to MIND's spread.
3. **Global-to-local convex optimisation** (:mod:`rtreg.convex`): the coupled convex stage on the global
   features (control points about every ``GLOBAL_STEP_MM``, candidates up to +-``GLOBAL_RANGE_MM``) gives
   u_g; on the local features of the moving image warped by u_g, finer (``LOCAL_STEP_MM``,
   ``LOCAL_RANGE_MM``), u_l. The
   composition w(x) = u_l(x) + u_g(x + u_l(x)) is the field of warping by u_g, then by u_l (our fields pull
   back: warped(x) = moving(x + w(x)); the paper's u_g(x) + u_l(x + u_g(x)) written for the same sequence).
   Optionally the same in the backward direction, and both made inverse-consistent.
   Guard (ours): the local convex stage is also run alone (without u_g; one more convex stage); when the
   global-to-local field does not end at a lower local feature SSD inside the fixed mask (where the
   pre-aligned moving image has data) than the local stage alone, the global features do not help on this
   pair (the shipped encoder is undertrained); u_g and the global term are then dropped, and the result says
   so (``global_guard``: False keeps them, for ablations).
4. **Adam instance optimisation** on C (control field on C, smoothed): alpha SSD(global) + beta SSD(local)
   inside the fixed mask + lambda bending energy + ``FOLDING_WEIGHT`` x the folding penalty on C (ours:
   :func:`rtreg.losses.folding_penalty`, zero unless a cell shrinks below a tenth of its volume; bending
   alone let it fold between two people's abdomens), the VAE updated jointly (its reconstruction and KL terms
   added), until its iterations or the time budget. Each SSD is estimated every step on ``ADAM_SAMPLES``
   random voxels of its mask (the moving global features sampled where the field points, then reduced).

Fallbacks (said in the result's messages and QA): global features that cannot be had (a SAM2 checkpoint that
does not exist or does not match, no ``sam2`` package, an image smaller than the feature grid), or a global
stage that the guard drops, leave the local features alone; an image too small for the local stage is an error.

Options (``options.extra``): ``global_features`` learned | sam2 | none; ``sam2_checkpoint``,
``sam2_config``; ``reduction`` vae | pca; ``stages`` global-to-local | global | local; ``inverse_consistency``
(bool); ``global_guard`` (bool, default True); ``adam_iterations``; ``folding_weight`` (0 leaves the penalty
out). ``options.iterations`` also sets the
Adam iterations, ``time_budget_s`` bounds them; ``regularization_weight`` is lambda.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..case import (Progress, RegisterOptions, RegistrationCase, RegistrationResult, folding_weight_option,
                    no_progress)
from ..convex import CoarsePair, adam_refine, control_field_mm, inverse_consistent
from ..device import resolve_device, seed_everything
from ..errors import InputError
from ..field import SpatialTransform, affine_to_sitk, resample_field
from ..global_features import fit_pca, fit_vae, learned_features, load_sam2, slice_features
from ..image import Grid, Volume, resample, smooth_for_downsampling
from ..losses import mind_ssc
from ..memory import check_memory
from ..models import load_weights
from ..nets.glide import build_encoder
from ..prealign import prealign
from ..spatial import compose_fields, field_to_array, resample_on_grid, warp
from .io import Level, normalised_images, prealign_similarity, pyramid, registration_masks

NAME = "glide"
ENCODER_WEIGHTS = "glide_features.pt"
LATENT = 12                      # channels of the reduced global features (MIND-SSC has 12 too)
GLOBAL_STEP_MM, GLOBAL_RANGE_MM = 12.0, 36.0   # control points about every 12 mm, candidates up to +-36 mm
LOCAL_STEP_MM, LOCAL_RANGE_MM = 9.0, 18.0
ADAM_ITERATIONS = 120
ADAM_LR_MM = 2.0
ADAM_SAMPLES = 100_000          # voxels of the working grid per Adam step (stochastic gradients)
ALPHA, BETA = 12.0, 12.0         # weights of the global and the local SSD in the refinement
BENDING_WEIGHT = 600.0           # lambda (bending energy of the field on the control grid, 1/mm); chosen on
#                                  held-out benchmark cases (bench/README.md, GlideReg, "Bending weight")
FOLDING_WEIGHT = 1.0e4           # the folding penalty's weight (ours; rtreg.losses.folding_penalty)
VAE_STEPS = 150                  # fitting the VAE before the convex stage
STAGES = ("global-to-local", "global", "local")
SOURCES = ("learned", "sam2", "none")
REDUCTIONS = ("vae", "pca")


def _option(options: RegisterOptions, key: str, default, allowed=None):
    value = options.extra.get(key, default)
    if allowed is not None and value not in allowed:
        raise InputError(f"GlideReg option {key}={value!r} is not one of {', '.join(allowed)}")
    return value


class GlobalFeatures:
    """The fixed and moving global features on their feature grid, and their reduction to ``LATENT`` channels
    (``reduce``: (1, C, ...) -> (1, LATENT, ...), scaled to MIND's spread) with the VAE's ``penalty`` and
    parameters when it is one."""

    def __init__(self, fixed: torch.Tensor, moving: torch.Tensor, grid: Grid, source: str):
        self.fixed, self.moving, self.grid, self.source = fixed, moving, grid, source
        self.reduce: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
        self.penalty: Optional[Callable[[], torch.Tensor]] = None
        self.parameters: List[torch.Tensor] = []

    def fit(self, reduction: str, seed: int, target_spread: float) -> None:
        if reduction == "vae":
            vae, self.penalty = fit_vae(self.fixed, self.moving, LATENT, VAE_STEPS, seed)
            self.parameters = list(vae.parameters())
            raw = lambda x: vae.encode(x)[0]  # noqa: E731 - the latent mean
        else:
            raw = fit_pca(self.fixed, self.moving, LATENT, seed)
        with torch.no_grad():
            spread = float(raw(self.fixed).std(dim=(2, 3, 4)).pow(2).sum().sqrt())
        scale = target_spread / max(spread, 1e-6)
        self.reduce = lambda x: raw(x) * scale

    def on_grid(self, grid: Grid) -> Tuple[torch.Tensor, torch.Tensor]:
        """Reduced (fixed, moving) features on ``grid`` (no gradient)."""
        with torch.no_grad():
            return tuple(resample_on_grid(self.reduce(x), self.grid, grid) for x in (self.fixed, self.moving))


def _global_features(case: RegistrationCase, f_norm: Volume, m_norm: Volume, affine: np.ndarray, grid: Grid,
                     options: RegisterOptions, device: torch.device, messages: List[str]
                     ) -> Optional[GlobalFeatures]:
    """The global features of the source asked for, or None (with a message) when they cannot be had."""
    source = _option(options, "global_features", "learned", SOURCES)
    if source == "none":
        return None
    try:
        if source == "sam2":
            encode = load_sam2(str(options.extra.get("sam2_checkpoint", "")),
                               str(options.extra.get("sam2_config", "configs/sam2.1/sam2.1_hiera_t.yaml")), device)
            spacing = float(np.min(grid.spacing))
            run = lambda image: slice_features(image, encode)  # noqa: E731
        else:
            state, config = load_weights(ENCODER_WEIGHTS)
            net = build_encoder(config).to(device).eval()
            net.load_state_dict(state)
            spacing = float(config["spacing_mm"])
            run = lambda image: learned_features(image, net, device)  # noqa: E731
        enc_grid = grid.with_spacing(spacing, finer=True)     # the encoder's scale, whatever the working grid's
        if min(enc_grid.shape) < 8:
            raise InputError(f"the image is {tuple(enc_grid.shape)} voxels at the global feature encoder's "
                             f"{spacing:g} mm: smaller than its feature grid (8 voxels along every axis)")
        fixed_img = resample(smooth_for_downsampling(f_norm, spacing), enc_grid)
        moving_img = resample(smooth_for_downsampling(m_norm, spacing), enc_grid, "linear", affine_to_sitk(affine), 0.0)
        f_feat, feat_grid = run(fixed_img)
        m_feat, _ = run(moving_img)
        return GlobalFeatures(f_feat.to(device), m_feat.to(device), feat_grid, source)
    except InputError as exc:
        messages.append(f"global features ({source}) not used: {exc}; GlideReg ran on its local (MIND-SSC) "
                        "features alone")
        return None


def _steps(grid: Grid, step_mm: float, range_mm: float) -> Tuple[int, int]:
    """(control step in working voxels, search radius in steps) for a step and a search range in mm."""
    spacing = float(np.max(grid.spacing))
    step = max(1, int(round(step_mm / spacing)))
    return step, max(1, int(round(range_mm / (step * spacing))))


def _global_field(global_pair: Tuple[torch.Tensor, torch.Tensor], grid: Grid) -> torch.Tensor:
    """u_g: the convex stage on the reduced global features (1, 3, z, y, x) LPS mm on ``grid``."""
    return control_field_mm(*global_pair, grid, *_steps(grid, GLOBAL_STEP_MM, GLOBAL_RANGE_MM))


def _convex(u_g: Optional[torch.Tensor], local_pair: Optional[Tuple], grid: Grid) -> torch.Tensor:
    """The global-to-local convex stage: u_l on the local pair after u_g, composed with u_g (either may be
    missing, not both)."""
    if local_pair is None:
        return u_g
    fixed, moving = local_pair
    u_l = control_field_mm(fixed, moving if u_g is None else warp(moving, u_g, grid), grid,
                           *_steps(grid, LOCAL_STEP_MM, LOCAL_RANGE_MM))
    return u_l if u_g is None else compose_fields(u_g, u_l, grid)


def _local_features(fine: Level) -> Tuple[torch.Tensor, torch.Tensor]:
    """MIND-SSC of the fixed image on the working grid and of the moving image on its own grid at the working
    spacing (``fine.moving_grid``; :meth:`rtreg.methods.io.Level.warped` takes it through A and a field)."""
    return mind_ssc(fine.fixed), mind_ssc(fine.moving)


def _ssd(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((((a - b) ** 2).mean(1, keepdim=True) * mask).sum() / mask.sum().clamp_min(1.0))


def register(case: RegistrationCase, options: RegisterOptions, progress: Progress = no_progress
             ) -> RegistrationResult:
    """Register ``case.moving`` to ``case.fixed``; see the module docstring."""
    t0 = time.perf_counter()
    case.validate(options.prealign)
    device = resolve_device(options.device)
    seed_everything(options.seed)
    stages = _option(options, "stages", "global-to-local", STAGES)
    reduction = _option(options, "reduction", "vae", REDUCTIONS)
    if options.extra.get("global_features") == "none" and stages == "global":
        raise InputError("GlideReg stages=global needs global features; choose learned or sam2")
    iterations = int(options.extra.get("adam_iterations", options.iterations or ADAM_ITERATIONS))
    bending = BENDING_WEIGHT if options.regularization_weight is None else float(options.regularization_weight)
    folding = folding_weight_option("GlideReg", options, FOLDING_WEIGHT)
    check_memory(case.fixed.grid, options.working_spacing_mm, device, channels=2 * LATENT + 12)
    messages: List[str] = []
    qa: Dict[str, object] = {"stages": stages, "reduction": reduction}

    fixed_mask, moving_mask = registration_masks(case)
    progress(0.0, f"pre-alignment ({options.prealign})")
    affine = prealign(case.fixed, case.moving, options.prealign, fixed_mask, moving_mask,
                      prealign_similarity(case, options.similarity), device, options.seed,
                      lambda f, m: progress(0.15 * f, m))
    t_pre = time.perf_counter()

    f_norm, m_norm = normalised_images(case, fixed_mask, moving_mask)
    coarse, fine = pyramid(f_norm, m_norm, fixed_mask, affine, options.working_spacing_mm, [0, 0], device)
    grid = fine.grid
    progress(0.2, "local features (MIND-SSC)")
    local = _local_features(fine) if stages != "global" else None
    glob = None
    if stages != "local":
        progress(0.25, "global features")
        glob = _global_features(case, f_norm, m_norm, affine, grid, options, device, messages)
        if glob is None:
            if stages == "global":
                raise InputError(messages[-1].replace("alone", "but stages=global asks for the global ones"))
            local = local if local is not None else _local_features(fine)
            qa["stages"] = "local (fallback)"
        else:
            progress(0.35, f"reducing the global features ({reduction})")
            spread = float(local[0].std(dim=(2, 3, 4)).pow(2).sum().sqrt()) if local is not None else 1.0
            glob.fit(reduction, options.seed, spread)
    qa["global_features"] = glob.source if glob is not None else "none"
    t_feat = time.perf_counter()

    progress(0.45, "convex optimisation")
    global_w = glob.on_grid(grid) if glob is not None else None
    try:
        u_g = _global_field(global_w, grid) if global_w is not None else None
        local_on_grid = (local[0], fine.warped(local[1])) if local is not None else None   # through A
        u = _convex(u_g, local_on_grid, grid)
        if u_g is not None and local is not None:
            local_only = _convex(None, local_on_grid, grid)
            with_global, without = (_ssd(local[0], fine.warped(local[1], v), fine.mask) for v in (u, local_only))
            qa["local_ssd_after_convex"] = {"global-to-local": with_global, "local only": without}
            if with_global >= without and options.extra.get("global_guard", True):
                messages.append(f"the global convex stage was dropped: with it the convex stages end at a local "
                                f"(MIND-SSC) feature SSD of {with_global:.4g}, not below the {without:.4g} of the "
                                "local stage alone, so the global features do not help on this pair; GlideReg "
                                "ran on its local features alone")
                glob = global_w = None
                u = local_only
                qa["stages"] = "local (global stage dropped)"
        if options.extra.get("inverse_consistency", False):
            backward = _convex(_global_field(global_w[::-1], grid) if global_w is not None else None,
                               local_on_grid[::-1] if local is not None else None, grid)
            u, _ = inverse_consistent(u, backward, grid)
    except ValueError as exc:
        raise InputError(f"the image is too small for GlideReg at {options.working_spacing_mm:g} mm: {exc}; "
                         "use a finer --working-spacing or a larger field of view") from exc
    t_convex = time.perf_counter()

    progress(0.6, "Adam instance optimisation")
    u_start = u
    named: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {"local": local} if local is not None else {}
    global_pair = None
    if glob is not None:   # on the control grid; the VAE keeps learning, so its reduction is recomputed each step
        raw = [resample_on_grid(x, glob.grid, coarse.grid) for x in (glob.fixed, glob.moving)]
        global_pair = CoarsePair(*raw, glob.reduce, glob.penalty or (lambda: torch.zeros((), device=device)),
                                 glob.parameters, ALPHA)
    u, done = adam_refine(list(named.values()), u_start, grid, [BETA] * len(named), bending, iterations,
                          lr_mm=ADAM_LR_MM, control_grid=coarse.grid, mask=fine.mask, coarse_pair=global_pair,
                          control_mask=coarse.mask, time_budget_s=options.time_budget_s, samples=ADAM_SAMPLES,
                          seed=options.seed, folding_weight=folding, moving_frame=(fine.moving_grid, fine.affine),
                          progress=lambda f, m: progress(0.6 + 0.35 * f, m))
    t_adam = time.perf_counter()
    if global_pair is not None:
        with torch.no_grad():
            final_global = global_pair.features()
    u_start_coarse, u_coarse = (resample_on_grid(x, grid, coarse.grid) for x in (u_start, u))
    for key, field in (("ssd_after_prealignment", None), ("ssd_after_convex", (u_start, u_start_coarse)),
                       ("ssd_after", (u, u_coarse))):
        qa[key] = {k: _ssd(a, fine.warped(b, None if field is None else field[0]), fine.mask)
                   for k, (a, b) in named.items()}
        if glob is not None:
            a, b = final_global
            qa[key]["global"] = _ssd(a, b if field is None else warp(b, field[1], coarse.grid), coarse.mask)

    field = Volume(field_to_array(u), grid.affine.copy(), {"units": "mm"})
    full = resample_field(field, case.fixed.grid)
    progress(1.0, "done")
    qa.update({"iterations": done, "stopped_by": "iterations" if done == iterations else "time budget",
               "bending_weight": bending, "folding_weight": folding, "working_spacing_mm": options.working_spacing_mm,
               "inverse_consistency": bool(options.extra.get("inverse_consistency", False))})
    return RegistrationResult(NAME, SpatialTransform(affine, full), affine, str(device),
                              {"prealign_s": t_pre - t0, "features_s": t_feat - t_pre, "convex_s": t_convex - t_feat,
                               "adam_s": t_adam - t_convex, "deformable_s": t_adam - t_pre,
                               "total_s": time.perf_counter() - t0}, qa, messages)
