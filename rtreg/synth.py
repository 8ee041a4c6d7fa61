"""Synthetic RT cases with known deformations (deterministic for a seed).

* :func:`rt_phantom` builds a planning CT phantom (pelvis, thorax or head and
  neck: body with skin and fat, bones, organs, OARs, a CTV, a dose that conforms
  to the CTV, a plan) and its repeat CT (setup shift and rotation, organ motion,
  bladder/rectum filling, weight loss, tumour shrinkage, new noise, a shifted
  field of view) with the true fixed->moving transform.
* :func:`deform_real_ct` applies realistic known deformations (breathing with
  sliding at the chest wall, soft tissue, weight loss) plus a rigid setup error
  to a real CT (or, for the multimodal case, to a co-registered image of another
  modality), carrying its structures.
* :func:`large_offset_case` gives a real CT a large rigid pose change and a
  cropped field of view.

Geometry: LPS mm (x to the patient's left, y posterior, z superior). The truth
is a :class:`~rtreg.field.SpatialTransform` in the engine's convention
(planning point x -> repeat point A(x + u(x))).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from scipy import ndimage

from .dicomrt import Beam, PlanSummary, Structure
from .field import SpatialTransform, invert, warp, write_transform
from .image import Grid, PathLike, Volume, resample, write_volume
from .priors import body_mask

SITES = ("pelvis", "thorax", "headneck")

# tissue -> HU
HU = {"air": -1000, "fat": -100, "skin": 30, "muscle": 40, "bone": 700, "bladder": 5, "rectum": 35, "gas": -700,
      "prostate": 60, "lung": -820, "heart": 42, "cord": 30, "tumour": 80, "brain": 32, "brainstem": 38,
      "parotid": -25}


@dataclass
class SyntheticCase:
    """A planning/repeat pair with everything a physicist would check, and the truth."""

    site: str
    planning: Volume
    repeat: Volume
    planning_structures: List[Structure]
    repeat_structures: List[Structure]
    dose: Optional[Volume]
    plan: Optional[PlanSummary]
    truth: Optional[SpatialTransform]   # None for a real pair whose only truth is its repeat-image contours
    points_planning: np.ndarray         # (N, 3) LPS mm; N = 0 without a point truth
    points_repeat: np.ndarray
    notes: Dict[str, Any] = field(default_factory=dict)    # figures of how the case was made (JSON-able)

    def structure(self, name: str, repeat: bool = False) -> Structure:
        for s in (self.repeat_structures if repeat else self.planning_structures):
            if s.name == name:
                return s
        raise KeyError(name)


# ---------------------------------------------------------------- shapes
def _ellipsoid(p: np.ndarray, c, r) -> np.ndarray:
    return (((p - np.asarray(c, float)) / np.asarray(r, float)) ** 2).sum(-1) <= 1.0


def _cylinder(p: np.ndarray, c_xy, r_xy, z_range) -> np.ndarray:
    q = (p[..., :2] - np.asarray(c_xy, float)) / np.asarray(r_xy, float)
    return ((q ** 2).sum(-1) <= 1.0) & (p[..., 2] >= z_range[0]) & (p[..., 2] <= z_range[1])


@dataclass
class _Anatomy:
    tissue: np.ndarray                       # (z, y, x) tissue names index into TISSUES
    organs: Dict[str, np.ndarray]            # structure name -> mask
    colors: Dict[str, tuple]
    ctv_name: str
    beams: List[float]
    prescription: tuple                      # (Gy, fractions)


TISSUES = list(HU)


def _paint(tissue: np.ndarray, mask: np.ndarray, name: str) -> None:
    tissue[mask] = TISSUES.index(name)


def _pelvis(p: np.ndarray, spacing: np.ndarray) -> _Anatomy:
    t = np.zeros(p.shape[:3], np.int16)
    body = _cylinder(p, (0, 0), (170, 115), (-1e9, 1e9))
    _layers(t, body, spacing)
    bone = (_ellipsoid(p, (90, 10, -40), (24, 24, 24)) | _ellipsoid(p, (-90, 10, -40), (24, 24, 24))
            | _cylinder(p, (95, 15), (14, 14), (-1e9, -40)) | _cylinder(p, (-95, 15), (14, 14), (-1e9, -40))
            | _cylinder(p, (0, 85), (28, 20), (-20, 1e9)) | _ellipsoid(p, (0, -75, -60), (30, 10, 14))
            | _ellipsoid(p, (110, 40, 25), (14, 45, 45)) | _ellipsoid(p, (-110, 40, 25), (14, 45, 45)))
    _paint(t, bone, "bone")
    bladder = _ellipsoid(p, (0, -42, 12), (42, 34, 30))
    _paint(t, bladder, "bladder")
    rectum = _cylinder(p, (0, 40), (18, 16), (-75, 30))
    _paint(t, rectum, "rectum")
    _paint(t, _cylinder(p, (0, 42), (7, 6), (-40, 10)), "gas")
    prostate = _ellipsoid(p, (0, -6, -38), (21, 17, 18))
    _paint(t, prostate, "prostate")
    organs = {"CTV": prostate, "Bladder": bladder, "Rectum": rectum,
              "FemoralHead_L": _ellipsoid(p, (90, 10, -40), (24, 24, 24)),
              "FemoralHead_R": _ellipsoid(p, (-90, 10, -40), (24, 24, 24))}
    colors = {"CTV": (255, 0, 0), "Bladder": (255, 255, 0), "Rectum": (150, 75, 0),
              "FemoralHead_L": (0, 255, 255), "FemoralHead_R": (0, 200, 255)}
    return _Anatomy(t, organs, colors, "CTV", [90.0, 270.0], (78.0, 39))


def _thorax(p: np.ndarray, spacing: np.ndarray) -> _Anatomy:
    t = np.zeros(p.shape[:3], np.int16)
    body = _cylinder(p, (0, 0), (165, 118), (-1e9, 1e9))
    _layers(t, body, spacing)
    lung_l, lung_r = _ellipsoid(p, (78, 5, 5), (62, 82, 115)), _ellipsoid(p, (-78, 5, 5), (62, 82, 115))
    _paint(t, lung_l | lung_r, "lung")
    heart = _ellipsoid(p, (22, -28, -25), (52, 48, 55))
    _paint(t, heart, "heart")
    _paint(t, _cylinder(p, (0, 88), (20, 18), (-1e9, 1e9)) | _cylinder(p, (0, -100), (15, 7), (-60, 70)), "bone")
    for z0 in range(-90, 100, 30):  # ribs: thin elliptic rings
        ring = _cylinder(p, (0, 0), (150, 104), (z0, z0 + 8)) & ~_cylinder(p, (0, 0), (142, 97), (z0, z0 + 8))
        _paint(t, ring & (p[..., 1] > -60), "bone")
    cord = _cylinder(p, (0, 88), (6, 6), (-1e9, 1e9))
    _paint(t, cord, "cord")
    tumour = _ellipsoid(p, (80, 0, 35), (20, 18, 22))
    _paint(t, tumour, "tumour")
    organs = {"CTV": tumour, "Lung_L": lung_l & ~tumour, "Lung_R": lung_r, "Heart": heart, "SpinalCord": cord}
    colors = {"CTV": (255, 0, 0), "Lung_L": (0, 150, 255), "Lung_R": (0, 100, 255), "Heart": (255, 0, 150),
              "SpinalCord": (255, 255, 0)}
    return _Anatomy(t, organs, colors, "CTV", [0.0, 60.0], (60.0, 30))


def _headneck(p: np.ndarray, spacing: np.ndarray) -> _Anatomy:
    t = np.zeros(p.shape[:3], np.int16)
    head = _ellipsoid(p, (0, 0, 35), (78, 98, 90))
    neck = _cylinder(p, (0, 10), (58, 60), (-1e9, -10))
    jaw = _ellipsoid(p, (0, -20, -30), (62, 75, 35))
    body = head | neck | jaw
    _layers(t, body, spacing)
    skull = _ellipsoid(p, (0, 0, 40), (72, 92, 80)) & ~_ellipsoid(p, (0, 0, 40), (65, 85, 73))
    skull &= p[..., 2] > 0
    brain = _ellipsoid(p, (0, 0, 40), (65, 85, 73)) & (p[..., 2] > 0)
    _paint(t, brain, "brain")
    _paint(t, skull, "bone")
    mandible = (_ellipsoid(p, (0, -25, -35), (55, 65, 14)) & ~_ellipsoid(p, (0, -25, -35), (48, 58, 14))
                & (p[..., 1] < 0))
    _paint(t, mandible | _cylinder(p, (0, 35), (14, 13), (-1e9, -5)), "bone")
    brainstem = _cylinder(p, (0, 22), (12, 11), (-5, 30))
    _paint(t, brainstem, "brainstem")
    cord = _cylinder(p, (0, 35), (5, 5), (-1e9, -5))
    _paint(t, cord, "cord")
    par_l, par_r = _ellipsoid(p, (50, 12, -25), (15, 20, 20)), _ellipsoid(p, (-50, 12, -25), (15, 20, 20))
    _paint(t, par_l | par_r, "parotid")
    ctv = _ellipsoid(p, (18, -12, -40), (17, 15, 16))
    _paint(t, ctv, "tumour")
    organs = {"CTV": ctv, "Brainstem": brainstem, "SpinalCord": cord, "Parotid_L": par_l, "Parotid_R": par_r}
    colors = {"CTV": (255, 0, 0), "Brainstem": (0, 255, 0), "SpinalCord": (255, 255, 0),
              "Parotid_L": (0, 200, 255), "Parotid_R": (0, 120, 255)}
    return _Anatomy(t, organs, colors, "CTV", [45.0, 315.0], (70.0, 35))


def _layers(t: np.ndarray, body: np.ndarray, spacing: np.ndarray) -> None:
    """Muscle inside ``body``, 12 mm of fat under 3 mm of skin."""
    depth = ndimage.distance_transform_edt(body, sampling=tuple(spacing[::-1]))
    _paint(t, body, "muscle")
    _paint(t, body & (depth <= 15.0), "fat")
    _paint(t, body & (depth <= 3.0), "skin")


_BUILDERS = {"pelvis": _pelvis, "thorax": _thorax, "headneck": _headneck}
_EXTENT_MM = {"pelvis": (384, 288, 192), "thorax": (384, 288, 240), "headneck": (216, 252, 192)}
_CENTRE_Z = {"pelvis": 0.0, "thorax": 0.0, "headneck": -10.0}


def _render(tissue: np.ndarray, rng: np.random.Generator, spacing: np.ndarray) -> np.ndarray:
    """HU image from tissue labels: per-tissue HU, soft-tissue texture, partial-volume blur (no noise)."""
    hu = np.array([HU[n] for n in TISSUES], np.float32)[tissue]
    texture = ndimage.gaussian_filter(rng.standard_normal(tissue.shape).astype(np.float32), 6.0 / spacing.mean())
    texture *= 15.0 / max(float(texture.std()), 1e-6)
    soft = np.isin(tissue, [TISSUES.index(n) for n in ("muscle", "fat", "brain", "heart", "bladder", "prostate")])
    hu[soft] += texture[soft]
    return ndimage.gaussian_filter(hu, 0.6)


def _dose(anat: _Anatomy, p: np.ndarray, spacing: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Dose (Gy) conforming to a 5 mm PTV with a 3 mm sigmoid fall-off, and proton entrance channels."""
    rx = anat.prescription[0]
    ctv = anat.organs[anat.ctv_name]
    sampling = tuple(spacing[::-1])
    outside = ndimage.distance_transform_edt(~ctv, sampling=sampling)
    inside = ndimage.distance_transform_edt(ctv, sampling=sampling)
    signed = np.where(ctv, -inside, outside) - 5.0  # distance to the PTV surface (mm)
    dose = rx / (1.0 + np.exp((signed + 4.0) / 2.5))
    c = p[ctv].mean(0)
    radius = float(np.cbrt(ctv.sum() * np.prod(spacing) * 3 / (4 * np.pi))) + 5.0
    for gantry in anat.beams:
        g = np.deg2rad(gantry)
        b = np.array([-np.sin(g), np.cos(g), 0.0])  # from the source towards the isocentre (IEC, HFS)
        rel = p - c
        along = rel @ b
        lateral = np.linalg.norm(rel - along[..., None] * b, axis=-1)
        channel = 0.45 * rx / (1.0 + np.exp((lateral - radius) / 2.5)) / (1.0 + np.exp((along + radius) / 2.5))
        dose = np.maximum(dose, channel)
    return (dose * body).astype(np.float32)


def _plan(site: str, anat: _Anatomy) -> PlanSummary:
    beams = [Beam(f"Field {i + 1}", "PROTON", g, 0.0, "PHANTOM") for i, g in enumerate(anat.beams)]
    oars = [n for n in anat.organs if n != anat.ctv_name]
    return PlanSummary(f"{site.upper()}_PBS", True, "PROTON", anat.prescription[0], anat.prescription[1],
                       [anat.ctv_name] + oars, beams, "HFS")


def _smooth_bump(p: np.ndarray, c, sigma: float) -> np.ndarray:
    return np.exp(-((p - np.asarray(c, float)) ** 2).sum(-1) / (2 * sigma ** 2))


def rigid_matrix(rotation_deg, translation_mm, centre) -> np.ndarray:
    """4x4 rotation about ``centre`` (x, y, z Euler degrees, applied z-y-x) then translation (LPS mm)."""
    ax, ay, az = np.deg2rad(rotation_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    r = rz @ ry @ rx
    a = np.eye(4)
    a[:3, :3] = r
    a[:3, 3] = np.asarray(centre) - r @ np.asarray(centre) + np.asarray(translation_mm)
    return a


def _weight_loss(p: np.ndarray, body: np.ndarray, spacing: np.ndarray, amount_mm: float,
                 centre_xy) -> np.ndarray:
    """Inward (towards the body axis) displacement of ``amount_mm`` at the skin, fading over 40 mm inside
    and 15 mm outside the body (the air far from the patient does not move)."""
    sampling = tuple(spacing[::-1])
    depth = ndimage.distance_transform_edt(body, sampling=sampling)
    outside = ndimage.distance_transform_edt(~body, sampling=sampling)
    radial = np.zeros(p.shape, np.float32)
    radial[..., :2] = p[..., :2] - np.asarray(centre_xy, float)
    radial /= np.maximum(np.linalg.norm(radial, axis=-1, keepdims=True), 1e-3)
    fade = ndimage.gaussian_filter(np.exp(-depth / 40.0) * np.exp(-outside / 15.0), 1.5)
    return (-amount_mm * fade[..., None] * radial).astype(np.float32)


def rt_phantom(site: str = "pelvis", seed: int = 0, spacing_mm: float = 3.0, n_points: int = 300,
               severity: float = 1.0) -> SyntheticCase:
    """A planning/repeat CT phantom pair of ``site`` with structures, dose, plan and the true transform.

    ``severity`` scales every anatomical change (1 = typical inter-fraction change).
    """
    if site not in _BUILDERS:
        raise ValueError(f"unknown site {site!r}; use one of {SITES}")
    rng = np.random.default_rng(seed)
    ext = np.array(_EXTENT_MM[site], float)
    size = np.maximum(np.round(ext / spacing_mm).astype(int), 8)
    spacing = np.full(3, float(spacing_mm))
    origin = -(size - 1) * spacing / 2 + np.array([0.0, 0.0, _CENTRE_Z[site]])
    grid = Grid.from_geometry(tuple(size[::-1]), spacing, origin)
    p = grid.world_points()
    anat = _BUILDERS[site](p, spacing)
    body = anat.tissue != 0
    hu_clean = _render(anat.tissue, rng, spacing)
    noise_hu = 10.0
    planning = Volume((hu_clean + rng.normal(0, noise_hu, hu_clean.shape)).astype(np.float32), grid.affine.copy(),
                      {"modality": "CT", "units": "HU", "name": f"{site} planning CT",
                       "frame_of_reference": f"1.2.826.0.1.3680043.10.1.{seed}.1"})
    dose = Volume(_dose(anat, p, spacing, body), grid.affine.copy(),
                  {"modality": "RTDOSE", "units": "Gy", "name": "dose",
                   "frame_of_reference": planning.meta["frame_of_reference"]})

    # true deformation, in planning coordinates
    s = severity
    u = np.zeros(p.shape, np.float32)
    for name, m in anat.organs.items():
        c = p[m].mean(0)
        shift = rng.normal(0, 2.5 * s, 3)
        u += (shift * _smooth_bump(p, c, 30.0)[..., None]).astype(np.float32)
    ctv = anat.organs[anat.ctv_name]
    c_ctv = p[ctv].mean(0)
    u += (-0.08 * s * (p - c_ctv) * _smooth_bump(p, c_ctv, 22.0)[..., None]).astype(np.float32)  # shrinkage
    if site == "pelvis":
        for name, gain, sigma in (("Bladder", 0.18, 35.0), ("Rectum", 0.15, 18.0)):
            c = p[anat.organs[name]].mean(0)
            u += (gain * s * (p - c) * _smooth_bump(p, c, sigma)[..., None]).astype(np.float32)  # filling
    u += _weight_loss(p, body, spacing, 5.0 * s, (0.0, 0.0))
    centre = grid.center()
    setup = rigid_matrix(rng.uniform(-2, 2, 3) * s, rng.uniform(-6, 6, 3) * s, centre)
    truth = SpatialTransform(setup, Volume(u, grid.affine.copy(), {"units": "mm"}))

    # repeat CT on a shifted field of view
    fov_shift = np.array([rng.uniform(-9, 9), rng.uniform(-9, 9), 2 * spacing_mm * rng.choice([-1, 1])])
    rgrid = Grid.from_geometry(grid.shape, spacing, origin + fov_shift)
    inverse = invert(truth, rgrid, max_spacing_mm=None)
    clean = Volume(hu_clean, grid.affine.copy())
    rep = warp(clean, inverse.transform, rgrid, fill=HU["air"]).array
    repeat = Volume((rep + rng.normal(0, noise_hu, rep.shape)).astype(np.float32), rgrid.affine.copy(),
                    {"modality": "CT", "units": "HU", "name": f"{site} repeat CT",
                     "frame_of_reference": f"1.2.826.0.1.3680043.10.1.{seed}.2"})

    structures, repeat_structures = [], []
    body_vol = Volume(body.astype(np.uint8), grid.affine.copy())
    for i, (name, m) in enumerate([("BODY", body)] + list(anat.organs.items()), start=1):
        color = anat.colors.get(name, (0, 255, 0))
        structures.append(Structure(name, i, color, m.astype(np.uint8), "PTV" if name == "CTV" else "ORGAN"))
        rm = warp(body_vol.with_array(m.astype(np.uint8)), inverse.transform, rgrid, "mask").array
        repeat_structures.append(Structure(name, i, color, rm, "CTV" if name == "CTV" else "ORGAN"))
    pts = _points_in(body & (ndimage.binary_erosion(body, iterations=2)), grid, n_points, rng)
    return SyntheticCase(site, planning, repeat, structures, repeat_structures, dose, _plan(site, anat), truth,
                         pts, truth.transform_points(pts),
                         {"inverse_residual_max_mm": inverse.residual_max_mm,
                          "max_displacement_mm": float(np.linalg.norm(u, axis=-1).max())})


def _points_in(mask: np.ndarray, grid: Grid, n: int, rng: np.random.Generator) -> np.ndarray:
    idx = np.argwhere(mask)
    pick = idx[rng.choice(len(idx), size=min(n, len(idx)), replace=False)]
    jitter = rng.uniform(-0.5, 0.5, pick.shape)
    return grid.index_to_world(pick[:, ::-1] + jitter)


# ---------------------------------------------------------------- real CT with known deformations
DEFORMATIONS = ("breathing", "soft_tissue", "weight_loss")


def deform_real_ct(ct: Volume, kind: str = "soft_tissue", seed: int = 0, amplitude_mm: float = 8.0,
                   setup_error: bool = True, n_points: int = 300, field_spacing_mm: float = 3.0,
                   structures: Sequence[Structure] = (), moving_source: Optional[Volume] = None
                   ) -> SyntheticCase:
    """Apply a known realistic deformation (and a rigid setup error) to a real CT.

    ``breathing``: superior-inferior and anterior motion of lungs and upper
    abdomen, largest at the diaphragm, that slides along the chest wall (the
    rib cage and spine do not move). ``soft_tissue``: a smooth random field
    inside the body (organ motion). ``weight_loss``: the body contour shrinks
    towards the body axis by ``amplitude_mm``. The field is built on the CT
    grid coarsened to ``field_spacing_mm`` (it is smooth) and the repeat image is
    resampled on the planning grid.

    ``structures`` (masks on the CT grid) are carried onto the repeat image as
    the true structures. ``moving_source``: an image of another modality in the
    CT's scanner coordinates (e.g. the co-registered MR of the same patient);
    it is deformed instead of the CT, on its own grid (the multimodal case).
    """
    if kind not in DEFORMATIONS:
        raise ValueError(f"unknown deformation {kind!r}; use one of {DEFORMATIONS}")
    rng = np.random.default_rng(seed)
    fgrid = ct.grid.with_spacing(field_spacing_mm)
    ct_c = resample(ct, fgrid)
    body = body_mask(ct_c).astype(bool)
    p = fgrid.world_points()
    spacing = fgrid.spacing
    if kind == "breathing":
        moving_part = ndimage.binary_opening((ct_c.array < -400) & body, iterations=1)
        labels, n = ndimage.label(moving_part)
        if n:
            sizes = ndimage.sum_labels(moving_part, labels, np.arange(1, n + 1))
            keep = np.argsort(sizes)[::-1][:2] + 1
            moving_part = np.isin(labels, keep)
        # the lungs move (most at their base, the diaphragm); the chest wall and spine do not
        z = p[..., 2]
        zl = z[moving_part] if moving_part.any() else z[body]
        inside = ndimage.binary_closing(moving_part, iterations=3)
        region = ndimage.gaussian_filter(inside.astype(np.float32), 1.0)  # sharp edge: sliding
        profile = np.clip((np.percentile(zl, 98) - z) / max(np.ptp(zl), 1.0), 0, 1)
        u = np.zeros(p.shape, np.float32)
        u[..., 2] = amplitude_mm * profile * region
        u[..., 1] = -0.3 * amplitude_mm * profile * region
    elif kind == "soft_tissue":
        u = np.stack([ndimage.gaussian_filter(rng.standard_normal(body.shape), 25.0 / spacing.mean())
                      for _ in range(3)], -1).astype(np.float32)
        u *= amplitude_mm / max(float(np.linalg.norm(u, axis=-1)[body].max()), 1e-6)
        u *= ndimage.gaussian_filter(body.astype(np.float32), 10.0 / spacing.mean())[..., None]
    else:
        c = p[body].mean(0)
        u = _weight_loss(p, body, spacing, amplitude_mm, c[:2])
    setup = np.eye(4)
    if setup_error:
        setup = rigid_matrix(rng.uniform(-3, 3, 3), rng.uniform(-8, 8, 3), p[body].mean(0))
    truth = SpatialTransform(setup, Volume(u, fgrid.affine.copy(), {"units": "mm"}))
    source = moving_source if moving_source is not None else ct
    inverse = invert(truth, source.grid)
    body_full = ndimage.binary_erosion(body_mask(ct).astype(bool), iterations=3)
    pts = _points_in(body_full, ct.grid, n_points, rng)
    return _known_transform_case(kind, ct, source, source.grid, truth, inverse.transform, structures, pts,
                                 {"inverse_residual_max_mm": inverse.residual_max_mm,
                                  "max_displacement_mm": float(np.linalg.norm(u, axis=-1).max())})


def large_offset_case(ct: Volume, seed: int = 0, max_translation_mm: float = 60.0,
                      max_rotation_deg: float = 15.0, keep_fraction: float = 0.6, n_points: int = 300,
                      structures: Sequence[Structure] = (), cbct: bool = False) -> SyntheticCase:
    """A rigid pose difference far beyond a setup error, seen through a cropped field of view.

    The truth is a rotation about the body centre (each Euler angle uniform in
    +-``max_rotation_deg``) and a translation of length ``max_translation_mm``
    in a random direction. The repeat image sees a box of ``keep_fraction`` of
    the planning extent along each axis (at a random place), as a brachytherapy
    or cone-beam CT sees part of the planning CT. Points are kept only where
    both images see them (and inside the body). ``cbct``: the repeat image also gets
    cone-beam CT artefacts (:func:`cbct_artefacts`).
    """
    if not 0.2 <= keep_fraction <= 1.0:
        raise ValueError("keep_fraction must lie in [0.2, 1]")
    rng = np.random.default_rng(seed)
    body = body_mask(ct).astype(bool)
    centre = ct.grid.index_to_world(np.argwhere(body).mean(0)[None, ::-1])[0]
    direction = rng.standard_normal(3)
    translation = max_translation_mm * direction / np.linalg.norm(direction)
    setup = rigid_matrix(rng.uniform(-max_rotation_deg, max_rotation_deg, 3), translation, centre)
    truth = SpatialTransform(setup)
    shape = np.array(ct.grid.shape)
    size = np.maximum(np.round(shape * keep_fraction).astype(int), 4)
    start = np.array([rng.integers(0, n - k + 1) for n, k in zip(shape, size)])
    crop_origin = ct.grid.index_to_world(start[None, ::-1].astype(float))[0]
    # the repeat scanner's box: the crop, moved by the true transform (same axes as the planning grid)
    affine = ct.grid.affine.copy()
    affine[:3, 3] = setup[:3, :3] @ crop_origin + setup[:3, 3]
    rgrid = Grid(tuple(int(v) for v in size), affine)
    inverse = SpatialTransform(np.linalg.inv(setup))
    sees = body & _seen_from(ct.grid, setup, rgrid, margin_voxels=2)
    pts = _points_in(ndimage.binary_erosion(sees, iterations=2), ct.grid, n_points, rng)
    case = _known_transform_case("large_offset", ct, ct, rgrid, truth, inverse, structures, pts,
                                 {"translation_mm": float(np.linalg.norm(translation)),
                                  "keep_fraction": keep_fraction})
    if cbct:
        case.repeat = cbct_artefacts(case.repeat, rng)
    return case


def cbct_artefacts(ct: Volume, rng: np.random.Generator) -> Volume:
    """A cone-beam-CT-like version of a CT (HU): cupping (soft tissue darker towards the centre of each
    axial slice, up to 80 HU), streaks (an in-plane sinusoidal pattern of up to 40 HU), noise (30 HU) and the
    circular field of view of the detector (air outside a cylinder of 90 % of the smaller in-plane extent)."""
    a = ct.array.astype(np.float32)
    nz, ny, nx = a.shape
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float32)
    r = np.hypot((x - (nx - 1) / 2) / (nx / 2), (y - (ny - 1) / 2) / (ny / 2))
    angle = rng.uniform(0, np.pi)
    streaks = np.sin((x * np.cos(angle) + y * np.sin(angle)) * rng.uniform(0.3, 0.8))
    inside = a > -500
    a = a - inside * 80.0 * np.clip(1 - r ** 2, 0, 1)[None] + 40.0 * streaks[None] * inside
    a = a + rng.normal(0, 30.0, a.shape).astype(np.float32)
    a[:, r > 0.9] = -1000.0
    out = ct.with_array(a.astype(np.float32))
    out.meta = dict(ct.meta, name=f"{ct.meta.get('name', 'image')} (CBCT-like)")
    return out


# T1-weighted MR signal (fraction of its maximum) at CT numbers (HU), after typical 1.5 T values: air and
# cortical bone dark, fat brightest, fluid darker than muscle, fatty marrow bright: not monotone in HU
_T1_HU = (-1000.0, -900.0, -500.0, -200.0, -100.0, -50.0, 0.0, 20.0, 50.0, 100.0, 250.0, 500.0, 900.0)
_T1_SIGNAL = (0.0, 0.02, 0.05, 0.65, 0.95, 0.8, 0.25, 0.3, 0.42, 0.45, 0.6, 0.3, 0.05)


def t1_weighted_like(ct: Volume, rng: np.random.Generator, bias: float = 0.25, noise: float = 0.02) -> Volume:
    """A T1-weighted-MR-like image of a CT's anatomy, in the CT's grid and frame (a multimodal pair whose
    true alignment is exact, unlike a real MR and CT taken on different days).

    Signal from HU by the table above (not monotone, so NCC to the CT is low or negative and only a
    multimodal similarity aligns them), times a smooth multiplicative bias field (up to +-``bias``), plus
    Rician noise of ``noise`` (fraction of the maximum); values 0-1000, ``modality`` MR."""
    signal = np.interp(ct.array.astype(np.float64), _T1_HU, _T1_SIGNAL)
    coarse = rng.standard_normal((3, 3, 3))
    field = ndimage.zoom(coarse, np.array(signal.shape) / 3.0, order=3, mode="nearest")[tuple(
        slice(0, n) for n in signal.shape)]
    signal = signal * np.exp(bias * field / max(float(np.abs(field).max()), 1e-6))
    real = signal + rng.normal(0.0, noise, signal.shape)
    imag = rng.normal(0.0, noise, signal.shape)
    out = ct.with_array((1000.0 * np.hypot(real, imag)).astype(np.float32))
    out.meta = dict(ct.meta, modality="MR", units="", name=f"{ct.meta.get('name', 'image')} (T1-like)")
    return out


def _seen_from(grid: Grid, transform: np.ndarray, other: Grid, margin_voxels: int = 0) -> np.ndarray:
    """Voxels of ``grid`` whose image under the 4x4 ``transform`` lies inside ``other`` (slice by slice)."""
    out = np.zeros(grid.shape, bool)
    lo, hi = margin_voxels, np.array(other.shape[::-1]) - 1 - margin_voxels
    for k in range(grid.shape[0]):
        j, i = np.mgrid[0:grid.shape[1], 0:grid.shape[2]]
        ijk = np.stack([i, j, np.full_like(i, k)], -1).reshape(-1, 3).astype(float)
        x = grid.index_to_world(ijk) @ transform[:3, :3].T + transform[:3, 3]
        idx = other.world_to_index(x)
        out[k] = np.all((idx >= lo) & (idx <= hi), axis=1).reshape(grid.shape[1:])
    return out


def _known_transform_case(kind: str, planning: Volume, source: Volume, repeat_grid: Grid,
                          truth: SpatialTransform, inverse: SpatialTransform, structures: Sequence[Structure],
                          points: np.ndarray, notes: Dict[str, float]) -> SyntheticCase:
    """The repeat image (``source`` pulled through ``inverse`` onto ``repeat_grid``), the structures it
    would show and the true point positions, for a known planning->repeat ``truth``."""
    repeat = warp(source, inverse, repeat_grid, fill=float(source.array.min()))
    repeat.meta = dict(source.meta, name=f"{source.meta.get('name', 'image')} ({kind})",
                       frame_of_reference=source.meta.get("frame_of_reference", "") + ".repeat")
    on_repeat = [Structure(s.name, s.number, s.color,
                           warp(planning.with_array(s.mask), inverse, repeat_grid, "mask").array, s.roi_type)
                 for s in structures]
    return SyntheticCase(kind, planning, repeat, list(structures), on_repeat, None, None, truth, points,
                         truth.transform_points(points), dict(notes))


def write_case(case: SyntheticCase, folder: PathLike) -> Path:
    """Write a case as files the CLI reads: planning/repeat images, structures, dose, plan text, truth."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    write_volume(case.planning, out / "planning_ct.nii.gz", np.int16 if case.planning.array.dtype != np.uint8 else None)
    write_volume(case.repeat, out / "repeat_ct.nii.gz", np.int16 if case.repeat.meta.get("units") == "HU" else np.float32)
    for sub, structs in (("structures", case.planning_structures), ("truth_structures_on_repeat",
                                                                     case.repeat_structures)):
        for s in structs:
            write_volume(case.planning.with_array(s.mask) if sub == "structures" else
                         case.repeat.with_array(s.mask), out / sub / f"{s.name}.nii.gz", np.uint8)
    if case.dose is not None:
        write_volume(case.dose, out / "dose.nii.gz", np.float32)
    if case.plan is not None:
        (out / "plan.txt").write_text(case.plan.text() + "\n")
    if case.truth is not None:
        write_transform(case.truth, out / "truth_transform.h5")
    if len(case.points_planning):
        np.savetxt(out / "points_planning.csv", case.points_planning, delimiter=",", fmt="%.4f",
                   header="x,y,z (LPS mm, planning CT)")
        np.savetxt(out / "points_repeat_truth.csv", case.points_repeat, delimiter=",", fmt="%.4f",
                   header="x,y,z (LPS mm, repeat CT)")
    return out
