"""Command line: ``rtreg info | register | eval | demo``.

Progress: a bar on a terminal, or JSON lines on stdout with ``--progress jsonl``
(``{"type": "progress", "fraction": f, "message": m}``, then one
``{"type": "done", ...}`` or ``{"type": "error", "message": m}``). Bad input
exits with status 2 and a message that names the problem and the fix.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

from . import __version__
from .case import RegisterOptions
from .device import PRECISIONS
from .errors import InputError
from .models import MODELS_DIR



class ProgressPrinter:
    """progress(fraction, message) -> a terminal bar, JSON lines, or nothing."""

    def __init__(self, mode: str):
        self.mode = mode
        self.last = -1.0
        self.t0 = time.perf_counter()

    def __call__(self, fraction: float, message: str) -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        if self.mode == "jsonl":
            if fraction - self.last >= 0.01 or fraction >= 1.0:
                print(json.dumps({"type": "progress", "fraction": round(fraction, 4), "message": message}),
                      flush=True)
                self.last = fraction
        elif self.mode == "bar":
            width = 30
            filled = int(width * fraction)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {100 * fraction:5.1f}% "
                             f"{time.perf_counter() - self.t0:6.1f}s {message[:60]:<60}")
            if fraction >= 1.0:
                sys.stderr.write("\n")
            sys.stderr.flush()


def _info(_args) -> int:
    import SimpleITK as sitk
    import torch
    import numpy
    import pydicom
    models = sorted(p.name for p in MODELS_DIR.glob("*") if p.is_file()) if MODELS_DIR.is_dir() else []
    from .methods import METHODS
    info = {"rtreg": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "SimpleITK": sitk.Version_VersionString(), "numpy": numpy.__version__, "pydicom": pydicom.__version__,
            "cuda_available": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
            "methods": sorted(METHODS), "models_dir": str(MODELS_DIR), "models": models}
    print(json.dumps(info, indent=2))
    return 0


def _options(args) -> RegisterOptions:
    extra = {"clinical_inputs": [c.strip() for c in args.clinical_inputs.split(",") if c.strip()],
             "refine": not args.no_refine, "prior_weight": args.prior_weight,
             "network": args.network, "adapt": not args.no_adapt,
             "precision": args.precision,
             "mode": args.quiz_mode, "global_features": args.global_features,
             "sam2_checkpoint": args.sam2_checkpoint, "sam2_config": args.sam2_config, "reduction": args.reduction,
             "stages": args.glide_stages, "inverse_consistency": args.inverse_consistency}
    if args.convergence_tolerance is not None:
        extra["convergence_tolerance"] = args.convergence_tolerance
    return RegisterOptions(device=args.device, seed=args.seed, time_budget_s=args.time_budget,
                           iterations=args.iterations, prealign=args.prealign, similarity=args.similarity,
                           regularization=args.regularization, regularization_weight=args.regularization_weight,
                           working_spacing_mm=args.working_spacing, extra=extra)


def _register(args) -> int:
    from .pipeline import load_case, run_registration
    progress = ProgressPrinter(args.progress)
    progress(0.0, "reading inputs")
    same = True if args.same_frame else None
    oars = [o.strip() for o in args.oars.split(",") if o.strip()] if args.oars is not None else None
    case = load_case(args.fixed, args.moving, args.fixed_mask, args.fixed_structures, args.dose, args.plan,
                     same, args.allow_frame_mismatch, args.target, oars, args.query_points)
    metrics = run_registration(case, args.method, _options(args), Path(args.out), progress,
                               command="rtreg " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    for message in metrics["messages"]:
        print(f"rtreg: note: {message}", file=sys.stderr)
    if args.report:
        from .report import write_html_report
        metrics["report"] = str(write_html_report(Path(args.out)))
    if args.progress == "jsonl":
        print(json.dumps({"type": "done", "out": str(Path(args.out).resolve()),
                          "similarity_after": metrics["similarity_after"],
                          "timings_s": metrics["timings_s"], "report": metrics.get("report")}), flush=True)
    else:
        _print_summary(metrics)
        if args.report:
            print(f"QA report: {metrics['report']}")
    return 0


def _register_series(args) -> int:
    from .series import register_series_file
    progress = ProgressPrinter(args.progress)
    summary = register_series_file(args.series, args.reference_frame, args.method, _options(args), Path(args.out),
                                   args.fixed_mask, progress,
                                   command="rtreg " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    if args.progress == "jsonl":
        print(json.dumps({"type": "done", "out": str(Path(args.out).resolve()), "seconds": summary["seconds"]}),
              flush=True)
    else:
        print(f"{'frame':>6s}{'NCC before':>12s}{'NCC after':>12s}{'seconds':>9s}")
        for k, f in sorted(summary["frames"].items(), key=lambda kv: int(kv[0])):
            print(f"{k:>6s}{f['similarity_before']['ncc']:12.4f}{f['similarity_after']['ncc']:12.4f}"
                  f"{f['seconds']:9.1f}")
        print(f"warped series: {Path(args.out) / 'warped_series.nii.gz'}")
    return 0


def _print_summary(metrics) -> None:
    b, p, a = metrics["similarity_before"], metrics["similarity_after_prealignment"], metrics["similarity_after"]
    print(f"{'':12s}{'before':>12s}{'prealign':>12s}{'after':>12s}")
    for k in ("ncc", "ssim", "mse"):
        print(f"{k:12s}{b[k]:12.5g}{p[k]:12.5g}{a[k]:12.5g}")
    j = metrics["jacobian"]
    print(f"Jacobian: min {j['jacobian_min']:.3f}, {j['percent_nonpositive_jacobian']:.4f}% <= 0; "
          f"inverse residual mean {metrics['inverse_residual_mm']['mean']:.3f} mm; "
          f"time {metrics['timings_s']['total']:.1f} s on {metrics['device']}")


def _demo(args) -> int:
    from .demo import run_demo
    ok = run_demo(Path(args.out), site=args.site, seed=args.seed, device=args.device,
                  progress=ProgressPrinter(args.progress))
    return 0 if ok else 1


def _eval(args) -> int:
    from .evaluation import evaluate_result
    out = evaluate_result(Path(args.case), Path(args.result))
    if "tre_mm" in out:
        t = out["tre_mm"]
        print(f"TRE (mm, {t['n']} points): mean {t['mean']:.2f}, median {t['median']:.2f}, p95 {t['p95']:.2f}, "
              f"max {t['max']:.2f}")
    for name, m in out.get("structures", {}).items():
        print(f"{name:20s} Dice {m['dice']:.3f}  HD95 {m['hd95_mm']:.2f} mm  MSD {m['mean_surface_distance_mm']:.2f} mm"
              f"  RVD {m['relative_volume_difference']:+.3f}")
    j = out["jacobian"]
    print(f"Jacobian min {j['jacobian_min']:.3f}, {j['percent_nonpositive_jacobian']:.4f}% <= 0; "
          f"written to {Path(args.result) / 'eval.json'}")
    return 0


def _train_protondir(args) -> int:
    from .train.protondir import main
    return main(args)


def _train_tto(args) -> int:
    from .train.tto import main
    return main(args)


def _train_quiz(args) -> int:
    from .train.quiz import main
    return main(args)


def _train_glide(args) -> int:
    from .train.glide import main
    return main(args)


def _add_method_options(r: argparse.ArgumentParser) -> None:
    """The options of a registration run shared by `register` and `register-series`."""
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the optimisation (tto: default 60)")
    r.add_argument("--iterations", type=int, default=None,
                   help="iterations per resolution level (io, protondir: at most, see --convergence-tolerance; "
                   "tto: of the test-time optimisation, default 100)")
    r.add_argument("--convergence-tolerance", type=float, default=None,
                   help="io, protondir: a resolution level stops once its last 10 iterations lowered the objective "
                   "by less than this fraction of the level's decrease so far (default 0.01; 0: every iteration)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--prealign", default="rigid", choices=["none", "com", "moments", "rigid", "affine", "quiz"],
                   help="pre-alignment before a deformable method; quiz: QuizRigid's query-point matching, for "
                   "large pose or field-of-view differences (CT vs CBCT, EBRT vs brachytherapy CT)")
    r.add_argument("--similarity", default="auto", choices=["auto", "ncc", "mind", "mi"],
                   help="auto: by modality; io: ncc or mind; tto: mi (multi-axis MI) or ncc (MI + local NCC)")
    r.add_argument("--regularization", default="diffusion", choices=["diffusion", "bending"])
    r.add_argument("--regularization-weight", type=float, default=None)
    r.add_argument("--working-spacing", type=float, default=2.0, help="finest working grid spacing (mm)")
    r.add_argument("--clinical-inputs", default="anatomy,risk,text",
                   help="protondir: which clinical inputs guide the network, comma-separated from anatomy, risk, "
                   "text ('' for none)")
    r.add_argument("--no-refine", action="store_true",
                   help="protondir: the network's field only, without the instance-optimisation refinement; "
                   "quiz: the matching's transform, without the intensity refinement")
    r.add_argument("--prior-weight", type=float, default=0.0,
                   help="protondir: in the refinement, the local NCC counts up to 1 + W times as much where the "
                   "clinical prior is high (target, its boundary, OARs, steep dose); 0 (default): alike everywhere "
                   "in the body")
    r.add_argument("--quiz-mode", default="rigid", choices=["rigid", "translation"],
                   help="quiz: a robust rigid fit of the matched points, or their mean translation (the paper's)")
    r.add_argument("--network", default="student", choices=["student", "teacher"],
                   help="tto: the distilled student (default) or the teacher")
    r.add_argument("--no-adapt", action="store_true",
                   help="tto: the network's prediction only, without test-time optimisation")
    r.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                   help="tto: the network's passes during the test-time optimisation in float32 or mixed bfloat16 "
                   "(weights, losses and the returned field stay float32); auto: bfloat16 on a CPU with AMX, "
                   "float32 elsewhere")
    r.add_argument("--global-features", default="learned", choices=["learned", "sam2", "none"],
                   help="glide: the shipped contrast-invariant encoder, SAM2 slice features (needs the sam2 "
                   "package and --sam2-checkpoint), or none (local MIND-SSC features only)")
    r.add_argument("--sam2-checkpoint", default="", help="glide: a SAM2 checkpoint file (with --global-features sam2)")
    r.add_argument("--sam2-config", default="configs/sam2.1/sam2.1_hiera_t.yaml",
                   help="glide: the SAM2 model configuration that matches the checkpoint")
    r.add_argument("--reduction", default="vae", choices=["vae", "pca"],
                   help="glide: reduce the global features to 12 channels by a jointly optimised VAE or by PCA")
    r.add_argument("--glide-stages", default="global-to-local", choices=["global-to-local", "global", "local"],
                   help="glide: the convex stage on the global then the local features (default), or one alone")
    r.add_argument("--inverse-consistency", action="store_true",
                   help="glide: make the convex stage's forward and backward fields inverse to each other")


def _training_parser(models, name: str, help_text: str, work: Optional[str], steps: int, lr: float,
                     work_help: str = "sources, checkpoints and log (a rerun resumes)", shared_data: bool = True,
                     models_help: str = "where to write the weights (default: Resources/Models)"
                     ) -> argparse.ArgumentParser:
    """A ``rtreg train <name>`` parser with the options every training command has."""
    parser = models.add_parser(name, help=help_text)
    parser.add_argument("--work", default=work, help=work_help)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the network trains (random draws come from CPU generators, so a seed gives "
                        "the same data on either)")
    if shared_data:
        parser.add_argument("--data", default=None, help="the shared data folder (default: ../shared/data)")
    parser.add_argument("--models-dir", default=None, help=models_help)
    parser.add_argument("--no-export", action="store_true", help="train only; do not write the weights")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="stop after this step (checkpointed); the same command resumes the run later")
    return parser


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rtreg", description="Registration engine of SlicerProtonDIR")
    ap.add_argument("--version", action="version", version=f"rtreg {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, models found").set_defaults(func=_info)

    r = sub.add_parser("register", help="register a moving (repeat) image to a fixed (planning) image")
    r.add_argument("--method", default="io", help="registration method (io, protondir, tto, quiz, glide)")
    r.add_argument("--fixed", required=True, help="planning image: NIfTI/NRRD/MHA file or DICOM folder")
    r.add_argument("--moving", required=True, help="repeat image: NIfTI/NRRD/MHA file or DICOM folder")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--fixed-mask", help="mask of the region that counts, on the fixed image")
    r.add_argument("--fixed-structures", help="RTSTRUCT file, or a folder of binary masks, on the fixed image")
    r.add_argument("--target", help="the target (CTV) among the structures (default: the first CTV, else GTV)")
    r.add_argument("--oars", help="organs at risk among the structures, comma-separated (default: every "
                   "structure that is not the target, the body, a PTV or a marker; '' for none)")
    r.add_argument("--dose", help="dose on the fixed image: RTDOSE file or image in Gy")
    r.add_argument("--plan", help="RTPLAN / RT Ion Plan file, a text file, or plan text")
    r.add_argument("--query-points", help="quiz: points on the fixed image to match, a CSV (columns x,y,z in LPS "
                   "mm) or a Slicer markups file (.mrk.json, .fcsv); default: chosen automatically")
    _add_method_options(r)
    r.add_argument("--same-frame", action="store_true",
                   help="the images share scanner coordinates although their frame-of-reference UIDs differ")
    r.add_argument("--allow-frame-mismatch", action="store_true",
                   help="accept structures/dose whose frame of reference differs from the fixed image's")
    r.add_argument("--report", action="store_true",
                   help="also write report.html: the QA page with figures and checks (self-contained)")
    r.add_argument("--progress", default="bar" if sys.stderr.isatty() else "none",
                   choices=["bar", "jsonl", "none"])
    r.set_defaults(func=_register)

    rs = sub.add_parser("register-series", help="motion correction: register every frame of a 4D image to a "
                        "reference frame (tto adapts one network frame after frame)")
    rs.add_argument("--series", required=True, help="4D NIfTI/NRRD/MHA image (time the 4th axis)")
    rs.add_argument("--reference-frame", type=int, default=0, help="the frame the others are registered to")
    rs.add_argument("--method", default="tto", help="registration method (tto, io, protondir)")
    rs.add_argument("--out", required=True, help="output folder")
    rs.add_argument("--fixed-mask", help="mask of the region that counts, on the reference frame")
    _add_method_options(rs)
    rs.add_argument("--progress", default="bar" if sys.stderr.isatty() else "none",
                    choices=["bar", "jsonl", "none"])
    rs.set_defaults(func=_register_series)

    e = sub.add_parser("eval", help="metrics of a registration output against a case's ground truth")
    e.add_argument("--case", required=True, help="case folder (points_*.csv and/or truth_structures_on_repeat/)")
    e.add_argument("--result", required=True, help="output folder of rtreg register")
    e.set_defaults(func=_eval)

    d = sub.add_parser("demo", help="build an RT phantom case, register it and print a before/after table")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--site", default="pelvis", choices=["pelvis", "thorax", "headneck"])
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    d.add_argument("--progress", default="bar" if sys.stderr.isatty() else "none", choices=["bar", "jsonl", "none"])
    d.set_defaults(func=_demo)

    t = sub.add_parser("train", help="train a method's network (reproducible, resumable) and write its weights")
    models = t.add_subparsers(dest="model", required=True)
    tp = _training_parser(models, "protondir", "ProtonDIR's network on synthetic and real CT pairs (see "
                          "rtreg/train/protondir.py for the data)", "train_work/protondir", 3000, 1e-3,
                          "folder for the training pairs, checkpoints and log (a rerun resumes from it)")
    tp.add_argument("--pairs-csv", default=None,
                    help="fine-tune on institutional pairs: a CSV with columns planning_ct,repeat_ct,rtstruct,"
                    "rtdose,plan (DICOM folders or files; the last three optional) instead of the built-in data")
    tp.add_argument("--init", default=None, help="start from this weights file (with its manifest beside it), "
                    "e.g. Resources/Models/protondir.pt when fine-tuning")
    tp.set_defaults(func=_train_protondir)
    for role, what in (("teacher", "TTORegister's teacher U-Net on synthetic label-map pairs"),
                       ("student", "TTORegister's student U-Net, distilled from the teacher's shipped weights")):
        tt = _training_parser(models, f"tto-{role}", what + " (see rtreg/train/tto.py)", None,
                              2000 if role == "teacher" else 1000, 1e-4,
                              f"checkpoints and log (default train_work/tto-{role}; a rerun resumes from it)",
                              shared_data=False, models_help="where to write (and, for the student, read the "
                              "teacher's) weights (default: Resources/Models)")
        tt.set_defaults(func=_train_tto)
    tq = _training_parser(models, "quiz", "QuizRigid's network on real and synthetic images with known poses and "
                          "fields of view (see rtreg/train/quiz.py)", "train_work/quiz", 2500, 5e-4)
    tq.add_argument("--size", type=int, default=96, help="view size in voxels (the paper's is 128)")
    tq.set_defaults(func=_train_quiz)
    tg = _training_parser(models, "glide", "GlideReg's contrast-invariant global feature encoder on real and "
                          "synthetic images (see rtreg/train/glide.py)", "train_work/glide", 700, 1e-3)
    tg.set_defaults(func=_train_glide)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:
        if getattr(args, "progress", "") == "jsonl":
            print(json.dumps({"type": "error", "message": str(exc)}), flush=True)
        print(f"rtreg: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
