"""TTORegister: a distilled U-Net, optimised on the pair being registered (test-time optimisation).

1. Pre-alignment A (fixed -> moving, rigid by default), as the ``io`` method does it: NCC when the
   similarity below includes NCC, Mattes MI otherwise (so ``--similarity mi`` also pre-aligns by MI).
2. Both images are scaled to [0, 1] inside their bodies and resampled to the working grid: isotropic,
   over the fixed body plus 20 mm, each axis a multiple of 16, at the finest spacing (not below
   ``options.working_spacing_mm``) whose voxel count keeps the budget on the device
   (:data:`MAX_VOXELS`: about 100 iterations in 60 s on 2 CPU cores).
3. The shipped student (:data:`rtreg.nets.tto.STUDENT`, distilled from the teacher; see
   :mod:`rtreg.train.tto`) predicts a displacement; then its weights are optimised on this pair with Adam:
   multi-axis mutual information (:data:`MI_BINS` = 32 intensity bins; training used 16, but at test time
   16 bins let the optimisation drift away from the truth on the T1-like MRs: thorax 1.55 against 1.16 mm,
   abdomen 2.44 against 2.06 mm, bench/README "Multi-axis MI of 32 bins"; ``python3 -m bench.tto_iterations``
   traces it over the iterations) + local NCC (only
   when the modalities match, or when asked) + diffusion
   smoothness + a divergence penalty (near-incompressibility) + a folding penalty (ours, not the paper's:
   :func:`rtreg.losses.folding_penalty`, zero unless a cell of the working grid shrinks below a tenth of its
   volume; without it the field folded 0.5 % of the body on an inter-subject abdomen), the similarity inside
   the fixed body (widened by 2 voxels) where both images have data: inside the fixed image, and where the
   current field takes the sample inside the moving image (recomputed every iteration), never over the fill
   or the edge value repeated past a cropped field of view (on the inter-subject abdomen slabs, 39 mm thick
   on a 178 mm working grid, the widened body reached 11 mm into the fixed image's fill at each end;
   bench/README "TTORegister"). It stops at ``options.iterations`` (default 100) or
   ``options.time_budget_s`` (default 60 s), whichever comes first, and keeps the running average of the
   weights over about its last 10 iterations (:data:`WEIGHT_AVERAGING`), so that where the budget cuts does
   not decide the result. On a CPU with AMX the network's passes run in mixed bfloat16 (its weights, its
   displacement head, the losses and the returned field in float32: :func:`rtreg.device.network_precision`),
   in 0.55-0.6 of the float32 time at the same accuracy (bench/README "TTORegister", "Mixed bfloat16").
4. The field (tapered to zero at the working grid's faces) is returned on the fixed grid at full resolution.

QA: the patch-wise MI map (16-voxel cubes, stride 4, centres inside the fixed body, on a 3 mm grid) before
registration and after, with their means before, after the pre-alignment and after
(``RegistrationResult.maps`` and ``qa``).

``options.extra``: ``network`` ("student" or "teacher"), ``adapt`` (False: the network's prediction only),
``max_voxels`` (the working-grid budget), ``learning_rate`` (of the test-time Adam), ``weight_averaging``
(the decay of the running average of the weights that is returned; 0: the last iterate; see :func:`adapt`),
``folding_weight`` (default :data:`FOLDING_WEIGHT`; 0 leaves the folding penalty out), ``precision`` (of the
network's passes during the optimisation: :func:`rtreg.device.network_precision`; the returned field is the
averaged weights' float32 prediction), ``mi_bins`` (of the test-time multi-axis MI, default :data:`MI_BINS`).
:func:`register_with` registers with a network the caller holds, so a 4D series (:mod:`rtreg.series`) carries
the adapted weights from frame to frame.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..case import (Progress, RegisterOptions, RegistrationCase, RegistrationResult, folding_weight_option,
                    no_progress, option_number)
from ..device import autocast, network_precision, resolve_device, seed_everything
from ..errors import InputError
from ..field import SpatialTransform, coverage, moving_view, resample_field, warp
from ..image import Grid, Volume, resample, smooth_for_downsampling
from ..losses import diffusion, divergence_penalty, folding_penalty, multi_axis_mi, ncc_local
from ..memory import check_memory
from ..metrics import patch_mi_map
from ..models import load_weights
from ..netgrid import edge_taper, network_images, spacing_for_budget, working_grid
from ..nets.tto import RegUNet, build, on_device
from ..prealign import prealign
from ..spatial import field_to_array, inside_through, to_tensor, voxels_to_mm, warp_through, warp_voxels
from . import io

NAME = "tto"
TEACHER_WEIGHTS = "tto_teacher.pt"
STUDENT_WEIGHTS = "tto_student.pt"
MAX_ITERATIONS = 100
TIME_BUDGET_S = 60.0
MAX_VOXELS = {"cpu": 48 * 48 * 64, "cuda": 128 * 128 * 128}
LEARNING_RATE = 1e-3             # Adam on the network weights; 3e-3 diverges on the pelvis phantom
SMOOTH_WEIGHT = 1.0            # diffusion of the field in voxels of the working grid
DIVERGENCE_WEIGHT = 0.1
FOLDING_WEIGHT = 1.0e3          # ours (not the paper's): step 3 of the module docstring
MI_BINS = 32                    # intensity bins of the test-time multi-axis MI (training uses 16): step 3
WEIGHT_AVERAGING = 0.9         # the returned weights: their running average over about the last 10 iterations
TAPER_MM = 12.0
QA_SPACING_MM = 3.0            # the patch-wise MI maps' grid (or the working grid's spacing, if finer)
SIMILARITIES = ("auto", "mi", "ncc")   # ncc: multi-axis MI + local NCC; mi: MI alone; auto: NCC if one modality


@lru_cache(maxsize=2)
def _weights(role: str):
    return load_weights(TEACHER_WEIGHTS if role == "teacher" else STUDENT_WEIGHTS)


def load_network(role: str, device: torch.device) -> RegUNet:
    """A fresh copy of the shipped ``role`` ("student" or "teacher") network on ``device`` (its weights are
    the caller's to adapt)."""
    if role not in ("student", "teacher"):
        raise InputError(f"unknown network {role!r}; use student or teacher")
    state, config = _weights(role)
    net = build(config)
    net.load_state_dict(copy.deepcopy(state))
    return on_device(net, device)


def check_budget(options: RegisterOptions) -> Tuple[int, float]:
    """(iterations, seconds) of the test-time optimisation; a budget of zero is bad input."""
    iterations = MAX_ITERATIONS if options.iterations is None else int(options.iterations)
    seconds = TIME_BUDGET_S if options.time_budget_s is None else float(options.time_budget_s)
    if iterations < 1 or not seconds > 0:
        raise InputError(f"the test-time optimisation budget is {iterations} iterations / {seconds:g} s; give "
                         "--iterations >= 1 and --time-budget > 0 (or turn the optimisation off to use the "
                         "network's prediction alone)")
    return iterations, seconds


def check_weight_averaging(value: object) -> float:
    """The decay of the returned weights' running average (see :func:`adapt`), checked: a number in [0, 1)."""
    return option_number("weight_averaging", value, lambda d: 0.0 <= d < 1.0,
                         f"a number in [0, 1) (0 keeps the last iterate, the default {WEIGHT_AVERAGING:g} averages "
                         "over about the last 10 iterations)")


def adapt(net: RegUNet, fixed: torch.Tensor, moving: torch.Tensor, mask: torch.Tensor, use_ncc: bool,
          iterations: int, seconds: float, smooth_weight: float = SMOOTH_WEIGHT,
          learning_rate: float = LEARNING_RATE, weight_averaging: float = WEIGHT_AVERAGING,
          folding_weight: float = FOLDING_WEIGHT, warp_moving: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
          inside: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
          precision: torch.dtype = torch.float32, mi_bins: int = MI_BINS,
          progress: Progress = no_progress) -> Dict[str, object]:
    """Optimise ``net``'s weights in place on one pair (fixed, moving: (1, 1, z, y, x) in [0, 1] on the working
    grid; mask (1, 1, z, y, x)); stops at ``iterations`` or ``seconds``. Returns what happened (QA).
    ``warp_moving``: the moving image the similarity compares for a field (1, 3, z, y, x) in working voxels
    (:meth:`WorkingPair.warped`: one interpolation from the moving image's own grid); default: ``moving``
    warped by it. ``inside``: for the same field, (1, 1, z, y, x) weights in [0, 1] of where the moving sample
    lies inside the moving image (:meth:`WorkingPair.inside`); the similarity then counts over ``mask`` times
    them, recomputed every iteration without a gradient (as ITK's metrics drop the samples that leave the
    moving image), so that no voxel compares the fixed image with the moving image's edge value repeated
    past a cropped field of view; default: ``mask`` alone. ``precision``: the dtype of the network's passes
    (:func:`rtreg.device.network_precision`; its weights, the losses and the field they see stay float32).
    ``mi_bins``: the intensity bins of the multi-axis MI (Parzen windows one bin wide over [0, 1]).

    ``net`` ends with the exponential moving average of its weights over the iterations (each step moves the
    average by 1 - ``weight_averaging`` towards the new weights; 0 keeps the last iterate). Adam at this
    learning rate makes the last iterate's TRE swing by up to 0.6 mm between stops two iterations apart on a
    pelvis phantom, so where a time budget cuts would decide the result; the average's moves by at most
    0.07 mm (``python3 bench/tto_weight_averaging.py``)."""
    weight_averaging = check_weight_averaging(weight_averaging)
    opt = torch.optim.Adam(net.parameters(), lr=learning_rate)
    params = list(net.parameters())
    averaged = [p.detach().clone() for p in params]
    net.train()
    eye = torch.eye(3)                  # the field is in voxels of the (isotropic) working grid
    start = time.perf_counter()
    qa: Dict[str, object] = {"iterations": 0, "stopped_by": "iterations", "loss": []}
    for it in range(iterations):
        if time.perf_counter() - start > seconds:
            qa["stopped_by"] = "time budget"
            break
        opt.zero_grad()
        with autocast(fixed.device, precision):
            u = net(fixed, moving)                  # float32: the head runs outside the autocast
        warped = warp_voxels(moving, u) if warp_moving is None else warp_moving(u)
        counted = mask
        if inside is not None:
            with torch.no_grad():
                counted = mask * inside(u)
        mi = multi_axis_mi(fixed, warped, counted, mi_bins)
        loss = -mi + smooth_weight * diffusion(u, [1.0, 1.0, 1.0]) + DIVERGENCE_WEIGHT * divergence_penalty(
            u, [1.0, 1.0, 1.0])
        if use_ncc:
            loss = loss - ncc_local(fixed, warped, 5, counted)
        if folding_weight:
            loss = loss + folding_weight * folding_penalty(u, eye)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for avg, p in zip(averaged, params):
                avg.lerp_(p, 1.0 - weight_averaging)
        qa["iterations"] = it + 1
        if it == 0 or (it + 1) % 10 == 0:
            qa["loss"].append(round(float(loss.detach()), 5))
        progress((it + 1) / iterations, f"test-time optimisation {it + 1}/{iterations}: MI {float(mi.detach()):.4f}")
    with torch.no_grad():
        for avg, p in zip(averaged, params):
            p.copy_(avg)
    qa["seconds"] = time.perf_counter() - start
    qa["weight_averaging"] = weight_averaging
    qa["folding_weight"] = folding_weight
    qa["precision"] = str(precision).replace("torch.", "")
    qa["mi_bins"] = mi_bins
    net.eval()
    return qa


@dataclass
class WorkingPair:
    """A pair on TTORegister's working grid: ``fixed``, ``moving`` (the moving image through the
    pre-alignment ``affine``, fixed -> moving LPS: the network's input) and ``mask`` as (1, 1, z, y, x)
    tensors (``mask``: the fixed body widened by 2 voxels, inside the fixed image); ``moving_own``, the moving
    image on ``moving_grid`` (its own field of view at the working spacing, where the working grid maps onto
    it: :func:`rtreg.field.moving_view`), which the similarity reads through A and the field in one
    interpolation (:meth:`warped`); the images
    normalised to [0, 1] on their own grids and the fixed body mask, for the QA maps; ``prealign_s``: the
    seconds the pre-alignment took; ``moving_image_grid``: the moving image's own grid (:meth:`inside`)."""

    grid: Grid
    affine: np.ndarray
    fixed: torch.Tensor
    moving: torch.Tensor
    mask: torch.Tensor
    use_ncc: bool
    f_norm: Volume
    m_norm: Volume
    fixed_mask: np.ndarray
    prealign_s: float
    moving_own: torch.Tensor
    moving_grid: Grid
    moving_image_grid: Grid

    def inside(self, u_voxels: torch.Tensor) -> torch.Tensor:
        """(1, 1, z, y, x) weights on the working grid: 1 where A(x + u(x)) lies inside the moving image (its
        own full grid, not the view), 0 beyond one moving voxel past its edge (:func:`rtreg.spatial.inside_through`)
        for u (1, 3, z, y, x) in working voxels."""
        return inside_through(self.moving_image_grid, self.affine, voxels_to_mm(u_voxels, self.grid), self.grid,
                              u_voxels.device)

    def warped(self, u_voxels: torch.Tensor) -> torch.Tensor:
        """moving(A(x + u(x))) on the working grid for u (1, 3, z, y, x) in its voxels, in one interpolation."""
        return warp_through(self.moving_own, self.moving_grid, self.affine, voxels_to_mm(u_voxels, self.grid),
                            self.grid)


def working_pair(case: RegistrationCase, options: RegisterOptions, device: torch.device, messages: List[str],
                 progress: Progress = no_progress) -> WorkingPair:
    """Steps 1-2 of the module docstring: the pre-alignment and the pair on the working grid."""
    use_ncc = io.prealign_similarity(case, options.similarity) == "ncc"    # NCC only within one modality
    fixed_mask, moving_mask = io.registration_masks(case)
    if fixed_mask.all():
        messages.append("no body found on the fixed image; similarity counts everywhere")
    budget = int(options.extra.get("max_voxels", MAX_VOXELS.get(device.type, MAX_VOXELS["cpu"])))
    spacing = spacing_for_budget(case.fixed.grid, budget, options.working_spacing_mm, fixed_mask)
    check_memory(case.fixed.grid, spacing, device, channels=16)
    grid = working_grid(case.fixed.grid, spacing, region=fixed_mask)
    progress(0.0, f"pre-alignment ({options.prealign})")
    t0 = time.perf_counter()
    affine = prealign(case.fixed, case.moving, options.prealign, fixed_mask, moving_mask, "ncc" if use_ncc else "mi",
                      device, options.seed, lambda f, m: progress(0.15 * f, m))
    prealign_s = time.perf_counter() - t0
    f_norm, m_norm = io.normalised_images(case, fixed_mask, moving_mask)
    f_img, m_img = network_images(f_norm, m_norm, affine, grid)
    moving_grid = moving_view(m_norm.grid, affine, grid)
    m_own = resample(smooth_for_downsampling(m_norm, spacing), moving_grid).array
    body = resample(case.fixed.with_array(fixed_mask.astype(np.uint8)), grid, "mask").array
    mask = F.max_pool3d(to_tensor(body, device), 5, stride=1, padding=2) * to_tensor(
        coverage(case.fixed.grid, np.eye(4), grid), device)   # the widened body, where the fixed image has data
    pair = WorkingPair(grid, affine, to_tensor(f_img, device), to_tensor(m_img, device), mask, use_ncc,
                       f_norm, m_norm, fixed_mask, prealign_s, to_tensor(m_own, device), moving_grid,
                       case.moving.grid)
    io.check_overlap(float((mask * pair.inside(torch.zeros(1, 3, *grid.shape, device=device))).sum()))
    return pair


def network_transform(net: RegUNet, pair: WorkingPair, fixed_grid: Grid) -> SpatialTransform:
    """``net``'s field on ``pair`` (tapered to zero at the working grid's faces, LPS mm) at full resolution on
    ``fixed_grid``, after the pre-alignment: the fixed -> moving transform."""
    spacing = float(pair.grid.spacing[0])
    with torch.no_grad():
        net.eval()
        u_mm = voxels_to_mm(net(pair.fixed, pair.moving), pair.grid) * to_tensor(
            edge_taper(pair.grid.shape, TAPER_MM / spacing), pair.fixed.device)
    field = Volume(field_to_array(u_mm), pair.grid.affine.copy(), {"units": "mm"})
    return SpatialTransform(pair.affine, resample_field(field, fixed_grid))


def register_with(net: RegUNet, case: RegistrationCase, options: RegisterOptions,
                  progress: Progress = no_progress) -> RegistrationResult:
    """Register ``case.moving`` to ``case.fixed`` with ``net`` (adapted in place unless ``adapt`` is False)."""
    t0 = time.perf_counter()
    case.validate(options.prealign)
    device = next(net.parameters()).device
    seed_everything(options.seed)
    do_adapt = bool(options.extra.get("adapt", True))
    iterations, seconds = check_budget(options) if do_adapt else (0, 0.0)
    averaging = check_weight_averaging(options.extra.get("weight_averaging", WEIGHT_AVERAGING))
    folding = folding_weight_option("TTORegister", options, FOLDING_WEIGHT)
    precision = network_precision(device, options.extra.get("precision"))
    mi_bins = int(option_number("TTORegister option mi_bins", options.extra.get("mi_bins", MI_BINS),
                                lambda b: b >= 2 and b == int(b), f"a whole number >= 2, e.g. {MI_BINS} (the default)"))
    if options.similarity not in SIMILARITIES:
        raise InputError(f"TTORegister uses similarity {', '.join(SIMILARITIES)}, not {options.similarity!r}")
    messages: List[str] = []
    pair = working_pair(case, options, device, messages, progress)
    t_in = time.perf_counter()
    grid, spacing = pair.grid, float(pair.grid.spacing[0])
    qa: Dict[str, object] = {"network": options.extra.get("network", "student"), "adapted": do_adapt,
                             "similarity": "multi-axis MI + local NCC" if pair.use_ncc else "multi-axis MI",
                             "prealign_metric": "ncc" if pair.use_ncc else "mi",
                             "working_grid": list(grid.size_xyz), "working_spacing_mm": spacing}
    if do_adapt:
        progress(0.2, f"test-time optimisation on a {'x'.join(map(str, grid.size_xyz))} grid at {spacing:.2f} mm")
        smooth_weight = options.regularization_weight if options.regularization_weight is not None else \
            SMOOTH_WEIGHT
        qa.update(adapt(net, pair.fixed, pair.moving, pair.mask, pair.use_ncc, iterations, seconds, smooth_weight,
                        float(options.extra.get("learning_rate", LEARNING_RATE)), averaging, folding,
                        pair.warped, pair.inside, precision, mi_bins,
                        lambda f, m: progress(0.2 + 0.7 * f, m)))
    t_adapt = time.perf_counter()
    transform = network_transform(net, pair, case.fixed.grid)
    t_net = time.perf_counter()
    progress(0.93, "patch-wise MI maps")
    maps = patch_mi_maps(pair.f_norm, pair.m_norm, pair.fixed_mask, pair.affine, transform,
                         min(QA_SPACING_MM, spacing), qa)
    t_end = time.perf_counter()
    progress(1.0, "done")
    return RegistrationResult(NAME, transform, pair.affine, str(device),
                              {"prealign_s": pair.prealign_s, "inputs_s": t_in - t0 - pair.prealign_s,
                               "adaptation_s": t_adapt - t_in,
                               "network_s": t_net - t_adapt, "total_s": t_end - t0}, qa, messages, maps)


def patch_mi_maps(f_norm: Volume, m_norm: Volume, fixed_mask: np.ndarray, affine: np.ndarray,
                  transform: SpatialTransform, spacing_mm: float, qa: Dict[str, object]) -> Dict[str, Volume]:
    """The patch-wise MI maps before registration (no transform) and after it, on an isotropic ``spacing_mm``
    grid over the fixed body (16-voxel cubes, stride 4, centres inside the body); writes the means before,
    after the pre-alignment ``affine`` and after into ``qa``."""
    grid = working_grid(f_norm.grid, spacing_mm, region=fixed_mask)
    fixed = resample(smooth_for_downsampling(f_norm, spacing_mm), grid)
    moving = smooth_for_downsampling(m_norm, spacing_mm)
    body = resample(f_norm.with_array(fixed_mask.astype(np.uint8)), grid, "mask").array
    maps = {}
    for name, tx in (("before", SpatialTransform(np.eye(4))), ("after_prealignment", SpatialTransform(affine)),
                     ("after", transform)):
        mi_map, qa[f"patch_mi_mean_{name}"] = patch_mi_map(fixed, warp(moving, tx, grid, fill=0.0), body)
        if name != "after_prealignment":
            maps[f"patch_mi_{name}"] = mi_map
    qa["patch_mi_grid_spacing_mm"] = spacing_mm
    return maps


def register(case: RegistrationCase, options: RegisterOptions, progress: Progress = no_progress
             ) -> RegistrationResult:
    """Register ``case.moving`` to ``case.fixed`` with a fresh copy of the shipped network; see the module
    docstring."""
    if options.extra.get("adapt", True):
        check_budget(options)                   # before loading the network: bad input fails fast
    return register_with(load_network(str(options.extra.get("network", "student")), resolve_device(options.device)),
                         case, options, progress)
