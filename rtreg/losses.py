"""Differentiable similarity and regularisation terms (torch).

Images are (1, C, z, y, x) tensors with intensities scaled to about [0, 1];
masks are (1, 1, z, y, x) in {0, 1} (or soft weights). Similarities are
returned as "higher is better" values; a loss is their negative. Fields are
(1, 3, z, y, x) LPS mm; ``spacing`` is the grid's (x, y, z) voxel size in mm,
so regularisers are per mm and do not depend on the working resolution.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .spatial import box_filter


def _weighted_mean(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return x.mean()
    m = mask.expand_as(x)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def ncc_global(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Normalised cross-correlation over the whole image (or ``mask``), in [-1, 1]."""
    w = torch.ones_like(a) if mask is None else mask.expand_as(a)
    n = w.sum().clamp_min(1.0)
    ma, mb = (a * w).sum() / n, (b * w).sum() / n
    da, db = (a - ma) * w, (b - mb) * w
    return (da * db).sum() / torch.sqrt((da * da).sum() * (db * db).sum() + 1e-10)


def ncc_local(a: torch.Tensor, b: torch.Tensor, window: int = 7, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean local squared NCC in cubic windows of ``window`` voxels (voxelmorph's LNCC), in [0, 1]."""
    def box(x):
        return box_filter(x, window)

    ma, mb = box(a), box(b)
    var_a = (box(a * a) - ma * ma).clamp_min(0)
    var_b = (box(b * b) - mb * mb).clamp_min(0)
    cov = box(a * b) - ma * mb
    cc = cov * cov / (var_a * var_b + 1e-9)
    return _weighted_mean(cc, mask)


PARZEN_SUPPORT_BINS = 6.0     # the Parzen kernel is zero beyond this many bins (its widths) from a sample


def _parzen_weights(x: torch.Tensor, bins: int) -> torch.Tensor:
    """(...) intensities in [0, 1] -> (..., bins) Gaussian Parzen weights (width one bin) summing to 1.

    The Gaussian is truncated at :data:`PARZEN_SUPPORT_BINS` widths and lowered by its value there
    (exp(-18), 1.5e-8), so it reaches zero continuously. The untruncated tails fell to subnormal floats
    (below 1.2e-38 from 13 bins away), which x86 CPUs process far more slowly: a 60,000-sample MI and its
    gradient took three times as long (``python3 bench/mi_speed.py``)."""
    centres = torch.linspace(0, 1, bins, device=x.device)
    z2 = ((x.clamp(0, 1)[..., None] - centres) * (bins - 1)) ** 2
    floor = math.exp(-0.5 * PARZEN_SUPPORT_BINS ** 2)
    w = (torch.exp(-0.5 * z2.clamp_max(PARZEN_SUPPORT_BINS ** 2)) - floor).clamp_min(0)
    return w / w.sum(-1, keepdim=True).clamp_min(1e-10)


def _mi_of_joint(joint: torch.Tensor) -> torch.Tensor:
    """MI (nats) of (..., bins, bins) joint histograms normalised to sum to 1 over the last two axes."""
    px, py = joint.sum(-1, keepdim=True), joint.sum(-2, keepdim=True)
    return (joint * (torch.log(joint + 1e-10) - torch.log(px * py + 1e-10))).sum((-2, -1))


def mutual_information(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None, bins: int = 32,
                       max_samples: int = 200_000, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Parzen-window mutual information (nats) of intensities in [0, 1].

    Gaussian kernels of width one bin; at most ``max_samples`` voxels (random,
    reproducible with ``generator``) are used.
    """
    x, y = a.reshape(-1), b.reshape(-1)
    if mask is not None:
        keep = mask.expand_as(a).reshape(-1) > 0.5
        x, y = x[keep], y[keep]
    if x.numel() > max_samples:
        idx = torch.randperm(x.numel(), generator=generator, device="cpu")[:max_samples].to(x.device)
        x, y = x[idx], y[idx]
    joint = _parzen_weights(x, bins).T @ _parzen_weights(y, bins) / max(x.numel(), 1)
    return _mi_of_joint(joint)


def multi_axis_mi(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None,
                  bins: int = 16) -> torch.Tensor:
    """Multi-axis mutual information (nats): the MI of each pair of corresponding slices along each of the
    three axes, averaged over slices (weighted by their voxels inside ``mask``) and then over the axes.

    a, b: (B, 1, z, y, x) intensities in [0, 1]; mask (B, 1, z, y, x) or None; the batch is averaged.
    Slice-wise histograms keep MI sensitive to spatially varying intensity relations (bias fields, local
    contrast) that one global histogram washes out. The joint histograms of the z and y slices are sums of
    those of the lines along x (one batched product), the x slices' one contraction over (z, y)."""
    total = a.new_zeros(())
    for k in range(a.shape[0]):
        wa, wb = _parzen_weights(a[k, 0], bins), _parzen_weights(b[k, 0], bins)      # (z, y, x, bins)
        if mask is not None:
            wa = wa * mask[k, 0][..., None]
        nz, ny, nx = wa.shape[:3]
        la, lb = wa.reshape(nz * ny, nx, bins), wb.reshape(nz * ny, nx, bins)
        lines = (la.transpose(1, 2) @ lb).reshape(nz, ny, bins, bins)             # each x line's joint histogram
        for joint in (lines.sum(1), lines.sum(0), torch.einsum("lxa,lxb->xab", la, lb)):   # z, y, x slices
            mass = joint.sum((1, 2))
            mi = _mi_of_joint(joint / mass.clamp_min(1e-10)[:, None, None])
            total = total + (mi * mass).sum() / mass.sum().clamp_min(1e-10) / 3
    return total / a.shape[0]


def _shift(x: torch.Tensor, offset: Sequence[int]) -> torch.Tensor:
    """x(p + offset) with edge replication; offset in voxels (dz, dy, dx)."""
    p = max(abs(o) for o in offset)
    xp = F.pad(x, (p,) * 6, mode="replicate")
    z, y, w = x.shape[2:]
    dz, dy, dx = offset
    return xp[:, :, p + dz:p + dz + z, p + dy:p + dy + y, p + dx:p + dx + w]


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptor (Heinrich et al. 2013): (1, 1, z, y, x) -> (1, 12, z, y, x).

    Patch distances between the 12 pairs of six-neighbourhood voxels at distance
    sqrt(2) * ``dilation``, box-filtered over (2 * radius + 1)^3 patches,
    turned into exp(-D / V) with V their mean, and scaled so the largest
    channel is 1. Invariant to monotone-affine intensity changes up to noise.
    """
    six = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    pairs = [(p, q) for a, p in enumerate(six) for b, q in enumerate(six)
             if a < b and sum((pi - qi) ** 2 for pi, qi in zip(p, q)) == 2]
    k = 2 * radius + 1
    dist = []
    for p, q in pairs:
        d = (_shift(image, [dilation * v for v in p]) - _shift(image, [dilation * v for v in q])) ** 2
        dist.append(box_filter(d, k))
    dist = torch.cat(dist, dim=1)
    var = dist.mean(1, keepdim=True)
    var = var.clamp(min=var.mean() * 1e-3 + 1e-8, max=var.mean() * 1e3 + 1e-8)
    mind = torch.exp(-dist / var)
    return mind / mind.amax(1, keepdim=True).clamp_min(1e-8)


def _gradients(u: torch.Tensor, spacing: Sequence[float]):
    """Forward differences of a field per mm along x, y, z (cropped to a common shape)."""
    sx, sy, sz = [float(s) for s in spacing]
    gx = (u[:, :, :, :, 1:] - u[:, :, :, :, :-1]) / sx
    gy = (u[:, :, :, 1:, :] - u[:, :, :, :-1, :]) / sy
    gz = (u[:, :, 1:, :, :] - u[:, :, :-1, :, :]) / sz
    return gx, gy, gz


def diffusion(u: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """Mean squared first derivative of the field (unitless, mm/mm)."""
    gx, gy, gz = _gradients(u, spacing)
    return (gx.pow(2).mean() + gy.pow(2).mean() + gz.pow(2).mean())


def bending_energy(u: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """Mean squared second derivatives (thin-plate bending energy, 1/mm)."""
    gx, gy, gz = _gradients(u, spacing)
    gxx, gxy, gxz = _gradients(gx, spacing)
    _, gyy, gyz = _gradients(gy, spacing)
    _, _, gzz = _gradients(gz, spacing)
    return (gxx.pow(2).mean() + gyy.pow(2).mean() + gzz.pow(2).mean()
            + 2 * (gxy.pow(2).mean() + gxz.pow(2).mean() + gyz.pow(2).mean()))


def jacobian_determinants(u: torch.Tensor, index_to_mm: torch.Tensor) -> torch.Tensor:
    """det(d(x + u)/dx) of a field (1, 3, z, y, x) LPS mm at each of the 8 corners of every grid cell, from the
    cell's three edges that meet there (one-sided differences): (8, z-1, y-1, x-1).

    A field whose determinants are positive at every corner of every cell keeps the orientation of each cell
    (not only with forward differences, which a field can satisfy while its trilinear interpolant folds).
    ``index_to_mm``: the grid's direction @ diag(spacing) (3x3; the affine's linear part), so oblique grids
    are handled. Values <= 0 mark folding (:func:`rtreg.field.jacobian_determinant` is the central-difference
    one, for reporting)."""
    to_world = torch.linalg.inv(index_to_mm.to(torch.float64)).tolist()             # d index / d mm
    edges = [u[0, :, :, :, 1:] - u[0, :, :, :, :-1],                                # along i, j, k: (3, ...)
             u[0, :, :, 1:, :] - u[0, :, :, :-1, :],
             u[0, :, 1:, :, :] - u[0, :, :-1, :, :]]
    nz, ny, nx = (n - 1 for n in u.shape[2:])
    identity = torch.eye(3, dtype=u.dtype, device=u.device)
    dets = []
    for ck in (0, 1):
        for cj in (0, 1):
            for ci in (0, 1):          # the corner (ci, cj, ck) of each cell: its three edges from there
                d_index = (edges[0][:, ck:ck + nz, cj:cj + ny, :], edges[1][:, ck:ck + nz, :, ci:ci + nx],
                           edges[2][:, :, cj:cj + ny, ci:ci + nx])
                # j[w][c] = d(x + u)_c / d x_w: the column w of the Jacobian, a (3, z, y, x) tensor
                j = [sum(d * to_world[a][w] for a, d in enumerate(d_index) if to_world[a][w] != 0.0)
                     + identity[:, w].view(3, 1, 1, 1) for w in range(3)]          # (axis-aligned: one term)
                (a0, a1, a2), (b0, b1, b2), (c0, c1, c2) = j                          # columns x, y, z
                dets.append(a0 * (b1 * c2 - b2 * c1) - b0 * (a1 * c2 - a2 * c1) + c0 * (a1 * b2 - a2 * b1))
    return torch.stack(dets)


def folding_penalty(u: torch.Tensor, index_to_mm: torch.Tensor, floor: float = 0.1) -> torch.Tensor:
    """Mean of max(0, ``floor`` - det J)^2 over the corners of the grid's cells (:func:`jacobian_determinants`;
    unitless): zero for a field that nowhere shrinks a volume below ``floor`` of its size, growing as it folds.

    The determinants are first computed without the autograd graph: where none is below ``floor`` (the usual
    case) the exact value, 0 with a zero gradient, is returned without the far dearer differentiable pass."""
    with torch.no_grad():
        if bool((jacobian_determinants(u, index_to_mm) >= floor).all()):
            return u.new_zeros(())
    return F.relu(floor - jacobian_determinants(u, index_to_mm)).pow(2).mean()


def divergence_penalty(u: torch.Tensor, spacing: Sequence[float], direction=None) -> torch.Tensor:
    """Mean squared divergence of the field (near-incompressibility), for fields on axis-aligned grids.

    ``direction`` (3x3, columns = grid axes in LPS) rotates the vectors into grid axes first.
    """
    if direction is not None:
        r = torch.as_tensor(direction, dtype=u.dtype, device=u.device)
        u = torch.einsum("ca,bczyx->bazyx", r, u)
    gx, _, _ = _gradients(u[:, 0:1], spacing)
    _, gy, _ = _gradients(u[:, 1:2], spacing)
    _, _, gz = _gradients(u[:, 2:3], spacing)
    div = gx[:, :, 1:, 1:, :] + gy[:, :, 1:, :, 1:] + gz[:, :, :, 1:, 1:]
    return div.pow(2).mean()
