"""ProtonDIR: clinically informed coarse-to-fine registration of the repeat CT to the planning CT.

1. Rigid pre-alignment A (fixed -> moving), as the ``io`` method does it.
2. The network (:class:`rtreg.nets.protondir.ProtonDIRNet`, shipped weights) predicts a
   displacement on an isotropic working grid (the weights' spacing, 3 mm) that covers the
   planning CT, from the planning CT, the repeat CT moved by A, the clinical prior and the plan
   text. The prior fuses the anatomy map (CTV proximity and boundary band, OARs) and the risk
   map (dose gradient, isodose bands, dose-weighted OARs), both computed on the working grid;
   the text is the mean embedding of the three prompts (anatomy, diagnosis, plan).
3. Optional instance-optimisation refinement (on by default): the ``io`` optimiser, started from the
   network's field (body-masked local NCC + diffusion, coarse to fine to the working spacing), each level
   stopping once converged (``options.extra["convergence_tolerance"]``, :func:`rtreg.methods.io.converged`)
   or at its iterations, within the time budget.

The network's grid covers the planning body (bounding box + 20 mm) and its field tapers to zero in the
outer 12 mm of that grid (air). A network field that lowers the body-masked local NCC below that of the
pre-alignment is not used, and the result says so (``options.extra["network_guard"]`` = False turns the
check off, for ablations).

Every clinical input is optional: ``options.extra["clinical_inputs"]`` (a subset of
:data:`CLINICAL_INPUTS`, all by default) chooses what is used, and what is missing or unusable
is said in ``RegistrationResult.messages``. The field (LPS mm) is returned on the fixed grid.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..case import Progress, RegisterOptions, RegistrationCase, RegistrationResult, no_progress, option_number
from ..device import resolve_device, seed_everything
from ..errors import InputError
from ..field import SpatialTransform, coverage, resample_field
from ..image import Grid, Volume, resample
from ..memory import check_memory
from ..netgrid import edge_taper, network_images, working_grid
from ..models import load_weights
from ..nets.protondir import ProtonDIRNet
from ..prealign import prealign
from ..priors import (anatomy_map, clinical_prior, load_text_encoder, plan_prompts,
                      prescription_from_text, prompt_embedding, risk_map)
from ..losses import ncc_local
from ..spatial import field_to_array, to_tensor, voxels_to_mm, warp
from . import io

NAME = "protondir"
WEIGHTS = "protondir.pt"
CLINICAL_INPUTS = ("anatomy", "risk", "text")
TAPER_MM = 12.0                   # the network's field falls to zero over this outer band of its grid (air)


# ---------------------------------------------------------------- clinical inputs
@dataclass
class ClinicalInputs:
    """The prior (z, y, x) on the working grid, the prompts, the text embedding, and what was (not) used."""

    prior: Optional[np.ndarray] = None
    prompts: Dict[str, str] = field(default_factory=dict)
    text: Optional[np.ndarray] = None
    used: List[str] = field(default_factory=list)
    messages: List[str] = field(default_factory=list)


def clinical_inputs(case: RegistrationCase, grid: Grid, use: Sequence[str], text_dim: int,
                    text_encoder_dir: Optional[str] = None) -> ClinicalInputs:
    """Anatomy map, risk map and text of ``case`` on the working ``grid``, as far as ``use`` asks and the
    inputs allow; each input that is asked for but missing or unusable adds a message."""
    out = ClinicalInputs()
    by_name = {s.name: s for s in case.structures}
    fixed_on = case.fixed.with_array  # structures are on the fixed grid (validated)

    def on_grid(mask: np.ndarray) -> np.ndarray:
        return resample(fixed_on(mask.astype(np.uint8)), grid, "mask").array

    target = on_grid(by_name[case.target].mask) if case.target else None
    oars = []
    for name in case.oars:
        if by_name[name].empty:
            out.messages.append(f"organ at risk {name!r} is empty on the planning CT; it is left out of the priors")
        else:
            oars.append(on_grid(by_name[name].mask))
    anatomy = risk = None
    if "anatomy" in use:
        if target is not None and by_name[case.target].empty:
            out.messages.append(f"the target {case.target!r} is empty; the anatomy map uses the organs at risk only")
            target = None
        if target is None and not oars:
            out.messages.append("anatomy map not used: no target (CTV) and no organs at risk were given")
        else:
            if target is None and case.target is None:
                out.messages.append("no target (CTV) was given; the anatomy map uses the organs at risk only")
            anatomy = anatomy_map(target if target is not None else np.zeros(grid.shape, np.uint8), oars,
                                  grid.spacing)
            out.used.append("anatomy")
    if "risk" in use:
        rx = case.plan.prescription_gy if case.plan is not None else prescription_from_text(case.plan_text)
        if case.dose is None:
            out.messages.append("risk map not used: no dose was given (add --dose, an RTDOSE in Gy)")
        elif not rx or rx <= 0:
            out.messages.append("risk map not used: the plan gives no prescription dose (add --plan: the RT plan, "
                                "or text such as 'prescription 60 Gy in 30 fractions')")
        else:
            dose = resample(case.dose, grid, "linear", None, 0.0).array
            risk = risk_map(dose, grid.spacing, rx, oars)
            out.used.append("risk")
    if anatomy is not None or risk is not None:
        out.prior = clinical_prior(anatomy if anatomy is not None else np.zeros((1,) + grid.shape, np.float32),
                                   risk)
    if "text" in use:
        out.prompts = plan_prompts([s.name for s in case.structures], case.target, case.oars, case.plan,
                                   case.plan_text)
        encoder, why = load_text_encoder(text_encoder_dir)
        if encoder is None:
            out.messages.append(why)
        else:
            out.text = prompt_embedding(out.prompts, encoder, text_dim)
            if out.text is None:
                out.messages.append("plan text not used: no structure names, plan or free text to describe")
            else:
                out.used.append("text")
    return out


# ---------------------------------------------------------------- the network
_NETS: Dict[str, Tuple[ProtonDIRNet, Dict]] = {}


def load_network(device: torch.device, weights: str = WEIGHTS) -> Tuple[ProtonDIRNet, Dict]:
    """The shipped network (eval mode, on ``device``) and its config (spacing_mm, text_dim, ...); cached."""
    key = f"{weights}@{device}"
    if key not in _NETS:
        state, config = load_weights(weights)
        net = ProtonDIRNet(tuple(config["channels"]), int(config["text_dim"]), int(config["window"]),
                           int(config["heads"]))
        net.load_state_dict(state)
        _NETS[key] = (net.to(device).eval(), config)
    return _NETS[key]


def predict_field(net: ProtonDIRNet, fixed: np.ndarray, moving: np.ndarray, prior: Optional[np.ndarray],
                  text: Optional[np.ndarray], grid: Grid, device: torch.device) -> torch.Tensor:
    """The network's displacement (1, 3, z, y, x) in LPS mm on ``grid`` (inputs (z, y, x) on ``grid``)."""
    with torch.no_grad():
        p = None if prior is None else to_tensor(prior, device)
        t = None if text is None else torch.as_tensor(text, device=device)[None]
        u_vox = net(to_tensor(fixed, device), to_tensor(moving, device), p, t)
        return voxels_to_mm(u_vox, grid)


# ---------------------------------------------------------------- refinement
def weight_by_prior(levels: List[io.Level], prior: Optional[np.ndarray], grid: Grid, weight: float,
                    device: torch.device) -> List[io.Level]:
    """The refinement's levels with their similarity masks multiplied by ``1 + weight x prior`` (``prior``
    (z, y, x) in [0, 1] on the network's working ``grid``, resampled linearly onto each level, 0 outside it):
    where the clinical prior is high (the CTV and its boundary, OARs, steep dose) the local NCC counts up to
    ``1 + weight`` times as much as elsewhere in the body. The similarity is a weighted mean, so the weights
    shift the fit towards those regions against the same diffusion penalty. ``levels`` unchanged when
    ``weight`` is 0 or there is no prior."""
    if prior is None or weight <= 0:
        return levels
    volume = Volume(prior, grid.affine.copy())
    return [dataclasses.replace(lv, mask=lv.mask * (1.0 + weight * to_tensor(
        resample(volume, lv.grid, "linear", None, 0.0).array, device))) for lv in levels]


# ---------------------------------------------------------------- register
def register(case: RegistrationCase, options: RegisterOptions, progress: Progress = no_progress
             ) -> RegistrationResult:
    """Register ``case.moving`` (repeat CT) to ``case.fixed`` (planning CT); see the module docstring."""
    t0 = time.perf_counter()
    case.validate(options.prealign)
    device = resolve_device(options.device)
    seed_everything(options.seed)
    use = list(options.extra.get("clinical_inputs", CLINICAL_INPUTS))
    unknown = sorted(set(use) - set(CLINICAL_INPUTS))
    if unknown:
        raise InputError(f"unknown clinical inputs {unknown}; use a subset of {list(CLINICAL_INPUTS)}")
    refine = bool(options.extra.get("refine", True))
    prior_weight = option_number("protondir option prior_weight (--prior-weight)",
                                 options.extra.get("prior_weight", 0.0), lambda w: w >= 0,
                                 "a number >= 0 (0, the default, counts the similarity alike everywhere in the body)")
    tolerance = io.convergence_tolerance(options)
    messages: List[str] = []
    if options.similarity not in ("auto", "ncc"):
        messages.append(f"ProtonDIR compares CT with CT by local NCC; similarity {options.similarity!r} is not used")
    if not io.same_modality(case):
        messages.append("ProtonDIR was trained on CT pairs; the images differ in modality, so expect the "
                        "network to help less (the refinement still uses local NCC)")
    net, config = load_network(device)
    spacing = float(config["spacing_mm"])
    check_memory(case.fixed.grid, options.working_spacing_mm if refine else spacing, device)

    fixed_mask, moving_mask = io.registration_masks(case)
    if fixed_mask.all():
        messages.append("no body found on the planning CT (threshold -400 HU); similarity counts everywhere")
    grid = working_grid(case.fixed.grid, spacing, region=fixed_mask)
    progress(0.0, f"pre-alignment ({options.prealign})")
    affine = prealign(case.fixed, case.moving, options.prealign, fixed_mask, moving_mask, "ncc", device,
                      options.seed, lambda f, m: progress(0.2 * f, m))
    t_pre = time.perf_counter()
    body = to_tensor(resample(case.fixed.with_array(fixed_mask.astype(np.uint8)), grid, "mask").array
                     * coverage(case.moving.grid, affine, grid), device)      # where the similarity counts
    io.check_overlap(float(body.sum()))

    progress(0.2, "clinical priors and plan text")
    clinical = clinical_inputs(case, grid, use, int(config["text_dim"]), options.extra.get("text_encoder"))
    messages += clinical.messages
    if refine and prior_weight > 0 and clinical.prior is None:
        messages.append("the refinement's prior weight is not used: there is no anatomy or risk map")
    t_prior = time.perf_counter()
    progress(0.3, f"network on a {'x'.join(map(str, grid.size_xyz))} grid at {spacing:g} mm")
    f_norm, m_norm = io.normalised_images(case, fixed_mask, moving_mask)    # once, for network and refinement
    f_img, m_img = network_images(f_norm, m_norm, affine, grid)
    if not refine:
        del f_norm, m_norm                    # full-resolution copies: free them when nothing else needs them
    t_inputs = time.perf_counter()
    u_net = predict_field(net, f_img, m_img, clinical.prior, clinical.text, grid, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_net = time.perf_counter()
    u_net = u_net * to_tensor(edge_taper(grid.shape, TAPER_MM / spacing), device)
    qa: Dict[str, object] = {"clinical_inputs_used": clinical.used, "prompts": clinical.prompts,
                             "network_grid": list(grid.size_xyz), "network_spacing_mm": spacing,
                             "refined": refine,
                             "refinement_prior_weight": prior_weight if refine and clinical.prior is not None else 0.0}
    f_t, m_t = to_tensor(f_img, device), to_tensor(m_img, device)
    with torch.no_grad():
        before = ncc_local(f_t, m_t, 5, body).item()
        after = ncc_local(f_t, warp(m_t, u_net, grid), 5, body).item()
    qa["network_similarity"] = {"local_ncc_prealigned": before, "local_ncc_network": after}
    if options.extra.get("network_guard", True) and after < before:
        messages.append(f"the network's field lowered the body-masked similarity (local NCC {before:.3f} -> "
                        f"{after:.3f}) on this pair, so it was not used: "
                        + ("the refinement starts from the pre-alignment" if refine else
                           "the result is the pre-alignment only"))
        u_net = torch.zeros_like(u_net)
        qa["network_used"] = False
    else:
        qa["network_used"] = True
    net_field = Volume(field_to_array(u_net), grid.affine.copy(), {"units": "mm"})
    if refine:
        iterations = list(options.extra.get("iterations_per_level", io.ITERATIONS_PER_LEVEL
                                            if options.iterations is None else [options.iterations] * 2))
        levels = io.pyramid(f_norm, m_norm, fixed_mask, affine, options.working_spacing_mm, iterations, device)
        levels = weight_by_prior(levels, clinical.prior, grid, prior_weight, device)
        start = to_tensor(resample_field(net_field, levels[0].grid).array, device)
        weight = options.regularization_weight if options.regularization_weight is not None else \
            io.DEFAULT_WEIGHTS[("ncc", options.regularization)]
        u, refine_qa = io.optimise(levels, "ncc", options.regularization, weight, options.time_budget_s,
                                   lambda f, m: progress(0.4 + 0.55 * f, "refinement " + m), u_init=start,
                                   tolerance=tolerance)
        qa.update(refine_qa)
        final = Volume(field_to_array(u), levels[-1].grid.affine.copy(), {"units": "mm"})
    else:
        final = net_field
    full = resample_field(final, case.fixed.grid)
    t_end = time.perf_counter()
    progress(1.0, "done")
    return RegistrationResult(NAME, SpatialTransform(affine, full), affine, str(device),
                              {"prealign_s": t_pre - t0, "priors_s": t_prior - t_pre,
                               "network_inputs_s": t_inputs - t_prior, "network_s": t_net - t_inputs,
                               "refinement_s": t_end - t_net if refine else 0.0, "total_s": t_end - t0}, qa,
                              messages)
