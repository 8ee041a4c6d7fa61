"""ProtonDIR's clinical priors on a real structure set (DCPT head phantom: CTV, BrainStem, BODY)."""
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from conftest import data_path
from rtreg.dicomrt import read_rtstruct
from rtreg.image import read_volume, resample
from rtreg.priors import BAND_MM, SIGMA_TARGET_MM, anatomy_map, clinical_prior, risk_map


@pytest.fixture(scope="module")
def dcpt():
    folder = data_path("dcpt_headphantom", "DCPT_headphantom")
    ct = read_volume(folder)
    ct = resample(ct, ct.grid.with_spacing(2.0))
    rs = next(f for f in sorted(folder.iterdir()) if f.name.startswith("RS"))
    return ct, {s.name: s.mask for s in read_rtstruct(rs, ct, names=["CTV", "BrainStem", "BODY"])}


def _distance_to(mask, grid, points_idx):
    """Distance (mm) from voxel centres to the nearest voxel centre of ``mask``, by brute force (k-d tree)."""
    tree = cKDTree(grid.index_to_world(np.argwhere(mask)[:, ::-1].astype(float)))
    return tree.query(grid.index_to_world(points_idx[:, ::-1].astype(float)))[0]


def test_anatomy_map_follows_the_ctv_distance(dcpt):
    ct, s = dcpt
    ctv, body, stem = s["CTV"], s["BODY"], s["BrainStem"]
    amap = anatomy_map(ctv, [stem], ct.grid.spacing)
    assert amap.shape == (3,) + ct.array.shape and amap.dtype == np.float32
    assert np.all(amap[0][ctv > 0] == 1.0) and amap.min() >= 0 and amap.max() <= 1
    # outside: compare with an independent distance (to the nearest CTV voxel centre; the surface lies about
    # half a voxel nearer, so allow a voxel)
    rng = np.random.default_rng(0)
    outside = np.argwhere((body > 0) & (ctv == 0))
    pick = outside[rng.choice(len(outside), 300, replace=False)]
    d = _distance_to(ctv, ct.grid, pick)
    got = amap[0][tuple(pick.T)]
    lo = np.exp(-d ** 2 / (2 * SIGMA_TARGET_MM ** 2))
    hi = np.exp(-np.maximum(d - 2.0, 0) ** 2 / (2 * SIGMA_TARGET_MM ** 2))
    assert np.all(got >= lo - 1e-4) and np.all(got <= hi + 1e-4)
    # the band peaks on the CTV boundary and is gone 3 band widths away
    rim = ctv.astype(bool) & ~ndimage.binary_erosion(ctv.astype(bool))
    assert amap[1][rim].mean() > 0.8
    far = _distance_to(ctv, ct.grid, outside) > 3 * BAND_MM + 2
    assert amap[1][tuple(outside[far].T)].max() < 0.02
    np.testing.assert_array_equal(amap[2], stem.astype(np.float32))


def test_risk_map_marks_gradient_isodoses_and_dosed_organs(dcpt):
    ct, s = dcpt
    ctv, stem = s["CTV"].astype(bool), s["BrainStem"]
    dose = 60.0 * ndimage.gaussian_filter(ctv.astype(np.float32), 3.0) / 0.5   # conformal, 60 Gy plateau
    dose = np.minimum(dose, 60.0)
    rmap = risk_map(dose, ct.grid.spacing, 60.0, [stem])
    assert rmap.shape == (3,) + ct.array.shape and rmap.min() >= 0 and rmap.max() <= 1
    assert np.all(rmap[1][dose >= 57.0] == 1.0) and np.all(rmap[1][dose < 30.0] == 0.0)
    assert np.allclose(rmap[1][(dose >= 48.0) & (dose < 57.0)], 2 / 3)
    # the gradient is steep at the field edge and nil in the plateau and far away
    plateau = ndimage.binary_erosion(dose == 60.0, iterations=2)
    assert plateau.any() and rmap[0][plateau].max() < 0.05 and rmap[0][(dose > 20) & (dose < 40)].mean() > 0.3
    np.testing.assert_allclose(rmap[2][stem > 0], dose[stem > 0] / 60.0, rtol=1e-5)
    prior = clinical_prior(anatomy_map(s["CTV"], [stem], ct.grid.spacing), rmap)
    assert prior.shape == ct.array.shape and 0 <= prior.min() and prior.max() <= 1
    assert prior[ctv].min() >= 0.5           # inside the target: proximity 1
    with pytest.raises(ValueError, match="prescription"):
        risk_map(dose, ct.grid.spacing, 0.0, [])


def test_a_missing_target_gives_zero_target_channels():
    empty = np.zeros((10, 12, 14), np.uint8)
    amap = anatomy_map(empty, [], (1.0, 1.0, 2.0))
    assert not amap.any() and clinical_prior(amap).shape == empty.shape


def test_prompts_from_structures_plan_and_free_text():
    from rtreg.dicomrt import Beam, PlanSummary
    from rtreg.priors import plan_prompts, tumour_site
    plan = PlanSummary("HN1", True, "PROTON", 70.0, 35, ["CTV"],
                       [Beam("B1", "PROTON", 90.0, 0.0, "G1"), Beam("B2", "PROTON", 270.0, 0.0, "G1")])
    p = plan_prompts(["BODY", "CTV", "BrainStem", "Parotid_L"], "CTV", ["BrainStem", "Parotid_L"], plan,
                     "Oropharynx carcinoma, T2N1. Replan after weight loss.")
    assert p["anatomy"] == "Target CTV; organs at risk: BrainStem, Parotid_L."
    assert p["diagnosis"] == "Tumour site: head and neck; Oropharynx carcinoma, T2N1."
    assert "70.00 Gy in 35 fractions" in p["plan"] and p["plan"].endswith("critical organs BrainStem, Parotid_L.")
    empty = plan_prompts([], None, [], None, "")
    assert empty == {"anatomy": "", "diagnosis": "", "plan": ""}
    assert tumour_site("Prostate", "") == "prostate and pelvis" and tumour_site("Lung_L") == "thorax"
    assert tumour_site("GTV", "soft-tissue sarcoma of the thigh") == "extremity (sarcoma)"
    assert tumour_site("SpinalCanal", "Lung_L") == "thorax" and tumour_site("Outer_Ring", "Liver") == "abdomen"


@pytest.mark.parametrize("site", ["pelvis", "thorax", "headneck"])
def test_body_mask_of_a_t1_like_mr_covers_the_body_also_in_a_field_of_view_inside_it(site):
    """A T1 MR's fat is brighter than its muscle: a two-class threshold kept the fat only (Dice 0.04-0.56
    on these crops). The T1-like image shares the CT's anatomy, so the CT's body mask is the truth."""
    from rtreg.image import crop_to_mask
    from rtreg.metrics import dice
    from rtreg.priors import body_mask
    from rtreg.synth import rt_phantom, t1_weighted_like

    ct = rt_phantom(site, seed=0).planning
    body = body_mask(ct)
    z, y, x = np.nonzero(body)
    inner = np.zeros_like(body)
    y0, y1, x0, x1 = (int(np.percentile(v, q)) for v in (y, x) for q in (20, 80))
    inner[:, y0:y1, x0:x1] = 1
    for image in (ct, crop_to_mask(ct, inner, 0.0)):      # whole body in air; a field of view inside the body
        mr = t1_weighted_like(image, np.random.default_rng(0))
        inside = body_mask(image) > 0
        assert abs(np.corrcoef(image.array[inside], mr.array[inside])[0, 1]) < 0.6   # another contrast
        assert dice(body_mask(mr), inside) > 0.95, (site, mr.array.shape)
