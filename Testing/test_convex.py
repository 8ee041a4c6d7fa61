"""The coupled convex stage (GlideReg's discrete step) and field composition in torch."""
import numpy as np
import torch
from scipy import ndimage

from conftest import smooth_image
from rtreg.convex import candidate_offsets, control_field_mm, coupled_convex
from rtreg.image import Grid
from rtreg.losses import mind_ssc
from rtreg.spatial import compose_fields, to_tensor, warp


def test_convex_stage_recovers_a_known_integer_shift():
    grid = Grid.from_geometry((40, 44, 48), (2.0, 2.0, 2.0))
    fixed = smooth_image(grid, seed=3).array
    shift_ijk = np.array([4, -2, 2])        # voxels along x, y, z: whole steps of the 2-voxel control grid
    moving = np.roll(fixed, tuple(shift_ijk[::-1]), axis=(0, 1, 2))   # moving(x + s) = fixed(x)
    f_t, m_t = to_tensor(fixed, torch.device("cpu")), to_tensor(moving, torch.device("cpu"))
    u = control_field_mm(mind_ssc(f_t), mind_ssc(m_t), grid, step=2, radius=4)
    inner = u[0, :, 10:-10, 10:-10, 10:-10].reshape(3, -1)
    np.testing.assert_allclose(inner.median(1).values.numpy(), shift_ijk * 2.0, atol=0.5)
    assert (inner - torch.tensor(shift_ijk * 2.0)[:, None]).abs().max() < 2.0 + 1e-4   # within one voxel


def test_coupling_smooths_an_isolated_wrong_choice():
    offsets = candidate_offsets(1, torch.device("cpu")).float()
    cost = ((offsets[:, :, None, None, None] - torch.tensor([1.0, 0, 0])[:, None, None, None]) ** 2).sum(1)
    cost = cost.expand(-1, 6, 6, 6).clone()
    cost[:, 3, 3, 3] = ((offsets - torch.tensor([-1.0, 0, 0])) ** 2).sum(1)   # one control point disagrees
    u = coupled_convex(cost, offsets)
    assert u[0, 0, 3, 3, 3] > 0.5 and torch.allclose(u[0, 0, 0, 0, 0], torch.tensor(1.0))


def test_composed_field_equals_the_sequential_warp():
    grid = Grid.from_geometry((24, 26, 28), (1.5, 2.0, 2.5))
    smoother = ndimage.gaussian_filter(smooth_image(grid, seed=1).array, 3.0)   # so that resampling twice
    image = to_tensor(smoother, torch.device("cpu"))                              # costs little detail
    gen = torch.Generator().manual_seed(0)
    u1, u2 = [torch.nn.functional.interpolate(3 * torch.randn(1, 3, 4, 4, 4, generator=gen), size=grid.shape,
                                              mode="trilinear", align_corners=True) for _ in range(2)]
    sequential = warp(warp(image, u1, grid), u2, grid)
    once = warp(image, compose_fields(u1, u2, grid), grid)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    assert (sequential - once)[inner].abs().max() < 0.02 * image.abs().max()


def test_adam_refinement_reaches_a_sub_voxel_shift_the_convex_grid_cannot():
    from rtreg.convex import adam_refine
    grid = Grid.from_geometry((32, 32, 32), (2.0, 2.0, 2.0))
    base = ndimage.gaussian_filter(smooth_image(grid, seed=5).array, 2.0)
    shift_mm = np.array([3.0, -1.0, 0.0])                                  # 1.5 and -0.5 voxels along x, y
    moving = ndimage.shift(base, (0.0, -0.5, 1.5), order=3, mode="nearest")  # moving(x + s) = fixed(x)
    f = mind_ssc(to_tensor(base, torch.device("cpu")))
    m = mind_ssc(to_tensor(moving, torch.device("cpu")))
    start = control_field_mm(f, m, grid, step=2, radius=2)                 # whole steps of 4 mm only
    u, iterations = adam_refine([(f, m)], start, grid, [1.0], bending_weight=0.1, iterations=80)
    assert iterations == 80

    def median_error(field):
        return np.abs(field[0, :, 8:-8, 8:-8, 8:-8].reshape(3, -1).median(1).values.numpy() - shift_mm).max()

    assert median_error(u) < 0.5 and median_error(u) < median_error(start)


def test_adam_refinement_on_a_sampled_control_grid_feature_pair():
    """GlideReg's global term: features compared on the control grid only (no fine pair), their SSD estimated
    on random control voxels each step, as with the full grid (same answer within 0.5 mm)."""
    from rtreg.convex import CoarsePair, adam_refine
    from rtreg.spatial import resample_on_grid
    grid = Grid.from_geometry((32, 32, 32), (2.0, 2.0, 2.0))
    control = grid.with_spacing(4.0)
    base = ndimage.gaussian_filter(smooth_image(grid, seed=5).array, 3.0)
    shift_mm = np.array([3.0, -2.0, 0.0])
    moving = ndimage.shift(base, (0.0, -1.0, 1.5), order=3, mode="nearest")   # moving(x + s) = fixed(x)
    f, m = (resample_on_grid(to_tensor(a, torch.device("cpu")), grid, control) for a in (base, moving))
    halve = lambda x: 0.5 * x   # noqa: E731 - a per-voxel reduction
    pair = CoarsePair(f, m, halve, lambda: torch.zeros(()), [], 40.0)
    assert torch.equal(pair.features()[0], 0.5 * f)
    start = torch.zeros(1, 3, *grid.shape)
    errors = []
    for samples in (None, 2000):
        u, _ = adam_refine([], start, grid, [], bending_weight=0.01, iterations=100, lr_mm=0.5,
                           coarse_pair=pair, samples=samples)
        errors.append(np.abs(u[0, :, 8:-8, 8:-8, 8:-8].reshape(3, -1).median(1).values.numpy() - shift_mm).max())
    assert max(errors) < 0.5, errors


def test_the_folding_penalty_unfolds_a_field_that_the_data_and_the_bending_energy_keep_folded():
    """GlideReg's refinement when the data ask for a fold: the fixed features are the moving ones warped by a
    field that folds (a 15 mm bump along x), and the refinement starts there. With the bending energy alone
    the fold stays; with the folding penalty no corner of any cell of the result is at or below zero."""
    from rtreg.convex import adam_refine
    from rtreg.losses import jacobian_determinants
    grid = Grid.from_geometry((24, 24, 24), (2.0, 2.0, 2.0))
    c = torch.arange(24, dtype=torch.float32) * 2.0 - 23.0
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    folded = torch.zeros(1, 3, 24, 24, 24)
    folded[0, 0] = 15.0 * torch.exp(-(x ** 2 + y ** 2 + z ** 2) / (2 * 6.0 ** 2))      # du_x/dx down to -1.5
    index_to_mm = torch.as_tensor(grid.affine[:3, :3], dtype=torch.float32)
    assert (jacobian_determinants(folded, index_to_mm) <= 0).any()
    moving = mind_ssc(to_tensor(smooth_image(grid, seed=4).array, torch.device("cpu")))
    fixed = warp(moving, folded, grid)
    results = {weight: adam_refine([(fixed, moving)], folded, grid, [12.0], bending_weight=1.0, iterations=100,
                                   lr_mm=0.5, folding_weight=weight)[0] for weight in (0.0, 1.0e4)}
    assert (jacobian_determinants(results[0.0], index_to_mm) <= 0).any()
    assert (jacobian_determinants(results[1.0e4], index_to_mm) > 0).all()
