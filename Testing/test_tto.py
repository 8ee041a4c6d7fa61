"""TTORegister: its losses, synthetic data and networks, the test-time optimisation's stop rules, the
patch-wise MI map, registration with the shipped student, 4D series, training and bad input."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import rtreg.device
from conftest import REPO, smooth_image
from rtreg.case import RegisterOptions, RegistrationCase
from rtreg.device import autocast, network_precision
from rtreg.errors import InputError
from rtreg.image import Grid, read_frames, read_volume, write_frames, write_volume
from rtreg.labelmaps import label_map_pair
from rtreg.losses import jacobian_determinants, multi_axis_mi
from rtreg.methods import tto
from rtreg.metrics import patch_mi_map, tre
from rtreg.models import load_weights, read_manifest
from rtreg.netgrid import spacing_for_budget, working_grid
from rtreg.nets.tto import STUDENT, TEACHER, build
from rtreg.spatial import warp_voxels
from rtreg.synth import rt_phantom, rigid_matrix


def test_multi_axis_mi_is_largest_for_aligned_images_and_ignores_contrast():
    g = torch.Generator().manual_seed(0)
    pair = label_map_pair((32, 32, 32), g, torch.device("cpu"))
    fixed = pair["fixed"]
    aligned = warp_voxels(pair["moving"], pair["u_true"])
    assert multi_axis_mi(fixed, aligned) > multi_axis_mi(fixed, pair["moving"])
    inverted = 1.0 - fixed                                  # another contrast of the same anatomy
    assert torch.isclose(multi_axis_mi(fixed, inverted), multi_axis_mi(fixed, fixed), rtol=0.05)
    shifted = torch.roll(fixed, 3, dims=4)
    assert multi_axis_mi(fixed, shifted) < 0.8 * multi_axis_mi(fixed, fixed)
    u = torch.zeros(1, 3, 32, 32, 32, requires_grad=True)
    multi_axis_mi(fixed, warp_voxels(pair["moving"], u)).backward()
    assert u.grad.abs().sum() > 0                           # differentiable through the warp


def test_multi_axis_mi_is_the_weighted_mean_of_each_slices_mi():
    """Against the definition, slice by slice along each axis of a (5, 6, 7) volume with a mask: the slices'
    MI weighted by their voxels in the mask, averaged over the axes and the batch."""
    from rtreg.losses import _mi_of_joint, _parzen_weights
    g = torch.Generator().manual_seed(5)
    a, b = torch.rand(2, 1, 5, 6, 7, generator=g), torch.rand(2, 1, 5, 6, 7, generator=g)
    b = 0.5 * b + 0.5 * a ** 2                                     # related, so the MI is not near zero
    mask = (torch.rand(2, 1, 5, 6, 7, generator=g) > 0.3).float()
    expected = []
    for k in range(2):
        wa = _parzen_weights(a[k, 0], 16) * mask[k, 0][..., None]
        wb = _parzen_weights(b[k, 0], 16)
        for axis in range(3):
            mis, masses = [], []
            for s in range(wa.shape[axis]):
                joint = wa.select(axis, s).reshape(-1, 16).T @ wb.select(axis, s).reshape(-1, 16)
                masses.append(float(joint.sum()))
                mis.append(float(_mi_of_joint(joint / joint.sum())) if masses[-1] > 0 else 0.0)
            expected.append(np.average(mis, weights=masses))
    assert float(multi_axis_mi(a, b, mask)) == pytest.approx(np.mean(expected), rel=1e-5)
    assert float(multi_axis_mi(a, b, mask)) > 0.05


def test_label_map_pairs_are_reproducible_and_their_field_is_true():
    a = label_map_pair((32, 32, 32), torch.Generator().manual_seed(5), torch.device("cpu"))
    b = label_map_pair((32, 32, 32), torch.Generator().manual_seed(5), torch.device("cpu"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    warped = warp_voxels(a["moving_labels"], a["u_true"])
    agree = (warped.argmax(1) == a["fixed_labels"].argmax(1)).float().mean()
    before = (a["moving_labels"].argmax(1) == a["fixed_labels"].argmax(1)).float().mean()
    assert agree > 0.97 and agree > before + 0.02
    assert float(a["fixed"].min()) >= 0.0 and float(a["fixed"].max()) <= 1.0


def test_networks_have_the_papers_layout_and_start_at_the_identity():
    teacher, student = build(TEACHER), build(STUDENT)
    assert [b[0].out_channels for b in teacher.down] == [16, 32, 32, 64] and teacher.bottom[0].out_channels == 64
    assert [b[0].out_channels for b in student.down] == [16, 24, 24, 32] and student.bottom[0].out_channels == 32
    assert [b[0].out_channels for b in student.final] == [16, 16, 16] == [b[0].out_channels for b in teacher.final]
    assert sum(p.numel() for p in student.parameters()) < 0.5 * sum(p.numel() for p in teacher.parameters())
    x = torch.rand(1, 1, 32, 48, 16)
    u = student(x, x)
    assert u.shape == (1, 3, 32, 48, 16) and u.abs().max() < 0.05
    with pytest.raises(ValueError, match="multiple of 16"):
        student(torch.rand(1, 1, 20, 32, 32), torch.rand(1, 1, 20, 32, 32))


def test_the_cpu_layout_changes_neither_the_field_nor_its_gradients():
    """``on_device`` puts the weights in the channels-last layout on a CPU (for speed): the shipped student's
    field and its weight gradients are the default layout's up to float32 rounding."""
    pair = label_map_pair((32, 32, 32), torch.Generator().manual_seed(3), torch.device("cpu"))
    fixed, moving = pair["fixed"], pair["moving"]
    results = []
    for layout in ("default", "channels-last"):
        net = tto.load_network("student", torch.device("cpu"))
        if layout == "default":
            net = net.to(memory_format=torch.contiguous_format)
        assert net.head.weight.is_contiguous() == (layout == "default")
        u = net(fixed, moving)
        (u * torch.linspace(-1, 1, u.numel()).view_as(u)).sum().backward()
        results.append((u.detach().contiguous(), net.down[0][0].weight.grad.contiguous()))
    (u_a, g_a), (u_b, g_b) = results
    assert u_a.abs().max() > 1e-3                      # the field is not trivially zero
    assert torch.allclose(u_a, u_b, rtol=1e-4, atol=1e-6 * float(u_a.abs().max()))
    assert torch.allclose(g_a, g_b, rtol=1e-3, atol=1e-5 * float(g_a.abs().max()))


def test_mixed_precision_is_chosen_by_the_cpu_and_keeps_the_field_in_float32(monkeypatch):
    """``auto`` runs the passes in bfloat16 only on a CPU with AMX; under the autocast the displacement head
    still runs in float32, so the field is the float32 field up to the features' rounding, not rounded itself."""
    cpu = torch.device("cpu")
    assert network_precision(cpu, "float32") == torch.float32 and network_precision(cpu, "bfloat16") == torch.bfloat16
    for amx in (False, True):
        monkeypatch.setattr(rtreg.device, "_cpu_has_amx", lambda amx=amx: amx)
        assert network_precision(cpu, "auto") == (torch.bfloat16 if amx else torch.float32)
        assert network_precision(cpu, None) == network_precision(cpu, "auto")
    pair = label_map_pair((32, 32, 32), torch.Generator().manual_seed(3), cpu)
    net = tto.load_network("student", cpu)
    with torch.no_grad():
        exact = net(pair["fixed"], pair["moving"])
        with autocast(cpu, torch.bfloat16):
            mixed = net(pair["fixed"], pair["moving"])
    assert mixed.dtype == torch.float32 and exact.abs().max() > 0.1
    assert float((mixed - exact).abs().max()) < 0.05 * float(exact.abs().max())
    assert not torch.equal(mixed, mixed.bfloat16().float())       # not rounded to bfloat16 itself
    # the test-time optimisation runs the network's convolutions in the precision it is given
    seen = []
    net.down[0][0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    mask = torch.ones_like(pair["fixed"])
    for precision in (torch.bfloat16, torch.float32):
        qa = tto.adapt(net, pair["fixed"], pair["moving"], mask, True, 1, 1e9, precision=precision)
        assert seen[-1] == precision and qa["precision"] == str(precision).replace("torch.", "")


def test_the_working_grid_keeps_to_the_voxel_budget_on_a_thin_slab():
    """A 40 mm slab (13 slices of 3 mm) across a 500 x 280 mm body: its thin axis is held at 32 voxels from the
    start, and the in-plane axes must still coarsen until the grid fits the budget (the inter-subject cases
    once ran at 2 mm, 8 times the budget, and reached 12 of their 100 iterations in 60 s)."""
    slab = Grid((13, 288, 512), np.diag([1.0, 1.0, 3.0, 1.0]))
    body = np.zeros(slab.shape, bool)
    body[:, 4:284, 6:506] = True
    budget = tto.MAX_VOXELS["cpu"]
    spacing = spacing_for_budget(slab, budget, 2.0, body)
    grid = working_grid(slab, spacing, region=body)
    assert grid.shape[0] == 32 and int(np.prod(grid.shape)) <= budget
    assert int(np.prod(working_grid(slab, spacing / 1.05, region=body).shape)) > budget     # the finest that fits
    # when every axis is down to its minimum, coarser spacings cannot help: the search stops there
    tiny = spacing_for_budget(slab, 1000, 2.0, body)
    assert working_grid(slab, tiny, region=body).shape == (32, 32, 32)


def test_test_time_optimisation_stops_at_its_iterations_or_its_time_budget():
    net = build(STUDENT)
    g = torch.Generator().manual_seed(1)
    pair = label_map_pair((16, 32, 32), g, torch.device("cpu"), same_contrast=True)
    mask = torch.ones_like(pair["fixed"])
    qa = tto.adapt(net, pair["fixed"], pair["moving"], mask, True, 100, 1e9)
    assert qa["iterations"] == 100 and qa["stopped_by"] == "iterations"
    assert qa["loss"][-1] < qa["loss"][0]                    # the pair's loss went down
    t0 = time.perf_counter()
    qa = tto.adapt(net, pair["fixed"], pair["moving"], mask, True, 100_000, 1.0)
    assert qa["stopped_by"] == "time budget" and 0 < qa["iterations"] < 100_000
    assert time.perf_counter() - t0 < 1.0 + 2.0              # the last iteration may finish after the budget


def test_the_adapted_weights_are_the_running_average_of_the_iterates():
    cpu = torch.device("cpu")
    pair = label_map_pair((16, 32, 32), torch.Generator().manual_seed(2), cpu, same_contrast=True)
    mask = torch.ones_like(pair["fixed"])
    start = tto.load_network("student", cpu)
    last, averaged = copy.deepcopy(start), copy.deepcopy(start)
    tto.adapt(last, pair["fixed"], pair["moving"], mask, True, 1, 1e9, weight_averaging=0.0)
    qa = tto.adapt(averaged, pair["fixed"], pair["moving"], mask, True, 1, 1e9)
    assert qa["weight_averaging"] == tto.WEIGHT_AVERAGING == 0.9
    moved = 0.0
    with torch.no_grad():
        for p0, p1, p_avg in zip(start.parameters(), last.parameters(), averaged.parameters()):
            moved = max(moved, float((p1 - p0).abs().max()))
            assert torch.allclose(p_avg, 0.9 * p0 + 0.1 * p1, atol=1e-8)
    assert moved > 1e-4                                      # the step did change the weights
    with pytest.raises(InputError, match="weight_averaging"):
        tto.adapt(last, pair["fixed"], pair["moving"], mask, True, 1, 1e9, weight_averaging=1.0)


class _FieldNet(torch.nn.Module):
    """A stand-in 'network' whose output is its one parameter, a displacement in voxels (1, 3, z, y, x)."""

    def __init__(self, u: torch.Tensor):
        super().__init__()
        self.u = torch.nn.Parameter(u.clone())

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return self.u


def test_the_folding_penalty_unfolds_a_field_that_the_images_ask_for():
    """The fixed image is the moving one warped by a folding field (det J down to -0.15), so the similarity
    keeps the fold (it deepens it, to about -0.2); the folding penalty (ours, on by default) removes it."""
    shape = (16, 16, 32)
    x = torch.arange(shape[2], dtype=torch.float32)
    u_fold = torch.zeros(1, 3, *shape)
    u_fold[0, 0] = 3.0 * torch.sin(2 * torch.pi * x / 16)            # along i: 1 + du/di down to 1 - 3 (2 pi / 16)
    moving = smooth_image(Grid(shape, np.eye(4)), seed=3).array
    moving = torch.from_numpy((moving - moving.min()) / np.ptp(moving)).float()[None, None]
    fixed = warp_voxels(moving, u_fold)
    mask = torch.ones_like(fixed)
    dets = {}
    for weight in (0.0, tto.FOLDING_WEIGHT):
        net = _FieldNet(u_fold)
        qa = tto.adapt(net, fixed, moving, mask, True, 60, 1e9, learning_rate=0.02, folding_weight=weight)
        assert qa["folding_weight"] == weight
        with torch.no_grad():
            dets[weight] = float(jacobian_determinants(net.u, torch.eye(3)).min())
    assert dets[0.0] < 0 < dets[tto.FOLDING_WEIGHT]


def test_the_test_time_mi_has_32_bins_unless_the_option_asks_for_others(monkeypatch):
    """32 bins by default (bench/README "TTORegister": 16, as in training, drifted across modalities); the
    ``mi_bins`` option reaches the loss."""
    seen = []
    real = tto.multi_axis_mi
    monkeypatch.setattr(tto, "multi_axis_mi",
                        lambda a, b, mask=None, bins=16: seen.append(bins) or real(a, b, mask, bins))
    pair = label_map_pair((16, 32, 32), torch.Generator().manual_seed(5), torch.device("cpu"), same_contrast=False)
    mask = torch.ones_like(pair["fixed"])
    qa = tto.adapt(build(STUDENT), pair["fixed"], pair["moving"], mask, False, 1, 1e9)
    assert seen == [32] and qa["mi_bins"] == 32
    img = smooth_image(Grid((32, 32, 32), np.diag([2.0, 2.0, 2.0, 1.0])), seed=4)
    result = tto.register(RegistrationCase(img, img), RegisterOptions(device="cpu", iterations=2,
                                                                         extra={"mi_bins": 24}))
    assert seen[1:] == [24, 24] and result.qa["mi_bins"] == 24


def test_a_bad_weight_averaging_folding_weight_mi_bins_or_precision_is_refused_before_the_prealignment(monkeypatch):
    monkeypatch.setattr(tto, "working_pair", lambda *a, **k: pytest.fail("the pair was prepared"))
    img = smooth_image(Grid((32, 32, 32), np.diag([2.0, 2.0, 2.0, 1.0])), seed=4)
    case = RegistrationCase(img, img)
    for bad in (1.0, -0.1, "fast", None):
        with pytest.raises(InputError, match=r"weight_averaging .*\[0, 1\)"):
            tto.register(case, RegisterOptions(device="cpu", extra={"weight_averaging": bad}))
    for bad in (-1.0, "strong", float("nan")):
        with pytest.raises(InputError, match=r"folding_weight .*>= 0"):
            tto.register(case, RegisterOptions(device="cpu", extra={"folding_weight": bad}))
    for bad in (1, 2.5, "many"):
        with pytest.raises(InputError, match=r"mi_bins is .*; give a whole number >= 2"):
            tto.register(case, RegisterOptions(device="cpu", extra={"mi_bins": bad}))
    with pytest.raises(InputError, match="unknown precision 'float16'; use auto, float32, bfloat16"):
        tto.register(case, RegisterOptions(device="cpu", extra={"precision": "float16"}))


def test_a_budget_of_zero_is_bad_input():
    for opts in (RegisterOptions(iterations=0), RegisterOptions(time_budget_s=0.0)):
        with pytest.raises(InputError, match="budget"):
            tto.check_budget(opts)
    assert tto.check_budget(RegisterOptions()) == (100, 60.0)
    grid = Grid.from_geometry((32, 32, 32), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0), np.eye(3))
    img = smooth_image(grid)                 # the network alone needs no optimisation budget
    result = tto.register(RegistrationCase(img, img), RegisterOptions(device="cpu", iterations=0, prealign="none",
                                                                      extra={"adapt": False}))
    assert not result.qa["adapted"] and "iterations" not in result.qa


def test_patch_mi_map_is_maximal_for_an_image_with_itself_and_drops_under_misalignment():
    grid = Grid.from_geometry((40, 44, 48), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    img = smooth_image(grid, seed=3)
    self_map, self_mean = patch_mi_map(img, img)
    shifted = img.with_array(np.roll(img.array, 5, axis=2))
    moved_map, moved_mean = patch_mi_map(img, shifted)
    assert self_map.array.shape == ((40 - 16) // 4 + 1, (44 - 16) // 4 + 1, (48 - 16) // 4 + 1)
    assert np.all(moved_map.array <= self_map.array + 1e-6) and moved_mean < 0.7 * self_mean
    # the map sits on the patch centres: spacing 4 voxels, first centre at index 7.5
    assert np.allclose(self_map.grid.spacing, 8.0) and np.allclose(self_map.affine[:3, 3], 15.0)
    mask = np.zeros(grid.shape, np.uint8)
    mask[:, :, :24] = 1
    masked, masked_mean = patch_mi_map(img, img, mask)
    assert (masked.array[:, :, -2:] == 0).all() and masked.array[:, :, 0].min() > 0
    with pytest.raises(ValueError, match="no patch centre"):
        patch_mi_map(img, img, np.zeros(grid.shape, np.uint8))


@pytest.fixture(scope="module")
def pelvis():
    return rt_phantom("pelvis", seed=13, spacing_mm=4.0, n_points=200)


def test_shipped_weights_are_in_the_manifest_with_their_training_commands():
    manifest = read_manifest()
    for name, role in (("tto_teacher.pt", "tto-teacher"), ("tto_student.pt", "tto-student")):
        assert manifest[name]["command"].startswith(f"rtreg train {role}")
        state, config = load_weights(name)
        build(config).load_state_dict(state)
    assert manifest["tto_student.pt"]["teacher_sha256"] == manifest["tto_teacher.pt"]["sha256"]


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_student_with_test_time_optimisation_registers_the_pelvis_phantom(pelvis, precision):
    from rtreg.device import _cpu_has_amx
    if precision == "bfloat16" and not _cpu_has_amx():
        pytest.skip("this CPU has no AMX: bfloat16 is emulated (about 18 s an iteration on a 2-core AMD EPYC, so "
                    "40 iterations ran past the 600 s budget) and --precision auto picks float32 here")
    case = RegistrationCase(pelvis.planning, pelvis.repeat)
    from rtreg.field import SpatialTransform
    result = tto.register(case, RegisterOptions(device="cpu", iterations=40, time_budget_s=600.0,
                                                extra={"max_voxels": 48 * 48 * 32, "precision": precision}))
    base = tre(SpatialTransform(result.prealignment).transform_points(pelvis.points_planning),
               pelvis.points_repeat)["mean"]
    after = tre(result.transform.transform_points(pelvis.points_planning), pelvis.points_repeat)["mean"]
    assert result.qa["iterations"] == 40 and result.qa["adapted"] and result.qa["prealign_metric"] == "ncc"
    assert result.qa["precision"] == precision
    assert after < 0.8 * base, (base, after)
    assert result.qa["patch_mi_mean_after"] > result.qa["patch_mi_mean_before"]
    assert set(result.maps) == {"patch_mi_before", "patch_mi_after"}
    assert result.transform.displacement.grid.same_as(pelvis.planning.grid)


def test_the_similarity_reads_the_moving_image_once_through_the_pre_alignment(pelvis, monkeypatch):
    """The test-time optimisation compares the fixed image with moving(A(x + u(x))) read from the moving
    image's own grid in one interpolation (``WorkingPair.warped``): with u = 0 it is the network's input (the
    moving image resampled through A) up to interpolation, and with u a whole-voxel shift it is that shift of
    it; a wrong direction of A or of u would fail both."""
    a = rigid_matrix((2.0, -1.0, 1.5), (3.3, -2.1, 1.2), pelvis.planning.grid.center())
    monkeypatch.setattr(tto, "prealign", lambda *args, **kwargs: a.copy())
    pair = tto.working_pair(RegistrationCase(pelvis.planning, pelvis.repeat),
                            RegisterOptions(device="cpu", extra={"max_voxels": 48 * 48 * 32}), torch.device("cpu"), [])
    inside = pair.mask > 0
    zero = torch.zeros(1, 3, *pair.grid.shape)
    spread = float(pair.moving[inside].std())
    assert float((pair.warped(zero) - pair.moving)[inside].abs().mean()) < 0.1 * spread
    one = zero.clone()
    one[:, 0] = 1.0                                          # one working voxel along i (x)
    shifted = pair.moving[..., 1:]                           # moving(A(x + 1 voxel)) on the working grid
    got = pair.warped(one)[..., :-1]
    assert float((got - shifted)[inside[..., :-1]].abs().mean()) < 0.1 * spread
    assert float((got - pair.moving[..., :-1])[inside[..., :-1]].abs().mean()) > \
        2 * float((got - shifted)[inside[..., :-1]].abs().mean())


def test_the_similarity_counts_only_where_both_images_have_data(pelvis, monkeypatch):
    """A planning slab of 8 slices against a repeat cropped in z elsewhere: the working grid (32 voxels at
    least along z) reaches far past both. The similarity's mask stops at the fixed image's edge (the widened
    body once reached 2 voxels into its fill), and the weight of where the moving image has data follows the
    field, every iteration (a sample pushed past the repeat's last slice reads its edge value, not anatomy)."""
    from rtreg.field import coverage
    from rtreg.image import crop_to_mask
    monkeypatch.setattr(tto, "prealign", lambda *args, **kwargs: np.eye(4))
    slab, part = (np.zeros(pelvis.planning.array.shape, bool) for _ in range(2))
    slab[20:28] = True
    part[14:26] = True
    fixed = crop_to_mask(pelvis.planning, slab, margin_mm=0.0)
    moving = crop_to_mask(pelvis.repeat, part, margin_mm=0.0)
    pair = tto.working_pair(RegistrationCase(fixed, moving),
                            RegisterOptions(device="cpu", extra={"max_voxels": 48 * 48 * 32}), torch.device("cpu"), [])
    counted = pair.mask[0, 0].numpy() > 0
    in_fixed = coverage(fixed.grid, np.eye(4), pair.grid).astype(bool)
    assert counted.any() and not (counted & ~in_fixed).any()
    zero = torch.zeros(1, 3, *pair.grid.shape)
    w = pair.inside(zero)[0, 0].numpy()
    in_moving = coverage(moving.grid, np.eye(4), pair.grid).astype(bool)
    assert (w[in_moving] > 0.999).all() and (w[counted & ~in_moving] < 1.0).all() and (counted & ~in_moving).any()
    far = zero.clone()
    far[:, 2] = -float(pair.grid.shape[0] + 2)            # every sample below the working grid, so below the repeat
    assert float(pair.inside(far).max()) == 0.0
    seen = []
    real_mi = tto.multi_axis_mi
    monkeypatch.setattr(tto, "multi_axis_mi",
                        lambda a, b, mask=None, bins=16: seen.append(mask.clone()) or real_mi(a, b, mask, bins))
    net = tto.load_network("student", torch.device("cpu"))
    tto.adapt(net, pair.fixed, pair.moving, pair.mask, False, 2, 1e9, warp_moving=pair.warped, inside=pair.inside)
    assert len(seen) == 2 and not (seen[0][0, 0].numpy()[~in_moving] > 0.999).any()      # the field's weight
    assert float(seen[0].sum()) < float(pair.mask.sum())


def test_a_repeat_that_does_not_overlap_the_planning_body_is_refused(pelvis, monkeypatch):
    far = np.eye(4)
    far[2, 3] = 5000.0                                      # the pre-alignment maps every fixed point 5 m away
    monkeypatch.setattr(tto, "prealign", lambda *args, **kwargs: far.copy())
    with pytest.raises(InputError, match="does not overlap"):
        tto.working_pair(RegistrationCase(pelvis.planning, pelvis.repeat),
                         RegisterOptions(device="cpu", extra={"max_voxels": 48 * 48 * 32}), torch.device("cpu"), [])


def _series(tmp_path, pelvis):
    """A 3-frame series: the planning image, then two known rigid motions of it (1 mm and 3 mm, 1-2 degrees)."""
    from rtreg.field import SpatialTransform, warp
    fixed = pelvis.planning
    centre = fixed.grid.index_to_world((np.array(fixed.grid.size_xyz)[None] - 1) / 2.0)[0]
    frames, motions = [fixed], [np.eye(4)]
    for rot, shift in (((0, 0, 1.0), (2.0, -1.0, 0.0)), ((2.0, 0, 0), (-3.0, 3.0, 2.0))):
        a = rigid_matrix(rot, shift, centre)
        frames.append(warp(fixed, SpatialTransform(np.linalg.inv(a)), fixed.grid, fill=-1000.0))
        motions.append(a)
    path = write_frames(frames, tmp_path / "series.nii.gz", np.int16)
    return path, motions


def test_a_4d_series_of_three_frames_comes_back_aligned(tmp_path, pelvis):
    from rtreg.field import SpatialTransform, warp
    from rtreg.pipeline import SimilarityReport
    from rtreg.priors import body_mask
    path, motions = _series(tmp_path, pelvis)
    frames = read_frames(path)
    assert len(frames) == 3 and frames[1].grid.same_as(pelvis.planning.grid)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "rtreg", "register-series", "--series", str(path),
                           "--reference-frame", "0", "--out", str(out), "--iterations", "15", "--device", "cpu"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "series.json").read_text())
    assert summary["n_frames"] == 3 and sorted(summary["frames"]) == ["1", "2"]
    warped = read_frames(out / "warped_series.nii.gz")
    ref = pelvis.planning.array.astype(float)
    body = ref > -400
    for k in (1, 2):
        f = summary["frames"][str(k)]
        assert f["similarity_after"]["ncc"] > f["similarity_before"]["ncc"] + 0.02
        err_before = np.abs(frames[k].array - ref)[body].mean()
        err_after = np.abs(warped[k].array - ref)[body].mean()
        # the best possible: the frame moved back by its true motion (resampling twice leaves ~14 HU here)
        exact = warp(frames[k], SpatialTransform(motions[k]), pelvis.planning.grid, fill=-1000.0).array
        err_floor = np.abs(exact - ref)[body].mean()
        assert err_after < err_floor + 0.3 * (err_before - err_floor), (k, err_before, err_floor, err_after)
        # NCC as the summary measures it (body of the reference); frame 2's motion cuts off part of the body,
        # so even the exact inverse stays below 1: 0.83 (matching that body to the fill ended at 0.77)
        similarity = SimilarityReport(pelvis.planning, body_mask(pelvis.planning))
        ncc_floor = similarity(pelvis.planning.with_array(exact))["ncc"]
        assert f["similarity_after"]["ncc"] > ncc_floor - 0.02, (k, ncc_floor, f["similarity_after"]["ncc"])
        assert (out / f"frame_{k:03d}" / "transform.h5").exists()
    assert np.array_equal(warped[0].array, frames[0].array)      # the reference frame is kept as it is
    assert [line.split()[0] for line in proc.stdout.splitlines()[1:3]] == ["1", "2"]   # the per-frame table


def test_dimensionality_is_checked_with_a_message(tmp_path, pelvis):
    path, _ = _series(tmp_path, pelvis)
    with pytest.raises(InputError, match="register-series"):
        read_volume(path)                                    # 4D where 3D is expected
    three_d = write_volume(pelvis.planning, tmp_path / "ct.nii.gz")
    with pytest.raises(InputError, match="4D series is needed"):
        read_frames(three_d)                                 # 3D where 4D is expected
    two_d = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkInt16), str(two_d))
    with pytest.raises(InputError, match="2D image"):
        read_volume(two_d)
    from rtreg.series import register_series
    with pytest.raises(InputError, match="reference frame 5 does not exist"):
        register_series(read_frames(path), 5, "tto", RegisterOptions(), tmp_path / "o")
    proc = subprocess.run([sys.executable, "-m", "rtreg", "register", "--method", "tto", "--fixed", str(three_d),
                           "--moving", str(three_d), "--out", str(tmp_path / "z"), "--time-budget", "0"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "budget" in proc.stderr and "Traceback" not in proc.stderr


def test_teacher_training_resumes_where_it_stopped_and_the_student_needs_the_teacher(tmp_path):
    from rtreg.train.tto import train
    common = dict(steps=3, threads=1, command="rtreg train tto-teacher --steps 3 (test)", log=lambda m: None)
    assert train("teacher", tmp_path / "a", stop_at=2, models_dir=tmp_path / "ma", **common) == \
        {"steps_done": 2, "steps": 3}
    train("teacher", tmp_path / "a", models_dir=tmp_path / "ma", **common)
    train("teacher", tmp_path / "b", models_dir=tmp_path / "mb", **common)
    a, _ = load_weights("tto_teacher.pt", tmp_path / "ma")
    b, _ = load_weights("tto_teacher.pt", tmp_path / "mb")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    with pytest.raises(InputError, match="missing"):
        train("student", tmp_path / "s", 2, models_dir=tmp_path / "empty", threads=1, log=lambda m: None)
    shutil.copytree(tmp_path / "ma", tmp_path / "ms")
    summary = train("student", tmp_path / "s", 2, models_dir=tmp_path / "ms", threads=1, log=lambda m: None,
                    command="rtreg train tto-student --steps 2 (test)")
    entry = read_manifest(tmp_path / "ms")["tto_student.pt"]
    assert entry["teacher_sha256"] == read_manifest(tmp_path / "ms")["tto_teacher.pt"]["sha256"]
    assert summary["role"] == "student"
