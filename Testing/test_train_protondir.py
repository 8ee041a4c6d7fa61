"""`rtreg train protondir`: a run interrupted and resumed ends where an uninterrupted run ends, and the
exported weights load through the manifest check."""
from __future__ import annotations

import shutil

import torch

from rtreg.models import load_weights, read_manifest
from rtreg.train.protondir import train


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    common = dict(steps=3, data=tmp_path / "no_real_data", n_phantom_seeds=1, checkpoint_every=1, threads=1,
                  command="rtreg train protondir --steps 3 (test)", log=lambda m: None)
    interrupted = train(tmp_path / "a", stop_at=2, models_dir=tmp_path / "models_a", **common)
    assert interrupted == {"steps_done": 2, "steps": 3}
    assert not (tmp_path / "models_a" / "protondir.pt").exists()       # nothing exported before the end
    train(tmp_path / "a", models_dir=tmp_path / "models_a", **common)
    shutil.copytree(tmp_path / "a" / "pairs", tmp_path / "b" / "pairs")  # same pairs, built once
    summary = train(tmp_path / "b", models_dir=tmp_path / "models_b", **common)
    assert summary["pairs"] == ["phantom-headneck-100", "phantom-pelvis-100", "phantom-thorax-100"]
    a, config = load_weights("protondir.pt", tmp_path / "models_a")
    b, _ = load_weights("protondir.pt", tmp_path / "models_b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    moved = [k for k in a if "heads" in k and "weight" in k]
    assert any(a[k].abs().max() > 1e-4 for k in moved)                  # training changed the heads
    entry = read_manifest(tmp_path / "models_a")["protondir.pt"]
    assert entry["command"].startswith("rtreg train protondir") and len(entry["sha256"]) == 64
    assert config["spacing_mm"] == 3.0


def test_fine_tuning_on_institutional_pairs_from_a_csv(tmp_path):
    from rtreg.nets.protondir import ProtonDIRNet
    from rtreg.models import save_weights
    from rtreg.synth import rt_phantom, write_case
    from rtreg.train.protondir import CONFIG
    case = write_case(rt_phantom("thorax", seed=3, spacing_mm=5.0), tmp_path / "case")
    csv = tmp_path / "pairs.csv"
    csv.write_text("planning_ct,repeat_ct,rtstruct,rtdose,plan\n"
                   f"{case / 'planning_ct.nii.gz'},{case / 'repeat_ct.nii.gz'},{case / 'structures'},"
                   f"{case / 'dose.nii.gz'},{case / 'plan.txt'}\n")
    start = ProtonDIRNet().state_dict()
    init = save_weights("start.pt", start, CONFIG, {"command": "test"}, tmp_path / "init")
    summary = train(tmp_path / "work", steps=2, pairs_csv=csv, init=init, models_dir=tmp_path / "tuned",
                    checkpoint_every=1, threads=1, command="rtreg train protondir --pairs-csv pairs.csv",
                    log=lambda m: None)
    assert summary["pairs"] == ["institution-0001"]
    tuned, _ = load_weights("protondir.pt", tmp_path / "tuned")
    assert any(not torch.equal(tuned[k], start[k]) for k in start)
    assert "pairs.csv" in read_manifest(tmp_path / "tuned")["protondir.pt"]["data"]
    import numpy as np
    pair = np.load(tmp_path / "work" / "pairs" / "institution-0001.npz")
    assert float(pair["has_truth"]) == 0.0 and pair["prior_ar"].max() > 0      # priors from its RTSTRUCT/dose
