"""Static checks of the Slicer modules: every .ui parses and holds the widgets the code uses; the CMake files
name what exists; each module's Logic imports and runs on slicer-core (no Slicer application)."""
import ast
import importlib.util
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODULES = ["ProtonDIR", "QuizRigid", "TTORegister", "GlideReg"]
BASE_WIDGET = REPO / "SlicerProtonDIRLib" / "widget.py"


def _ui_names(module):
    root = ET.parse(REPO / module / "Resources" / "UI" / f"{module}.ui").getroot()
    return {w.get("name") for w in root.iter("widget") if w.get("name")}


def _used_names(path):
    return set(re.findall(r"self\.ui\.(\w+)", path.read_text()))


@pytest.mark.parametrize("module", MODULES)
def test_ui_parses_and_holds_the_widgets_the_code_uses(module):
    names = _ui_names(module)
    used = _used_names(REPO / module / f"{module}.py") | _used_names(BASE_WIDGET)
    assert not used - names, f"{module}.ui lacks {sorted(used - names)}"
    root = ET.parse(REPO / module / "Resources" / "UI" / f"{module}.ui").getroot()
    assert root.find("class").text == module


@pytest.mark.parametrize("module", MODULES)
def test_module_files_and_cmake(module):
    folder = REPO / module
    cmake = (folder / "CMakeLists.txt").read_text()
    assert "WITH_GENERIC_TESTS" in cmake and "slicer_add_python_unittest" in cmake
    for res in re.findall(r"Resources/\S+", cmake):
        resolved = res.replace("${MODULE_NAME}", module)
        assert (folder / resolved).is_file(), resolved
    assert f"add_subdirectory({module})" in (REPO / "CMakeLists.txt").read_text()
    tree = ast.parse((folder / f"{module}.py").read_text())
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {module, f"{module}Widget", f"{module}Logic", f"{module}Test"} <= classes


def test_extension_cmake_metadata():
    text = (REPO / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL"):
        assert key in text
    assert re.search(r"set\(EXTENSION_DEPENDS PyTorch SlicerRT\)", text)
    assert (REPO / "Resources" / "Icons" / "SlicerProtonDIR.png").is_file()


@pytest.mark.parametrize("module", MODULES)
def test_logic_imports_under_slicer_core(module):
    slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is not installed")
    spec = importlib.util.spec_from_file_location(module, REPO / module / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    logic = getattr(mod, f"{module}Logic")(slicer.vtkMRMLScene())
    assert logic.method == {"ProtonDIR": "protondir", "TTORegister": "tto", "QuizRigid": "quiz",
                            "GlideReg": "glide"}[module]
    from rtreg.mrml import RegistrationLogic
    assert isinstance(logic, RegistrationLogic)


@pytest.mark.parametrize("module", [m for m in MODULES if m != "QuizRigid"])   # rigid: its own test below
def test_each_module_logic_registers_a_small_phantom(module):
    slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is not installed")
    from rtreg import mrml
    from rtreg.metrics import dice
    from rtreg.synth import rt_phantom
    spec = importlib.util.spec_from_file_location(module, REPO / module / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    case = rt_phantom("pelvis", seed=2, spacing_mm=6.0, n_points=10)
    scene = slicer.vtkMRMLScene()
    fixed = mrml.add_volume_node(scene, case.planning, "planning")
    moving = mrml.add_volume_node(scene, case.repeat, "repeat")
    seg = mrml.add_segmentation_node(scene, case.planning_structures, case.planning.grid, "structures")
    options = {"device": "cpu", "working_spacing": 6}
    if module == "TTORegister":
        options["iterations"] = 30          # of the test-time optimisation (100 by default)
    if module == "ProtonDIR":
        options["prior_weight"] = 2.0       # the panel's target emphasis reaches the engine
    out = getattr(mod, f"{module}Logic")(scene).process(mrml.RegistrationInputs(fixed, moving, seg), options)
    repeat = mrml.volume_from_node(moving, with_parent_transform=False)
    got = {s.name: s.mask for s in mrml.structures_from_segmentation(out.segmentation, repeat)}
    before = dice(mrml.structures_from_segmentation(seg, repeat, [seg.GetSegmentation().GetSegmentIdBySegmentName(
        "Bladder")])[0].mask, case.structure("Bladder", repeat=True).mask)
    assert dice(got["Bladder"], case.structure("Bladder", repeat=True).mask) > before
    if module == "TTORegister":  # the patch-wise MI maps become volumes, their means reach the panel
        assert set(out.maps) == {"patch_mi_before", "patch_mi_after"}
        assert out.maps["patch_mi_after"].GetImageData() is not None
        assert any(line.startswith("patch-wise MI") for line in out.summary), out.summary
    if module == "GlideReg":    # its QA reaches the panel's log and table
        assert any(line.startswith("GlideReg: ") and "feature SSD after pre-alignment / convex / Adam" in line
                   for line in out.summary), out.summary
    if module == "ProtonDIR":   # the engine's notes reach the panel: no dose was given
        assert any("risk map not used: no dose" in m for m in out.messages), out.messages
        assert any(line.startswith("ProtonDIR: clinical inputs used by the network: anatomy")
                   and line.endswith("refinement prior weight 2") for line in out.summary), out.summary


def test_quizrigid_logic_gives_a_linear_transform_and_markups_that_land_where_they_should():
    """User query points (a markups node) on a planning CT moved 60 mm and cropped: the linear transform node
    takes a point of the repeat image, placed under it, onto the planning point it shows (a wrong sign or
    direction fails), and the query and matched points come back as markups with their confidence."""
    slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is not installed")
    import numpy as np
    from rtreg import mrml
    from rtreg.synth import large_offset_case, rt_phantom
    spec = importlib.util.spec_from_file_location("QuizRigid", REPO / "QuizRigid" / "QuizRigid.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    case = large_offset_case(rt_phantom("thorax", seed=64).planning, seed=64, keep_fraction=0.8, n_points=30)
    scene = slicer.vtkMRMLScene()
    fixed = mrml.add_volume_node(scene, case.planning, "planning")
    moving = mrml.add_volume_node(scene, case.repeat, "repeat")
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "landmarks")
    mrml.set_points(points, case.points_planning[:24], [f"L{k}" for k in range(24)], [""] * 24)
    out = mod.QuizRigidLogic(scene).process(mrml.RegistrationInputs(fixed, moving, query_points=points),
                                            {"device": "cpu"})
    assert out.transform.IsA("vtkMRMLLinearTransformNode") and moving.GetParentTransformNode() is out.transform
    m = mrml.vtk.vtkMatrix4x4()
    out.transform.GetMatrixTransformToParent(m)
    ras = lambda p: np.array([-p[0], -p[1], p[2], 1.0])  # noqa: E731
    for k in range(0, 30, 5):
        landed = np.array(m.MultiplyPoint(tuple(ras(case.points_repeat[k]))))[:3]
        assert np.linalg.norm(landed - ras(case.points_planning[k])[:3]) < 3.0, k
    assert out.query_points.GetNumberOfControlPoints() == 24 == out.matched_points.GetNumberOfControlPoints()
    assert out.matched_points.GetParentTransformNode() is out.transform
    assert "confidence" in out.matched_points.GetNthControlPointDescription(0)
    assert any(line.startswith("query-point matching") for line in out.summary), out.summary
    assert points.GetNumberOfControlPoints() == 24 and points.GetParentTransformNode() is None   # input untouched


def test_ttoregister_logic_corrects_a_sequence_of_three_frames():
    """A Slicer sequence (3 frames: a phantom and two known rigid motions of it) comes back as a new sequence
    whose frames match the reference frame; the input sequence is not modified."""
    slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is not installed")
    import numpy as np
    from rtreg import mrml
    from rtreg.field import SpatialTransform, warp
    from rtreg.synth import rigid_matrix, rt_phantom
    spec = importlib.util.spec_from_file_location("TTORegister", REPO / "TTORegister" / "TTORegister.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ref = rt_phantom("pelvis", seed=2, spacing_mm=6.0, n_points=10).planning
    centre = ref.grid.index_to_world((np.array(ref.grid.size_xyz)[None] - 1) / 2.0)[0]
    frames = [ref] + [warp(ref, SpatialTransform(np.linalg.inv(rigid_matrix(rot, shift, centre))), ref.grid,
                           fill=-1000.0) for rot, shift in (((0, 0, 2.0), (3.0, 0, 0)), ((0, 2.0, 0), (0, -4.0, 2.0)))]
    scene = slicer.vtkMRMLScene()
    seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "dce")
    for k, f in enumerate(frames):
        seq.SetDataNodeAtValue(mrml.update_volume_node(slicer.vtkMRMLScalarVolumeNode(), f), str(k))
    logic = mod.TTORegisterLogic(scene)
    corrected = logic.process_series(seq, 0, {"device": "cpu", "iterations": 15, "working_spacing": 6,
                                              "similarity": "mi"})
    assert corrected.GetNumberOfDataNodes() == 3 and corrected.GetNthIndexValue(2) == "2"
    body = ref.array > -400
    for k in (1, 2):
        got = mrml.volume_from_node(corrected.GetNthDataNode(k)).array
        before = np.abs(frames[k].array - ref.array)[body].mean()
        assert np.abs(got - ref.array)[body].mean() < 0.8 * before, k   # 6 mm voxels: accuracy is test_tto's
        assert np.array_equal(mrml.volume_from_node(seq.GetNthDataNode(k)).array, frames[k].array)
    with pytest.raises(mrml.InputError, match="reference frame 3 does not exist"):
        logic.start_series(seq, 3)


def test_quizrigid_selftest_code_runs_on_real_mrml():
    """The QuizRigid self-test (run inside Slicer by ctest) on a slicer-core scene: the same code path."""
    slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is not installed")
    import sys
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))       # as a module loaded from the source tree does
    from SlicerProtonDIRLib.selftest import run_phantom_selftest
    error = run_phantom_selftest(slicer.vtkMRMLScene(), "quiz")
    assert error <= 5.0
