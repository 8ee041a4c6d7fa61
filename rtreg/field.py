"""Spatial transforms and displacement fields (DESIGN.md convention).

A :class:`SpatialTransform` maps a fixed-image point x (LPS mm) to the moving
image point ``A(x + u(x))``: first the displacement field ``u`` (vectors in LPS
mm, stored on the fixed grid), then the 4x4 affine pre-alignment ``A``. This is
the ITK "resampling" direction (warped moving = moving(T(x))), Slicer's
FromParent, and exactly what ``transform.h5`` holds: an ITK composite transform
``[affine, displacement]`` (ITK applies the last added first).

Everything here goes through SimpleITK, so what we compute equals what
``sitk.ReadTransform`` + ``sitk.Resample`` compute from our files; the one
exception, the inverse's point-wise sampling of a field (only the points still
iterating), reproduces ITK's evaluation and is tested against it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import InputError
from .image import Grid, PathLike, Volume, resample


def affine_to_sitk(affine: np.ndarray) -> sitk.AffineTransform:
    """4x4 LPS point mapping -> ITK AffineTransform (centre 0)."""
    tx = sitk.AffineTransform(3)
    tx.SetMatrix([float(v) for v in np.asarray(affine)[:3, :3].ravel()])
    tx.SetTranslation([float(v) for v in np.asarray(affine)[:3, 3]])
    return tx


def sitk_linear_to_affine(tx: sitk.Transform) -> np.ndarray:
    """Any ITK matrix-offset transform (Euler, Versor, Similarity, Affine) -> 4x4: y = M (x - c) + c + t.

    A transform read from a file as the generic ``sitk.Transform`` (no matrix accessors) is probed at the
    origin and the unit points instead, which is exact for a linear transform."""
    if not hasattr(tx, "GetMatrix"):
        a = np.eye(4)
        a[:3, 3] = tx.TransformPoint((0.0, 0.0, 0.0))
        for k in range(3):
            a[:3, k] = np.asarray(tx.TransformPoint(tuple(float(v) for v in np.eye(3)[k]))) - a[:3, 3]
        return a
    m = np.array(tx.GetMatrix(), dtype=np.float64).reshape(3, 3)
    t = np.array(tx.GetTranslation(), dtype=np.float64) if hasattr(tx, "GetTranslation") else np.zeros(3)
    c = np.array(tx.GetCenter(), dtype=np.float64) if hasattr(tx, "GetCenter") else np.zeros(3)
    a = np.eye(4)
    a[:3, :3] = m
    a[:3, 3] = t + c - m @ c
    return a


def coverage(image_grid: Grid, affine: np.ndarray, grid: Grid) -> np.ndarray:
    """(z, y, x) uint8 on ``grid``: 1 where the 4x4 ``affine`` (``grid``'s LPS mm -> the image's LPS mm) maps
    the voxel centre inside ``image_grid`` (continuous index in [-0.5, n - 0.5) on each axis, where ITK's linear
    interpolation reads image voxels and not the fill of a cropped field of view). Similarity is counted
    only where both images have data there (the moving image through the pre-alignment, the fixed image with
    the identity): comparing one image's anatomy with the other's fill pulls a registration towards the
    fill."""
    to_index = np.linalg.inv(image_grid.affine) @ np.asarray(affine, np.float64) @ grid.affine   # ijk -> image ijk
    k, j, i = (np.arange(n, dtype=np.float64) for n in grid.shape)
    inside = np.ones(grid.shape, bool)
    for axis, n in enumerate(image_grid.size_xyz):      # the map is affine: one broadcast sum per image axis
        r = to_index[axis]
        index = r[0] * i[None, None, :] + r[1] * j[None, :, None] + r[2] * k[:, None, None] + r[3]
        inside &= (index >= -0.5) & (index < n - 0.5)  # ITK's buffer: half a voxel past the edge centres
    return inside.astype(np.uint8)


VIEW_MARGIN_MM = 50.0
"""How far past the part of the moving image that the fixed grid maps onto a working copy of it reaches: more
than any displacement a deformable stage adds after pre-alignment (samples beyond it read the edge value)."""


def _oriented_like(moving_grid: Grid, axes: np.ndarray) -> Grid:
    """``moving_grid``'s lattice (the same voxel centres) with its axes reordered and reversed so that index axis
    k runs as close as a signed permutation allows along the LPS direction ``axes[:, k]``."""
    unit = moving_grid.direction
    cos = unit.T @ (axes / np.linalg.norm(axes, axis=0))                    # moving axis p vs wanted axis k
    perm = max(itertools.permutations(range(3)), key=lambda q: sum(abs(cos[q[k], k]) for k in range(3)))
    signs = [1.0 if cos[perm[k], k] >= 0 else -1.0 for k in range(3)]
    size, spacing = np.array(moving_grid.size_xyz), moving_grid.spacing
    first = np.zeros(3)                                             # moving ijk of the new first voxel
    for k in range(3):
        if signs[k] < 0:
            first[perm[k]] = size[perm[k]] - 1                     # a reversed axis starts at the far voxel
    a = np.eye(4)
    for k in range(3):
        a[:3, k] = signs[k] * spacing[perm[k]] * unit[:, perm[k]]
    a[:3, 3] = moving_grid.index_to_world(first[None])[0]
    return Grid(tuple(int(size[perm[k]]) for k in (2, 1, 0)), a)


def moving_view(moving_grid: Grid, affine: np.ndarray, grid: Grid, margin_mm: Optional[float] = None) -> Grid:
    """Where a registration holds the moving image on a working ``grid`` (the fixed frame at some spacing): the
    moving image's axes, reordered and reversed to run like ``grid``'s axes mapped through the 4x4 ``affine``
    (``grid``'s LPS mm -> the moving image's LPS mm), at ``grid``'s spacing along each, from the moving image's
    first voxel centre (so at the moving image's own spacing nothing is interpolated), cropped to the part
    that ``grid``'s box maps onto, widened by ``margin_mm`` on every side (clipped, at least one voxel).

    Orientation and spacing matter to local descriptors: MIND-SSC's channels compare neighbours one voxel
    step along the index axes, so the moving image's features match the fixed image's channel for channel
    only on axes that run alike with the same steps (a DICOM series against a NIfTI, a head-first against a
    feet-first scan, 5 mm slices against 2 mm). The crop bounds the memory when the moving field of view is
    much larger than the fixed one (a whole-body repeat CT against a head planning CT). ``margin_mm``:
    :data:`VIEW_MARGIN_MM` unless given."""
    margin_mm = VIEW_MARGIN_MM if margin_mm is None else margin_mm
    oriented = _oriented_like(moving_grid, np.asarray(affine, np.float64)[:3, :3] @ grid.direction)
    extent = (np.array(oriented.size_xyz) - 1) * oriented.spacing
    steps = grid.spacing
    sized = np.eye(4)
    sized[:3, :3] = oriented.direction * steps
    sized[:3, 3] = oriented.origin
    sized = Grid(tuple(int(v) for v in (np.floor(extent / steps + 1e-6).astype(int) + 1)[::-1]), sized)
    n = np.array(grid.size_xyz, dtype=np.float64)
    corners = np.array([[a, b, c] for a in (-0.5, n[0] - 0.5) for b in (-0.5, n[1] - 0.5)
                        for c in (-0.5, n[2] - 0.5)])                                        # grid ijk
    to_index = np.linalg.inv(sized.affine) @ np.asarray(affine, np.float64) @ grid.affine
    ijk = corners @ to_index[:3, :3].T + to_index[:3, 3]                                 # view ijk
    pad = margin_mm / steps
    size = np.array(sized.size_xyz)
    lo = np.clip(np.floor(ijk.min(0) - pad), 0, size - 1).astype(int)
    hi = np.clip(np.ceil(ijk.max(0) + pad), lo, size - 1).astype(int)
    a = sized.affine.copy()
    a[:3, 3] = sized.index_to_world(lo[None].astype(np.float64))[0]
    return Grid(tuple(int(s) for s in (hi - lo + 1)[::-1]), a)


def field_to_sitk_transform(field: Volume) -> sitk.DisplacementFieldTransform:
    """A DisplacementFieldTransform over a copy of ``field`` (vector Volume, LPS mm)."""
    _check_field(field)
    img = field.to_sitk(np.float64)
    return sitk.DisplacementFieldTransform(img)  # takes ownership of img, not of field


def _check_field(field: Volume) -> None:
    if not field.is_vector or field.array.shape[-1] != 3:
        raise InputError(f"a displacement field needs 3 components per voxel, got shape {field.array.shape}")


@dataclass
class SpatialTransform:
    """Fixed point x (LPS mm) -> moving point ``affine @ (x + displacement(x))``.

    ``displacement`` is a vector Volume (z, y, x, 3) of LPS mm on the fixed grid,
    or None for a purely affine transform.
    """

    affine: np.ndarray
    displacement: Optional[Volume] = None

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.displacement is not None:
            _check_field(self.displacement)

    @classmethod
    def identity(cls) -> "SpatialTransform":
        return cls(np.eye(4), None)

    def to_sitk(self) -> sitk.CompositeTransform:
        tx = sitk.CompositeTransform(3)
        tx.AddTransform(affine_to_sitk(self.affine))
        if self.displacement is not None:
            tx.AddTransform(field_to_sitk_transform(self.displacement))
        return tx

    def transform_points(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) fixed LPS mm -> (N, 3) moving LPS mm."""
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        if self.displacement is None:
            return pts @ self.affine[:3, :3].T + self.affine[:3, 3]
        tx = self.to_sitk()
        return np.array([tx.TransformPoint(tuple(float(v) for v in p)) for p in pts])

    def total_field(self, grid: Grid) -> Volume:
        """The whole mapping as a displacement field on ``grid``: T(x) - x (LPS mm, float32)."""
        return _field_of(self.to_sitk(), grid)


def _field_of(tx: sitk.Transform, grid: Grid) -> Volume:
    """Any ITK transform sampled as a displacement field T(x) - x on ``grid`` (LPS mm, float32)."""
    img = sitk.TransformToDisplacementField(tx, sitk.sitkVectorFloat64, [int(s) for s in grid.size_xyz],
                                            [float(o) for o in grid.origin], [float(s) for s in grid.spacing],
                                            [float(d) for d in grid.direction.ravel()])
    return Volume(sitk.GetArrayFromImage(img).astype(np.float32), grid.affine.copy(), {"units": "mm"})


def warp(volume: Volume, transform: SpatialTransform, grid: Grid, mode: str = "linear",
         fill: float = 0.0) -> Volume:
    """``volume`` seen through ``transform`` on ``grid``: out(x) = volume(T(x)).

    ``mode``: ``linear`` for images and dose (units kept in meta), ``mask`` for a
    binary mask (label-aware: linear then >= 0.5), ``label`` for label maps.
    """
    return resample(volume, grid, mode, transform.to_sitk(), fill)


def resample_field(field: Volume, grid: Grid) -> Volume:
    """Up- or down-sample a displacement field onto ``grid`` (linear, vectors unchanged, 0 outside)."""
    _check_field(field)
    return resample(field, grid, "linear", None, 0.0)


def compose(outer: SpatialTransform, inner: SpatialTransform, grid: Grid) -> SpatialTransform:
    """x -> outer(inner(x)) as one displacement field on ``grid``.

    With fields only: w(x) = u_inner(x) + u_outer(x + u_inner(x)).
    """
    tx = sitk.CompositeTransform(3)
    tx.AddTransform(outer.to_sitk())
    tx.AddTransform(inner.to_sitk())
    return SpatialTransform(np.eye(4), _field_of(tx, grid))


@dataclass
class InverseResult:
    """The inverse mapping (moving point -> fixed point) and how well it inverts."""

    transform: SpatialTransform
    residual_mean_mm: float
    residual_max_mm: float
    iterations: int


def displacement_at(field: Volume) -> Callable[[np.ndarray], np.ndarray]:
    """A function giving ``field``'s displacement (LPS mm) at (N, 3) LPS mm points, as ITK's
    DisplacementFieldTransform evaluates it (and so ``sitk.Resample`` with our ``transform.h5``): trilinear,
    the border value up to half a voxel beyond the outer voxel centres, zero farther out."""
    at_index = _displacement_at_index(field)
    return lambda points: at_index(field.grid.world_to_index(points))


def _displacement_at_index(field: Volume) -> Callable[[np.ndarray], np.ndarray]:
    """:func:`displacement_at` taking (N, 3) continuous indices (i, j, k) of the field's grid."""
    _check_field(field)
    components = [np.ascontiguousarray(field.array[..., c]) for c in range(3)]
    end = np.array(field.grid.size_xyz, dtype=np.float64) - 0.5

    def at(ijk: np.ndarray) -> np.ndarray:
        u = np.stack([ndimage.map_coordinates(c, ijk[:, ::-1].T, order=1, mode="nearest", output=np.float64)
                      for c in components], axis=-1)
        u[~np.all((ijk >= -0.5) & (ijk < end), axis=1)] = 0.0
        return u

    return at


def invert(transform: SpatialTransform, grid: Grid, iterations: int = 40, tolerance_mm: float = 0.01,
           max_spacing_mm: Optional[float] = 2.0) -> InverseResult:
    """Invert ``transform`` on ``grid`` (normally the moving grid) by fixed-point iterations.

    For each point y of the (possibly coarsened) grid it finds x with ``A(x + u(x)) = y`` by iterating
    x <- A^-1 y - u(x), point by point: a point stops once its residual |x + u(x) - A^-1 y| is below
    ``tolerance_mm``; the others go on up to ``iterations`` and keep the iterate of smallest residual.
    The residual is reported in mm, mean and max over the points whose iterates all lay at least one voxel
    inside the field's grid: at its border u drops to zero (as in ITK), and a point whose iterates cross it
    may have no pre-image at all (it keeps its best iterate, unjudged). The inverse is computed on ``grid``
    coarsened to at most ``max_spacing_mm`` (None: full resolution); it is a smooth field and is
    interpolated linearly.
    """
    a_inv = np.linalg.inv(transform.affine)
    if transform.displacement is None:
        return InverseResult(SpatialTransform(a_inv, None), 0.0, 0.0, 0)
    work = grid.with_spacing(max_spacing_mm) if max_spacing_mm else grid
    y = work.world_points().reshape(-1, 3)
    z = y @ a_inv[:3, :3].T + a_inv[:3, 3]
    u_at = _displacement_at_index(transform.displacement)
    x, best = z.copy(), z.copy()              # the current iterate and the best pre-image found so far
    residual = np.full(len(z), np.inf)        # the residual of ``best``
    u_grid = transform.displacement.grid
    upper = np.array(u_grid.size_xyz) - 2
    judged = np.ones(len(z), bool)            # every iterate at least one voxel inside the field's grid
    active = np.arange(len(z))
    it = 0
    for it in range(1, iterations + 1):
        xa = x[active]
        ijk = u_grid.world_to_index(xa)
        judged[active[~np.all((ijk >= 1) & (ijk <= upper), axis=1)]] = False
        u = u_at(ijk)
        r = np.linalg.norm(xa + u - z[active], axis=1)
        better = r < residual[active]
        best[active[better]], residual[active[better]] = xa[better], r[better]
        x[active] = z[active] - u
        active = active[r >= tolerance_mm]
        if not active.size:
            break
    r = residual[judged]
    res_mean, res_max = (float(r.mean()), float(r.max())) if r.size else (0.0, 0.0)
    field = Volume((best - y).reshape(work.shape + (3,)).astype(np.float32), work.affine.copy(), {"units": "mm"})
    return InverseResult(SpatialTransform(np.eye(4), field), res_mean, res_max, it)


def jacobian_determinant(field: Volume) -> Volume:
    """det(d(x + u)/dx) per voxel of a displacement field (vectors and grid in LPS mm).

    Central differences along the grid axes, turned into world derivatives with
    the inverse of direction @ diag(spacing), so oblique grids are handled.
    Values <= 0 mark folding.
    """
    _check_field(field)
    u = field.array.astype(np.float32)
    m_inv = np.linalg.inv(field.grid.affine[:3, :3]).astype(np.float32)  # d index / d world
    # du/d(index): axes of array are (k, j, i) -> index component order (i, j, k)
    d_index = [np.gradient(u, axis=ax) if u.shape[ax] > 1 else np.zeros_like(u) for ax in (2, 1, 0)]
    g = np.stack(d_index, axis=-1)  # (..., 3 components, 3 index axes)
    jac = np.einsum("...ci,iw->...cw", g, m_inv) + np.eye(3, dtype=np.float32)
    return field.with_array(np.linalg.det(jac).astype(np.float32), units="")


# ---------------------------------------------------------------- files
def write_transform(transform: SpatialTransform, path: PathLike) -> Path:
    """Write the composite ITK transform (``.h5``; affine + displacement, LPS) readable by ``sitk.ReadTransform``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteTransform(transform.to_sitk(), str(p))
    return p


def write_field(field: Volume, path: PathLike) -> Path:
    """Write a displacement field alone as a vector image (``.mha`` or ``.nrrd``; LPS mm, float32)."""
    p = Path(path)
    if not (p.name.endswith(".mha") or p.name.endswith(".nrrd")):
        raise InputError(f"write displacement fields as .mha or .nrrd, not {p.name} (NIfTI vector fields are ambiguous)")
    _check_field(field)
    p.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(field.to_sitk(np.float32), str(p), useCompression=True)
    return p


def read_transform(path: PathLike) -> SpatialTransform:
    """Read an ITK transform file (ours or any affine/rigid/displacement/composite) or a field image.

    Composite transforms must have the form [linear..., displacement] (ITK order).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"transform file {p} does not exist")
    if p.name.endswith((".mha", ".nrrd", ".nii", ".nii.gz")):
        img = sitk.ReadImage(str(p))
        if img.GetNumberOfComponentsPerPixel() != 3:
            raise InputError(f"{p} is not a 3-component displacement field")
        return SpatialTransform(np.eye(4), Volume.from_sitk(img, units="mm"))
    tx = sitk.ReadTransform(str(p))
    parts = []
    if tx.GetName() == "CompositeTransform":
        comp = sitk.CompositeTransform(tx)
        parts = [comp.GetNthTransform(i) for i in range(comp.GetNumberOfTransforms())]
    else:
        parts = [tx]
    affine = np.eye(4)
    field = None
    for i, part in enumerate(parts):
        name = part.GetName()
        if name == "DisplacementFieldTransform":
            if i != len(parts) - 1:
                raise InputError(f"{p}: the displacement field must be applied first (added last) in the composite")
            img = sitk.DisplacementFieldTransform(part).GetDisplacementField()
            field = Volume.from_sitk(img, units="mm")
            field.array = field.array.astype(np.float32)
        elif name == "TranslationTransform":
            affine = affine @ _translation(np.array(part.GetOffset()))
        elif hasattr(part, "GetMatrix"):
            affine = affine @ sitk_linear_to_affine(part)
        else:
            raise InputError(f"{p}: transform type {name} is not supported; use linear and displacement transforms")
    return SpatialTransform(affine, field)


def _translation(offset: np.ndarray) -> np.ndarray:
    a = np.eye(4)
    a[:3, 3] = offset
    return a
