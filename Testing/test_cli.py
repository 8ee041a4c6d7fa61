"""The command line contract: outputs with their exact names, JSON-lines progress, errors with exit status 2."""
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import data_path
from rtreg.cli import main
from rtreg.field import read_transform
from rtreg.image import Grid, Volume, read_volume, write_volume
from rtreg.synth import deform_real_ct, rt_phantom, write_case


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    return write_case(rt_phantom("headneck", seed=2, spacing_mm=4.0), tmp_path_factory.mktemp("case"))


def _run(args):
    return subprocess.run([sys.executable, "-m", "rtreg.cli", *args], capture_output=True, text=True, timeout=600)


def test_register_writes_every_output_and_streams_jsonl(case_dir, tmp_path):
    out = tmp_path / "out"
    p = _run(["register", "--method", "io", "--fixed", str(case_dir / "planning_ct.nii.gz"),
              "--moving", str(case_dir / "repeat_ct.nii.gz"), "--out", str(out),
              "--fixed-structures", str(case_dir / "structures"), "--dose", str(case_dir / "dose.nii.gz"),
              "--plan", str(case_dir / "plan.txt"), "--working-spacing", "4", "--iterations", "30",
              "--progress", "jsonl", "--device", "cpu", "--report"])
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    assert lines[-1]["type"] == "done" and all(x["type"] == "progress" for x in lines[:-1])
    fr = [x["fraction"] for x in lines[:-1]]
    assert fr == sorted(fr) and fr[-1] == 1.0
    for name in ("transform.h5", "displacement.mha", "warped_moving.nii.gz", "dose_on_moving.nii.gz",
                 "metrics.json", "jacobian.nii.gz", "qa/overlay_before.png", "qa/overlay_after.png",
                 "qa/checkerboard_after.png", "qa/jacobian.png", "qa/structures_on_moving.png",
                 "structures_on_moving/CTV.nii.gz", "structures_on_moving/Brainstem.nii.gz"):
        assert (out / name).is_file(), name
    fixed, moving = read_volume(case_dir / "planning_ct.nii.gz"), read_volume(case_dir / "repeat_ct.nii.gz")
    # transform.h5 is a real ITK transform; displacement.mha is the same mapping as a total field
    tx = sitk.ReadTransform(str(out / "transform.h5"))
    total = read_transform(out / "displacement.mha")
    pts = fixed.grid.index_to_world(np.array([[10, 20, 15], [30, 40, 20]]))
    np.testing.assert_allclose(total.transform_points(pts), [tx.TransformPoint(q.tolist()) for q in pts], atol=1e-2)
    warped = read_volume(out / "warped_moving.nii.gz")
    assert warped.grid.same_as(fixed.grid)
    ctv = read_volume(out / "structures_on_moving" / "CTV.nii.gz")
    assert ctv.grid.same_as(moving.grid) and ctv.array.any()
    dose = read_volume(out / "dose_on_moving.nii.gz")
    assert dose.grid.same_as(moving.grid) and 60 < dose.array.max() <= 70.5
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "io" and m["device"] == "cpu"
    assert m["similarity_after"]["ncc"] > m["similarity_before"]["ncc"]
    assert m["inverse_residual_mm"]["mean"] < 0.1 and "percent_nonpositive_jacobian" in m["jacobian"]
    assert "Proton plan" in m["plan_text"] and "prealign_s" in m["timings_s"]
    assert m["roles"]["target"] == "CTV" and sorted(m["roles"]["oars"]) == ["Brainstem", "Parotid_L", "Parotid_R",
                                                                           "SpinalCord"]
    ctv_cc = m["structure_volumes_cc"]["CTV"]
    assert ctv_cc["planning"] > 1 and abs(ctv_cc["on_moving"] / ctv_cc["planning"] - 1) < 0.3
    # the QA report: one self-contained page with every figure and the checks
    assert lines[-1]["report"] == str(out / "report.html")
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(list((out / "qa").glob("*.png"))) >= 6
    for text in ("Checkerboard", "propagated onto the moving image", "Jacobian determinant", "Folded voxels",
                 "Inverse residual", "CTV"):
        assert text in page, text


def test_the_engine_imports_matplotlib_only_to_draw_and_never_sets_its_backend():
    """Loading a case and a method (what every run and the benchmark's timing include) does not import
    matplotlib (about 0.3 s); drawing a QA figure does, without choosing pyplot's backend for the process
    (inside Slicer's Python that would change every later plot)."""
    code = ("import sys; import rtreg.pipeline, rtreg.methods, rtreg.cli, rtreg.qa; "
            "print('matplotlib' in sys.modules); "
            "import numpy as np, tempfile, pathlib; from rtreg.image import Grid, Volume; "
            "v = Volume(np.random.rand(8, 8, 8).astype('float32'), Grid((8, 8, 8), np.eye(4)).affine); "
            "p = rtreg.qa.overlay_figure(v, v, pathlib.Path(tempfile.mkdtemp()) / 'o.png', 't', (4, 4, 4)); "
            "print('matplotlib' in sys.modules, 'matplotlib.pyplot' in sys.modules, p.stat().st_size > 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "False", "True"]


def test_report_needs_a_registration_output(tmp_path):
    from rtreg.errors import InputError
    from rtreg.report import write_html_report
    with pytest.raises(InputError, match="rtreg register"):
        write_html_report(tmp_path)


def test_roles_name_structures_or_fail_clearly(case_dir, tmp_path, capsys):
    from rtreg.pipeline import load_case
    fixed, moving = str(case_dir / "planning_ct.nii.gz"), str(case_dir / "repeat_ct.nii.gz")
    case = load_case(fixed, moving, structures=str(case_dir / "structures"), target="ctv", oars=["brainstem"])
    case.validate("rigid")
    assert case.target == "CTV" and case.oars == ["Brainstem"]
    assert main(["register", "--fixed", fixed, "--moving", moving, "--out", str(tmp_path / "o"),
                 "--fixed-structures", str(case_dir / "structures"), "--target", "PTV_70"]) == 2
    err = capsys.readouterr().err
    assert "target 'PTV_70' is not among the structures" in err and "CTV" in err
    assert main(["register", "--fixed", fixed, "--moving", moving, "--out", str(tmp_path / "o"),
                 "--target", "CTV"]) == 2
    assert "no --fixed-structures" in capsys.readouterr().err


def test_role_guessing_follows_planning_names():
    from rtreg.roles import guess_roles
    names = ["BODY", "CTV", "BrainStem", "M1", "M7", "Beekley", "PTV_CTV", "Couch"]
    assert guess_roles(names) == ("CTV", ["BrainStem"], "BODY")
    assert guess_roles(["PTV_CTV", "HighRisk_CTV", "Bladder"]) == ("HighRisk_CTV", ["Bladder"], None)
    assert guess_roles(["External", "GTVp", "Lung L", "PTV"]) == ("GTVp", ["Lung L"], "External")
    assert guess_roles(["Heart", "Cord"]) == (None, ["Heart", "Cord"], None)


def test_info_lists_versions_and_methods(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "io" in info["methods"] and info["torch"] and info["SimpleITK"]


def test_bad_input_exits_2_with_a_message(case_dir, tmp_path, capsys):
    fixed, moving = str(case_dir / "planning_ct.nii.gz"), str(case_dir / "repeat_ct.nii.gz")
    assert main(["register", "--fixed", str(tmp_path / "none.nii"), "--moving", moving, "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    nan = read_volume(moving)
    nan.array = nan.array.astype(np.float32)
    nan.array[5, 5, 5] = np.nan
    write_volume(nan, tmp_path / "nan.nii.gz")
    assert main(["register", "--fixed", fixed, "--moving", str(tmp_path / "nan.nii.gz"), "--out",
                 str(tmp_path / "o1")]) == 2
    assert "NaN" in capsys.readouterr().err
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o500)
    blocked = ro / "sub" if not _is_root() else tmp_path / "file_not_dir"
    if _is_root():
        blocked.write_text("x")  # root ignores permissions: a path that is a file cannot be a folder
    assert main(["register", "--fixed", fixed, "--moving", moving, "--out", str(blocked)]) == 2
    assert "not writable" in capsys.readouterr().err
    flat = sitk.Image([8, 8], sitk.sitkInt16)
    sitk.WriteImage(flat, str(tmp_path / "flat.nii.gz"))
    assert main(["register", "--fixed", str(tmp_path / "flat.nii.gz"), "--moving", moving, "--out",
                 str(tmp_path / "o2")]) == 2
    assert "2D image" in capsys.readouterr().err
    assert main(["register", "--fixed", fixed, "--moving", moving, "--out", str(tmp_path / "o3"),
                 "--fixed-structures", str(tmp_path / "nothing")]) == 2
    assert "do not exist" in capsys.readouterr().err
    for flag, value, named in (("--regularization-weight", "-5", "regularization weight"),
                               ("--regularization-weight", "nan", "regularization weight"),
                               ("--working-spacing", "0", "working spacing"),
                               ("--convergence-tolerance", "1", "--convergence-tolerance")):
        assert main(["register", "--fixed", fixed, "--moving", moving, "--out", str(tmp_path / "o4"),
                     flag, value]) == 2
        assert named in capsys.readouterr().err
    assert main(["register", "--method", "protondir", "--fixed", fixed, "--moving", moving, "--out",
                 str(tmp_path / "o4"), "--prior-weight", "-1"]) == 2
    assert "--prior-weight" in capsys.readouterr().err
    assert not (tmp_path / "o4").exists()


def test_different_frames_need_prealignment_or_override(tmp_path, capsys):
    g = Grid.from_geometry((16, 16, 16), (2, 2, 2))
    a = Volume(np.random.default_rng(0).normal(size=g.shape).astype(np.float32), g.affine)
    write_volume(a, tmp_path / "a.nii.gz")
    from rtreg.case import RegistrationCase
    from rtreg.errors import InputError
    fa = Volume(a.array, a.affine, {"frame_of_reference": "1.1"})
    fb = Volume(a.array, a.affine, {"frame_of_reference": "2.2"})
    with pytest.raises(InputError, match="--same-frame"):
        RegistrationCase(fa, fb).validate("none")
    RegistrationCase(fa, fb, same_frame=True).validate("none")
    RegistrationCase(fa, fb).validate("rigid")


def _is_root():
    import os
    return os.geteuid() == 0


def test_io_on_dcpt_phantom_reduces_tre_by_70_percent(tmp_path):
    """The issue's acceptance check, on the real DCPT head CT resampled to 2 mm (full resolution: bench/)."""
    ct = read_volume(data_path("dcpt_headphantom", "DCPT_headphantom"))
    from rtreg.image import resample
    ct2 = resample(ct, ct.grid.with_spacing(2.0))
    ct2.array = ct2.array.astype(np.int16)
    case = deform_real_ct(ct2, "soft_tissue", seed=3, amplitude_mm=8.0, n_points=300)
    write_volume(ct2, tmp_path / "planning.nii.gz", np.int16)
    write_volume(case.repeat, tmp_path / "repeat.nii.gz", np.int16)
    assert main(["register", "--method", "io", "--fixed", str(tmp_path / "planning.nii.gz"), "--moving",
                 str(tmp_path / "repeat.nii.gz"), "--out", str(tmp_path / "out"), "--working-spacing", "3",
                 "--progress", "none", "--device", "cpu"]) == 0
    est = read_transform(tmp_path / "out" / "transform.h5").transform_points(case.points_planning)
    before = np.linalg.norm(case.points_planning - case.points_repeat, axis=1).mean()
    after = np.linalg.norm(est - case.points_repeat, axis=1).mean()
    assert len(est) == 300
    assert after <= 0.3 * before, (before, after)


def test_a_failed_run_leaves_the_output_folder_as_it_was(case_dir, tmp_path, monkeypatch):
    """Outputs appear only when all are written: an error after the transform and the warped image were written
    leaves an existing output folder with only what it held, and removes a folder the run created; a
    successful run into the same folder replaces the earlier outputs and removes those of ours it does not
    write (a mapped dose, a report), keeping the user's own files."""
    from rtreg import pipeline
    args = ["register", "--fixed", str(case_dir / "planning_ct.nii.gz"), "--moving", str(case_dir / "repeat_ct.nii.gz"),
            "--fixed-structures", str(case_dir / "structures"), "--working-spacing", "8", "--iterations", "5",
            "--progress", "none"]
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    for name in ("metrics.json", "dose_on_moving.nii.gz", "report.html", "notes.txt"):   # an earlier run's
        (earlier / name).write_text("earlier")

    def broken(*_args, **_kw):
        raise RuntimeError("simulated failure while writing the outputs")
    monkeypatch.setattr(pipeline, "jacobian_determinant", broken)
    for out in (earlier, tmp_path / "new"):
        with pytest.raises(RuntimeError, match="simulated failure"):
            main(args + ["--out", str(out)])
    assert sorted(p.name for p in earlier.iterdir()) == ["dose_on_moving.nii.gz", "metrics.json", "notes.txt",
                                                         "report.html"]
    assert (earlier / "metrics.json").read_text() == "earlier"
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    assert main(args + ["--out", str(earlier)]) == 0      # no dose and no --report this time
    names = sorted(p.name for p in earlier.iterdir())
    assert {"transform.h5", "warped_moving.nii.gz", "structures_on_moving", "qa", "metrics.json"} <= set(names)
    assert not {"dose_on_moving.nii.gz", "report.html"} & set(names)      # not this run's: removed
    assert (earlier / "notes.txt").read_text() == "earlier"                 # not ours: kept
    assert set(names) - {"notes.txt"} <= set(pipeline.OUTPUTS)             # the list knows every output
    assert not [n for n in names if n.startswith(".rtreg-partial")]
    assert json.loads((earlier / "metrics.json").read_text())["method"] == "io"


def test_inputs_are_never_modified(case_dir, tmp_path):
    import hashlib

    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}

    before = digest(case_dir)
    assert main(["register", "--fixed", str(case_dir / "planning_ct.nii.gz"), "--moving",
                 str(case_dir / "repeat_ct.nii.gz"), "--out", str(tmp_path / "o"), "--fixed-structures",
                 str(case_dir / "structures"), "--dose", str(case_dir / "dose.nii.gz"), "--working-spacing", "8",
                 "--iterations", "5", "--progress", "none"]) == 0
    assert digest(case_dir) == before


def test_demo_improves_every_metric(tmp_path, capsys):
    from rtreg.demo import run_demo
    assert run_demo(tmp_path / "demo", site="thorax", seed=1, device="cpu", spacing_mm=5.0)
    table = capsys.readouterr().out
    assert "TRE mean" in table and "NO" not in table
    assert (tmp_path / "demo" / "result" / "qa" / "structures_on_moving.png").is_file()


def test_eval_matches_the_demo_metrics(tmp_path, capsys):
    """`rtreg eval` on a registered phantom gives the same TRE and Dice as computing them directly."""
    from rtreg.evaluation import point_errors
    from rtreg.metrics import dice
    case = rt_phantom("pelvis", seed=3, spacing_mm=6.0, n_points=40)
    case_dir = write_case(case, tmp_path / "case")
    out = tmp_path / "out"
    assert main(["register", "--fixed", str(case_dir / "planning_ct.nii.gz"), "--moving",
                 str(case_dir / "repeat_ct.nii.gz"), "--out", str(out), "--fixed-structures",
                 str(case_dir / "structures"), "--working-spacing", "6", "--progress", "none"]) == 0
    capsys.readouterr()
    assert main(["eval", "--case", str(case_dir), "--result", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "eval.json").read_text())
    direct = point_errors(read_transform(out / "transform.h5"), case.points_planning, case.points_repeat)
    assert result["tre_mm"]["mean"] == pytest.approx(direct["mean"], abs=1e-3)  # csv keeps 4 decimals
    assert result["tre_mm"]["n"] == 40 and "TRE (mm, 40 points)" in printed
    ctv = read_volume(out / "structures_on_moving" / "CTV.nii.gz").array
    assert result["structures"]["CTV"]["dice"] == pytest.approx(dice(ctv, case.structure("CTV", repeat=True).mask))
    assert set(result["structures"]) == {s.name for s in case.repeat_structures}
    assert result["jacobian"]["percent_nonpositive_jacobian"] == 0.0
    assert main(["eval", "--case", str(tmp_path / "nothing"), "--result", str(out)]) == 2
    assert main(["eval", "--case", str(case_dir), "--result", str(case_dir)]) == 2
    assert "not a registration output" in capsys.readouterr().err
