"""Coupled convex discrete optimisation of a displacement field from feature maps, then Adam (torch).

The stage GlideReg runs on its global and its local features (after Heinrich's
ConvexAdam, written here as small functions with units in the names):

1. :func:`patch_features`: features averaged over cubic patches of ``step``
   working voxels, one patch per control point of a coarse grid;
2. :func:`ssd_cost_volume`: the sum of squared feature differences for every
   candidate displacement of a control point, a cube of ``(2 r + 1)^3`` whole
   control-grid steps;
3. :func:`coupled_convex`: alternately the best candidate per control point and
   a smoothed field, the two coupled ever more strongly, so that the result is
   both data-driven and smooth (a global regulariser without gradient descent);
4. :func:`control_field_mm`: the field in LPS mm on the working grid;
5. :func:`adam_refine`: instance optimisation of that field on a smoothed
   control grid (weighted feature SSD + bending energy, optionally with features on
   the control grid learned jointly, :class:`CoarsePair`), which reaches what the discrete
   candidates cannot (sub-step motion);
6. :func:`inverse_consistent`: a forward and a backward field made inverse to
   each other (optional).

Shapes: features (1, C, z, y, x); cost (D, Z, Y, X) with D candidates;
displacements (1, 3, ...) with components (x, y, z) in LPS mm, as
:mod:`rtreg.spatial` uses them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .case import Progress, no_progress
from .image import Grid
from .spatial import box_filter, resize_field, sample_at_index

COUPLINGS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)   # per mm^2 of disagreement with the smoothed field


def patch_features(features: torch.Tensor, step: int) -> torch.Tensor:
    """(1, C, z, y, x) -> (1, C, z // step, y // step, x // step): the mean of each ``step``^3 patch."""
    return F.avg_pool3d(features, step, stride=step)


def candidate_offsets(radius: int, device: torch.device) -> torch.Tensor:
    """(D, 3) integer offsets (dx, dy, dz) in control-grid steps, D = (2 radius + 1)^3, z slowest."""
    r = torch.arange(-radius, radius + 1, device=device)
    dz, dy, dx = torch.meshgrid(r, r, r, indexing="ij")
    return torch.stack([dx.reshape(-1), dy.reshape(-1), dz.reshape(-1)], 1)


def ssd_cost_volume(fixed_patches: torch.Tensor, moving_patches: torch.Tensor, radius: int) -> torch.Tensor:
    """(D, Z, Y, X) mean squared feature difference between each fixed patch and the moving patch displaced by
    each candidate of :func:`candidate_offsets` (moving patches outside the image repeat the edge), smoothed
    over 3^3 neighbouring control points so that one noisy patch does not decide."""
    _, c, nz, ny, nx = fixed_patches.shape
    padded = F.pad(moving_patches, (radius,) * 6, mode="replicate")
    costs = []
    for dx, dy, dz in candidate_offsets(radius, fixed_patches.device).tolist():
        shifted = padded[:, :, radius + dz:radius + dz + nz, radius + dy:radius + dy + ny,
                         radius + dx:radius + dx + nx]
        costs.append(((fixed_patches - shifted) ** 2).mean(1))
    cost = torch.cat(costs, 0)
    return box_filter(cost[None], 3)[0]


def coupled_convex(cost: torch.Tensor, offsets_mm: torch.Tensor, couplings: Sequence[float] = COUPLINGS
                   ) -> torch.Tensor:
    """(D, Z, Y, X) cost and (D, 3) candidate displacements (LPS mm) -> (1, 3, Z, Y, X) smooth field (mm).

    Starts from the best candidate of every control point; then, for each coupling weight w (increasing),
    picks per point the candidate minimising cost + w |d - smooth(u)|^2 and smooths the choice again.
    """
    d, nz, ny, nx = cost.shape
    flat_cost = cost.reshape(d, -1)

    def smoothed(choice: torch.Tensor) -> torch.Tensor:
        u = offsets_mm[choice].T.reshape(1, 3, nz, ny, nx)
        return box_filter(u, 3)

    u_smooth = smoothed(flat_cost.argmin(0))
    for w in couplings:
        disagreement = ((offsets_mm[:, :, None] - u_smooth.reshape(1, 3, -1)) ** 2).sum(1)   # (D, N) mm^2
        u_smooth = smoothed((flat_cost + w * disagreement).argmin(0))
    return u_smooth


def control_field_mm(fixed_features: torch.Tensor, moving_features: torch.Tensor, grid: Grid, step: int,
                     radius: int, couplings: Sequence[float] = COUPLINGS) -> torch.Tensor:
    """The convex stage on one pair of feature maps on the working ``grid`` (axis-aligned or oblique):
    (1, 3, z, y, x) LPS mm field on that grid, searching up to ``radius * step`` voxels along each axis."""
    f_p, m_p = patch_features(fixed_features, step), patch_features(moving_features, step)
    if min(f_p.shape[2:]) < 2:
        raise ValueError(f"the image ({tuple(fixed_features.shape[2:])} voxels) is smaller than two control "
                         f"points of {step} voxels along an axis")
    cost = ssd_cost_volume(f_p, m_p, radius)
    steps = candidate_offsets(radius, cost.device).to(torch.float64) * step           # working voxels (i, j, k)
    offsets_mm = (steps @ torch.as_tensor(grid.affine[:3, :3], device=steps.device).T).to(torch.float32)   # LPS mm
    u_coarse = coupled_convex(cost, offsets_mm.to(cost.device), couplings)
    return _upsample_patch_field(u_coarse, fixed_features.shape[2:], step)


def _upsample_patch_field(u_coarse: torch.Tensor, shape_zyx, step: int) -> torch.Tensor:
    """Patch-centred coarse field -> the working grid (patch centres sit at (step - 1) / 2 + k step)."""
    nz, ny, nx = u_coarse.shape[2:]
    full = [n * step for n in (nz, ny, nx)]
    u = F.interpolate(u_coarse, size=full, mode="trilinear", align_corners=False)
    pad = [0, shape_zyx[2] - full[2], 0, shape_zyx[1] - full[1], 0, shape_zyx[0] - full[0]]
    u = F.pad(u, pad, mode="replicate")
    return resize_field(u, shape_zyx)


@dataclass
class CoarsePair:
    """A feature pair compared on the refinement's control grid (GlideReg's global features): ``fixed`` and
    ``moving`` (1, C, z, y, x) there, each seen through ``reduce`` (a per-voxel map to the compared channels,
    applied to (1, C, ...) feature vectors; the identity when the features are compared as they are). When
    the reduction is learned jointly (the VAE) it is differentiable in ``parameters`` (updated with the
    field), and its own loss ``penalty()`` (reconstruction + KL) is added to the objective; ``weight``
    scales their SSD. The moving features are sampled where the field points, then reduced."""

    fixed: torch.Tensor
    moving: torch.Tensor
    reduce: Callable[[torch.Tensor], torch.Tensor]
    penalty: Callable[[], torch.Tensor]
    parameters: Sequence[torch.Tensor]
    weight: float

    def features(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The reduced (fixed, moving) features on the control grid (1, C', z, y, x)."""
        return self.reduce(self.fixed), self.reduce(self.moving)


def adam_refine(pairs: Sequence[tuple], u_init: torch.Tensor, grid: Grid, weights: Sequence[float],
                bending_weight: float, iterations: int, lr_mm: float = 0.5, control_grid: Optional[Grid] = None,
                mask: Optional[torch.Tensor] = None, coarse_pair: Optional[CoarsePair] = None,
                control_mask: Optional[torch.Tensor] = None, time_budget_s: Optional[float] = None,
                samples: Optional[int] = None, seed: int = 0, folding_weight: float = 0.0,
                moving_frame: Optional[Tuple[Grid, np.ndarray]] = None, progress: Progress = no_progress
                ) -> Tuple[torch.Tensor, int]:
    """Instance optimisation after the convex stage: Adam on a residual field on ``control_grid`` (default:
    half the resolution of ``grid``, over the same extent), smoothed, added to ``u_init`` and upsampled to
    ``grid``, minimising sum_k weights[k] * SSD(fixed_k, moving_k(x + u)) on ``grid`` (inside ``mask``)
    + the ``coarse_pair``'s weight * SSD on the control grid (inside ``control_mask``) and its penalty, its
    parameters updated jointly + bending_weight * bending energy of the field on the control grid (1/mm)
    + folding_weight * :func:`rtreg.losses.folding_penalty` of that field (zero unless a cell shrinks below a
    tenth of its volume or folds; 0 leaves it out).

    SSD is the mean squared feature difference (over channels and the mask's voxels); with ``samples``, each
    SSD is estimated each step on that many voxels of its mask drawn at random (seeded by ``seed``:
    stochastic gradients, far cheaper on a fine grid). ``pairs``: (fixed, moving) feature maps (1, C, z, y, x),
    the fixed ones on ``grid``, the moving ones on ``grid`` too, or with ``moving_frame`` (moving grid, 4x4
    pre-alignment A: fixed LPS mm -> moving LPS mm) on the moving image's own grid, sampled at A(x + u(x)) in
    one interpolation (:func:`rtreg.spatial.warp_through`); ``u_init`` (1, 3, z, y, x) LPS mm on ``grid``. Stops
    after ``iterations`` or ``time_budget_s`` seconds. Returns the refined field on ``grid`` (mm, detached)
    and the iterations run."""
    from .losses import bending_energy, folding_penalty
    from .spatial import smooth, warp, warp_through
    start = time.perf_counter()
    control_grid = control_grid or grid.with_spacing(2.0 * float(max(grid.spacing)))
    shape, coarse = u_init.shape[2:], control_grid.shape
    base = u_init.detach()
    base_coarse = resize_field(base, coarse)       # both grids share the first and last voxel centres
    residual = torch.zeros(1, 3, *coarse, device=u_init.device, requires_grad=True)
    opt = torch.optim.Adam([residual], lr=lr_mm)
    feature_opt = torch.optim.Adam(list(coarse_pair.parameters), lr=1e-3) \
        if coarse_pair is not None and list(coarse_pair.parameters) else None
    control_spacing = [float(s) for s in control_grid.spacing]
    control_index_to_mm = torch.as_tensor(control_grid.affine[:3, :3], dtype=torch.float32, device=u_init.device)

    def ssd(fixed: torch.Tensor, moving: torch.Tensor, u: torch.Tensor, on: Grid, where: Optional[torch.Tensor],
            frame: Optional[Tuple[Grid, np.ndarray]] = None) -> torch.Tensor:
        warped = warp(moving, u, on) if frame is None else warp_through(moving, frame[0], frame[1], u, on)
        d = ((fixed - warped) ** 2).mean(1, keepdim=True)
        return d.mean() if where is None else (d * where).sum() / where.sum().clamp_min(1.0)

    sampler = _VoxelSampler(grid, coarse, mask, samples, seed, u_init.device, moving_frame) if samples else None
    coarse_sampler = _VoxelSampler(control_grid, coarse, control_mask, samples, seed + 1, u_init.device) \
        if samples and coarse_pair is not None else None
    done = 0
    for done in range(1, iterations + 1):
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            done -= 1
            break
        opt.zero_grad()
        step = smooth(residual)
        u_coarse = base_coarse + step
        loss = bending_weight * bending_energy(u_coarse, control_spacing)
        if folding_weight:
            loss = loss + folding_weight * folding_penalty(u_coarse, control_index_to_mm)
        if sampler is not None:
            flat, moved = sampler.draw(base, step)
            for w, (fixed, moving) in zip(weights, pairs):
                diff = fixed.flatten(2)[:, :, flat] - sample_at_index(moving, moved)
                loss = loss + w * (diff ** 2).mean()
        else:
            u = base + resize_field(step, shape)
            for w, (fixed, moving) in zip(weights, pairs):
                loss = loss + w * ssd(fixed, moving, u, grid, mask, moving_frame)
        if coarse_pair is not None:
            if feature_opt is not None:
                feature_opt.zero_grad()
            if coarse_sampler is not None:
                flat, moved = coarse_sampler.draw(base_coarse, step)
                diff = coarse_pair.reduce(coarse_pair.fixed.flatten(2)[:, :, flat]) \
                    - coarse_pair.reduce(sample_at_index(coarse_pair.moving, moved))
                global_ssd = (diff ** 2).mean()
            else:
                global_ssd = ssd(*coarse_pair.features(), u_coarse, control_grid, control_mask)
            loss = loss + coarse_pair.weight * global_ssd + coarse_pair.penalty()
        loss.backward()
        opt.step()
        if feature_opt is not None:
            feature_opt.step()
        progress(done / max(iterations, 1), f"Adam refinement {done}/{iterations}: loss {loss.item():.4f}")
    with torch.no_grad():
        return base + resize_field(smooth(residual), shape), done


class _VoxelSampler:
    """Random voxels of a mask on ``grid`` and where a field (a full-resolution start plus a residual on the
    control grid of shape ``coarse``, both grids over one extent) sends them, as continuous indices of
    ``grid`` or, with ``moving_frame`` (moving grid, 4x4 A: fixed LPS mm -> moving LPS mm), of the moving
    grid at A(x + u(x))."""

    def __init__(self, grid: Grid, coarse, mask: Optional[torch.Tensor], n: int, seed: int, device: torch.device,
                 moving_frame: Optional[Tuple[Grid, np.ndarray]] = None):
        shape = grid.shape
        where = mask[0, 0].reshape(-1) > 0 if mask is not None else torch.ones(int(np.prod(shape)), dtype=torch.bool)
        self.candidates = torch.nonzero(where.to(device)).squeeze(1)
        self.n, self.shape = min(n, len(self.candidates)), shape
        self.generator = torch.Generator().manual_seed(seed)
        target, a = moving_frame if moving_frame is not None else (grid, np.eye(4))
        to_index = np.linalg.inv(target.affine) @ np.asarray(a, np.float64)          # fixed mm -> target index
        index_map = to_index @ grid.affine                                              # fixed index -> target
        self.to_index = torch.as_tensor(to_index[:3, :3], dtype=torch.float32, device=device)
        self.index_rot = torch.as_tensor(index_map[:3, :3], dtype=torch.float32, device=device)
        self.index_shift = torch.as_tensor(index_map[:3, 3], dtype=torch.float32, device=device)
        self.scale = torch.tensor([(c - 1) / max(s - 1, 1) for c, s in zip(coarse[::-1], shape[::-1])],
                                  dtype=torch.float32, device=device)       # (i, j, k) -> control grid index

    def draw(self, base: torch.Tensor, residual: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(flat voxel numbers (n,), their moved continuous indices (1, n, 3) of the sampled features' grid)
        under base + upsampled residual."""
        pick = torch.randint(len(self.candidates), (self.n,), generator=self.generator)
        flat = self.candidates[pick.to(self.candidates.device)].sort().values   # in memory order: 3x faster sampling
        nz, ny, nx = self.shape
        ijk = torch.stack([flat % nx, (flat // nx) % ny, flat // (nx * ny)], 1).to(base.dtype)[None]   # (1, n, 3)
        u = base.flatten(2)[:, :, flat] + sample_at_index(residual, ijk * self.scale)                   # (1, 3, n) mm
        return flat, (ijk @ self.index_rot.T + self.index_shift) + (u[0].T @ self.to_index.T)[None]


def inverse_consistent(forward: torch.Tensor, backward: torch.Tensor, grid: Grid, iterations: int = 10
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Make a forward field (fixed -> moving) and a backward field (moving -> fixed), both (1, 3, z, y, x) LPS
    mm on ``grid``, inverse to each other: each is replaced by half of itself minus the other sampled where
    it points, repeatedly (ConvexAdam's scheme). Returns the two fields."""
    from .spatial import warp
    u, v = forward, backward
    for _ in range(iterations):
        u, v = 0.5 * (u - warp(v, u, grid)), 0.5 * (v - warp(u, v, grid))
    return u, v
