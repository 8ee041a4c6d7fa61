"""QuizRigid: views, query points, the robust fit, the network's layout, training samples, registration with
the shipped weights (large offsets and cropped fields of view), its use as pre-alignment, and bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from rtreg.case import RegisterOptions, RegistrationCase
from rtreg.errors import InputError
from rtreg.image import Grid, Volume, normalize_intensity, write_volume
from rtreg.methods import quiz
from rtreg.models import read_manifest
from rtreg.nets.quiz import DEFAULT, build
from rtreg.priors import body_mask
from rtreg.synth import large_offset_case, rigid_matrix, rt_phantom
from rtreg.train.quiz import draw
from rtreg.train.sources import prepare_source, sample_world, view_points


def _rigid(deg, shift, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    return rigid_matrix(deg, shift, centre)


# ---------------------------------------------------------------- the robust fit
def test_kabsch_recovers_a_rigid_transform_exactly():
    rng = np.random.default_rng(0)
    p = rng.uniform(-80, 80, (20, 3))
    a = _rigid((10, -7, 13), (40, -25, 12), (5, 5, 5))
    q = p @ a[:3, :3].T + a[:3, 3]
    np.testing.assert_allclose(quiz.kabsch(p, q, np.ones(20)), a, atol=1e-9)


def test_robust_fit_ignores_outliers_and_reports_them():
    rng = np.random.default_rng(1)
    p = rng.uniform(-80, 80, (40, 3))
    a = _rigid((-12, 5, 8), (-55, 20, 30), (0, 10, 0))
    q = p @ a[:3, :3].T + a[:3, 3] + rng.normal(0, 1.0, (40, 3))
    bad = rng.choice(40, 14, replace=False)
    q[bad] += rng.uniform(30, 90, (14, 3)) * rng.choice([-1, 1], (14, 3))
    fit, inliers = quiz.robust_fit(p, q, np.full(40, 0.9))
    assert not inliers[bad].any() and inliers.sum() == 26
    err = np.linalg.norm(p @ (fit[:3, :3] - a[:3, :3]).T + fit[:3, 3] - a[:3, 3], axis=1)
    assert err.max() < 1.5
    t_fit, _ = quiz.robust_fit(p, p + [30.0, -10.0, 5.0], np.ones(40), mode="translation")
    np.testing.assert_allclose(t_fit[:3, 3], [30.0, -10.0, 5.0], atol=1e-9)
    np.testing.assert_allclose(t_fit[:3, :3], np.eye(3))


def test_too_few_or_collinear_points_are_refused():
    p = np.array([[0.0, 0, 0], [10, 0, 0]])
    with pytest.raises(InputError, match="at least 3"):
        quiz.robust_fit(p, p, np.ones(2))
    line = np.array([[0.0, 0, 0], [10, 0, 0], [20, 0, 0], [30, 0, 0]])
    with pytest.raises(InputError, match="one line"):
        quiz.robust_fit(line, line + 5, np.ones(4))
    with pytest.raises(InputError, match="unknown QuizRigid mode"):
        quiz.robust_fit(line, line, np.ones(4), mode="affine")


# ---------------------------------------------------------------- views and query points
def _phantom_ct():
    return rt_phantom("pelvis", seed=3).planning


def test_views_are_world_aligned_and_ignore_the_storage_order():
    ct = _phantom_ct()
    body = body_mask(ct)
    norm = ct.with_array(normalize_intensity(ct, body))
    view, _ = quiz.paired_views(ct, ct, body, body, 32)
    a = quiz.view_image(norm, view)
    # the same image stored with its axes permuted and one flipped (a different slice order and direction
    # matrix; SimpleITK keeps every voxel where it is in the world)
    import SimpleITK as sitk
    img = sitk.Flip(sitk.PermuteAxes(norm.to_sitk(), [1, 2, 0]), [True, False, False])
    other = Volume.from_sitk(img)
    assert other.array.shape != norm.array.shape and not np.allclose(other.grid.direction, np.eye(3))
    p = norm.grid.index_to_world(np.array([[10.0, 12, 14]]))
    k, j, i = np.round(other.grid.world_to_index(p)[0][::-1]).astype(int)
    assert other.array[k, j, i] == norm.array[14, 12, 10]
    b = quiz.view_image(other, view)
    assert np.abs(a - b).max() < 1e-4
    corner = view.grid.index_to_world(np.zeros((1, 3)))[0]
    np.testing.assert_allclose(view.to_world(np.full((1, 3), 0.5 / 32 * 2 - 1))[0], corner, atol=1e-9)
    np.testing.assert_allclose(view.to_normalised(view.to_world(np.array([[0.3, -0.2, 0.9]]))), [[0.3, -0.2, 0.9]])


def test_training_views_match_the_views_the_method_samples():
    ct = _phantom_ct()
    body = body_mask(ct)
    norm = ct.with_array(normalize_intensity(ct, body))
    view, _ = quiz.paired_views(ct, ct, body, body, 32)
    pts = view_points(torch.tensor(view.center, dtype=torch.float32), view.side_mm, 32)
    np.testing.assert_allclose(pts.reshape(-1, 3).numpy(), view.grid.world_points().reshape(-1, 3), atol=1e-3)
    trained = sample_world(torch.as_tensor(norm.array), torch.as_tensor(norm.grid.affine), pts).numpy()
    from rtreg.image import resample
    method = resample(norm, view.grid, "linear", None, 0.0).array      # before anti-aliasing
    assert np.abs(trained - method).max() < 1e-3


def test_distinctive_points_lie_in_the_body_and_are_spread_out():
    ct = _phantom_ct()
    body = body_mask(ct)
    view, _ = quiz.paired_views(ct, ct, body, body, 48)
    img = quiz.view_image(ct.with_array(normalize_intensity(ct, body)), view)
    mask = quiz.view_mask(ct, body, view)
    pts = quiz.distinctive_points(img, mask, 30)
    assert 10 <= len(pts) <= 30
    idx = np.floor((pts + 1) / 2 * 48).astype(int)
    assert mask[idx[:, 2], idx[:, 1], idx[:, 0]].all()
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1) + np.eye(len(pts)) * 9
    assert d.min() * 24 >= 4.8 - 1e-6                   # at least a tenth of the view apart (in voxels)


def test_query_points_outside_the_fixed_image_are_refused():
    grid = Grid.from_geometry((10, 10, 10), (2.0, 2.0, 2.0))
    vol = Volume(np.zeros((10, 10, 10), np.float32), grid.affine)
    quiz.check_query_points(np.array([[1.0, 2, 3], [18, 18, 18]]), vol)
    with pytest.raises(InputError, match="point\\(s\\) 2 lie outside the fixed"):
        quiz.check_query_points(np.array([[1.0, 2, 3], [40, 0, 0]]), vol)


# ---------------------------------------------------------------- network and training samples
def test_network_layout_and_answers_shape():
    net = build(dict(DEFAULT, size=32))
    enc = net.encoder
    assert [enc.stage1.conv1.out_channels, enc.stage2.conv1.out_channels, enc.stage3.conv1.out_channels,
            enc.stage4.conv1.out_channels] == DEFAULT["channels"]
    assert enc.stage4.conv1.dilation == (2, 2, 2)
    pos, vis, logits = net(torch.rand(2, 1, 32, 32, 32), torch.rand(2, 1, 32, 32, 32), torch.rand(2, 7, 3) * 2 - 1)
    assert pos.shape == (2, 7, 3) and vis.shape == (2, 7) and pos.abs().max() <= 1.1
    assert logits.shape == (2, 7, 4 ** 3)            # one per search token (32 / 8 = 4 per axis)
    with pytest.raises(ValueError, match="multiple of 16"):
        net.features(torch.rand(1, 1, 24, 24, 24))


def test_training_samples_know_where_each_point_went():
    """The search view, sampled at each visible point's true position, shows what the reference shows at the
    query (same-modality samples without strong intensity changes: the correlation is high)."""
    ct = _phantom_ct()

    src = prepare_source(ct)
    agree = []
    for seed in range(6):
        s = draw(src, torch.Generator().manual_seed(seed), 48, 200)
        half = float(s["side"]) / 2
        ref_at = torch.nn.functional.grid_sample(s["reference"][None], s["queries"].view(1, -1, 1, 1, 3),
                                                 align_corners=False).flatten()
        t = ((s["truth_mm"] - s["s_center"]) / half).view(1, -1, 1, 1, 3)
        search_at = torch.nn.functional.grid_sample(s["search"][None], t, align_corners=False).flatten()
        v = s["visible"] > 0
        if v.sum() > 20:
            agree.append(float(np.corrcoef(ref_at[v].numpy(), search_at[v].numpy())[0, 1]))
    assert len(agree) >= 3 and np.median(agree) > 0.6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (training with --device cuda)")
def test_training_samples_are_the_same_on_the_gpu():
    """``rtreg train quiz --device cuda`` draws the samples the CPU run draws (random numbers come from the CPU
    generator); only floating-point rounding of the resampling differs."""
    src = prepare_source(_phantom_ct())
    on_cpu = draw(src, torch.Generator().manual_seed(3), 32, 50)
    on_gpu = draw({k: v.cuda() for k, v in src.items()}, torch.Generator().manual_seed(3), 32, 50)
    for key in ("reference", "search", "queries", "truth_mm", "visible"):
        assert on_gpu[key].is_cuda
        torch.testing.assert_close(on_gpu[key].cpu(), on_cpu[key], atol=1e-3, rtol=1e-4)


# ---------------------------------------------------------------- with the shipped weights
def test_shipped_weights_have_a_manifest_entry_with_the_training_command():
    entry = read_manifest()[quiz.WEIGHTS]
    assert entry["command"].startswith("rtreg train quiz") and "held out" in entry["data"]
    state, config = quiz._weights()
    assert config["size"] % 16 == 0
    build(config).load_state_dict(state)


def _offset_case(site: str, seed: int, keep: float, cbct: bool = False):
    ct = rt_phantom(site, seed=seed, spacing_mm=3.0).planning
    return large_offset_case(ct, seed=seed, keep_fraction=keep, n_points=100, cbct=cbct)


@pytest.mark.parametrize("site,seed,keep,cbct", [("thorax", 52, 0.7, False), ("pelvis", 54, 0.5, True),
                                                 ("thorax", 55, 0.6, True)])
def test_quizrigid_is_accurate_or_says_it_found_nothing(site, seed, keep, cbct):
    """Hard cases (a small field of view, CBCT-like artefacts): QuizRigid either lands within 3 mm or refuses
    with a message; it never returns a transform that is off (the failure a physicist could miss)."""
    case = _offset_case(site, seed, keep, cbct)
    try:
        result = quiz.register(RegistrationCase(case.planning, case.repeat), RegisterOptions(device="cpu"))
    except InputError as exc:
        assert "no reliable correspondence" in str(exc) or "do not overlap" in str(exc)
        return
    tre = np.linalg.norm(result.transform.transform_points(case.points_planning) - case.points_repeat, axis=1)
    assert tre.mean() < 3.0, (tre.mean(), result.qa)


@pytest.mark.parametrize("site,seed,keep", [("pelvis", 60, 1.0), ("thorax", 64, 0.8), ("headneck", 65, 0.8)])
def test_quizrigid_recovers_a_large_offset_with_a_cropped_field_of_view(site, seed, keep):
    case = _offset_case(site, seed, keep)
    before = np.linalg.norm(case.points_planning - case.points_repeat, axis=1).mean()
    result = quiz.register(RegistrationCase(case.planning, case.repeat), RegisterOptions(device="cpu"))
    got = result.transform.transform_points(case.points_planning)
    tre = np.linalg.norm(got - case.points_repeat, axis=1).mean()
    assert before > 40 and tre < 3.0, (before, tre, result.qa)
    m = result.matched_points
    assert m is not None and m.inliers.sum() >= 3 and np.all((m.confidence >= 0) & (m.confidence <= 1))
    assert result.transform.displacement is None and result.qa["overlap_fraction"] > 0.3


def test_translation_mode_gives_a_translation_and_says_the_matching_is_coarse():
    case = _offset_case("headneck", 65, 0.8)
    before = np.linalg.norm(case.points_planning - case.points_repeat, axis=1).mean()
    tr = quiz.register(RegistrationCase(case.planning, case.repeat),
                       RegisterOptions(device="cpu", extra={"mode": "translation", "refine": False}))
    tre = np.linalg.norm(tr.transform.transform_points(case.points_planning) - case.points_repeat, axis=1).mean()
    assert np.allclose(tr.transform.affine[:3, :3], np.eye(3)) and tre < 0.5 * before, (tre, before)
    assert any("without the intensity refinement" in m for m in tr.messages)


def test_user_query_points_are_matched_and_reported():
    case = _offset_case("thorax", 64, 0.8)
    pts = case.points_planning[:24]
    result = quiz.register(RegistrationCase(case.planning, case.repeat, query_points=pts),
                           RegisterOptions(device="cpu"))
    m = result.matched_points
    np.testing.assert_allclose(m.fixed, pts)
    assert result.qa["automatic_points"] is False and result.qa["query_points"] == 24
    tre = np.linalg.norm(result.transform.transform_points(case.points_planning) - case.points_repeat, axis=1)
    assert tre.mean() < 3.0, (tre.mean(), result.qa)
    with pytest.raises(InputError, match="at least 3"):
        quiz.register(RegistrationCase(case.planning, case.repeat, query_points=pts[:2]),
                      RegisterOptions(device="cpu"))


def test_images_without_common_anatomy_are_refused_not_aligned():
    """A repeat image of noise shares no anatomy with the planning CT: no confident match, a clear error."""
    case = _offset_case("pelvis", 55, 1.0)
    rng = np.random.default_rng(0)
    noise = case.repeat.with_array(rng.normal(0, 300, case.repeat.array.shape).astype(np.float32))
    noise.meta = {"name": "noise"}
    with pytest.raises(InputError, match="no reliable correspondence") as refused:
        quiz.register(RegistrationCase(case.planning, noise), RegisterOptions(device="cpu"))
    assert "query points" in str(refused.value) and "--prealign rigid" in str(refused.value)   # what to try
    with pytest.raises(InputError, match="QuizRigid takes similarity"):       # an unknown similarity option
        quiz.register(RegistrationCase(case.planning, noise), RegisterOptions(device="cpu", similarity="mse"))


def test_quiz_as_prealignment_recovers_a_large_offset_end_to_end(tmp_path):
    """`rtreg register --method io --prealign quiz` on a 60 mm / cropped case recovers it (points through the
    transform file read back by SimpleITK), as the rigid start does on this case."""
    import SimpleITK as sitk
    case = _offset_case("thorax", 64, 0.8)
    write_volume(case.planning, tmp_path / "planning.nii.gz")
    write_volume(case.repeat, tmp_path / "repeat.nii.gz")
    errors = {"before": float(np.linalg.norm(case.points_planning - case.points_repeat, axis=1).mean())}
    for prealign in ("rigid", "quiz"):
        out = tmp_path / prealign
        done = subprocess.run([sys.executable, "-m", "rtreg.cli", "register", "--method", "io", "--fixed",
                               str(tmp_path / "planning.nii.gz"), "--moving", str(tmp_path / "repeat.nii.gz"),
                               "--out", str(out), "--prealign", prealign, "--device", "cpu",
                               "--working-spacing", "6", "--iterations", "20"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        tx = sitk.ReadTransform(str(out / "transform.h5"))
        got = np.array([tx.TransformPoint(tuple(p)) for p in case.points_planning])
        errors[prealign] = float(np.linalg.norm(got - case.points_repeat, axis=1).mean())
    assert errors["before"] > 40 and errors["quiz"] < 4.0 and abs(errors["quiz"] - errors["rigid"]) < 1.0, errors


def test_cli_quiz_writes_matched_points_and_refuses_bad_points(tmp_path):
    case = _offset_case("headneck", 65, 0.8)
    write_volume(case.planning, tmp_path / "planning.nii.gz")
    write_volume(case.repeat, tmp_path / "repeat.nii.gz")
    base = [sys.executable, "-m", "rtreg.cli", "register", "--method", "quiz", "--fixed",
            str(tmp_path / "planning.nii.gz"), "--moving", str(tmp_path / "repeat.nii.gz"), "--device", "cpu"]
    done = subprocess.run(base + ["--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["transform_kind"] == "linear" and metrics["matched_points"] == "matched_points.csv"
    rows = (tmp_path / "out" / "matched_points.csv").read_text().splitlines()
    assert rows[0].startswith("point,fixed_x") and len(rows) - 1 == metrics["method_qa"]["query_points"]
    far = tmp_path / "far.csv"
    far.write_text("x,y,z\n0,0,0\n5000,0,0\n10,10,10\n")
    bad = subprocess.run(base + ["--out", str(tmp_path / "bad"), "--query-points", str(far)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "outside the fixed" in bad.stderr, bad.stderr[-500:]
    two = tmp_path / "two.mrk.json"
    c = case.points_planning[:2]
    two.write_text(json.dumps({"markups": [{"coordinateSystem": "RAS", "controlPoints": [
        {"position": [-p[0], -p[1], p[2]]} for p in c]}]}))
    bad = subprocess.run(base + ["--out", str(tmp_path / "bad2"), "--query-points", str(two)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "at least 3" in bad.stderr, bad.stderr[-500:]


def test_training_resumes_where_an_uninterrupted_run_ends_and_exports_weights(tmp_path):
    """`rtreg train quiz` on two small sources: 3 steps, or 2 then 1 after a restart, give the same weights;
    the export has a manifest entry the method can load (the position-reset phase runs in the last step)."""
    from rtreg.models import load_weights
    from rtreg.train.quiz import train
    sources = {f"phantom-{s}": prepare_source(rt_phantom(s, seed=7, spacing_mm=6.0).planning)
               for s in ("pelvis", "headneck")}
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        torch.save(sources, tmp_path / run / "sources.pt")
    train(tmp_path / "a", steps=3, size=32, models_dir=tmp_path / "models_a", command="rtreg train quiz (test)",
          threads=1, log=lambda m: None)
    train(tmp_path / "b", steps=3, size=32, export=False, threads=1, stop_at=2, log=lambda m: None)
    train(tmp_path / "b", steps=3, size=32, models_dir=tmp_path / "models_b", command="rtreg train quiz (test)",
          threads=1, log=lambda m: None)
    a, config = load_weights("quiz.pt", tmp_path / "models_a")
    b, _ = load_weights("quiz.pt", tmp_path / "models_b")
    assert config["size"] == 32 and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3 and log[-1]["point_reset"] > 0     # the reset phase trained (70 % of 3 steps)
    resumed = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [2, 3] and resumed[1]["elapsed_s"] > resumed[0]["elapsed_s"]  # summed
    # the manifest names the sources trained on (those of sources.pt), not what the data folder holds
    assert read_manifest(tmp_path / "models_b")["quiz.pt"]["data"].startswith(
        "sources: phantom-headneck, phantom-pelvis; held out:")


def test_query_point_files_are_read_in_lps(tmp_path):
    """CSV (LPS), Slicer markups JSON (RAS) and .fcsv (LPS or RAS by its header) give the same LPS points; an
    empty or unreadable file is refused."""
    from rtreg.pipeline import read_points
    lps = np.array([[10.0, -20.0, 30.0], [-5.0, 7.5, 1.0]])
    (tmp_path / "p.csv").write_text("x,y,z\n" + "\n".join(",".join(map(str, p)) for p in lps) + "\n")
    (tmp_path / "p.mrk.json").write_text(json.dumps({"markups": [{"coordinateSystem": "RAS", "controlPoints": [
        {"position": [-p[0], -p[1], p[2]]} for p in lps]}]}))
    (tmp_path / "lps.fcsv").write_text("# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n"
                                       + "\n".join(f"{k},{p[0]},{p[1]},{p[2]},0,0,0,1,1,1,0,F-{k},," for k, p
                                                   in enumerate(lps)) + "\n")
    (tmp_path / "ras.fcsv").write_text("# Markups fiducial file version = 4.11\n# CoordinateSystem = 0\n"
                                       + "\n".join(f"{k},{-p[0]},{-p[1]},{p[2]},0,0,0,1,1,1,0,F-{k},," for k, p
                                                   in enumerate(lps)) + "\n")
    for name in ("p.csv", "p.mrk.json", "lps.fcsv", "ras.fcsv"):
        np.testing.assert_allclose(read_points(tmp_path / name), lps, err_msg=name)
    (tmp_path / "empty.csv").write_text("x,y,z\n")
    with pytest.raises(InputError, match="holds no points"):
        read_points(tmp_path / "empty.csv")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="cannot read points"):
        read_points(tmp_path / "bad.csv")


def test_a_generic_itk_transform_becomes_its_matrix():
    """``field.sitk_linear_to_affine`` on a transform without matrix accessors (as files may read back)."""
    import SimpleITK as sitk
    from rtreg.field import sitk_linear_to_affine
    euler = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, -0.2, 0.3, (5.0, -4.0, 2.0))
    np.testing.assert_allclose(sitk_linear_to_affine(sitk.Transform(euler)), sitk_linear_to_affine(euler),
                               atol=1e-9)
