"""The self-test the four modules share: a generated phantom registered inside Slicer through the Logic."""
from __future__ import annotations

import numpy as np

from rtreg import mrml
from rtreg.metrics import dice
from rtreg.synth import rt_phantom

from .environment import missing_requirements, python_executable


def run_phantom_selftest(scene, method: str, delay_display=lambda message: None, site: str = "headneck") -> float:
    """Register a generated phantom (5 mm voxels) with ``method``; returns the CTV Dice against the truth.

    Raises AssertionError when the engine's requirements are missing or the CTV Dice is below 0.8.
    """
    missing = missing_requirements()
    assert not missing, f"the engine needs {missing}: install the PyTorch extension and press Apply once"
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
