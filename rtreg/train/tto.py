"""``rtreg train tto-teacher`` and ``rtreg train tto-student``: TTORegister's networks, resumable.

Data: synthetic label-map pairs generated on the fly (:func:`rtreg.labelmaps.label_map_pair`), 48^3
voxels, a new pair every step, seeded by (seed, step); no patient image is used, so nothing is held out
and every benchmark case is unseen.

* Teacher (:data:`rtreg.nets.tto.TEACHER`): multi-axis mutual information between the fixed image and
  the warped moving image, plus the diffusion smoothness of the field (voxels), plus (ours, to learn
  within 2 CPU hours rather than the paper's GPU days) the squared error to the known synthetic field.
* Student (:data:`rtreg.nets.tto.STUDENT`), distilled from the frozen teacher: multi-axis MI between the
  teacher-warped and the student-warped moving image, multi-axis MI between the fixed image and the
  student-warped one, and smoothness. The student never sees the true field.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from ..device import resolve_device
from ..losses import diffusion, multi_axis_mi
from ..methods.tto import STUDENT_WEIGHTS, TEACHER_WEIGHTS
from ..labelmaps import label_map_pair
from ..models import MODELS_DIR, load_weights, read_manifest
from ..nets.tto import STUDENT, TEACHER, build
from ..spatial import warp_voxels
from .loop import cosine_schedule, export_weights, resumable_training, training_command

SIZE = 48
SAME_CONTRAST_P = 0.5      # half the pairs share their contrast (one modality), half do not (two modalities)
DATA = ("synthetic label-map pairs generated on the fly (rtreg.labelmaps, 16 labels, 48^3 voxels, "
        "displacements up to 6 voxels); no patient images")


def pair(seed: int, step: int, device: torch.device) -> Dict[str, torch.Tensor]:
    """The training pair of one step (the same for a given (seed, step), on any run)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    same = bool(torch.rand((), generator=gen) < SAME_CONTRAST_P)
    return label_map_pair((SIZE, SIZE, SIZE), gen, device, same_contrast=same)


def teacher_losses(net: torch.nn.Module, s: Dict[str, torch.Tensor], smooth_weight: float,
                   field_weight: float) -> Dict[str, torch.Tensor]:
    u = net(s["fixed"], s["moving"])
    mi = multi_axis_mi(s["fixed"], warp_voxels(s["moving"], u))
    smooth = diffusion(u, [1.0, 1.0, 1.0])
    field = ((u - s["u_true"]) ** 2).sum(1).mean()
    return {"total": -mi + smooth_weight * smooth + field_weight * field, "mi": mi, "smooth": smooth,
            "field": field, "field_relative": field.detach() / (s["u_true"] ** 2).sum(1).mean()}


def student_losses(net: torch.nn.Module, teacher: torch.nn.Module, s: Dict[str, torch.Tensor],
                   smooth_weight: float) -> Dict[str, torch.Tensor]:
    with torch.no_grad():
        by_teacher = warp_voxels(s["moving"], teacher(s["fixed"], s["moving"]))
    u = net(s["fixed"], s["moving"])
    warped = warp_voxels(s["moving"], u)
    mi_teacher = multi_axis_mi(by_teacher, warped)
    mi_fixed = multi_axis_mi(s["fixed"], warped)
    smooth = diffusion(u, [1.0, 1.0, 1.0])
    with torch.no_grad():                     # monitored, never optimised: the student does not see the truth
        field = ((u - s["u_true"]) ** 2).sum(1).mean()
    return {"total": -mi_teacher - mi_fixed + smooth_weight * smooth, "mi_teacher": mi_teacher,
            "mi_fixed": mi_fixed, "smooth": smooth, "field": field,
            "field_relative": field / (s["u_true"] ** 2).sum(1).mean()}


def train(role: str, work: Path, steps: int, seed: int = 0, lr: float = 1e-4, smooth_weight: float = 1.0,
          field_weight: float = 0.5, export: bool = True, models_dir: Optional[Path] = None, command: str = "",
          threads: Optional[int] = None, stop_at: Optional[int] = None, device: str = "cpu",
          log: Callable[[str], None] = print) -> Dict:
    """Train the ``role`` ("teacher" or "student") network up to ``steps`` steps (resuming from
    ``work/checkpoint.pt``) and export its weights. The student needs the teacher's weights in ``models_dir``."""
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    config = TEACHER if role == "teacher" else STUDENT
    net = build(config).to(dev)
    teacher = None
    if role == "student":
        state, teacher_config = load_weights(TEACHER_WEIGHTS, models_dir)
        teacher = build(teacher_config).to(dev).eval()
        teacher.load_state_dict(state)
        for p in teacher.parameters():
            p.requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = cosine_schedule(opt, steps)

    def step_losses(step: int) -> Dict[str, torch.Tensor]:
        s = pair(seed, step, dev)
        if teacher is None:
            return teacher_losses(net, s, smooth_weight, field_weight)
        return student_losses(net, teacher, s, smooth_weight)

    done = resumable_training(Path(work), net, opt, sched, steps, step_losses, stop_at, log=log)
    if done < steps:
        return {"steps_done": done, "steps": steps}
    summary = {"role": role, "steps": steps, "seed": seed, "lr": lr, "size": SIZE, "smooth_weight": smooth_weight,
               "field_weight": field_weight if role == "teacher" else 0.0}
    if export:
        extra = {"teacher_sha256": read_manifest(Path(models_dir) if models_dir else MODELS_DIR
                                                 )[TEACHER_WEIGHTS]["sha256"]} if role == "student" else {}
        export_weights(TEACHER_WEIGHTS if role == "teacher" else STUDENT_WEIGHTS, net, dict(config), work, summary,
                       command, DATA, models_dir, log, **extra)
    return summary


def main(args) -> int:
    """Entry point of ``rtreg train tto-teacher`` / ``tto-student`` (arguments from :mod:`rtreg.cli`)."""
    role = "teacher" if args.model == "tto-teacher" else "student"
    summary = train(role, Path(args.work or f"train_work/tto-{role}"), args.steps, args.seed, args.lr,
                    export=not args.no_export, models_dir=Path(args.models_dir) if args.models_dir else None,
                    command=training_command(), threads=args.threads, stop_at=args.stop_at, device=args.device,
                    log=lambda m: print(m, flush=True))
    print(json.dumps(summary, indent=2))
    return 0
