"""Speed of two hot paths, each beside the way it was done before, in the same run (2 threads):

1. ``rtreg.field.invert`` on the DCPT head CT resampled to 2 mm with a known weight-loss deformation (the
   case of ``Testing/test_mrml.py::test_logic_on_dcpt_phantom_with_rtstruct``), against the full-grid
   fixed-point iteration that preceded it (every point resampled by SimpleITK at each of 40 iterations):
   time, residual, and how far the two inverses differ.
2. ``rtreg.spatial.box_filter`` (shifted sums) against one-axis ``avg_pool3d`` kernels, forward + backward.

    python3 bench/inverse_and_box_speed.py          (needs ../shared/data/dcpt_headphantom; about 2 minutes)
"""
from __future__ import annotations

import time

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from rtreg.field import SpatialTransform, invert
from rtreg.image import Grid, read_volume, resample
from rtreg.spatial import box_filter
from rtreg.synth import deform_real_ct

DCPT = "../shared/data/dcpt_headphantom/DCPT_headphantom"


def full_grid_inverse(transform: SpatialTransform, grid: Grid, iterations: int = 40) -> np.ndarray:
    """The earlier inverse: x <- A^-1 y - u(x) on every point of ``grid`` for all ``iterations``, u sampled by
    ``sitk.Resample``; returns the (z, y, x, 3) inverse displacement (LPS mm)."""
    a_inv = np.linalg.inv(transform.affine)
    y = grid.world_points()
    z = y @ a_inv[:3, :3].T + a_inv[:3, 3]
    u_img, ref, v = transform.displacement.to_sitk(np.float64), grid.to_sitk_reference(), z - y
    for _ in range(iterations):
        v_img = sitk.GetImageFromArray(v, isVector=True)
        v_img.CopyInformation(ref)
        u_at_x = sitk.GetArrayFromImage(sitk.Resample(u_img, ref, sitk.DisplacementFieldTransform(v_img),
                                                      sitk.sitkLinear, 0.0))
        v = z - u_at_x - y
    return v


def avg_pool_box(x: torch.Tensor, size: int) -> torch.Tensor:
    """The earlier box filter: edge-replicated, one ``avg_pool3d`` per axis."""
    pad = size // 2
    x = F.pad(x, (pad,) * 6, mode="replicate")
    for kernel in ((size, 1, 1), (1, size, 1), (1, 1, size)):
        x = F.avg_pool3d(x, kernel, stride=1)
    return x


def timed_box(fn, x: torch.Tensor, size: int, repeats: int = 3) -> float:
    t = time.perf_counter()
    for _ in range(repeats):
        fn(x, size).sum().backward()
    return (time.perf_counter() - t) / repeats


def main() -> None:
    torch.set_num_threads(2)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
    ct = read_volume(DCPT)
    ct2 = resample(ct, ct.grid.with_spacing(2.0))
    case = deform_real_ct(ct2, "weight_loss", seed=5, amplitude_mm=6.0, n_points=50)
    work = case.repeat.grid.with_spacing(2.0)
    t = time.perf_counter()
    new = invert(case.truth, case.repeat.grid)
    t_new = time.perf_counter() - t
    t = time.perf_counter()
    old = full_grid_inverse(case.truth, work)
    t_old = time.perf_counter() - t
    d = np.linalg.norm(new.transform.displacement.array - old, axis=-1)
    print(f"inverse, DCPT at 2 mm, grid {work.shape}")
    print("| inverse | time | residual mean / max (judged points) |\n|---|---|---|")
    print(f"| rtreg.field.invert | {t_new:.1f} s | {new.residual_mean_mm:.4f} / {new.residual_max_mm:.4f} mm |")
    print(f"| full grid, 40 iterations | {t_old:.1f} s | - |")
    print(f"ratio {t_new / t_old:.2f}; difference mean {d.mean():.4f} mm, p99.9 {np.percentile(d, 99.9):.4f} mm, "
          f"{int((d > 0.05).sum())} of {d.size} points above 0.05 mm\n")
    print("| box filter, forward + backward | size | shifted sums | avg_pool3d | ratio |\n|---|---|---|---|---|")
    for shape in ((1, 1, 90, 100, 100), (1, 1, 200, 256, 256), (1, 12, 45, 50, 50)):
        for size in (3, 7):
            x = (torch.rand(shape) * 2 + 1).requires_grad_(True)
            a, b = timed_box(box_filter, x, size), timed_box(avg_pool_box, x, size)
            print(f"| {'x'.join(map(str, shape[1:]))} | {size} | {1000 * a:.0f} ms | {1000 * b:.0f} ms | {a / b:.2f} |")


if __name__ == "__main__":
    main()
