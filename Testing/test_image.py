"""Volumes: geometry kept exactly through I/O, resampling modes, intensity helpers, bad input."""
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import oblique_grid, smooth_image
from rtreg.errors import InputError
from rtreg.image import (Grid, Volume, check_finite, normalize_intensity, read_volume, resample, window_ct,
                         write_volume)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_write_read_keeps_oblique_anisotropic_geometry(tmp_path, suffix):
    vol = smooth_image(oblique_grid())
    path = write_volume(vol, tmp_path / f"v{suffix}")
    back = read_volume(path)
    assert back.array.shape == vol.array.shape
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    np.testing.assert_allclose(back.array, vol.array, rtol=1e-6)


def test_grid_index_world_round_trip_and_sitk_agree():
    g = oblique_grid()
    ijk = np.array([[0, 0, 0], [3.5, 2.0, 7.25], [15, 13, 11]])
    world = g.index_to_world(ijk)
    np.testing.assert_allclose(g.world_to_index(world), ijk, atol=1e-9)
    ref = g.to_sitk_reference()
    for p, w in zip(ijk, world):
        np.testing.assert_allclose(ref.TransformContinuousIndexToPhysicalPoint(p.tolist()), w, atol=1e-9)


def test_with_spacing_keeps_extent_and_direction():
    g = oblique_grid(shape=(40, 50, 60), spacing=(0.5, 0.5, 1.0))
    c = g.with_spacing(2.0)
    np.testing.assert_allclose(c.spacing, 2.0, rtol=0.05)
    np.testing.assert_allclose(c.direction, g.direction, atol=1e-12)
    np.testing.assert_allclose(c.origin, g.origin)
    far_g = g.index_to_world((np.array(g.size_xyz) - 1)[None])
    far_c = c.index_to_world((np.array(c.size_xyz) - 1)[None])
    np.testing.assert_allclose(far_c, far_g, atol=1e-6)


def test_resample_identity_grid_is_exact_and_linear_matches_sitk():
    vol = smooth_image(oblique_grid())
    same = resample(vol, vol.grid)
    np.testing.assert_allclose(same.array, vol.array, atol=1e-4)
    target = Grid.from_geometry((10, 10, 10), (1.7, 1.7, 1.7), vol.grid.center() - 8)
    ours = resample(vol, target)
    ref = sitk.Resample(vol.to_sitk(), target.to_sitk_reference(), sitk.Transform(), sitk.sitkLinear, 0.0,
                        sitk.sitkFloat32)
    np.testing.assert_allclose(ours.array, sitk.GetArrayFromImage(ref), atol=1e-4)


def test_mask_and_label_resampling_keep_labels():
    g = Grid.from_geometry((20, 20, 20), (1, 1, 1))
    lab = np.zeros(g.shape, np.uint8)
    lab[5:15, 5:15, 5:10] = 1
    lab[5:15, 5:15, 10:15] = 3
    vol = Volume(lab, g.affine)
    fine = Grid.from_geometry((39, 39, 39), (0.5, 0.5, 0.5))
    out = resample(vol, fine, "label")
    assert set(np.unique(out.array)) == {0, 1, 3}
    m = resample(Volume((lab > 0).astype(np.uint8), g.affine), fine, "mask")
    assert m.array.dtype == np.uint8 and set(np.unique(m.array)) == {0, 1}
    # volume is preserved within a voxel layer
    assert abs(m.array.sum() * 0.125 - (lab > 0).sum()) / (lab > 0).sum() < 0.15


def test_window_and_normalize():
    a = np.array([-2000, -160, 40, 240, 3000], np.float32).reshape(1, 1, 5).repeat(4, 0).repeat(4, 1)
    w = window_ct(a, 40, 400)
    assert w.min() == 0 and w.max() == 1 and abs(w[0, 0, 2] - 0.5) < 1e-6
    v = Volume(np.random.default_rng(0).normal(0, 50, (8, 8, 8)).astype(np.float32), np.eye(4), {"modality": "CT"})
    n = normalize_intensity(v)
    assert n.min() >= 0 and n.max() <= 1
    with pytest.raises(InputError, match="constant"):
        normalize_intensity(Volume(np.zeros((4, 4, 4), np.float32), np.eye(4)))


def test_bad_images_get_clear_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_volume(tmp_path / "nothing.nii.gz")
    img2d = sitk.Image([8, 8], sitk.sitkFloat32)
    sitk.WriteImage(img2d, str(tmp_path / "flat.nii.gz"))
    with pytest.raises(InputError, match="2D image"):
        read_volume(tmp_path / "flat.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read"):
        read_volume(tmp_path / "junk.nii.gz")
    a = np.zeros((4, 4, 4), np.float32)
    a[1, 2, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        check_finite(Volume(a, np.eye(4)), "moving")
    for suffix in (".nii.gz", ".nii", ".mha"):  # ITK reads NaN in NIfTI as 0: we look at the file itself
        path = write_volume(Volume(a, np.eye(4)), tmp_path / f"nan{suffix}")
        vol = read_volume(path) if suffix == ".mha" else None
        if vol is not None:
            with pytest.raises(InputError, match="NaN"):
                check_finite(vol, "moving")
        else:
            with pytest.raises(InputError, match="NaN"):
                read_volume(path)
    with pytest.raises(InputError, match="zero size"):
        Grid((0, 4, 4), np.eye(4))


def test_nrrd_and_mha_keep_the_modality_so_an_mr_file_is_not_taken_for_a_ct(tmp_path):
    """The Slicer modules hand volumes to the engine as NRRD: before, an int16 MR came back as a CT in HU (its
    body mask thresholded at -400 HU, its similarity NCC)."""
    from rtreg.case import RegistrationCase
    from rtreg.methods.io import prealign_similarity, same_modality
    arr = (np.arange(6 * 7 * 8).reshape(6, 7, 8) % 300).astype(np.int16)
    ct = Volume(arr, oblique_grid((6, 7, 8)).affine, {"modality": "CT", "units": "HU"})
    mr = ct.with_array(arr, modality="MR", units="")
    for suffix in (".nrrd", ".mha"):
        back_ct = read_volume(write_volume(ct, tmp_path / f"ct{suffix}"))
        back_mr = read_volume(write_volume(mr, tmp_path / f"mr{suffix}"))
        assert (back_ct.meta["modality"], back_ct.meta["units"]) == ("CT", "HU")
        assert (back_mr.meta["modality"], back_mr.meta["units"]) == ("MR", "")
        case = RegistrationCase(back_ct, back_mr)
        assert not same_modality(case) and prealign_similarity(case, "auto") == "mi"
    legacy = read_volume(write_volume(Volume(arr, ct.affine), tmp_path / "plain.nii.gz"))   # no header meta
    assert legacy.meta["units"] == "HU" and "modality" not in legacy.meta
