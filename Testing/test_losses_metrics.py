"""Similarity and regularisation terms (torch) and evaluation metrics (numpy) on cases with known answers."""
import numpy as np
import pytest
import torch

from rtreg.image import Grid, Volume
from rtreg.losses import (bending_energy, diffusion, divergence_penalty, folding_penalty, jacobian_determinants,
                          mind_ssc, mutual_information, ncc_global, ncc_local)
from rtreg.metrics import (dice, hd95, jacobian_stats, mean_surface_distance, mse, ncc, relative_volume_difference,
                           ssim, tre)


def _blobs(seed=0, shape=(24, 24, 24)):
    from scipy import ndimage
    a = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), 2.0)
    a = (a - a.min()) / (a.max() - a.min())
    return torch.as_tensor(a, dtype=torch.float32)[None, None]


def test_ncc_identical_and_inverted():
    a = _blobs()
    assert ncc_global(a, a).item() == pytest.approx(1.0, abs=1e-5)
    assert ncc_global(a, 1 - a).item() == pytest.approx(-1.0, abs=1e-5)
    assert ncc_local(a, a).item() == pytest.approx(1.0, abs=1e-3)
    assert ncc_local(a, 2 * a + 0.3).item() == pytest.approx(1.0, abs=1e-3)
    assert ncc_local(a, _blobs(1)).item() < 0.5


def test_mutual_information_prefers_alignment_and_is_contrast_invariant():
    a = _blobs()
    shifted = torch.roll(a, 3, dims=2)
    assert mutual_information(a, a).item() > mutual_information(a, shifted).item() + 0.2
    # an inverted contrast (a different modality) is as informative as the original
    assert mutual_information(a, 1 - a).item() == pytest.approx(mutual_information(a, a).item(), rel=0.05)


def test_the_parzen_kernel_is_a_gaussian_cut_to_zero_at_six_bins_without_subnormal_weights():
    """The weights are a Gaussian of one bin's width lowered by its value at six widths and zero beyond (no
    subnormal float, which x86 CPUs process far more slowly), each sample's summing to 1; the MI
    and its gradient are those of the untruncated Gaussian to float rounding."""
    from rtreg.losses import PARZEN_SUPPORT_BINS, _parzen_weights, multi_axis_mi
    bins = 32
    x = torch.linspace(0, 1, 1001)
    w = _parzen_weights(x, bins)
    assert torch.allclose(w.sum(-1), torch.ones(len(x)))
    distance = (x[:, None] - torch.linspace(0, 1, bins)).abs() * (bins - 1)          # in bin widths
    assert (w[distance >= PARZEN_SUPPORT_BINS] == 0).all() and (w[distance < PARZEN_SUPPORT_BINS - 0.01] > 0).all()
    assert not ((w > 0) & (w < torch.finfo(torch.float32).tiny)).any()
    gaussian = torch.exp(-0.5 * distance ** 2) - np.exp(-0.5 * PARZEN_SUPPORT_BINS ** 2)
    expected = gaussian.clamp_min(0) / gaussian.clamp_min(0).sum(-1, keepdim=True)
    assert torch.allclose(w, expected, atol=1e-6)

    def untruncated(v, n):
        full = torch.exp(-0.5 * ((v.clamp(0, 1)[..., None] - torch.linspace(0, 1, n)) * (n - 1)) ** 2)
        return full / full.sum(-1, keepdim=True)

    a = _blobs(1)
    b = (1 - _blobs(1) ** 2 + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    for similarity in (mutual_information, multi_axis_mi):
        values = []
        for kernel in (_parzen_weights, untruncated):
            moving = b.clone().requires_grad_()
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr("rtreg.losses._parzen_weights", kernel)
                value = similarity(a, moving)
            values.append((value.detach(), torch.autograd.grad(value, moving)[0]))
        (v_cut, g_cut), (v_full, g_full) = values
        assert float(v_cut) == pytest.approx(float(v_full), rel=1e-5)
        assert float((g_cut - g_full).abs().max()) < 1e-4 * float(g_full.abs().max())


def test_mind_ssc_invariant_to_monotone_affine_intensity_change():
    a = _blobs()
    m1 = mind_ssc(a)
    m2 = mind_ssc(0.5 * a + 0.2)
    assert m1.shape == (1, 12, 24, 24, 24)
    assert torch.allclose(m1, m2, atol=1e-4)
    assert (m1 - mind_ssc(torch.roll(a, 2, 3))).abs().mean() > 0.05


def test_regularisers_zero_for_trivial_fields():
    sp = (1.0, 2.0, 1.5)
    const = torch.ones(1, 3, 8, 9, 10) * 4.0
    assert diffusion(const, sp).item() == 0.0
    assert bending_energy(const, sp).item() == 0.0
    z, y, x = torch.meshgrid(torch.arange(8.0) * 1.5, torch.arange(9.0) * 2.0, torch.arange(10.0), indexing="ij")
    linear = torch.stack([0.1 * x, 0.2 * y, -0.05 * z])[None]
    assert bending_energy(linear, sp).item() == pytest.approx(0.0, abs=1e-9)
    assert diffusion(linear, sp).item() > 0
    assert divergence_penalty(linear, sp).item() == pytest.approx((0.1 + 0.2 - 0.05) ** 2, rel=1e-4)
    rot = torch.stack([-y, x, torch.zeros_like(x)])[None]  # rotation-like: divergence free
    assert divergence_penalty(rot, sp).item() == pytest.approx(0.0, abs=1e-9)


def test_the_differentiable_jacobian_matches_the_reported_one_and_the_folding_penalty_marks_folds():
    from rtreg.field import jacobian_determinant
    from rtreg.spatial import field_to_array
    c, s_ = np.cos(0.4), np.sin(0.4)
    oblique = Grid.from_geometry((10, 11, 12), (1.5, 2.0, 2.5), direction=[[c, -s_, 0], [s_, c, 0], [0, 0, 1]])
    index_to_mm = torch.as_tensor(oblique.affine[:3, :3])
    k, j, i = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in oblique.shape), indexing="ij")
    world = torch.einsum("wa,azyx->wzyx", index_to_mm, torch.stack([i, j, k]))       # LPS mm of every voxel
    linear = torch.tensor([[0.2, -0.1, 0.05], [0.1, -0.3, 0.0], [0.0, 0.15, 0.1]], dtype=torch.float64)
    u = torch.einsum("cw,wzyx->czyx", linear, world)[None]                             # u(x) = L x, det(I + L)
    expected = float(np.linalg.det(np.eye(3) + linear.numpy()))
    assert torch.allclose(jacobian_determinants(u, index_to_mm), torch.tensor(expected, dtype=torch.float64))
    reported = jacobian_determinant(Volume(field_to_array(u.float()), oblique.affine)).array
    assert np.allclose(reported, expected, atol=1e-4)
    assert folding_penalty(u, index_to_mm).item() == 0.0                              # det 0.82: nothing to pay
    squash = u.clone()
    squash[:, 0] = -1.5 * world[0]                                                     # x -> -0.5 x: a fold
    assert (jacobian_determinants(squash, index_to_mm) < 0).all()
    assert folding_penalty(squash, index_to_mm).item() > 0.0
    squash.requires_grad_(True)
    folding_penalty(squash, index_to_mm).backward()
    assert squash.grad.abs().sum() > 0


def test_overlap_and_surface_metrics_on_known_cubes():
    a = np.zeros((30, 30, 30), bool)
    b = np.zeros_like(a)
    a[5:15, 5:15, 5:15] = True
    b[5:15, 5:15, 8:18] = True  # shifted by 3 voxels along x
    assert dice(a, a) == 1.0
    assert dice(a, b) == pytest.approx(2 * 700 / 2000)
    spacing = (2.0, 1.0, 1.0)  # x spacing 2 mm: the 3-voxel shift is 6 mm
    assert hd95(a, b, spacing) == pytest.approx(6.0)
    assert 0 < mean_surface_distance(a, b, spacing) < 6.0
    assert relative_volume_difference(b, a) == pytest.approx(0.0)
    assert relative_volume_difference(a | b, a) == pytest.approx(0.3)
    assert relative_volume_difference(np.zeros_like(a), a) == -1.0


def test_point_and_image_metrics():
    p = np.zeros((4, 3))
    q = np.array([[3, 4, 0], [0, 0, 0], [0, 0, 1], [0, 0, 2]], float)
    r = tre(p, q)
    assert r["mean"] == pytest.approx(2.0) and r["max"] == 5.0 and r["n"] == 4
    img = np.random.default_rng(0).normal(size=(12, 12, 12))
    mask = np.ones(img.shape, bool)
    assert ncc(img, 3 * img + 1, mask) == pytest.approx(1.0)
    assert mse(img, img + 2) == pytest.approx(4.0)
    assert ssim(img, img) == pytest.approx(1.0)
    assert ssim(img, np.random.default_rng(1).normal(size=img.shape)) < 0.2
    with pytest.raises(ValueError, match="empty"):
        ncc(img, img, np.zeros_like(mask))


def test_jacobian_stats_counts_folding():
    j = np.ones((4, 4, 4), np.float32)
    j[0, 0, :2] = -0.5
    s = jacobian_stats(Volume(j, Grid.from_geometry(j.shape, (1, 1, 1)).affine))
    assert s["percent_nonpositive_jacobian"] == pytest.approx(100 * 2 / 64)
    assert s["jacobian_min"] == -0.5


@pytest.mark.parametrize("size", [1, 3, 5])
def test_box_filter_is_the_edge_replicated_moving_average(size):
    from scipy import ndimage
    from rtreg.spatial import box_filter
    x = torch.randn(1, 2, 7, 9, 11, dtype=torch.float64)
    expected = np.stack([ndimage.uniform_filter(x[0, c].numpy(), size, mode="nearest") for c in range(2)])[None]
    np.testing.assert_allclose(box_filter(x, size).numpy(), expected, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: box_filter(t, size), x[:, :1, :4, :5, :6].clone().requires_grad_(True))
    with pytest.raises(ValueError, match="odd"):
        box_filter(x, 4)
