"""The registration methods the benchmark compares: ours and the tools a user would pick instead.

Every method takes the fixed and moving image files and returns the mapping of
fixed points to moving points as a total displacement field on the fixed grid
(LPS mm, ``x -> x + u(x)``): the one convention every metric is computed from.
Each peer runs with the settings its documentation recommends for the task
(a rigid or affine start, then its deformable stage; mutual information when
the images differ in modality) and with 2 threads (set by the harness through
``OMP_NUM_THREADS`` and ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``).

Peers and their PyPI packages (installed by ``python -m bench setup``):
ANTs SyN with CC and its quick MI variant (``antspyx``), elastix B-spline (``itk-elastix``), plastimatch
B-spline (``plastimatch``, the engine behind SlicerRT's registration),
SimpleITK diffeomorphic demons (``SimpleITK``, already an rtreg dependency),
ConvexAdam (``convexadam``).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import SimpleITK as sitk

from rtreg.field import sitk_linear_to_affine
from rtreg.image import Volume, read_volume

Runner = Callable[[Path, Path, Path, bool], Volume]


@dataclass(frozen=True)
class Method:
    """A method in the comparison: its label, the module it needs and how to run it."""

    name: str
    label: str
    package: str            # the Python module that must import (the PyPI package that provides it)
    run: Runner             # (fixed, moving, work folder, multimodal) -> total displacement on the fixed grid
    same_modality_only: bool = False
    ours: bool = False
    in_default: bool = True   # run by default (otherwise only with --full or when named)
    suites: Tuple[str, ...] = ()   # the suites it is meant for (rigid alignment: large-offset); () = every suite

    def available(self) -> bool:
        return importlib.util.find_spec(self.package) is not None


def _field_volume(img: sitk.Image) -> Volume:
    """A SimpleITK vector image (physical displacement, LPS mm) -> float32 field Volume."""
    return Volume.from_sitk(sitk.Cast(img, sitk.sitkVectorFloat32), units="mm")


# ---------------------------------------------------------------- ours
def _rtreg(method: str, at_image_spacing: bool = False, **extra) -> Runner:
    """An rtreg method on the case's files; ProtonDIR also gets the case's structures, dose and plan text
    (``extra``: the method's options, e.g. ProtonDIR's clinical inputs and whether it refines; its
    ``prealign`` and ``regularization_weight`` go to the ``RegisterOptions`` fields of those names);
    ``at_image_spacing``: work at the fixed image's own spacing (as ConvexAdam does) instead of 2 mm."""
    def run(fixed: Path, moving: Path, work: Path, multimodal: bool) -> Volume:
        from rtreg.case import RegisterOptions
        from rtreg.methods import get_method
        from rtreg.pipeline import load_case
        case_dir = fixed.parent
        clinical = method == "protondir"
        def present(name: str):
            return str(case_dir / name) if clinical and (case_dir / name).exists() else None
        case = load_case(str(fixed), str(moving), structures=present("structures"), dose=present("dose.nii.gz"),
                         plan=present("plan.txt"))
        across = "mi" if method == "tto" else "mind"      # the similarity each method uses across modalities
        opts = dict(extra)
        spacing = float(min(case.fixed.grid.spacing)) if at_image_spacing else RegisterOptions.working_spacing_mm
        options = RegisterOptions(device="cpu", similarity=across if multimodal else "auto",
                                  prealign=str(opts.pop("prealign", "rigid")), working_spacing_mm=spacing,
                                  regularization_weight=opts.pop("regularization_weight", None), extra=opts)
        result = get_method(method)(case, options, lambda f, m: None)
        return result.transform.total_field(case.fixed.grid)
    return run


# ProtonDIR's ablation as in its paper: the network alone, without (Base) and with the anatomy map (A), the
# risk map (R) and the plan text (T); one set of weights trained with random dropout of each input
_ABLATION = {"protondir-base": [], "protondir-base-a": ["anatomy"], "protondir-base-r": ["risk"],
             "protondir-base-a-r": ["anatomy", "risk"], "protondir-base-a-r-t": ["anatomy", "risk", "text"]}


# ---------------------------------------------------------------- ANTs
ANTS_SEED = 1   # antsRegistration's --random-seed, for its random metric sampling


def _seeded_ants():
    """``ants``, set to pass ``--random-seed ANTS_SEED`` to every ``antsRegistration`` call, so that its random
    metric sampling is the same in every run. Unseeded, results moved a lot between runs (SyN CC organ Dice
    0.29 to 0.46 on one inter-subject case; twice its affine stage mirrored an image). Seeded, two runs still
    differ a little (up to 0.045 organ Dice on an inter-subject slab, 0.005 mm TRE on DCPT) because of ITK's two
    threads: with one thread, two seeded runs give identical images. ``ants.set_ants_deterministic`` forces
    that one thread, which would make its timings unfair, so only the seed that antspyx 0.6.3 reads is set."""
    import ants
    ants.config._random_seed = ANTS_SEED
    return ants


def _ants(quick: bool) -> Runner:
    """``antsRegistrationSyN.sh``'s recipe: affine (Mattes MI), then SyN with CC radius 4 over 100x70x50x20
    iterations at shrink factors 8x4x2x1; ``quick``: ``antsRegistrationSyNQuick.sh``'s, SyN with Mattes MI
    over 100x70x50x0. Across modalities SyN uses Mattes MI in both."""
    def run(fixed: Path, moving: Path, work: Path, multimodal: bool) -> Volume:
        ants = _seeded_ants()
        f, m = ants.image_read(str(fixed)), ants.image_read(str(moving))
        cc = not (quick or multimodal)
        reg = ants.registration(f, m, type_of_transform="SyN", syn_metric="CC" if cc else "mattes",
                                syn_sampling=4 if cc else 32,
                                reg_iterations=(100, 70, 50, 0) if quick else (100, 70, 50, 20),
                                outprefix=str(work / "ants_"), verbose=False)
        composed = ants.apply_transforms(f, m, transformlist=reg["fwdtransforms"],
                                         compose=str(work / "ants_total_"))
        return _field_volume(sitk.ReadImage(composed))
    return run


# ---------------------------------------------------------------- elastix
def _elastix(fixed: Path, moving: Path, work: Path, multimodal: bool) -> Volume:
    import itk
    f, m = itk.imread(str(fixed), itk.F), itk.imread(str(moving), itk.F)
    params = itk.ParameterObject.New()
    params.AddParameterMap(params.GetDefaultParameterMap("rigid"))
    bspline = params.GetDefaultParameterMap("bspline")
    bspline["FinalGridSpacingInPhysicalUnits"] = ["10.0"]
    params.AddParameterMap(bspline)    # both use Mattes mutual information: fine for CT-CT and MR-CT
    _, tparams = itk.elastix_registration_method(f, m, parameter_object=params, log_to_console=False,
                                                 output_directory=str(work))
    field = itk.transformix_deformation_field(m, tparams)
    arr = itk.array_from_image(field).astype(np.float32)
    img = sitk.GetImageFromArray(arr, isVector=True)
    ref = sitk.ReadImage(str(fixed))
    img.CopyInformation(ref)
    return _field_volume(img)


# ---------------------------------------------------------------- rigid alignment peers (the large-offset suite)
def _constant_field(fixed: Path, matrix: np.ndarray) -> Volume:
    """The total displacement on the fixed grid of the 4x4 fixed->moving (LPS mm) ``matrix``."""
    from rtreg.field import SpatialTransform
    return SpatialTransform(matrix).total_field(read_volume(fixed).grid)


def _rtreg_rigid(fixed: Path, moving: Path, work: Path, multimodal: bool) -> Volume:
    """rtreg's own intensity-based rigid pre-alignment (``--prealign rigid``: the better of identity and the
    centre-of-mass start, then rigid NCC/MI at 8 and 4 mm), alone."""
    from rtreg.case import RegistrationCase
    from rtreg.methods.io import registration_masks
    from rtreg.prealign import prealign
    case = RegistrationCase(read_volume(fixed), read_volume(moving))
    fixed_mask, moving_mask = registration_masks(case)
    return _constant_field(fixed, prealign(case.fixed, case.moving, "rigid", fixed_mask, moving_mask,
                                           "mi" if multimodal else "ncc"))


def _ants_linear(kind: str) -> Runner:
    """``ants.registration`` with ``type_of_transform`` Rigid or Affine (Mattes MI, its defaults)."""
    def run(fixed: Path, moving: Path, work: Path, multimodal: bool) -> Volume:
        ants = _seeded_ants()
        reg = ants.registration(ants.image_read(str(fixed)), ants.image_read(str(moving)),
                                type_of_transform=kind, outprefix=str(work / "ants_"), verbose=False)
        return _constant_field(fixed, sitk_linear_to_affine(sitk.ReadTransform(reg["fwdtransforms"][0])))
    return run


def _elastix_rigid(fixed: Path, moving: Path, work: Path, multimodal: bool) -> Volume:
    """elastix's default rigid parameter map (Mattes MI, 4 resolutions)."""
    import itk
    f, m = itk.imread(str(fixed), itk.F), itk.imread(str(moving), itk.F)
    params = itk.ParameterObject.New()
    params.AddParameterMap(params.GetDefaultParameterMap("rigid"))
    _, tparams = itk.elastix_registration_method(f, m, parameter_object=params, log_to_console=False,
                                                 output_directory=str(work))
    field = itk.transformix_deformation_field(m, tparams)
    img = sitk.GetImageFromArray(itk.array_from_image(field).astype(np.float32), isVector=True)
    img.CopyInformation(sitk.ReadImage(str(fixed)))
    return _field_volume(img)


def _moments(fixed: Path, moving: Path, work: Path, multimodal: bool) -> Volume:
    """SimpleITK's centred transform initialiser by image moments (centre of mass and principal axes)."""
    f = sitk.Cast(sitk.ReadImage(str(fixed)), sitk.sitkFloat32)
    m = sitk.Cast(sitk.ReadImage(str(moving)), sitk.sitkFloat32)
    shift = lambda img: img - float(np.min(sitk.GetArrayViewFromImage(img)))  # noqa: E731 - moments of mass >= 0
    tx = sitk.CenteredTransformInitializer(shift(f), shift(m), sitk.Euler3DTransform(),
                                           sitk.CenteredTransformInitializerFilter.MOMENTS)
    return _constant_field(fixed, sitk_linear_to_affine(tx))


def _convexadam_translation(fixed: Path, moving: Path, work: Path, multimodal: bool) -> Volume:
    """ConvexAdam's translation mode (``convex_adam_translation``: its field on a 1 mm grid, averaged, rounded
    to whole moving voxels along the moving image's axes)."""
    from convexAdam.convex_adam_translation import convex_adam_translation
    m = sitk.ReadImage(str(moving), sitk.sitkFloat32)
    t_ijk_mm, _, _ = convex_adam_translation(sitk.ReadImage(str(fixed), sitk.sitkFloat32), m)
    a = np.eye(4)
    a[:3, 3] = np.asarray(m.GetDirection()).reshape(3, 3) @ np.asarray(t_ijk_mm)
    return _constant_field(fixed, a)


# ---------------------------------------------------------------- plastimatch
_PLASTIMATCH_STAGES = """
[STAGE]
xform=align_center
[STAGE]
xform=rigid
optim=versor
impl=itk
metric={metric}
max_its=60
res=4 4 2
[STAGE]
xform=bspline
impl=plastimatch
optim=lbfgsb
metric={metric}
max_its=50
grid_spac=40 40 40
regularization_lambda=0.005
res=4 4 2
[STAGE]
grid_spac=20 20 20
max_its=50
res=2 2 1
[STAGE]
grid_spac=10 10 10
max_its=30
res=1 1 1
"""


def _plastimatch(fixed: Path, moving: Path, work: Path, multimodal: bool) -> Volume:
    import plastimatch
    exe = Path(plastimatch.__file__).parent / "bin" / "plastimatch"
    vf = work / "plastimatch_vf.mha"
    parms = work / "plastimatch.txt"
    parms.write_text(f"[GLOBAL]\nfixed={fixed}\nmoving={moving}\nvf_out={vf}\n"
                     + _PLASTIMATCH_STAGES.format(metric="mi" if multimodal else "mse"))
    done = subprocess.run([str(exe), "register", str(parms)], capture_output=True, text=True, env=os.environ)
    if done.returncode != 0 or not vf.exists():
        raise RuntimeError(f"plastimatch failed ({done.returncode}): {done.stderr[-2000:] or done.stdout[-2000:]}")
    return _field_volume(sitk.ReadImage(str(vf)))


# ---------------------------------------------------------------- SimpleITK demons
def _demons(fixed: Path, moving: Path, work: Path, multimodal: bool) -> Volume:
    """Rigid (Mattes MI, versor) then multi-resolution diffeomorphic demons on histogram-matched intensities
    (ITK's recommended set-up for the demons family, which assumes the same modality)."""
    f = sitk.Cast(sitk.ReadImage(str(fixed)), sitk.sitkFloat32)
    m = sitk.Cast(sitk.ReadImage(str(moving)), sitk.sitkFloat32)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(50)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.05, seed=1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(2.0, 1e-3, 150)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    init = sitk.CenteredTransformInitializer(f, m, sitk.VersorRigid3DTransform(),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg.SetInitialTransform(init, inPlace=False)
    rigid = reg.Execute(f, m)
    m_on_f = sitk.Resample(m, f, rigid, sitk.sitkLinear, float(np.min(sitk.GetArrayViewFromImage(m))))
    m_on_f = sitk.HistogramMatching(m_on_f, f, 1024, 7, True)
    field = None
    for shrink, iters in ((4, 60), (2, 40), (1, 20)):
        fs = sitk.Shrink(f, [shrink] * 3) if shrink > 1 else f
        ms = sitk.Resample(m_on_f, fs)
        init_field = (sitk.Resample(field, fs, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
                      if field is not None else sitk.Image(fs.GetSize(), sitk.sitkVectorFloat64))
        init_field.CopyInformation(fs)
        demons = sitk.DiffeomorphicDemonsRegistrationFilter()
        demons.SetNumberOfIterations(iters)
        demons.SetStandardDeviations(1.5)
        demons.SetSmoothDisplacementField(True)
        field = demons.Execute(fs, ms, sitk.Cast(init_field, sitk.sitkVectorFloat64))
    # total mapping: x -> rigid(x + u(x)), sampled on the fixed grid
    disp = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    total = sitk.CompositeTransform([rigid, disp])
    out = sitk.TransformToDisplacementFieldFilter()
    out.SetReferenceImage(f)
    out.SetOutputPixelType(sitk.sitkVectorFloat64)
    return _field_volume(out.Execute(total))


# ---------------------------------------------------------------- ConvexAdam
def _convexadam(fixed: Path, moving: Path, work: Path, multimodal: bool) -> Volume:
    """ConvexAdam (MIND-SSC, coupled convex optimisation + Adam) with its default settings, on the fixed
    grid; the moving image is resampled there first, as its pipeline expects."""
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt
    f = sitk.ReadImage(str(fixed), sitk.sitkFloat32)
    m = sitk.Resample(sitk.ReadImage(str(moving), sitk.sitkFloat32), f, sitk.Transform(), sitk.sitkLinear,
                      0.0)
    disp = convex_adam_pt(f, m, device=torch.device("cpu"))   # voxels along the (z, y, x) array axes
    vol = read_volume(fixed)
    u_ijk = np.asarray(disp, np.float64)[..., ::-1]
    u_mm = u_ijk @ vol.grid.affine[:3, :3].T
    return Volume(u_mm.astype(np.float32), vol.grid.affine.copy(), {"units": "mm"})


METHODS: List[Method] = [
    Method("io", "rtreg io (baseline)", "rtreg", _rtreg("io"), ours=True),
    Method("protondir", "rtreg ProtonDIR (network + refinement)", "rtreg", _rtreg("protondir"), ours=True),
    *[Method(f"{m}-coarse40", f"{label}, 40 instead of 80 iterations on the coarse level", "rtreg",
             _rtreg(m, iterations_per_level=[40, 60]), ours=True, in_default=False)
      for m, label in (("io", "rtreg io"), ("protondir", "rtreg ProtonDIR"))],
    # the convergence stop (--convergence-tolerance, default 0.01): without it, and with twice the iterations
    *[Method(f"{m}-every-iteration", f"{label}, every iteration of each level (--convergence-tolerance 0)", "rtreg",
             _rtreg(m, convergence_tolerance=0.0), ours=True, in_default=False)
      for m, label in (("io", "rtreg io"), ("protondir", "rtreg ProtonDIR"))],
    Method("io-long", "rtreg io, at most 160 and 120 iterations (twice the default), stopping at convergence",
           "rtreg", _rtreg("io", iterations_per_level=[160, 120]), ours=True, in_default=False),
    *[Method(name, f"ProtonDIR {name[10:].upper()} (network only)", "rtreg",
             _rtreg("protondir", clinical_inputs=inputs, refine=False, network_guard=False), ours=True,
             in_default=False)
      for name, inputs in _ABLATION.items()],
    *[Method(f"protondir-pw{w}", f"ProtonDIR prior weight {w}", "rtreg", _rtreg("protondir", prior_weight=w),
             ours=True, in_default=False) for w in (1, 3, 10)],   # --prior-weight W: the refinement's emphasis
    Method("tto", "rtreg TTORegister (student + test-time optimisation)", "rtreg", _rtreg("tto"), ours=True),
    Method("tto-teacher", "TTORegister teacher + test-time optimisation", "rtreg", _rtreg("tto", network="teacher"),
           ours=True, in_default=False),
    Method("tto-float32", "TTORegister student + test-time optimisation, passes in float32 (--precision float32)",
           "rtreg", _rtreg("tto", precision="float32"), ours=True, in_default=False),
    Method("tto-mi16", "TTORegister student + test-time optimisation, multi-axis MI of 16 bins (as in training)",
           "rtreg", _rtreg("tto", mi_bins=16), ours=True, in_default=False),
    Method("tto-student-net", "TTORegister student, network only", "rtreg", _rtreg("tto", adapt=False),
           ours=True, in_default=False),
    Method("tto-teacher-net", "TTORegister teacher, network only", "rtreg",
           _rtreg("tto", network="teacher", adapt=False), ours=True, in_default=False),
    Method("quiz", "rtreg QuizRigid (rigid fit + refinement)", "rtreg", _rtreg("quiz"), ours=True,
           suites=("large-offset",)),
    Method("quiz-translation", "QuizRigid, translation only (the paper's), no refinement", "rtreg",
           _rtreg("quiz", mode="translation", refine=False), ours=True, suites=("large-offset",)),
    Method("quiz-matching", "QuizRigid, rigid fit of the matches, no refinement", "rtreg",
           _rtreg("quiz", refine=False), ours=True, suites=("large-offset",)),
    Method("io-quiz", "rtreg io with QuizRigid pre-alignment", "rtreg", _rtreg("io", prealign="quiz"), ours=True,
           suites=("large-offset",)),
    Method("rtreg-rigid", "rtreg rigid pre-alignment alone", "rtreg", _rtreg_rigid, ours=True),
    Method("ants-rigid", "ANTs rigid (MI)", "ants", _ants_linear("Rigid"), suites=("large-offset",)),
    Method("ants-affine", "ANTs affine (MI)", "ants", _ants_linear("Affine"), suites=("large-offset",)),
    Method("elastix-rigid", "elastix rigid", "itk", _elastix_rigid, suites=("large-offset",)),
    Method("moments", "SimpleITK moments initialisation", "SimpleITK", _moments, suites=("large-offset",)),
    Method("convexadam-translation", "ConvexAdam translation mode", "convexAdam", _convexadam_translation,
           suites=("large-offset",)),
    Method("glide", "rtreg GlideReg (global-to-local, VAE)", "rtreg", _rtreg("glide", at_image_spacing=True),
           ours=True),
    Method("glide-global", "GlideReg, global features only", "rtreg",
           _rtreg("glide", at_image_spacing=True, stages="global"), ours=True, in_default=False),
    Method("glide-local", "GlideReg, local (MIND-SSC) features only", "rtreg",
           _rtreg("glide", at_image_spacing=True, stages="local"), ours=True, in_default=False),
    Method("glide-pca", "GlideReg, global-to-local with PCA instead of the VAE", "rtreg",
           _rtreg("glide", at_image_spacing=True, reduction="pca"), ours=True, in_default=False),
    Method("glide-no-guard", "GlideReg, global-to-local always (the guard off)", "rtreg",
           _rtreg("glide", at_image_spacing=True, global_guard=False), ours=True, in_default=False),
    *[Method(f"glide-bending-{w}", f"GlideReg, bending weight {w}", "rtreg",
             _rtreg("glide", at_image_spacing=True, regularization_weight=float(w)), ours=True, in_default=False)
      for w in (300, 1000)],
    Method("ants-syn-quick", "ANTs SyN quick (MI)", "ants", _ants(quick=True)),
    Method("ants-syn", "ANTs SyN (CC)", "ants", _ants(quick=False), in_default=False),
    Method("elastix", "elastix B-spline", "itk", _elastix),
    Method("plastimatch", "plastimatch B-spline", "plastimatch", _plastimatch),
    Method("demons", "SimpleITK diffeomorphic demons", "SimpleITK", _demons, same_modality_only=True),
    Method("convexadam", "ConvexAdam", "convexAdam", _convexadam),
]


def by_name() -> Dict[str, Method]:
    return {m.name: m for m in METHODS}
