"""Registration quality numbers: point errors (mm), overlap and surface distances, similarity, Jacobians.

Masks are boolean/uint8 arrays (z, y, x) on one grid; ``spacing`` is (x, y, z) mm
as ``Grid.spacing`` gives it.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .image import Volume


def point_distances(points_estimated: np.ndarray, points_true: np.ndarray) -> np.ndarray:
    """Euclidean distance (mm) between corresponding rows of two (N, 3) LPS mm point sets."""
    return np.linalg.norm(np.asarray(points_estimated, float) - np.asarray(points_true, float), axis=1)


def tre(points_estimated: np.ndarray, points_true: np.ndarray) -> dict:
    """Target registration error of corresponding (N, 3) LPS mm point sets: mean, median, p95, max (mm)."""
    d = point_distances(points_estimated, points_true)
    return {"mean": float(d.mean()), "median": float(np.median(d)), "p95": float(np.percentile(d, 95)),
            "max": float(d.max()), "n": int(d.size)}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two masks on the same grid (1 = identical; two empty masks give 1)."""
    a, b = a > 0, b > 0
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2.0 * np.logical_and(a, b).sum() / s)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1))


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distances (mm) from each surface voxel of ``a`` to the surface of ``b`` and back (symmetric set)."""
    a, b = a > 0, b > 0
    if not a.any() or not b.any():
        raise ValueError("surface distance needs two non-empty masks")
    sampling = tuple(float(s) for s in reversed(list(spacing)))  # array axes are (z, y, x)
    sa, sb = _surface(a), _surface(b)
    dist_to_b = ndimage.distance_transform_edt(~sb, sampling=sampling)
    dist_to_a = ndimage.distance_transform_edt(~sa, sampling=sampling)
    return np.concatenate([dist_to_b[sa], dist_to_a[sb]])


def hd95(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> float:
    """95th percentile symmetric Hausdorff distance (mm)."""
    return float(np.percentile(surface_distances(a, b, spacing), 95))


def mean_surface_distance(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> float:
    """Mean symmetric surface distance (mm)."""
    return float(surface_distances(a, b, spacing).mean())


def relative_volume_difference(estimated: np.ndarray, reference: np.ndarray) -> float:
    """(V_est - V_ref) / V_ref, signed (same grid)."""
    ref = float((reference > 0).sum())
    if ref == 0:
        raise ValueError("the reference mask is empty")
    return float(((estimated > 0).sum() - ref) / ref)


def _masked(a: np.ndarray, b: np.ndarray, mask: Optional[np.ndarray]):
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    if mask is not None:
        m = mask > 0
        if not m.any():
            raise ValueError("the evaluation mask is empty")
        return a[m], b[m]
    return a.ravel(), b.ravel()


def ncc(a: np.ndarray, b: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Global normalised cross-correlation in [-1, 1] (inside ``mask`` if given)."""
    x, y = _masked(a, b, mask)
    x, y = x - x.mean(), y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else 0.0


def mse(a: np.ndarray, b: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Mean squared difference (image units squared) inside ``mask``."""
    x, y = _masked(a, b, mask)
    return float(np.mean((x - y) ** 2))


def ssim(a: np.ndarray, b: np.ndarray, mask: Optional[np.ndarray] = None, sigma_vox: float = 1.5,
         data_range: Optional[float] = None) -> float:
    """Mean structural similarity (3D Gaussian window of ``sigma_vox`` voxels) inside ``mask``."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    if data_range is None:
        data_range = float(max(a.max(), b.max()) - min(a.min(), b.min())) or 1.0
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    f = lambda x: ndimage.gaussian_filter(x, sigma_vox)  # noqa: E731
    mu_a, mu_b = f(a), f(b)
    var_a, var_b, cov = f(a * a) - mu_a ** 2, f(b * b) - mu_b ** 2, f(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s[mask > 0].mean() if mask is not None else s.mean())


def _quantised(a: np.ndarray, mask: Optional[np.ndarray], bins: int) -> np.ndarray:
    """Intensities -> bin numbers 0..bins-1, the 0.5-99.5 % range (inside ``mask``) spread over the bins."""
    values = a[mask > 0] if mask is not None else a.ravel()
    lo, hi = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
    x = np.clip((a.astype(np.float64) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    return np.minimum((x * bins).astype(np.int64), bins - 1)


def patch_mi_map(fixed: Volume, moving_on_fixed: Volume, mask: Optional[np.ndarray] = None, patch: int = 16,
                 stride: int = 4, bins: int = 16) -> Tuple[Volume, float]:
    """Patch-wise mutual information: the MI (nats) of the two images in every ``patch``^3-voxel cube, cubes
    every ``stride`` voxels; (map, mean).

    The map is a Volume on the grid of the cube centres (spacing ``stride`` x the image's, same direction),
    0 where the centre lies outside ``mask``; the mean is over the cubes whose centre is inside (all cubes
    without a mask). Joint histograms have ``bins`` x ``bins`` hard bins over each image's 0.5-99.5 %
    range, so the map of an image with itself is each cube's entropy, the largest MI any image can reach
    there."""
    if fixed.array.shape != moving_on_fixed.array.shape:
        raise ValueError(f"the images differ in shape {fixed.array.shape} vs {moving_on_fixed.array.shape}: "
                         "resample the moving image onto the fixed grid first")
    if min(fixed.array.shape) < patch:
        raise ValueError(f"the image {fixed.array.shape} is smaller than one {patch}-voxel patch")
    a, b = _quantised(fixed.array, mask, bins), _quantised(moving_on_fixed.array, mask, bins)
    win = (patch,) * 3
    wa = np.lib.stride_tricks.sliding_window_view(a, win)[::stride, ::stride, ::stride]
    wb = np.lib.stride_tricks.sliding_window_view(b, win)[::stride, ::stride, ::stride]
    nz, ny, nx = wa.shape[:3]
    out = np.zeros((nz, ny, nx), np.float32)
    offset = np.arange(ny * nx)[:, None] * bins * bins
    for z in range(nz):                               # one slab of cubes at a time keeps memory small
        joint_index = offset + wa[z].reshape(ny * nx, -1) * bins + wb[z].reshape(ny * nx, -1)
        joint = np.bincount(joint_index.ravel(), minlength=ny * nx * bins * bins).reshape(ny * nx, bins, bins)
        p = joint / float(patch ** 3)
        px, py = p.sum(2, keepdims=True), p.sum(1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, p * np.log(p / (px * py)), 0.0)
        out[z] = terms.sum((1, 2)).reshape(ny, nx)
    centres = (patch - 1) / 2.0 + stride * np.stack(np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx),
                                                                indexing="ij"), -1)
    inside = np.ones(out.shape, bool) if mask is None else \
        mask[tuple(np.round(centres[..., k]).astype(int) for k in range(3))] > 0
    if not inside.any():
        raise ValueError("no patch centre lies inside the mask; give a larger mask or none")
    out[~inside] = 0.0
    affine = fixed.affine.copy()
    affine[:3, 3] = fixed.grid.index_to_world(np.full((1, 3), (patch - 1) / 2.0))[0]
    affine[:3, :3] = fixed.affine[:3, :3] * stride
    return Volume(out, affine, {"name": "patch-wise MI", "units": "nats"}), float(out[inside].mean())


def jacobian_stats(jac: Volume, mask: Optional[np.ndarray] = None) -> dict:
    """Summary of a Jacobian determinant map (inside ``mask`` if given); % <= 0 is the folding rate."""
    j = jac.array[mask > 0] if mask is not None and np.any(mask) else jac.array.ravel()
    return {"jacobian_min": float(j.min()), "jacobian_max": float(j.max()), "jacobian_mean": float(j.mean()),
            "jacobian_std": float(j.std()), "percent_nonpositive_jacobian": float(100.0 * np.mean(j <= 0))}


def structure_metrics(estimated: np.ndarray, reference: np.ndarray, spacing: Sequence[float]) -> dict:
    """Dice, HD95, mean surface distance (mm) and relative volume difference of one structure."""
    out = {"dice": dice(estimated, reference), "relative_volume_difference": relative_volume_difference(
        estimated, reference)}
    if estimated.any():
        out["hd95_mm"] = hd95(estimated, reference, spacing)
        out["mean_surface_distance_mm"] = mean_surface_distance(estimated, reference, spacing)
    else:
        out["hd95_mm"] = out["mean_surface_distance_mm"] = float("inf")
    return out
