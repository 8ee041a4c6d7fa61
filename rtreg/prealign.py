"""Pre-alignment: centre of mass, then multi-resolution rigid / affine optimisation in torch.

Returns a 4x4 matrix A mapping a fixed point to a moving point (LPS mm):
the affine part of the engine's transform (``field.SpatialTransform``).
Similarity: global NCC within a modality, Parzen mutual information across.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .case import Progress, no_progress
from .image import Volume, normalize_intensity, resample, smooth_for_downsampling
from .losses import mutual_information, ncc_global
from .spatial import sample_at_index, to_tensor, world_to_index_torch

KINDS = ("none", "com", "moments", "rigid", "affine", "quiz")
OVERLAP_MARGIN_MM = 4.0    # after the first level: samples mapped at least this far inside the moving image
MOVING_SAMPLES = 20_000    # moving-mask samples that say how much of the moving body the fixed image still sees
FIT_TOLERANCE = 1.5        # the moving body "fits" the fixed view along an axis up to this ratio of lengths
# (the inter-subject abdomen 484 mm wide with its arms in a 363 mm view fits: with 1.25 its slab tilted 15 degrees)


def center_of_mass(volume: Volume, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Intensity-weighted centre (LPS mm) of ``mask`` (or of the whole image above its minimum)."""
    w = (mask > 0).astype(np.float64) if mask is not None else (volume.array - volume.array.min()).astype(np.float64)
    if w.sum() <= 0:
        return volume.grid.center()
    k, j, i = [np.sum(w * g) / w.sum() for g in np.meshgrid(*[np.arange(n) for n in w.shape], indexing="ij")] \
        if w.size < 2e6 else _com_by_axes(w)
    return volume.grid.index_to_world(np.array([[i, j, k]]))[0]


def _com_by_axes(w: np.ndarray):
    total = w.sum()
    return [float(np.sum(w.sum(axis=tuple(a for a in range(3) if a != ax)) * np.arange(w.shape[ax])) / total)
            for ax in range(3)]


def _principal_axes(volume: Volume, mask: np.ndarray):
    """Centroid (LPS mm), principal axes (columns) and their variances (mm^2) of ``mask``, at most 200k voxels."""
    idx = np.argwhere(mask > 0)
    if len(idx) > 200_000:
        idx = idx[np.linspace(0, len(idx) - 1, 200_000).astype(int)]
    pts = volume.grid.index_to_world(idx[:, ::-1].astype(np.float64))
    c = pts.mean(0)
    w, v = np.linalg.eigh(np.cov((pts - c).T))
    return c, v[:, ::-1], w[::-1]


def _rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest rotation taking unit vector ``a`` to unit vector ``b``."""
    v, c = np.cross(a, b), float(np.dot(a, b))
    if np.linalg.norm(v) < 1e-12:
        if c > 0:
            return np.eye(3)
        perp = np.cross(a, [1.0, 0, 0] if abs(a[0]) < 0.9 else [0, 1.0, 0])
        perp /= np.linalg.norm(perp)
        return 2 * np.outer(perp, perp) - np.eye(3)
    k = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + k + k @ k / (1 + c)


def moments_initialisation(fixed: Volume, moving: Volume, fixed_mask: np.ndarray, moving_mask: np.ndarray
                           ) -> np.ndarray:
    """Centre of mass plus the rotation that matches the masks' principal axes (fixed -> moving).

    Only axes whose variances differ by more than 10 % are trusted: all three give the full rotation
    (the proper sign choice whose mapped fixed mask overlaps the moving mask most is kept); only the
    first (an elongated body, as an axial CT of the trunk) gives the smallest rotation that aligns it;
    none (a round body) gives the centre-of-mass translation alone.
    """
    cf, vf, wf = _principal_axes(fixed, fixed_mask)
    cm, vm, wm = _principal_axes(moving, moving_mask)
    gaps = np.minimum((wf[:2] - wf[1:]) / wf[:2], (wm[:2] - wm[1:]) / wm[:2])
    if gaps[0] < 0.1:
        return translation(cm - cf)
    if gaps[1] >= 0.1:
        candidates = []
        for signs in ((1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1)):
            r = vm @ np.diag(signs) @ vf.T
            candidates.append(r if np.linalg.det(r) > 0 else vm @ np.diag(signs) @ np.diag([1, 1, -1]) @ vf.T)
    else:
        candidates = [_rotation_between(vf[:, 0], s * vm[:, 0]) for s in (1, -1)]
    sample = fixed.grid.index_to_world(np.argwhere(fixed_mask > 0)[::97, ::-1].astype(np.float64))
    scored = []
    for r in candidates:
        a = np.eye(4)
        a[:3, :3] = r
        a[:3, 3] = cm - r @ cf
        idx = np.round(moving.grid.world_to_index(sample @ r.T + a[:3, 3])).astype(int)
        ok = np.all((idx >= 0) & (idx < np.array(moving.grid.size_xyz)), axis=1)
        scored.append((float(moving_mask[idx[ok, 2], idx[ok, 1], idx[ok, 0]].sum()) / len(sample), a))
    best = max(s for s, _ in scored)
    # a symmetric body overlaps as well when flipped: among near-ties keep the smallest rotation
    return max((a for s, a in scored if s >= 0.98 * best), key=lambda a: np.trace(a[:3, :3]))


def translation(offset: np.ndarray) -> np.ndarray:
    a = np.eye(4)
    a[:3, 3] = offset
    return a


def _rotation(rotvec: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula, differentiable at 0."""
    theta2 = (rotvec * rotvec).sum() + 1e-12
    theta = torch.sqrt(theta2)
    zero = torch.zeros((), dtype=rotvec.dtype, device=rotvec.device)
    x, y, z = rotvec
    k = torch.stack([torch.stack([zero, -z, y]), torch.stack([z, zero, -x]), torch.stack([-y, x, zero])])
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device)
    return eye + torch.sin(theta) / theta * k + (1 - torch.cos(theta)) / theta2 * (k @ k)


class _Samples:
    """Fixed-image samples (values, LPS points inside the fixed mask) and the moving image, both normalised and
    smoothed for a level of ``spacing_mm``; ``similarity`` scores a fixed->moving matrix on them.

    The samples are up to ``max_points`` random level voxels of the fixed mask. ``off_grid``: each is moved by
    a uniform offset within its voxel (values interpolated), so the samples do not lie on the level's grid.
    On-grid samples make the similarity favour transforms that put them on the moving image's grid as well
    (the interpolation artefact), which biased the optimum by up to 1 mm on the benchmark's 3 mm images."""

    def __init__(self, f_norm: Volume, m_norm: Volume, fixed_mask: Optional[np.ndarray], spacing_mm: float,
                 gen: torch.Generator, max_points: int, device: torch.device, off_grid: bool = False,
                 moving_mask: Optional[np.ndarray] = None):
        fg = f_norm.grid.with_spacing(spacing_mm)
        self.fg, self.f_size = fg, torch.tensor(fg.size_xyz, dtype=torch.float32, device=device)
        f_lvl = resample(smooth_for_downsampling(f_norm, spacing_mm), fg)
        mk = (resample(f_norm.with_array(fixed_mask), fg, "mask").array > 0 if fixed_mask is not None
              else np.ones(fg.shape, bool))
        pts_idx = np.argwhere(mk)
        if len(pts_idx) > max_points:
            pick = torch.randperm(len(pts_idx), generator=gen)[:max_points].numpy()
            pts_idx = pts_idx[np.sort(pick)]
        xyz = pts_idx[:, ::-1].astype(np.float64)
        if off_grid:
            jitter = torch.rand(len(pts_idx), 3, generator=gen, dtype=torch.float64).numpy() - 0.5
            xyz = np.clip(xyz + jitter, 0, np.array(fg.size_xyz) - 1)
            self.vals = sample_at_index(to_tensor(f_lvl.array, device),
                                        torch.as_tensor(xyz, dtype=torch.float32, device=device)[None])[0, 0]
        else:
            self.vals = torch.as_tensor(f_lvl.array[tuple(pts_idx.T)], dtype=torch.float32, device=device)
        self.pts = torch.as_tensor(fg.index_to_world(xyz), dtype=torch.float32, device=device)
        self.mg = m_norm.grid.with_spacing(spacing_mm)
        self.m_t = to_tensor(resample(smooth_for_downsampling(m_norm, spacing_mm), self.mg).array, device)
        self.size = torch.tensor(self.mg.size_xyz, dtype=torch.float32, device=device)
        self.m_pts = None
        self.seen_axes = torch.ones(3, dtype=torch.bool, device=device)   # fixed axes whose view counts
        if moving_mask is not None:
            m_idx = np.argwhere(resample(m_norm.with_array(moving_mask), self.mg, "mask").array > 0)
            if len(m_idx) > MOVING_SAMPLES:     # a generator of their own: the fixed samples stay as they were
                own = torch.Generator().manual_seed(gen.initial_seed())
                m_idx = m_idx[np.sort(torch.randperm(len(m_idx), generator=own)[:MOVING_SAMPLES].numpy())]
            if len(m_idx):
                m_world = self.mg.index_to_world(m_idx[:, ::-1].astype(np.float64))
                self.seen_axes = self._fits_fixed_view(m_world)
                if bool(self.seen_axes.any()):
                    self.m_pts = torch.as_tensor(m_world, dtype=torch.float32, device=device)

    def _fits_fixed_view(self, m_world: np.ndarray) -> torch.Tensor:
        """Per fixed index axis (i, j, k): whether the moving body (LPS points, mm), measured along that axis's
        direction, is at most ``FIT_TOLERANCE`` times as long as the fixed image's view (size x spacing).

        Along an axis where the fixed image is the cropped one (a CBCT or a shorter scan as the fixed image),
        the moving body cannot be all in view at the true pose; counting that loss biased the rigid fit of a
        pelvis CT to a 30 mm slab of itself (0.8 mm and 0.7 degrees off; 0.2 mm and 0.1 degrees without)."""
        along = m_world @ self.fg.direction                                  # (N, 3) mm along the fixed axes
        extent = along.max(0) - along.min(0)
        view = np.asarray(self.fg.size_xyz, dtype=np.float64) * self.fg.spacing
        return torch.as_tensor(extent <= FIT_TOLERANCE * view, device=self.f_size.device)

    def moving_index(self, m_total: torch.Tensor, t_total: torch.Tensor) -> torch.Tensor:
        """(N, 3) continuous (i, j, k) indices in the moving level grid of the samples mapped by the matrix."""
        return world_to_index_torch(self.pts @ m_total.T + t_total, self.mg)

    def keep_overlap(self, m_total: torch.Tensor, t_total: torch.Tensor, margin_mm: float,
                     min_points: int = 1000) -> None:
        """Keep only the samples that the matrix maps at least ``margin_mm`` inside the moving image (when at
        least ``min_points`` do). With a fixed set of samples the similarity cannot improve by moving
        samples in or out of a partial overlap (global NCC and MI change with the set they are computed on,
        which pulled the optimum towards more overlap on the cropped fields of view)."""
        with torch.no_grad():
            idx = self.moving_index(m_total, t_total)
            margin = margin_mm / float(np.mean(self.mg.spacing))
            keep = ((idx > margin - 0.5) & (idx < self.size - 0.5 - margin)).all(-1)
        if int(keep.sum()) >= min_points:
            self.pts, self.vals = self.pts[keep], self.vals[keep]

    def moving_seen(self, m_total: torch.Tensor, t_total: torch.Tensor) -> torch.Tensor:
        """Soft fraction (0-1, differentiable) of the moving-mask samples that the inverse of the matrix maps
        inside the fixed image; 1 without a moving mask.

        The similarity is computed on the fixed samples that land inside the moving image, so a pose that
        pushes part of the moving body out of the fixed image's view can score higher on the band that
        remains: a rigid fit of a 40 mm slab tilted it by 25 degrees. Where the repeat image is the cropped
        one (a CBCT, a shorter scan), its body stays in the fixed view at the true pose, so this fraction
        does not favour a larger overlap there. Only the fixed axes along which the moving body fits the
        fixed view count (:meth:`_fits_fixed_view`); 1 when it fits along none."""
        if self.m_pts is None:
            return torch.ones((), device=self.f_size.device)
        back = (self.m_pts - t_total) @ torch.linalg.inv(m_total).T
        idx = world_to_index_torch(back, self.fg)
        # 1 inside and up to one voxel beyond the image's edge, 0 from two voxels beyond: no pull on a body
        # that reaches the edge of the view, as a CT's body does at its first and last slices
        soft = torch.sigmoid(4.0 * (idx + 1.5)) * torch.sigmoid(4.0 * (self.f_size + 0.5 - idx))
        return torch.where(self.seen_axes, soft, torch.ones_like(soft)).prod(-1).mean()

    def similarity(self, m_total: torch.Tensor, t_total: torch.Tensor, similarity: str, gen: torch.Generator):
        """(similarity, fraction of the fixed samples that land inside the moving image)."""
        idx = self.moving_index(m_total, t_total)
        inside = ((idx > -0.5) & (idx < self.size - 0.5)).all(-1).float()
        sampled = sample_at_index(self.m_t, idx[None])[0, 0]
        if similarity == "mi":
            sim = mutual_information(self.vals[None, None], sampled[None, None], inside[None, None], generator=gen)
        else:
            sim = ncc_global(self.vals, sampled, inside)
        return sim, inside.mean()


class _Adam:
    """Adam (Kingma and Ba) on a few parameter tensors, updated in place, with a learning rate per tensor.

    Not ``torch.optim``: a process's first optimiser from there imports ``torch._dynamo`` (about 1.3 s on
    2 cores), longer than the whole rigid optimisation it would drive."""

    def __init__(self, params: Sequence[torch.Tensor], betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8):
        self.params, self.betas, self.eps, self.t = list(params), tuple(betas), eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor], lrs: Sequence[float]) -> None:
        self.t += 1
        b1, b2 = self.betas
        for p, g, m, v, lr in zip(self.params, grads, self.m, self.v, lrs):
            # torch's single-tensor Adam, operation for operation: the same numbers to the last bit
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / (1 - b2 ** self.t) ** 0.5).add_(self.eps)
            p.addcdiv_(m, denom, value=-(lr / (1 - b1 ** self.t)))


def best_start(fixed: Volume, moving: Volume, candidates: Sequence[np.ndarray],
               fixed_mask: Optional[np.ndarray] = None, moving_mask: Optional[np.ndarray] = None,
               similarity: str = "ncc", spacing_mm: float = 8.0, seed: int = 0) -> np.ndarray:
    """The candidate 4x4 fixed->moving start whose similarity, weighted by the fraction of the fixed mask it
    keeps inside the moving image, is highest at ``spacing_mm`` (e.g. identity against the centre-of-mass
    shift: identity wins when the images share coordinates but not their field of view)."""
    gen = torch.Generator().manual_seed(seed)
    samples = _Samples(fixed.with_array(normalize_intensity(fixed, fixed_mask)),
                       moving.with_array(normalize_intensity(moving, moving_mask)), fixed_mask, spacing_mm, gen,
                       60_000, torch.device("cpu"))
    scores = []
    with torch.no_grad():
        for a in candidates:
            a_t = torch.as_tensor(a, dtype=torch.float32)
            sim, kept = samples.similarity(a_t[:3, :3], a_t[:3, 3], similarity, gen)
            scores.append(float(sim) * float(kept))
    return np.asarray(candidates[int(np.argmax(scores))], dtype=np.float64)


def optimise_linear(fixed: Volume, moving: Volume, init: np.ndarray, kind: str = "rigid",
                    fixed_mask: Optional[np.ndarray] = None, moving_mask: Optional[np.ndarray] = None,
                    similarity: str = "ncc", levels_mm: Sequence[float] = (8.0, 4.0),
                    iterations: Sequence[int] = (60, 40), device: torch.device = torch.device("cpu"),
                    seed: int = 0, max_points: int = 60_000, precise: bool = False,
                    progress: Progress = no_progress) -> np.ndarray:
    """Refine ``init`` (4x4 fixed->moving) with a translation, rigid or affine model, coarse to fine.

    Parameters act about the fixed mask's centre: A(x) = M (x - c) + c + t, with
    M = I (translation), R (rigid) or R (I + L) (affine). Each level (spacing in mm) takes up to
    ``max_points`` random voxels of the fixed mask as samples and runs Adam on them; samples that fall
    outside the moving image do not count, and the part of the moving mask that the pose takes out of the
    fixed image's view costs its share of the similarity (:meth:`_Samples.moving_seen`; a 40 mm slab was
    tilted 25 degrees without it, 8 with it, and the rigid TRE of the benchmark's other cases moved by
    -0.3 to +0.1 mm).

    ``precise`` (QuizRigid's refinement, whose start is already close): samples off the grid, rates that decay
    over each level, and after the first level (which keeps the capture range of a changing overlap) only
    the samples that the level's start maps at least ``OVERLAP_MARGIN_MM`` inside the moving image. It ended
    within 0.16-0.71 mm on the large-offset cases where the plain schedule ended 0.4-1.5 mm off, but as the
    start of ``io`` on the DCPT weight-loss case it lowered the CTV Dice from 0.92 to 0.90, so the
    pre-alignment of the deformable methods keeps the plain schedule.
    """
    gen = torch.Generator().manual_seed(seed)
    f_norm = fixed.with_array(normalize_intensity(fixed, fixed_mask))
    m_norm = moving.with_array(normalize_intensity(moving, moving_mask))
    c = center_of_mass(fixed, fixed_mask)
    a0 = torch.as_tensor(init, dtype=torch.float32, device=device)
    rotvec = torch.zeros(3, device=device, requires_grad=True)
    shift = torch.zeros(3, device=device, requires_grad=True)
    lin = torch.zeros(3, 3, device=device, requires_grad=True)
    c_t = torch.as_tensor(c, dtype=torch.float32, device=device)

    def matrix():
        m = _rotation(rotvec)
        if kind == "affine":
            m = m @ (torch.eye(3, device=device) + lin)
        # A = A0 o (x -> M (x - c) + c + t)
        m_total = a0[:3, :3] @ m
        t_total = a0[:3, :3] @ (c_t - m @ c_t + shift) + a0[:3, 3]
        return m_total, t_total

    steps_total = sum(iterations)
    done = 0
    for level, (sp, n_it) in enumerate(zip(levels_mm, iterations)):
        samples = _Samples(f_norm, m_norm, fixed_mask, sp, gen, max_points, device, off_grid=precise,
                           moving_mask=None if precise else moving_mask)
        if precise and level > 0:   # the first level keeps its capture range: samples may enter the overlap
            with torch.no_grad():
                samples.keep_overlap(*matrix(), margin_mm=OVERLAP_MARGIN_MM)
        groups = [(shift, sp / 4)]
        if kind != "translation":
            groups.append((rotvec, 0.01))
        if kind == "affine":
            groups.append((lin, 0.005))
        adam = _Adam([p for p, _ in groups])
        for it in range(n_it):
            sim, _ = samples.similarity(*matrix(), similarity, gen)
            # the moving body lost from the fixed view costs its share of the similarity (sign-safe for NCC);
            # the precise schedule holds its samples to the overlap instead (keep_overlap)
            objective = sim - sim.detach().abs() * (1.0 - samples.moving_seen(*matrix()))
            grads = torch.autograd.grad(-objective, [p for p, _ in groups])
            # cosine decay to a twentieth of each rate over the level: long first steps, fine last ones
            decay = 0.05 + 0.475 * (1 + np.cos(np.pi * it / max(n_it - 1, 1))) if precise else 1.0
            adam.step(grads, [lr * decay for _, lr in groups])
            done += 1
            progress(done / steps_total, f"{kind} level {level + 1}/{len(levels_mm)} ({sp:g} mm): "
                                         f"{similarity} {sim.item():.4f}")
    with torch.no_grad():
        m_total, t_total = matrix()
    out = np.eye(4)
    out[:3, :3] = m_total.cpu().double().numpy()
    out[:3, 3] = t_total.cpu().double().numpy()
    return out


def prealign(fixed: Volume, moving: Volume, kind: str, fixed_mask: Optional[np.ndarray] = None,
             moving_mask: Optional[np.ndarray] = None, similarity: str = "ncc",
             device: torch.device = torch.device("cpu"), seed: int = 0, progress: Progress = no_progress
             ) -> np.ndarray:
    """The 4x4 fixed->moving pre-alignment of ``kind`` (none, com, moments, rigid, affine, quiz).

    rigid and affine start from identity or the centre-of-mass translation, whichever
    :func:`best_start` scores higher; quiz is QuizRigid's query-point matching and its refinement
    (:func:`rtreg.methods.quiz.align`), for poses and fields of view too different for that start; its
    refinement uses its own similarity (:data:`rtreg.methods.quiz.REFINE_SIMILARITY`), not ``similarity``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown pre-alignment {kind!r}; use one of {KINDS}")
    if kind == "none":
        return np.eye(4)
    if kind == "quiz":
        if fixed_mask is None or moving_mask is None:
            raise ValueError("QuizRigid pre-alignment needs the fixed and moving body masks")
        from .methods.quiz import REFINE_SIMILARITY, align    # the method builds on this module's optimise_linear
        return align(fixed, moving, fixed_mask, moving_mask, REFINE_SIMILARITY, device=device, seed=seed,
                     progress=progress)[0].affine
    com = translation(center_of_mass(moving, moving_mask) - center_of_mass(fixed, fixed_mask))
    if kind == "com":
        return com
    if kind == "moments":
        if fixed_mask is None or moving_mask is None:
            raise ValueError("moments initialisation needs the fixed and moving body masks")
        return moments_initialisation(fixed, moving, fixed_mask, moving_mask)
    init = best_start(fixed, moving, [np.eye(4), com], fixed_mask, moving_mask, similarity, seed=seed)
    a = optimise_linear(fixed, moving, init, "rigid", fixed_mask, moving_mask, similarity, device=device,
                        seed=seed, progress=(lambda f, m: progress(f * (0.5 if kind == "affine" else 1.0), m)))
    if kind == "affine":
        a = optimise_linear(fixed, moving, a, "affine", fixed_mask, moving_mask, similarity, levels_mm=(4.0,),
                            iterations=(50,), device=device, seed=seed,
                            progress=lambda f, m: progress(0.5 + 0.5 * f, m))
    return a
