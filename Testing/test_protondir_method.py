"""ProtonDIR as a method: working grid, clinical inputs, shipped weights, runs with and without every
optional input, the CLI, and the RTSTRUCT written for the repeat image."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, data_path, oblique_grid
from rtreg.case import RegisterOptions, RegistrationCase
from rtreg.dicomrt import PlanSummary, Structure, read_dicom_series, read_rtstruct, write_dicom_series
from rtreg.errors import InputError
from rtreg.metrics import dice
from rtreg.image import resample
from rtreg.methods import io, protondir
from rtreg.netgrid import edge_taper, working_grid
from rtreg.models import load_weights, read_manifest, save_weights, MODELS_DIR
from rtreg.roles import guess_roles
from rtreg.synth import rt_phantom, write_case


@pytest.fixture(scope="module")
def phantom():
    return rt_phantom("pelvis", seed=5, spacing_mm=4.0)


def _case(c, with_clinical: bool = True) -> RegistrationCase:
    if not with_clinical:
        return RegistrationCase(c.planning, c.repeat)
    target, oars, _ = guess_roles([s.name for s in c.planning_structures])
    return RegistrationCase(c.planning, c.repeat, structures=list(c.planning_structures), dose=c.dose,
                            plan=c.plan, target=target, oars=oars)


def _tre(c, result) -> float:
    return float(np.linalg.norm(result.transform.transform_points(c.points_planning) - c.points_repeat, axis=1).mean())


def test_working_grid_is_isotropic_centred_and_sized_for_five_levels():
    g = oblique_grid(shape=(12, 40, 70), spacing=(1.3, 0.9, 2.1))
    w = working_grid(g, 3.0)
    assert np.allclose(w.spacing, 3.0)
    assert np.allclose(w.direction, g.direction, atol=1e-9)
    assert np.allclose(w.center(), g.center(), atol=1e-6)
    assert all(n % 16 == 0 and n >= 32 for n in w.shape)
    extent = (np.array(g.size_xyz) - 1) * g.spacing
    assert np.all((np.array(w.size_xyz) - 1) * 3.0 >= extent - 3.0)        # covers the planning CT
    body = np.zeros(g.shape, np.uint8)
    body[3:9, 10:30, 20:50] = 1
    crop = working_grid(g, 3.0, region=body, margin_mm=6.0)
    corners = g.index_to_world(np.array([[20, 10, 3], [49, 29, 8]], float))
    inside = crop.world_to_index(corners)
    assert np.all(inside >= 6.0 / 3.0 - 1e-6) and np.all(inside <= np.array(crop.size_xyz) - 1 - 2.0 + 1e-6)
    taper = edge_taper((32, 32, 48), 4.0)
    assert taper[16, 16, 24] == 1.0 and taper[0].max() == 0.0 and 0 < taper[16, 16, 2] < 1


def test_clinical_inputs_say_what_is_used_and_what_is_missing(phantom):
    grid = working_grid(phantom.planning.grid, 3.0)
    full = protondir.clinical_inputs(_case(phantom), grid, protondir.CLINICAL_INPUTS, 384)
    assert {"anatomy", "risk"} <= set(full.used)
    assert full.prior.shape == grid.shape and 0 <= full.prior.min() and full.prior.max() <= 1
    assert full.prompts["anatomy"].startswith("Target CTV")
    # no dose, a plan without prescription, an empty organ at risk
    c = _case(phantom)
    c.dose = None
    c.structures = [Structure(s.name, s.number, s.color, np.zeros_like(s.mask) if s.name == "Rectum" else s.mask)
                    for s in c.structures]
    part = protondir.clinical_inputs(c, grid, protondir.CLINICAL_INPUTS, 384)
    text = " ".join(part.messages)
    assert "risk map not used: no dose" in text and "'Rectum' is empty" in text
    assert "anatomy" in part.used and "risk" not in part.used
    c.dose = phantom.dose
    c.plan = PlanSummary("no rx", True, "PROTON", None, None)
    assert any("no prescription" in m for m in protondir.clinical_inputs(c, grid, ("risk",), 384).messages)
    none = protondir.clinical_inputs(_case(phantom, False), grid, protondir.CLINICAL_INPUTS, 384)
    assert none.prior is None and none.used == []
    assert any("no target (CTV) and no organs" in m for m in none.messages)


def test_shipped_weights_match_their_manifest():
    entry = read_manifest()["protondir.pt"]
    assert entry["command"].startswith("rtreg train protondir")
    state, config = load_weights("protondir.pt")
    assert config["spacing_mm"] > 0 and config["text_dim"] == 384
    assert (MODELS_DIR / "protondir.pt").stat().st_size < 10 * 2 ** 20       # small enough to ship


def test_damaged_or_missing_weights_are_refused(tmp_path):
    save_weights("net.pt", {"w": torch.ones(3)}, {"spacing_mm": 3.0}, {"command": "test"}, tmp_path)
    state, _ = load_weights("net.pt", tmp_path)
    assert torch.equal(state["w"], torch.ones(3))
    with open(tmp_path / "net.pt", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(InputError, match="sha256"):
        load_weights("net.pt", tmp_path)
    with pytest.raises(InputError, match="rtreg train"):
        load_weights("other.pt", tmp_path)


def test_network_alone_improves_on_the_prealignment(phantom):
    """The trained network (no refinement) brings the points closer than the rigid pre-alignment alone."""
    base = protondir.register(_case(phantom), RegisterOptions(device="cpu", extra={"refine": False}))
    assert base.qa["clinical_inputs_used"][:2] == ["anatomy", "risk"]
    prealigned_only = type(base.transform)(base.prealignment)
    tre_pre = float(np.linalg.norm(prealigned_only.transform_points(phantom.points_planning)
                                   - phantom.points_repeat, axis=1).mean())
    assert _tre(phantom, base) < tre_pre
    assert base.timings["network_s"] < 30


def test_every_optional_input_missing_still_registers(phantom):
    c = _case(phantom, with_clinical=False)
    r = protondir.register(c, RegisterOptions(device="cpu", iterations=15))
    assert "no target (CTV) and no organs at risk" in " ".join(r.messages)
    assert "risk map not used: no dose" in " ".join(r.messages)
    assert r.qa["clinical_inputs_used"] == []
    assert r.transform.displacement.array.shape[:3] == phantom.planning.array.shape
    assert _tre(phantom, r) < 0.6 * phantom.notes["max_displacement_mm"] + 2.0


def test_unknown_clinical_input_is_refused(phantom):
    with pytest.raises(InputError, match="unknown clinical inputs"):
        protondir.register(_case(phantom), RegisterOptions(device="cpu", extra={"clinical_inputs": ["dose"]}))


def test_prior_weight_multiplies_the_refinements_masks_by_one_plus_weight_times_the_prior(phantom):
    """Each level's similarity mask becomes mask x (1 + w x prior): about 1 + w inside the CTV (prior ~1),
    1 where the prior is 0; the levels given are left as they were, and w = 0 or no prior changes nothing."""
    case = _case(phantom)
    grid = working_grid(case.fixed.grid, 4.0)
    prior = protondir.clinical_inputs(case, grid, ("anatomy", "risk"), 384).prior
    fixed_mask, moving_mask = io.registration_masks(case)
    f_norm, m_norm = io.normalised_images(case, fixed_mask, moving_mask)
    levels = io.pyramid(f_norm, m_norm, fixed_mask, np.eye(4), 4.0, [2, 2], torch.device("cpu"))
    before = [lv.mask.clone() for lv in levels]
    weighted = protondir.weight_by_prior(levels, prior, grid, 3.0, torch.device("cpu"))
    for lv, kept in zip(levels, before):
        assert torch.equal(lv.mask, kept)
    finest, mask = weighted[-1], levels[-1].mask
    ratio = (finest.mask / mask.clamp_min(1e-6))[mask > 0]
    assert float(ratio.min()) >= 1.0 - 1e-5 and float(ratio.max()) <= 4.0 + 1e-5
    ctv = next(s for s in phantom.planning_structures if s.name == case.target).mask
    on_level = resample(case.fixed.with_array(ctv.astype(np.uint8)), finest.grid, "mask").array.astype(bool)
    inside = (finest.mask / mask.clamp_min(1e-6))[0, 0][torch.from_numpy(on_level) & (mask[0, 0] > 0)]
    assert float(inside.mean()) > 3.0                     # the CTV counts about four times as much
    assert float((ratio == 1.0).float().mean()) > 0.1     # and much of the body as before
    assert protondir.weight_by_prior(levels, prior, grid, 0.0, torch.device("cpu")) is levels
    assert protondir.weight_by_prior(levels, None, grid, 3.0, torch.device("cpu")) is levels


def test_prior_weight_changes_the_refinement_is_recorded_and_checked(phantom):
    """A prior weight changes the refined field (it is not ignored) and QA records it; with no anatomy or risk
    map it is said to be unused; a negative or non-numeric weight is refused before any work."""
    def run(weight: float, inputs=("anatomy", "risk")):
        return protondir.register(_case(phantom), RegisterOptions(
            device="cpu", iterations=15, extra={"prior_weight": weight, "clinical_inputs": list(inputs)}))

    plain, weighted, no_prior = run(0.0), run(3.0), run(3.0, ())
    assert weighted.qa["refinement_prior_weight"] == 3.0 and plain.qa["refinement_prior_weight"] == 0.0
    change = np.abs(weighted.transform.displacement.array - plain.transform.displacement.array).max()
    assert change > 0.05                                   # mm
    assert no_prior.qa["refinement_prior_weight"] == 0.0
    assert "prior weight is not used: there is no anatomy or risk map" in " ".join(no_prior.messages)
    for bad in (-1.0, "a lot", float("nan")):
        with pytest.raises(InputError, match="prior_weight"):
            protondir.register(_case(phantom), RegisterOptions(device="cpu", extra={"prior_weight": bad}))


def test_the_refinement_stops_each_level_at_convergence_with_the_tolerance_given(phantom):
    """ProtonDIR's refinement is `io`'s optimisation: each level stops once converged (a loose tolerance here,
    so well before the 100 iterations), QA says so; a tolerance outside [0, 1) is refused by its flag's name."""
    r = protondir.register(_case(phantom), RegisterOptions(device="cpu", iterations=100,
                                                           extra={"convergence_tolerance": 0.5}))
    assert r.qa["convergence_tolerance"] == 0.5
    for level in (1, 2):
        assert r.qa[f"stopped_by_level{level}"] == "convergence" and 21 <= r.qa[f"iterations_level{level}"] < 100
    with pytest.raises(InputError, match="--convergence-tolerance"):
        protondir.register(_case(phantom), RegisterOptions(device="cpu", extra={"convergence_tolerance": -0.1}))


def test_cli_protondir_writes_a_readable_rtstruct_on_the_repeat_ct(tmp_path, phantom):
    case_dir = write_case(phantom, tmp_path / "case")
    from rtreg.image import write_volume
    write_volume(phantom.planning.with_array(np.zeros(phantom.planning.array.shape, np.uint8)),
                 case_dir / "structures" / "SpinalCord.nii.gz", np.uint8)       # an empty organ at risk
    rep_dicom = write_dicom_series(phantom.repeat, tmp_path / "repeat_dicom")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "rtreg", "register", "--method", "protondir", "--fixed",
           str(case_dir / "planning_ct.nii.gz"), "--moving", str(rep_dicom), "--fixed-structures",
           str(case_dir / "structures"), "--dose", str(case_dir / "dose.nii.gz"), "--plan",
           "Proton plan; prescription 60 Gy in 30 fractions. Prostate cancer.", "--iterations", "10",
           "--same-frame", "--progress", "jsonl", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "protondir" and "anatomy" in metrics["method_qa"]["clinical_inputs_used"]
    said = " ".join(metrics["messages"])
    assert "'SpinalCord' is empty on the planning image" in said and "left out of the priors" in said
    repeat = read_dicom_series(rep_dicom)
    back = {s.name: s.mask for s in read_rtstruct(out / "rtstruct_on_moving.dcm", repeat)}
    from rtreg.image import read_volume
    for name in ("CTV", "Bladder", "Rectum"):
        labelmap = read_volume(out / "structures_on_moving" / f"{name}.nii.gz").array
        assert dice(back[name], labelmap) >= 0.95, name


def test_an_unusable_dose_is_left_out_with_a_note_and_the_run_goes_on(tmp_path, phantom):
    import pydicom
    from rtreg.pipeline import load_case
    case_dir = write_case(phantom, tmp_path / "case")
    source = data_path("pydicom_rt", "rtdose.dcm")
    ds = pydicom.dcmread(source)
    ds.DoseUnits = "GY"
    del ds.DoseGridScaling
    ds.save_as(tmp_path / "unscaled.dcm")
    for dose, why in ((source, "RELATIVE"), (tmp_path / "unscaled.dcm", "no DoseGridScaling")):
        case = load_case(str(case_dir / "planning_ct.nii.gz"), str(case_dir / "repeat_ct.nii.gz"),
                         structures=str(case_dir / "structures"), dose=str(dose))
        assert case.dose is None and why in case.notes[0] and "left out" in case.notes[0]
        grid = working_grid(case.fixed.grid, 3.0)
        assert "anatomy" in protondir.clinical_inputs(case, grid, ("anatomy", "risk"), 384).used
    with pytest.raises(InputError, match="does not exist"):
        load_case(str(case_dir / "planning_ct.nii.gz"), str(case_dir / "repeat_ct.nii.gz"), dose=str(tmp_path / "no.dcm"))
