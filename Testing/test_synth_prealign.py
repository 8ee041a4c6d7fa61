"""Synthetic RT cases (deterministic, consistent truth) and pre-alignment recovering known poses."""
import numpy as np
import pytest

from conftest import data_path
from rtreg.field import SpatialTransform, warp
from rtreg.image import read_volume
from rtreg.metrics import dice
from rtreg.prealign import center_of_mass, prealign
from rtreg.priors import body_mask
from rtreg.synth import SITES, deform_real_ct, rigid_matrix, rt_phantom


@pytest.fixture(scope="module")
def pelvis():
    return rt_phantom("pelvis", seed=7, spacing_mm=5.0)


@pytest.mark.parametrize("site", SITES)
def test_phantom_has_rt_content_and_consistent_truth(site):
    c = rt_phantom(site, seed=1, spacing_mm=5.0, n_points=50)
    names = [s.name for s in c.planning_structures]
    assert names[0] == "BODY" and "CTV" in names and len(names) >= 5
    ctv = c.structure("CTV").mask
    assert ctv.any() and c.structure("CTV", repeat=True).mask.any()
    assert c.dose.array.max() == pytest.approx(c.plan.prescription_gy, rel=0.05)
    assert c.dose.array[ctv > 0].min() > 0.9 * c.plan.prescription_gy   # the CTV is covered
    assert c.dose.array[c.structure("BODY").mask == 0].max() == 0        # no dose outside the patient
    assert "proton" in c.plan.text().lower() and "CTV" in c.plan.text()
    assert c.notes["inverse_residual_max_mm"] < 0.1
    # the repeat CT really is the planning CT seen through the truth: warped back it matches
    back = warp(c.repeat, c.truth, c.planning.grid, fill=-1000)
    inside = c.structure("BODY").mask > 0
    err = np.abs(back.array - c.planning.array)[inside]
    assert np.median(err) < 25  # two noise realisations (10 HU each) + interpolation
    moved = np.linalg.norm(c.points_repeat - c.points_planning, axis=1)
    assert 2.0 < moved.mean() < 20.0


def test_phantom_is_deterministic():
    a, b = rt_phantom("headneck", seed=3, spacing_mm=6.0), rt_phantom("headneck", seed=3, spacing_mm=6.0)
    np.testing.assert_array_equal(a.repeat.array, b.repeat.array)
    np.testing.assert_array_equal(a.points_repeat, b.points_repeat)
    c = rt_phantom("headneck", seed=4, spacing_mm=6.0)
    assert not np.array_equal(a.repeat.array, c.repeat.array)


def test_rigid_prealign_recovers_setup_error(pelvis):
    fixed = pelvis.planning
    true_a = rigid_matrix((2.0, -1.5, 3.0), (9.0, -6.0, 7.0), fixed.grid.center())
    moving = warp(fixed, SpatialTransform(np.linalg.inv(true_a)), fixed.grid, fill=-1000)
    moving.meta = dict(fixed.meta)
    # moving(y) = fixed(A^-1 y): the fixed point x sits at A x in the moving image
    est = prealign(fixed, moving, "rigid", body_mask(fixed), body_mask(moving))
    pts = pelvis.points_planning
    err = np.linalg.norm((pts @ est[:3, :3].T + est[:3, 3]) - (pts @ true_a[:3, :3].T + true_a[:3, 3]), axis=1)
    assert err.mean() < 1.5  # 5 mm voxels
    com = prealign(fixed, moving, "com", body_mask(fixed), body_mask(moving))
    assert np.allclose(com[:3, :3], np.eye(3))
    assert np.linalg.norm(com[:3, 3] - (center_of_mass(moving, body_mask(moving)) -
                                        center_of_mass(fixed, body_mask(fixed)))) < 1e-6


def test_affine_and_mutual_information_prealign_across_contrasts(pelvis):
    fixed = pelvis.planning
    true_a = rigid_matrix((0.0, 0.0, 4.0), (6.0, 4.0, -5.0), fixed.grid.center())
    true_a[:3, :3] = true_a[:3, :3] @ np.diag([1.05, 0.97, 1.0])
    moving = warp(fixed, SpatialTransform(np.linalg.inv(true_a)), fixed.grid, fill=-1000)
    inverted = moving.with_array(-moving.array, modality="MR", units="")  # another contrast
    est = prealign(fixed, inverted, "affine", body_mask(fixed), body_mask(moving), similarity="mi")
    pts = pelvis.points_planning
    err = np.linalg.norm((pts @ est[:3, :3].T + est[:3, 3]) - (pts @ true_a[:3, :3].T + true_a[:3, 3]), axis=1)
    assert err.mean() < 2.5


def test_real_ct_deformations_are_smooth_and_known():
    ct = read_volume(data_path("totalsegmentator", "example_ct.nii.gz"))
    ct.meta["modality"] = "CT"
    for kind in ("soft_tissue", "weight_loss", "breathing"):
        c = deform_real_ct(ct, kind, seed=2, amplitude_mm=6.0, n_points=100)
        assert c.notes["inverse_residual_max_mm"] < 0.5, kind
        assert 0.5 < c.notes["max_displacement_mm"] <= 6.0 + 1e-3, kind
        assert c.points_planning.shape == (100, 3)
        back = warp(c.repeat, c.truth, ct.grid, fill=-1024)
        body = body_mask(ct) > 0
        assert np.median(np.abs(back.array - ct.array)[body]) < 40, kind
    assert dice(body_mask(ct), body_mask(c.repeat)) < 0.99  # the setup error moved the patient


def test_moments_initialisation_recovers_a_large_rotation(pelvis):
    from rtreg.prealign import moments_initialisation
    fixed = pelvis.planning
    true_a = rigid_matrix((0.0, 0.0, 25.0), (10.0, -5.0, 4.0), fixed.grid.center())
    moving = warp(fixed, SpatialTransform(np.linalg.inv(true_a)), fixed.grid, fill=-1000)
    est = moments_initialisation(fixed, moving, body_mask(fixed), body_mask(moving))
    pts = pelvis.points_planning
    err = np.linalg.norm((pts @ est[:3, :3].T + est[:3, 3]) - (pts @ true_a[:3, :3].T + true_a[:3, 3]), axis=1)
    assert err.mean() < 8.0  # from ~50 mm: close enough for the rigid optimisation to take over
    com = prealign(fixed, moving, "com", body_mask(fixed), body_mask(moving))
    err_com = np.linalg.norm((pts @ com[:3, :3].T + com[:3, 3]) - (pts @ true_a[:3, :3].T + true_a[:3, 3]), axis=1)
    assert err.mean() < 0.5 * err_com.mean()
