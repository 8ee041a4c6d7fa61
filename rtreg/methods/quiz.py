"""QuizRigid: rigid alignment by query-point matching, for large pose and field-of-view differences.

1. Views: each image is scaled to [0, 1] inside its body and sampled (trilinear, anti-aliased) on a cube
   whose axes are the world (LPS) axes, centred on its body's bounding box, with one side for both images
   (the larger body extent + 2 x 10 mm) and ``size``^3 voxels (the network's; 96 for the shipped weights).
   Both views thus show anatomy at the same scale, and a different slice order or a flipped direction matrix
   changes nothing.
2. Query points of the fixed (reference) image: the user's (``case.query_points``, LPS mm), or 64
   distinctive points inside the body (Förstner corner strength of the view, spread out by non-maximum
   suppression).
3. The network (:mod:`rtreg.nets.quiz`) answers where each point lies in the moving (search) view, and how
   likely it is to lie inside the moving image's field of view. It is also asked the reverse question
   for each answer (cycle consistency). Confidence per point = visibility x exp(-(cycle error / 10 mm)^2).
4. A robust fit of the matched points (RANSAC over 3-point Kabsch fits, inliers within 25 mm on the first
   pass and 12 mm after, then confidence-weighted Kabsch on the inliers) gives the rigid fixed->moving
   transform; ``mode`` = "translation" keeps only the confidence-weighted mean displacement of the inliers
   (the paper's).
5. Position reset: the moving image is resampled through that transform into the fixed view, and the
   network answers again (``passes`` in all, 2 by default); the fit is repeated on the new answers.
6. Optional refinement (on by default): a rigid intensity optimisation from the estimate (8, 4, 2 mm; Parzen
   mutual information for every modality pair, NCC only when asked with ``--similarity ncc``), kept when it
   scores better than the estimate and moves the inlier points by less than the first pass's inlier
   distance. On the five large-offset CT cases QuizRigid recovers, MI ended 0.23 mm from the truth on
   average against NCC's 0.33 mm (better on four, 0.07 mm worse on the thorax; bench/README "QuizRigid"), for
   about 0.1 s more.

Bad input: query points outside the fixed image, fewer than a fit needs (3 non-collinear for rigid, 1 for
translation), or no reliable match (fewer confident inliers than 3 and than a tenth of the points, or no
overlap after the fit): an InputError that says so, never a silently wrong transform.

``options.extra``: ``mode`` (rigid | translation), ``passes`` (network passes, >= 1), ``refine`` (bool),
``n_points`` (automatic query points).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..case import MatchedPoints, Progress, RegisterOptions, RegistrationCase, RegistrationResult, no_progress
from ..device import resolve_device, seed_everything
from ..errors import InputError
from ..field import SpatialTransform, affine_to_sitk
from ..image import Grid, Volume, normalize_intensity, resample, smooth_for_downsampling
from ..models import load_weights
from ..nets.quiz import QuizNet, build
from ..prealign import best_start, optimise_linear
from ..spatial import smooth, to_tensor
from .io import registration_masks

NAME = "quiz"
WEIGHTS = "quiz.pt"
MARGIN_MM = 10.0           # around the larger body in the views
N_POINTS = 64              # automatic query points
PASSES = 2                 # network passes: the first, then after each position reset
INLIER_MM = 12.0           # a match within this distance of the fit is an inlier (after the first pass)
FIRST_PASS_INLIER_MM = 25.0   # the first pass sees the whole pose difference: a wider net
MIN_CONFIDENT = 3          # inliers with confidence >= 0.5 needed for a result: at least this many,
MIN_CONFIDENT_FRACTION = 0.1   # and this fraction of the query points
RANSAC_TRIALS = 256
REFINE_LEVELS_MM = (8.0, 4.0, 2.0)   # the intensity refinement's levels
REFINE_SIMILARITY = "mi"             # ... and its similarity, unless --similarity ncc (step 6)
SIMILARITIES = ("auto", "ncc", "mi", "mind")   # the options it takes: ncc -> NCC, the others -> MI
MODES = ("rigid", "translation")


# ---------------------------------------------------------------- views
@dataclass(frozen=True)
class View:
    """A cube of ``size``^3 voxels, side ``side_mm``, centred at ``center`` (LPS mm), axes along the world's."""

    center: Tuple[float, float, float]
    side_mm: float
    size: int

    @property
    def grid(self) -> Grid:
        voxel = self.side_mm / self.size
        origin = np.asarray(self.center) - self.side_mm / 2 + voxel / 2
        return Grid.from_geometry((self.size,) * 3, (voxel,) * 3, origin)

    def to_world(self, normalised: np.ndarray) -> np.ndarray:
        """(N, 3) normalised (x, y, z) in [-1, 1] (grid_sample, align_corners=False) -> (N, 3) LPS mm."""
        return np.asarray(self.center) + np.asarray(normalised, np.float64) * self.side_mm / 2

    def to_normalised(self, world: np.ndarray) -> np.ndarray:
        return (np.asarray(world, np.float64) - np.asarray(self.center)) / (self.side_mm / 2)


def body_box(volume: Volume, mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(lowest, highest) LPS mm corner of the axis-aligned world box around ``mask``'s voxels."""
    idx = np.argwhere(mask > 0)
    lo, hi = idx.min(0)[::-1] - 0.5, idx.max(0)[::-1] + 0.5
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    world = volume.grid.index_to_world(corners)
    return world.min(0), world.max(0)


def paired_views(fixed: Volume, moving: Volume, fixed_mask: np.ndarray, moving_mask: np.ndarray, size: int
                 ) -> Tuple[View, View]:
    """The fixed and moving views: centred on each body, one side for both (the larger extent + margins)."""
    (flo, fhi), (mlo, mhi) = body_box(fixed, fixed_mask), body_box(moving, moving_mask)
    side = float(max((fhi - flo).max(), (mhi - mlo).max())) + 2 * MARGIN_MM
    return (View(tuple((flo + fhi) / 2), side, size), View(tuple((mlo + mhi) / 2), side, size))


def view_image(normalised: Volume, view: View, transform: Optional[np.ndarray] = None,
               smoothed: bool = False) -> np.ndarray:
    """(n, n, n) float32: ``normalised`` at ``transform``(x) (4x4, view frame -> image world; identity if None)
    for the view's voxel centres x, anti-aliased (unless ``smoothed`` says it already is), 0 outside."""
    sm = normalised if smoothed else smooth_for_downsampling(normalised, view.side_mm / view.size)
    tx = affine_to_sitk(transform) if transform is not None else None
    return resample(sm, view.grid, "linear", tx, 0.0).array.astype(np.float32)


def view_mask(volume: Volume, mask: np.ndarray, view: View) -> np.ndarray:
    return resample(volume.with_array(mask.astype(np.uint8)), view.grid, "mask").array > 0


# ---------------------------------------------------------------- query points
def distinctive_points(image: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` (N, 3) normalised view points inside ``mask`` with the strongest Förstner corner measure
    (det / trace of the smoothed structure tensor), at least a tenth of the view apart."""
    t = to_tensor(image, torch.device("cpu"))
    t = smooth(t, passes=1)
    gz, gy, gx = torch.gradient(t[0, 0])
    g = [gx, gy, gz]
    pairs = [(a, b) for a in range(3) for b in range(a, 3)]
    tensor = smooth(torch.stack([g[a] * g[b] for a, b in pairs])[None], passes=2)[0]   # one call: 2x faster
    s = dict(zip(pairs, tensor))
    j = lambda a, b: s[(min(a, b), max(a, b))]  # noqa: E731
    det = (j(0, 0) * (j(1, 1) * j(2, 2) - j(1, 2) ** 2) - j(0, 1) * (j(0, 1) * j(2, 2) - j(1, 2) * j(0, 2))
           + j(0, 2) * (j(0, 1) * j(1, 2) - j(1, 1) * j(0, 2)))
    score = det / (j(0, 0) + j(1, 1) + j(2, 2) + 1e-6)
    inside = torch.as_tensor(mask, dtype=torch.bool)
    score = torch.where(inside, score, torch.full_like(score, -1.0))
    peaks = (score == F.max_pool3d(score[None, None], 5, 1, 2)[0, 0]) & inside & (score > 0)
    cand = torch.nonzero(peaks).numpy()                       # (K, 3) z, y, x
    cand = cand[np.argsort(-score[peaks].numpy(), kind="stable")]
    size = image.shape[0]
    chosen: List[np.ndarray] = []
    min_dist = size / 10
    for c in cand:
        if all(np.linalg.norm(c - d) >= min_dist for d in chosen):
            chosen.append(c)
            if len(chosen) == n:
                break
    zyx = np.array(chosen, np.float64).reshape(-1, 3)
    return (zyx[:, ::-1] + 0.5) / size * 2 - 1


def check_query_points(points: np.ndarray, fixed: Volume) -> np.ndarray:
    """(N, 3) LPS mm query points, checked to lie inside the fixed image."""
    pts = np.asarray(points, np.float64).reshape(-1, 3)
    if not np.all(np.isfinite(pts)):
        raise InputError("a query point has a coordinate that is not a number; check the points file")
    idx = fixed.grid.world_to_index(pts)
    outside = np.where(np.any((idx < -0.5) | (idx > np.array(fixed.grid.size_xyz) - 0.5), axis=1))[0]
    if len(outside):
        raise InputError(f"query point(s) {', '.join(str(i + 1) for i in outside[:10])} lie outside the fixed "
                         "(reference) image; place the query points on the fixed image (LPS mm)")
    return pts


# ---------------------------------------------------------------- robust fit
def kabsch(p: np.ndarray, q: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The 4x4 rigid transform minimising sum w |R p + t - q|^2 (weighted Kabsch, proper rotation)."""
    w = np.asarray(w, np.float64) / max(float(np.sum(w)), 1e-12)
    cp, cq = w @ p, w @ q
    h = (p - cp).T @ ((q - cq) * w[:, None])
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    a = np.eye(4)
    a[:3, :3], a[:3, 3] = r, cq - r @ cp
    return a


def _translation_fit(p: np.ndarray, q: np.ndarray, w: np.ndarray) -> np.ndarray:
    a = np.eye(4)
    a[:3, 3] = (w / max(float(w.sum()), 1e-12)) @ (q - p)
    return a


def robust_fit(p: np.ndarray, q: np.ndarray, confidence: np.ndarray, mode: str = "rigid",
               threshold_mm: float = INLIER_MM, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(4x4 fixed->moving transform, inlier mask) of matches p -> q (N, 3) LPS mm: RANSAC (minimal
    confidence-weighted samples; score = confidence of the inliers), then confidence-weighted refits on
    the inliers until they stop changing."""
    if mode not in MODES:
        raise InputError(f"unknown QuizRigid mode {mode!r}; use one of {MODES}")
    need = 3 if mode == "rigid" else 1
    if len(p) < need:
        raise InputError(f"{len(p)} query point(s) give too few matches for a {mode} fit, which needs at least "
                         f"{need}; place more query points (or let QuizRigid choose them)")
    if mode == "rigid" and np.linalg.matrix_rank(p - p.mean(0), tol=1.0) < 2:
        raise InputError("the query points lie on one line, so they cannot fix a rotation; place at least 3 "
                         "points that are not in a line")
    fit = kabsch if mode == "rigid" else _translation_fit
    w = np.clip(confidence, 1e-3, None)
    rng = np.random.default_rng(seed)
    best, best_score = None, -1.0
    for _ in range(RANSAC_TRIALS if len(p) > need else 1):
        pick = rng.choice(len(p), need, replace=False, p=w / w.sum())
        if mode == "rigid" and np.linalg.matrix_rank(p[pick] - p[pick].mean(0), tol=1.0) < 2:
            continue
        a = fit(p[pick], q[pick], w[pick])
        inl = np.linalg.norm(p @ a[:3, :3].T + a[:3, 3] - q, axis=1) < threshold_mm
        score = float(w[inl].sum())
        if score > best_score:
            best, best_score = a, score
    if best is None:
        best = fit(p, q, w)
    inliers = np.zeros(len(p), bool)
    for _ in range(10):
        res = np.linalg.norm(p @ best[:3, :3].T + best[:3, 3] - q, axis=1)
        new = res < threshold_mm
        if new.sum() < need or np.array_equal(new, inliers):
            break
        inliers = new
        best = fit(p[inliers], q[inliers], w[inliers])
    return best, inliers


# ---------------------------------------------------------------- the network
@lru_cache(maxsize=1)
def _weights():
    return load_weights(WEIGHTS)


def load_network(device: torch.device) -> QuizNet:
    """The shipped QuizRigid network on ``device``, in evaluation mode."""
    state, config = _weights()
    net = build(config)
    net.load_state_dict(state)
    return net.to(device).eval()


@dataclass
class Estimate:
    """What the query-point matching found: the transform, the matches and their confidence."""

    affine: np.ndarray                 # 4x4 fixed -> moving, LPS mm
    matches: MatchedPoints
    qa: Dict[str, object]


def view_features(net: QuizNet, view: np.ndarray, device: torch.device) -> torch.Tensor:
    """The encoder's features (1, dim, n/8, n/8, n/8) of one (n, n, n) view."""
    with torch.no_grad():
        return net.features(to_tensor(view, device))


def match(net: QuizNet, fixed_features: torch.Tensor, moving_features: torch.Tensor, queries: np.ndarray
          ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(answers (N, 3) normalised in the moving view, visibility (N,) in [0, 1], cycle answers (N, 3)
    normalised in the fixed view) for ``queries`` (N, 3) normalised in the fixed view."""
    with torch.no_grad():
        q = torch.as_tensor(queries, dtype=torch.float32, device=fixed_features.device)[None]
        ans, vis, _ = net.ask(fixed_features, moving_features, q)
        back, _, _ = net.ask(moving_features, fixed_features, ans.clamp(-1, 1))
    return ans[0].cpu().double().numpy(), torch.sigmoid(vis[0]).cpu().double().numpy(), back[0].cpu().double().numpy()


def estimate(fixed: Volume, moving: Volume, fixed_mask: np.ndarray, moving_mask: np.ndarray,
             query_points: Optional[np.ndarray] = None, mode: str = "rigid", passes: int = PASSES,
             n_points: int = N_POINTS, device: torch.device = torch.device("cpu"), seed: int = 0,
             progress: Progress = no_progress) -> Estimate:
    """Steps 1-5 of the module docstring: the fixed->moving transform from matched query points."""
    if passes < 1:
        raise InputError(f"passes must be at least 1, not {passes}")
    net = load_network(device)
    size = net.config["size"]
    f_norm = fixed.with_array(normalize_intensity(fixed, fixed_mask))
    m_norm = moving.with_array(normalize_intensity(moving, moving_mask))
    f_view, m_view = paired_views(fixed, moving, fixed_mask, moving_mask, size)
    f_img = view_image(f_norm, f_view)
    m_smooth = smooth_for_downsampling(m_norm, m_view.side_mm / size)     # once for every pass
    f_feat = view_features(net, f_img, device)
    if query_points is not None:
        pts = check_query_points(query_points, fixed)
        queries = f_view.to_normalised(pts)
        if np.any(np.abs(queries) > 1):
            raise InputError("some query points lie outside the fixed image's body region that QuizRigid looks "
                             "at; place them inside the body")
    else:
        queries = distinctive_points(f_img, view_mask(fixed, fixed_mask, f_view), n_points)
        if len(queries) < 3:
            raise InputError("the fixed image has fewer than 3 distinctive points inside its body; check the "
                             "fixed image (is it blank?) or place query points")
        pts = f_view.to_world(queries)
    affine = None
    token_mm = f_view.side_mm / (size / 8)           # the spacing of the network's tokens
    qa: Dict[str, object] = {"mode": mode, "passes": passes, "view_size": size, "view_side_mm": f_view.side_mm,
                             "token_spacing_mm": token_mm,
                             "query_points": len(pts), "automatic_points": query_points is None}
    for k in range(passes):
        progress(k / passes, f"query-point matching, pass {k + 1}/{passes}")
        # pass 1: the moving image in its own view; later passes: reset into the fixed view through the estimate
        search, to_moving = (m_view, None) if affine is None else (f_view, affine)
        s_img = view_image(m_smooth, search, to_moving, smoothed=True)
        ans, vis, back = match(net, f_feat, view_features(net, s_img, device), queries)
        found = search.to_world(ans)
        q = found if to_moving is None else found @ to_moving[:3, :3].T + to_moving[:3, 3]
        cycle = np.linalg.norm((back - queries) * f_view.side_mm / 2, axis=1)
        confidence = vis * np.exp(-(cycle / token_mm) ** 2)
        affine, inliers = robust_fit(pts, q, confidence, mode, FIRST_PASS_INLIER_MM if k == 0 else INLIER_MM,
                                     seed)
        qa[f"pass{k + 1}_inliers"] = int(inliers.sum())
    residual = np.linalg.norm(pts @ affine[:3, :3].T + affine[:3, 3] - q, axis=1)
    confident = int(np.sum(inliers & (confidence >= 0.5)))
    qa.update(inliers=int(inliers.sum()), confident_inliers=confident,
              confidence_mean=float(confidence.mean()), confidence_inliers_mean=float(confidence[inliers].mean())
              if inliers.any() else 0.0, cycle_error_median_mm=float(np.median(cycle)),
              residual_inliers_rms_mm=float(np.sqrt(np.mean(residual[inliers] ** 2))) if inliers.any() else None)
    matches = MatchedPoints(pts, q, confidence, inliers)
    if confident < min(max(MIN_CONFIDENT, int(np.ceil(MIN_CONFIDENT_FRACTION * len(pts)))), len(pts)):
        raise InputError(f"QuizRigid found no reliable correspondence ({confident} confident matches of "
                         f"{len(pts)}; mean confidence {confidence.mean():.2f}): the images may show different "
                         "anatomy or not overlap. Check the inputs, place query points on anatomy both images "
                         "show, try the intensity-based rigid pre-alignment instead (--prealign rigid with a "
                         "deformable method, 'rigid' in a panel's pre-alignment choice), or pre-align by hand")
    return Estimate(affine, matches, qa)


def overlap_fraction(fixed: Volume, moving: Volume, fixed_mask: np.ndarray, affine: np.ndarray) -> float:
    """The fraction of the fixed body that ``affine`` maps inside the moving image."""
    idx = np.argwhere(fixed_mask > 0)[::53, ::-1].astype(np.float64)
    pts = fixed.grid.index_to_world(idx) @ affine[:3, :3].T + affine[:3, 3]
    m_idx = moving.grid.world_to_index(pts)
    return float(np.mean(np.all((m_idx > -0.5) & (m_idx < np.array(moving.grid.size_xyz) - 0.5), axis=1)))


def align(fixed: Volume, moving: Volume, fixed_mask: np.ndarray, moving_mask: np.ndarray, similarity: str,
          query_points: Optional[np.ndarray] = None, mode: str = "rigid", passes: int = PASSES,
          n_points: int = N_POINTS, refine: bool = True, device: torch.device = torch.device("cpu"), seed: int = 0,
          progress: Progress = no_progress) -> Tuple[Estimate, List[str]]:
    """Steps 1-6 of the module docstring: the matching's estimate with its ``affine`` replaced by the refined one
    (when ``refine`` and the refinement agrees with the matches), and messages for the user. ``similarity``
    (ncc or mi) is the refinement's. Raises InputError when nothing reliable was found."""
    est = estimate(fixed, moving, fixed_mask, moving_mask, query_points, mode, passes, n_points, device, seed,
                   lambda f, m: progress(0.85 * f, m))
    messages: List[str] = []
    if not refine:
        messages.append(f"without the intensity refinement the transform is the network's matching alone; its "
                        f"resolution is the network's token spacing ({est.qa['token_spacing_mm']:.0f} mm here) and "
                        "on the benchmark's rotated cases its answers were off by up to 30 mm: check it, or refine")
    if refine:
        progress(0.85, "intensity refinement")
        refined = optimise_linear(fixed, moving, est.affine, "rigid" if mode == "rigid" else "translation",
                                  fixed_mask, moving_mask, similarity, levels_mm=REFINE_LEVELS_MM,
                                  iterations=(30,) * len(REFINE_LEVELS_MM),
                                  device=device, seed=seed, max_points=20_000, precise=True)
        m = est.matches
        p = m.fixed[m.inliers] if m.inliers.any() else m.fixed
        moved = p @ (refined[:3, :3] - est.affine[:3, :3]).T + refined[:3, 3] - est.affine[:3, 3]
        shift = float(np.linalg.norm(moved, axis=1).mean())
        better = best_start(fixed, moving, [est.affine, refined], fixed_mask, moving_mask, similarity, seed=seed)
        est.qa.update(refine_shift_mm=shift, refine_kept=bool(shift < FIRST_PASS_INLIER_MM
                                                              and np.array_equal(better, refined)))
        if est.qa["refine_kept"]:
            est.affine = refined
        else:
            messages.append(f"the intensity refinement (moving the matched points by {shift:.1f} mm) did not score "
                            "better than the matching or moved too far, so the matching's transform is kept")
    overlap = overlap_fraction(fixed, moving, fixed_mask, est.affine)
    est.qa["overlap_fraction"] = overlap
    if overlap < 0.02:
        raise InputError("after the search the fixed body and the moving image do not overlap; the images show "
                         "different anatomy, or the moving image is empty")
    rot = np.degrees(np.arccos(np.clip((np.trace(est.affine[:3, :3]) - 1) / 2, -1, 1)))
    est.qa.update(rotation_deg=float(rot), translation_mm=[float(v) for v in est.affine[:3, 3]])
    progress(1.0, "done")
    return est, messages


def register(case: RegistrationCase, options: RegisterOptions, progress: Progress = no_progress
             ) -> RegistrationResult:
    """Rigid (or translation) alignment of ``case.moving`` to ``case.fixed``; see the module docstring."""
    t0 = time.perf_counter()
    case.validate("quiz")
    device = resolve_device(options.device)
    seed_everything(options.seed)
    fixed_mask, moving_mask = registration_masks(case)
    if options.similarity not in SIMILARITIES:
        raise InputError(f"QuizRigid takes similarity {', '.join(SIMILARITIES)} (ncc refines by NCC, the others by "
                         f"mutual information), not {options.similarity!r}")
    similarity = "ncc" if options.similarity == "ncc" else REFINE_SIMILARITY
    est, messages = align(case.fixed, case.moving, fixed_mask, moving_mask, similarity, case.query_points,
                          str(options.extra.get("mode", "rigid")), int(options.extra.get("passes", PASSES)),
                          int(options.extra.get("n_points", N_POINTS)), bool(options.extra.get("refine", True)),
                          device, options.seed, progress)
    return RegistrationResult(NAME, SpatialTransform(est.affine), est.affine, str(device),
                              {"total_s": time.perf_counter() - t0}, est.qa, messages, matched_points=est.matches)
