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
from bench.suites import CaseSpec, SUITES, select  # noqa: E402
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


def test_suites_cover_the_four_kinds_and_the_default_subset_is_smaller():
    full, default = select(list(SUITES), True), select(list(SUITES), False)
    assert {c.suite for c in default} == set(SUITES)
    assert len(default) < len(full)
    assert sum(c.suite == "rt-phantom" for c in full) >= 6
    assert all(c.multimodal for c in full if c.suite == "multimodal")


def test_bench_cli_refuses_an_unknown_suite():
    done = subprocess.run([sys.executable, "-m", "bench", "run", "--suites", "nonsense"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode != 0 and "unknown suite" in done.stderr
