"""Smoke test of the benchmark harness: one tiny case, one peer, the real child process, the real report.

The benchmark itself (all suites, all peers) is not part of CI: `python3 -m bench run`.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.harness import load_rows, run_case, save_rows  # noqa: E402
from bench.methods import Method, by_name  # noqa: E402
from bench.report import summarise, write_report  # noqa: E402
from bench.suites import DATA, CaseSpec, SUITES, inter_subject, select, shared_label_translation  # noqa: E402
from rtreg.image import Grid, Volume, resample  # noqa: E402
from rtreg.synth import rt_phantom  # noqa: E402


def _tiny(spacing):
    return rt_phantom("headneck", seed=4, spacing_mm=6.0, n_points=60)


def test_harness_runs_a_peer_and_scores_it(tmp_path):
    spec = CaseSpec("rt-phantom", "tiny-headneck", "head and neck phantom at 6 mm", _tiny)
    missing = Method("missing-peer", "a peer that is not installed", "no_such_module_rtreg_test", by_name()["demons"].run)
    rows = run_case(spec, [by_name()["demons"], missing], tmp_path / "cases", tmp_path / "results", 6.0,
                    timeout_s=300, log=lambda *_: None)
    before, demons, absent = rows
    assert before.method == "before" and before.status == "ok" and before.tre["n"] == 60
    assert demons.status == "ok", demons.message
    # the peer's mapping is read in the engine's convention: a sign or axis error would not beat "before"
    assert demons.tre["mean"] < 0.6 * before.tre["mean"]
    assert demons.structures["CTV"]["dice"] > before.structures["CTV"]["dice"]
    assert demons.seconds > 0 and 50 < demons.peak_mb < 4000    # measured in the child process
    assert len(demons.point_errors) == 60
    assert demons.similarity["ncc"] > before.similarity["ncc"] and demons.similarity["mse"] < before.similarity["mse"]
    assert 0 < len(demons.target_point_errors) == len(before.target_point_errors) < 60    # points near the CTV
    assert np.mean(demons.target_point_errors) < np.mean(before.target_point_errors)
    assert absent.status == "unavailable" and "bench setup" in absent.message
    eval_json = json.loads((tmp_path / "results" / "rt-phantom" / "tiny-headneck" / "demons" / "eval.json").read_text())
    assert eval_json["tre_mm"]["mean"] == pytest.approx(demons.tre["mean"])

    save_rows(rows, tmp_path / "report" / "rows.jsonl")
    again = load_rows(tmp_path / "report" / "rows.jsonl")
    assert [r.method for r in again] == ["before", "demons", "missing-peer"]
    summary = summarise([r for r in again if r.suite == "rt-phantom"])
    assert summary["demons"]["tre_mean"] == pytest.approx(np.mean(demons.point_errors))
    text = write_report(again, tmp_path / "report", "test", {"cpu": "x", "threads_per_method": 2,
                                                             "cores_available": 2, "python": "3", "torch": "2"}, 1.0)
    assert "SimpleITK diffeomorphic demons" in text and "unavailable" in text
    assert (tmp_path / "report" / "rt-phantom_tre_box.png").stat().st_size > 1000
    assert (tmp_path / "report" / "rt-phantom_accuracy_vs_time.png").stat().st_size > 1000


def test_suites_cover_every_kind_and_the_default_subset_is_smaller():
    full, default = select(list(SUITES), True), select(list(SUITES), False)
    assert {c.suite for c in default} == set(SUITES)
    assert len(default) < len(full)
    assert sum(c.suite == "rt-phantom" for c in full) >= 6
    assert all(c.multimodal for c in full if c.suite == "multimodal")


def test_bench_cli_refuses_an_unknown_suite():
    done = subprocess.run([sys.executable, "-m", "bench", "run", "--suites", "nonsense"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode != 0 and "unknown suite" in done.stderr


def _contours_only(spacing):
    """The tiny phantom with its point truth and its transform removed: a pair whose truth is contours."""
    case = rt_phantom("headneck", seed=4, spacing_mm=6.0, n_points=60)
    case.truth, case.points_planning, case.points_repeat = None, np.zeros((0, 3)), np.zeros((0, 3))
    return case


def test_a_pair_whose_truth_is_contours_is_scored_by_dice(tmp_path):
    spec = CaseSpec("inter-subject", "tiny-contours", "head and neck phantom, contours only", _contours_only)
    before, demons = run_case(spec, [by_name()["demons"]], tmp_path / "cases", tmp_path / "results", 6.0,
                              timeout_s=300, log=lambda *_: None)
    case_dir = tmp_path / "cases" / "inter-subject" / "tiny-contours"
    assert not (case_dir / "points_planning.csv").exists() and not (case_dir / "truth_transform.h5").exists()
    assert before.tre == {} and demons.status == "ok", demons.message
    assert demons.structures["CTV"]["dice"] > before.structures["CTV"]["dice"]
    text = write_report([before, demons], tmp_path / "report", "test",
                        {"cpu": "x", "threads_per_method": 2, "cores_available": 2, "python": "3", "torch": "2"}, 1.0)
    assert "Dice per structure" in text
    # the structure table's row: the method, one column per structure, the organs' mean Dice and HD95
    row = next(line for line in text.splitlines() if line.startswith("| SimpleITK diffeomorphic demons") and
               line.count("|") == len(demons.structures) + 4)
    assert f"{demons.structures['CTV']['dice']:.3f}" in row


def test_shared_label_translation_recovers_a_known_shift_across_grid_directions():
    rng = np.random.default_rng(0)
    labels = np.zeros((20, 24, 28), np.uint8)
    for value in (1, 2, 3):
        c = rng.integers(5, 15, 3)
        labels[c[0] - 3:c[0] + 3, c[1] - 4:c[1] + 2, c[2] - 2:c[2] + 5] = value
    fixed = Volume(labels, Grid.from_geometry(labels.shape, (3, 3, 3), (100, 40, -30), np.diag([-1, -1, 1])).affine)
    # the same labels on an LPS-aligned grid over the same extent (x 19..100, y -29..40, z -30..27 mm) ...
    aligned = resample(fixed, Grid.from_geometry(labels.shape, (3, 3, 3), (19, -29, -30)), "nearest")
    assert sorted(np.unique(aligned.array)) == [0, 1, 2, 3]
    # ... placed elsewhere: moving coordinates + offset = fixed coordinates
    offset = np.array([-12.0, 21.0, 903.0])
    moved = Volume(aligned.array, Grid.from_geometry(labels.shape, (3, 3, 3), np.array([19, -29, -30]) - offset).affine)
    found = shared_label_translation(fixed, moved, (1, 2, 3))
    np.testing.assert_allclose(found, offset, atol=1e-6)


@pytest.mark.skipif(not (DATA / "totalsegmentator" / "example_seg_dicom.nii.gz").exists(),
                    reason="needs ../shared/data/totalsegmentator (two TotalSegmentator subjects)")
def test_inter_subject_case_places_the_two_subjects_by_their_shared_organs():
    case = inter_subject(3.0)
    names = [s.name for s in case.planning_structures]
    assert names == [s.name for s in case.repeat_structures] and {"BODY", "liver", "spleen", "aorta"} <= set(names)
    assert case.truth is None and len(case.points_planning) == 0
    # placed by their body centres the livers overlap (Dice > 0.6: different people), in their own frames 95 cm apart
    liver_f, liver_m = case.structure("liver"), case.structure("liver", repeat=True)
    carried = resample(case.planning.with_array(liver_f.mask), case.repeat.grid, "mask").array > 0
    dice = 2 * (carried & (liver_m.mask > 0)).sum() / (carried.sum() + (liver_m.mask > 0).sum())
    assert dice > 0.6
    assert abs(case.notes["placement_translation_mm"][2]) > 500
    # the fixed subject is cut to the moving subject's slab
    z_fixed, z_moving = (v.grid.world_points()[..., 2] for v in (case.planning, case.repeat))
    assert abs(z_fixed.min() - z_moving.min()) < 3.0 and abs(z_fixed.max() - z_moving.max()) < 3.0
    reverse = inter_subject(3.0, reverse=True)
    assert reverse.planning.grid.same_as(case.repeat.grid) and reverse.repeat.grid.same_as(case.planning.grid)
