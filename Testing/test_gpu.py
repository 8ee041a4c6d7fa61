"""Every method on a CUDA GPU gives the answer it gives on the CPU (skipped where torch sees no GPU).

The pelvis RT phantom at 4 mm (its known deformation and points) is registered by each method twice, with
``device="cpu"`` and ``device="cuda"``; the GPU run must say it ran there, register the pair (TRE below the
pre-alignment's, or for the rigid QuizRigid below the start's) and end within 0.1 mm + 15 % of the CPU run's
mean TRE (the GPU's floating-point order differs, so iterative methods do not end bit for bit alike).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rtreg.case import RegisterOptions, RegistrationCase
from rtreg.field import SpatialTransform
from rtreg.methods import get_method
from rtreg.metrics import tre
from rtreg.roles import guess_roles
from rtreg.synth import rt_phantom

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")


@pytest.fixture(scope="module")
def pelvis():
    return rt_phantom("pelvis", seed=13, spacing_mm=4.0, n_points=200)


def _case(p) -> RegistrationCase:
    target, oars, _ = guess_roles([s.name for s in p.planning_structures])
    return RegistrationCase(p.planning, p.repeat, structures=list(p.planning_structures), dose=p.dose,
                            plan=p.plan, target=target, oars=oars)


def _mean_tre(transform: SpatialTransform, p) -> float:
    return tre(transform.transform_points(p.points_planning), p.points_repeat)["mean"]


@pytest.mark.parametrize("method,options", [
    ("io", {"working_spacing_mm": 4.0}),
    ("protondir", {"working_spacing_mm": 4.0}),
    ("glide", {"working_spacing_mm": 4.0}),
    ("tto", {"extra": {"max_voxels": 48 * 48 * 32}}),
    ("quiz", {}),
])
def test_a_method_on_the_gpu_matches_the_cpu(pelvis, method, options):
    case = _case(pelvis)
    register = get_method(method)
    on_cpu = register(case, RegisterOptions(device="cpu", **options))
    on_gpu = register(case, RegisterOptions(device="cuda", **options))
    assert on_gpu.device.startswith("cuda") and on_cpu.device == "cpu"
    start = _mean_tre(SpatialTransform(np.eye(4)), pelvis) if method == "quiz" else \
        _mean_tre(SpatialTransform(on_gpu.prealignment), pelvis)
    cpu, gpu = _mean_tre(on_cpu.transform, pelvis), _mean_tre(on_gpu.transform, pelvis)
    print(f"{method}: start {start:.2f} mm, CPU {cpu:.2f} mm ({on_cpu.timings['total_s']:.1f} s), "
          f"GPU {gpu:.2f} mm ({on_gpu.timings['total_s']:.1f} s)")
    assert gpu < start, (start, gpu)
    assert abs(gpu - cpu) <= 0.1 + 0.15 * cpu, (cpu, gpu)
