"""The self-test the four modules share: a generated phantom registered inside Slicer through the Logic."""
from __future__ import annotations

import numpy as np

from rtreg import mrml
from rtreg.metrics import dice
from rtreg.synth import large_offset_case, rt_phantom

from .environment import missing_requirements, python_executable


def run_phantom_selftest(scene, method: str, delay_display=lambda message: None, site: str = "headneck") -> float:
    """Register a generated phantom (5 mm voxels) with ``method``; returns the CTV Dice against the truth
    (QuizRigid: the mean point error in mm, on the phantom moved by 60 mm and cropped).

    Raises AssertionError when the engine's requirements are missing or the CTV Dice is below 0.8 (QuizRigid:
    the mean point error is above 5 mm).
    """
    missing = missing_requirements()
    assert not missing, f"the engine needs {missing}: install the PyTorch extension and press Apply once"
    if method == "quiz":
        return _large_offset_selftest(scene, delay_display)
    delay_display(f"Building a {site} phantom")
    case = rt_phantom(site, seed=11, spacing_mm=5.0)
    fixed = mrml.add_volume_node(scene, case.planning, "selftest planning CT")
    moving = mrml.add_volume_node(scene, case.repeat, "selftest repeat CT")
    seg = mrml.add_segmentation_node(scene, case.planning_structures, case.planning.grid, "selftest structures")
    delay_display(f"Registering with {method}")
    logic = mrml.RegistrationLogic(method, scene, python_executable())
    out = logic.process(mrml.RegistrationInputs(fixed, moving, seg), {"device": "cpu", "working_spacing": 5})
    repeat = mrml.volume_from_node(moving, with_parent_transform=False)
    got = {s.name: s for s in mrml.structures_from_segmentation(out.segmentation, repeat)}
    score = dice(got["CTV"].mask, case.structure("CTV", repeat=True).mask)
    assert score >= 0.8 and np.isfinite(score), f"CTV Dice {score:.3f} after registration"
    delay_display(f"CTV Dice {score:.3f}: test passed")
    return score


def _large_offset_selftest(scene, delay_display) -> float:
    delay_display("Building a thorax phantom moved by 60 mm, 80 % field of view")
    case = large_offset_case(rt_phantom("thorax", seed=64, spacing_mm=3.0).planning, seed=64, keep_fraction=0.8,
                             n_points=50)
    fixed = mrml.add_volume_node(scene, case.planning, "selftest planning CT")
    moving = mrml.add_volume_node(scene, case.repeat, "selftest repeat CT")
    delay_display("Registering with quiz")
    out = mrml.RegistrationLogic("quiz", scene, python_executable()).process(
        mrml.RegistrationInputs(fixed, moving), {"device": "cpu"})
    m = mrml.vtk.vtkMatrix4x4()
    out.transform.GetMatrixTransformFromParent(m)            # fixed -> moving, RAS
    a = mrml.LPS_RAS @ np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)]) @ mrml.LPS_RAS
    got = case.points_planning @ a[:3, :3].T + a[:3, 3]
    error = float(np.linalg.norm(got - case.points_repeat, axis=1).mean())
    assert error <= 5.0, f"mean point error {error:.1f} mm after QuizRigid"
    delay_display(f"Mean point error {error:.2f} mm: test passed")
    return error
