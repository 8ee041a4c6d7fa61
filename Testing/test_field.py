"""Displacement fields and transforms: the DESIGN.md convention, checked against SimpleITK."""
import numpy as np
import SimpleITK as sitk

from conftest import oblique_grid, smooth_field, smooth_image
from rtreg.field import (SpatialTransform, affine_to_sitk, compose, displacement_at, field_to_sitk_transform, invert,
                         jacobian_determinant, read_transform, resample_field, warp, write_field, write_transform)
from rtreg.image import Grid, Volume, read_volume, resample
from rtreg.synth import rigid_matrix


def _transform(grid):
    a = rigid_matrix((3, -2, 4), (2.0, -1.5, 3.0), grid.center())
    return SpatialTransform(a, smooth_field(grid, 3.0))


def test_warp_equals_sitk_resample_with_written_file(tmp_path):
    grid = oblique_grid(shape=(14, 16, 18))
    moving = smooth_image(oblique_grid(shape=(16, 18, 20), spacing=(1.1, 1.0, 1.9), deg=(-5, 10, 3)), seed=4)
    t = _transform(grid)
    path = write_transform(t, tmp_path / "transform.h5")
    tx = sitk.ReadTransform(str(path))
    ref = sitk.Resample(moving.to_sitk(), grid.to_sitk_reference(), tx, sitk.sitkLinear, -50.0, sitk.sitkFloat32)
    ours = warp(moving, t, grid, fill=-50.0)
    np.testing.assert_allclose(ours.array, sitk.GetArrayFromImage(ref), atol=1e-4)


def test_transform_is_affine_after_field_and_points_agree_with_sitk(tmp_path):
    grid = oblique_grid()
    t = _transform(grid)
    pts = grid.index_to_world(np.array([[3, 4, 5], [7.5, 2.2, 9.1]]))
    u = resample_field(t.displacement, grid)  # same grid: exact at voxel centres
    # at voxel (3, 4, 5) the field is u[k=5, j=4, i=3]
    expected0 = t.affine[:3, :3] @ (pts[0] + u.array[5, 4, 3]) + t.affine[:3, 3]
    np.testing.assert_allclose(t.transform_points(pts)[0], expected0, atol=1e-4)
    tx = sitk.ReadTransform(str(write_transform(t, tmp_path / "t.h5")))
    np.testing.assert_allclose(t.transform_points(pts), [tx.TransformPoint(p.tolist()) for p in pts], atol=1e-6)


def test_total_field_file_round_trip(tmp_path):
    grid = oblique_grid()
    t = _transform(grid)
    total = t.total_field(grid)
    back = read_transform(write_field(total, tmp_path / "displacement.mha"))
    pts = grid.index_to_world(np.array([[2, 3, 4], [10, 11, 5]]))
    np.testing.assert_allclose(back.transform_points(pts), t.transform_points(pts), atol=1e-3)
    again = read_transform(write_transform(t, tmp_path / "transform.h5"))
    np.testing.assert_allclose(again.affine, t.affine, atol=1e-9)
    np.testing.assert_allclose(again.displacement.array, t.displacement.array, atol=1e-5)


def test_compose_equals_sequential_warp():
    grid = oblique_grid(shape=(16, 16, 16), spacing=(1.0, 1.0, 1.0))
    inner = SpatialTransform(np.eye(4), smooth_field(grid, 1.5, seed=2))
    outer = SpatialTransform(np.eye(4), smooth_field(grid, 1.5, seed=3))
    both = compose(outer, inner, grid)
    img = smooth_image(oblique_grid(shape=(20, 20, 20), spacing=(1.0, 1.0, 1.0), origin=(-22, 9, 3)), seed=5)
    # warping by the composed field: img(outer(inner(x)))
    pts = grid.world_points()[4:12, 4:12, 4:12].reshape(-1, 3)
    direct = outer.transform_points(inner.transform_points(pts))
    np.testing.assert_allclose(both.transform_points(pts), direct, atol=1e-3)
    assert warp(img, both, grid).array.shape == grid.shape


def test_inverse_round_trip_and_residual():
    grid = oblique_grid(shape=(20, 20, 20), spacing=(1.5, 1.5, 2.0))
    t = _transform(grid)
    inv = invert(t, grid, max_spacing_mm=None)
    assert inv.residual_mean_mm < 0.01
    inner_pts = grid.world_points()[6:14, 6:14, 6:14].reshape(-1, 3)
    back = inv.transform.transform_points(t.transform_points(inner_pts))
    assert np.abs(back - inner_pts).max() < 0.2


def test_the_inverse_samples_a_field_as_itk_does_inside_at_the_border_and_outside():
    """The inverse's point sampler equals ITK's DisplacementFieldTransform (what ``transform.h5`` holds) at
    random points inside the oblique field, within half a voxel of its border and beyond it."""
    grid = oblique_grid(shape=(12, 14, 16), spacing=(1.3, 0.9, 2.1))
    field = smooth_field(grid, 3.0, seed=4)
    rng = np.random.default_rng(0)
    size = np.array(grid.size_xyz, dtype=float)
    ijk = rng.uniform(-0.5, 1.5, (4000, 3)) * size - 0.5     # the grid, and half its size beyond every side
    ijk = np.concatenate([ijk, [[-0.49, 3, 3], [-0.51, 3, 3], [grid.size_xyz[0] - 0.51, 3, 3],
                                [grid.size_xyz[0] - 0.49, 3, 3]]])
    points = grid.index_to_world(ijk)
    tx = field_to_sitk_transform(field)
    expected = np.array([tx.TransformPoint(tuple(p)) for p in points]) - points
    got = displacement_at(field)(points)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert (np.abs(got).sum(1) == 0).sum() > 500 and (np.abs(got).sum(1) > 0).sum() > 500   # both regions drawn
    assert np.abs(got[-4]).sum() > 0 and np.abs(got[-3]).sum() == 0 and np.abs(got[-2]).sum() > 0 \
        and np.abs(got[-1]).sum() == 0


def test_jacobian_of_affine_field_is_its_determinant():
    grid = oblique_grid()
    m = np.array([[1.1, 0.05, 0], [0.0, 0.9, 0.1], [0.02, 0, 1.05]])
    p = grid.world_points()
    u = (p @ m.T - p).astype(np.float32)
    from rtreg.image import Volume
    jac = jacobian_determinant(Volume(u, grid.affine))
    np.testing.assert_allclose(jac.array, np.linalg.det(m), rtol=1e-4)
    fold = Volume((-2.5 * p).astype(np.float32), grid.affine)  # x -> -1.5 x: all folded
    assert (jacobian_determinant(fold).array <= 0).all()


def test_fields_read_back_as_written(tmp_path):
    grid = oblique_grid()
    f = smooth_field(grid)
    back = read_volume(write_field(f, tmp_path / "f.nrrd"))
    np.testing.assert_allclose(back.affine, grid.affine, atol=1e-5)
    np.testing.assert_allclose(back.array, f.array, atol=1e-6)


def test_coverage_marks_where_the_moving_image_has_data():
    from rtreg.field import coverage
    g = Grid.from_geometry((10, 10, 10), (2.0, 2.0, 2.0))
    shift = np.eye(4)
    shift[0, 3] = 5.0                          # fixed x -> moving x + 5 mm (2.5 voxels)
    cover = coverage(g, shift, g)
    assert cover.dtype == np.uint8 and cover[:, :, :7].all() and not cover[:, :, 7:].any()
    small = Grid.from_geometry((10, 10, 4), (2.0, 2.0, 2.0))   # a moving image 4 voxels wide in x
    narrow = coverage(small, np.eye(4), g)
    assert narrow[:, :, :4].all() and not narrow[:, :, 4:].any()
    # oblique grids and a rotation: where resampling an all-ones moving image reads no fill
    fixed_grid, moving_grid = oblique_grid((20, 22, 24), (2.0, 2.5, 3.0)), oblique_grid((12, 14, 16), (3.0, 2.0, 2.0))
    a = rigid_matrix((8.0, -5.0, 12.0), (6.0, -4.0, 3.0), fixed_grid.center())
    ones = Volume(np.ones(moving_grid.shape, np.float32), moving_grid.affine.copy())
    by_resampling = resample(ones, fixed_grid, "linear", affine_to_sitk(a), 0.0).array > 0.999
    cover = coverage(moving_grid, a, fixed_grid)
    assert 0 < cover.sum() < cover.size and np.mean(cover.astype(bool) != by_resampling) < 1e-3


def test_inside_through_follows_the_field_and_matches_coverage_without_one():
    import torch
    from rtreg.field import coverage
    from rtreg.spatial import inside_through
    fixed_grid, moving_grid = oblique_grid((20, 22, 24), (2.0, 2.5, 3.0)), oblique_grid((12, 14, 16), (3.0, 2.0, 2.0))
    a = rigid_matrix((8.0, -5.0, 12.0), (6.0, -4.0, 3.0), fixed_grid.center())
    w = inside_through(moving_grid, a, None, fixed_grid, torch.device("cpu"))[0, 0].numpy()
    assert w.shape == fixed_grid.shape and w.min() >= 0 and w.max() <= 1
    cover = coverage(moving_grid, a, fixed_grid).astype(bool)
    assert (w[cover] > 0.999).mean() > 0.999 and (w[~cover] < 1.0).all()   # agrees with the static coverage
    # 100 mm along each axis at every voxel takes every sample out of the moving image
    u = torch.full((1, 3) + fixed_grid.shape, 100.0)
    assert float(inside_through(moving_grid, a, u, fixed_grid, torch.device("cpu")).max()) == 0.0
    # half a voxel past the buffer's edge along one axis: weight 0.5, linear in between
    g = Grid.from_geometry((1, 1, 1), (2.0, 2.0, 2.0))
    small = Grid.from_geometry((4, 4, 4), (2.0, 2.0, 2.0))
    for shift_mm, expected in ((0.0, 1.0), (7.0, 1.0), (8.0, 0.5), (9.0, 0.0), (-2.0, 0.5)):
        u = torch.zeros(1, 3, 1, 1, 1)
        u[0, 0] = shift_mm                                    # x: buffer [-0.5, 3.5] voxels = [-1, 7] mm
        got = float(inside_through(small, np.eye(4), u, g, torch.device("cpu")))
        assert abs(got - expected) < 1e-5, (shift_mm, got)


def test_moving_view_keeps_the_part_the_fixed_grid_maps_onto_and_its_voxel_centres():
    import torch
    from rtreg.field import moving_view
    from rtreg.spatial import to_tensor, warp_through
    # a head-sized fixed box inside a whole-body moving image, both 4 mm: x 400, y 320, z 1200 mm
    moving_grid = Grid.from_geometry((300, 80, 100), (4.0, 4.0, 4.0), (-200.0, -160.0, -900.0))
    fixed_grid = oblique_grid((30, 40, 40), (4.0, 4.0, 4.0), (-60.0, -70.0, 0.0), (5.0, -4.0, 10.0))
    a = rigid_matrix((6.0, -3.0, 8.0), (5.0, -8.0, 4.0), fixed_grid.center())
    view = moving_view(moving_grid, a, fixed_grid, margin_mm=20.0)
    assert view.n_voxels < 0.25 * moving_grid.n_voxels
    # the same axes and voxel centres: the view's origin is a voxel centre of the moving grid
    np.testing.assert_allclose(view.affine[:3, :3], moving_grid.affine[:3, :3])
    lo = moving_grid.world_to_index(view.affine[None, :3, 3])[0]
    np.testing.assert_allclose(lo, np.round(lo), atol=1e-9)
    # every fixed voxel centre through A lies inside the view, at least the margin from its edge
    ijk = view.world_to_index(fixed_grid.world_points().reshape(-1, 3) @ a[:3, :3].T + a[:3, 3])
    assert (ijk.min(0) >= 20.0 / 4.0 - 1e-6).all() and (ijk.max(0) <= np.array(view.size_xyz) - 1 - 5.0).all()
    # the moving image read through A from the view equals it read from the whole image
    image = smooth_image(moving_grid, seed=3)
    k0, j0, i0 = np.round(lo[::-1]).astype(int)
    part = image.array[k0:k0 + view.shape[0], j0:j0 + view.shape[1], i0:i0 + view.shape[2]]
    u = torch.full((1, 3) + fixed_grid.shape, 7.0)           # a 12 mm displacement, inside the 20 mm margin
    whole = warp_through(to_tensor(image.array, "cpu"), moving_grid, a, u, fixed_grid)
    viewed = warp_through(to_tensor(part, "cpu"), view, a, u, fixed_grid)
    torch.testing.assert_close(viewed, whole, atol=0.02, rtol=0)   # image std 100: float32 index rounding only
    # a fixed box that maps outside the moving image gets a one-voxel view at the nearest edge, not an error
    far = np.eye(4)
    far[2, 3] = 5000.0
    assert moving_view(moving_grid, far, fixed_grid).shape[0] == 1


def test_io_levels_hold_the_moving_image_only_where_the_fixed_grid_maps():
    from rtreg.methods.io import pyramid
    moving_grid = Grid.from_geometry((200, 60, 60), (4.0, 4.0, 4.0), (-120.0, -120.0, -500.0))
    fixed_grid = Grid.from_geometry((20, 30, 30), (4.0, 4.0, 4.0), (-60.0, -60.0, -40.0))
    moving = smooth_image(moving_grid, seed=4)
    fixed = resample(moving, fixed_grid)
    levels = pyramid(fixed, moving, np.ones(fixed_grid.shape, np.uint8), np.eye(4), 4.0, [1, 1], "cpu")
    for level in levels:
        whole = moving_grid.with_spacing(float(level.grid.spacing[0]))
        assert level.moving_grid.shape[0] < 0.6 * whole.shape[0]
        assert tuple(level.moving.shape[2:]) == level.moving_grid.shape


def test_moving_view_runs_like_the_fixed_axes_so_mind_channels_correspond():
    """A moving image stored with its axes reversed and swapped (a DICOM series against a NIfTI) is held on a
    view whose axes run like the fixed grid's: its MIND-SSC read through A equals the fixed image's channel for
    channel. On the moving image's own axes the channels would compare other neighbours."""
    import torch
    from rtreg.field import moving_view
    from rtreg.losses import mind_ssc
    from rtreg.spatial import to_tensor, warp_through
    fixed = smooth_image(Grid.from_geometry((20, 24, 28), (2.0, 2.0, 2.0), (-30.0, -20.0, -10.0)), seed=5)
    stored = np.ascontiguousarray(np.flip(fixed.array, (1, 2)).transpose(1, 0, 2))   # y, x reversed; z and y swapped
    a = np.zeros((4, 4))
    a[:3, 0] = fixed.affine[:3, 0] * -1            # index i: x, reversed
    a[:3, 1] = fixed.affine[:3, 2]                 # index j: z
    a[:3, 2] = fixed.affine[:3, 1] * -1            # index k: y, reversed
    a[:3, 3] = fixed.grid.index_to_world(np.array([[27.0, 23.0, 0.0]]))[0]
    a[3, 3] = 1.0
    moving = Volume(stored, a)
    np.testing.assert_allclose(resample(moving, fixed.grid).array, fixed.array, atol=1e-3)   # the same image
    view = moving_view(moving.grid, np.eye(4), fixed.grid)
    np.testing.assert_allclose(view.direction, fixed.grid.direction, atol=1e-9)
    held = to_tensor(resample(moving, view).array, "cpu")
    expected = mind_ssc(to_tensor(fixed.array, "cpu"))
    through_view = warp_through(mind_ssc(held), view, np.eye(4), None, fixed.grid)
    torch.testing.assert_close(through_view, expected, atol=1e-4, rtol=1e-4)
    own = to_tensor(moving.array, "cpu")
    through_own = warp_through(mind_ssc(own), moving.grid, np.eye(4), None, fixed.grid)
    assert (through_own - expected).abs().max() > 0.1                  # what the fix avoids
