"""Volumes on oriented grids in LPS millimetres, their I/O and resampling.

Conventions
-----------
* ``Volume.array`` is indexed ``[k, j, i]`` = ``(z, y, x)``; a vector image has a
  trailing component axis ``(z, y, x, c)``.
* ``Grid.affine`` is the 4x4 matrix that maps a voxel index ``(i, j, k, 1)``
  (i fastest, i.e. x) to a world point in LPS millimetres: the ITK/DICOM
  convention, ``world = origin + direction @ diag(spacing) @ index``.
* Resampling goes through SimpleITK, so our results equal ``sitk.Resample``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from .errors import InputError

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``shape`` (z, y, x) and the index-to-LPS ``affine`` (4x4, mm)."""

    shape: tuple
    affine: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "affine", np.asarray(self.affine, dtype=np.float64))
        if len(self.shape) != 3:
            raise InputError(f"a grid needs 3 dimensions, got shape {self.shape}; pass a 3D image")
        if min(self.shape) < 1:
            raise InputError(f"the image has zero size {self.shape}; check that the file holds voxels")

    @classmethod
    def from_geometry(cls, shape_zyx, spacing_xyz, origin_xyz=(0.0, 0.0, 0.0), direction=None) -> "Grid":
        """Grid from ITK-style geometry: spacing and origin in (x, y, z) mm, 3x3 direction (columns = axes)."""
        d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64).reshape(3, 3)
        a = np.eye(4)
        a[:3, :3] = d @ np.diag(np.asarray(spacing_xyz, dtype=np.float64))
        a[:3, 3] = origin_xyz
        return cls(tuple(shape_zyx), a)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along (i, j, k) in mm."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def direction(self) -> np.ndarray:
        """3x3 direction cosines, one column per index axis (i, j, k), LPS."""
        return self.affine[:3, :3] / self.spacing

    @property
    def origin(self) -> np.ndarray:
        """LPS position (mm) of voxel (0, 0, 0)."""
        return self.affine[:3, 3].copy()

    @property
    def size_xyz(self) -> tuple:
        return tuple(reversed(self.shape))

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape))

    def index_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) continuous indices (i, j, k) -> (N, 3) LPS mm."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """(N, 3) LPS mm -> (N, 3) continuous indices (i, j, k)."""
        xyz = np.asarray(xyz, dtype=np.float64)
        return (xyz - self.affine[:3, 3]) @ np.linalg.inv(self.affine[:3, :3]).T

    def world_points(self) -> np.ndarray:
        """LPS mm of every voxel centre, shape (z, y, x, 3)."""
        k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in self.shape], indexing="ij")
        ijk = np.stack([i, j, k], axis=-1)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def center(self) -> np.ndarray:
        """LPS mm of the grid's geometric centre."""
        return self.index_to_world(((np.array(self.size_xyz, dtype=np.float64) - 1) / 2)[None])[0]

    def with_spacing(self, spacing_mm: float, finer: bool = False) -> "Grid":
        """Same direction and world extent, voxels of about ``spacing_mm`` along every axis.

        The spacing is adjusted (by less than half a voxel over the extent) so
        that the first and last voxel centres stay where they were; axes already
        coarser than ``spacing_mm`` keep their spacing unless ``finer``.
        """
        old = self.spacing
        new = np.full(3, float(spacing_mm)) if finer else np.maximum(old, float(spacing_mm))
        size_xyz = np.array(self.size_xyz, dtype=np.float64)
        extent = (size_xyz - 1) * old
        new_size = np.maximum(1, np.round(extent / new).astype(int) + 1)
        new = np.where(new_size > 1, extent / np.maximum(new_size - 1, 1), new)
        a = np.eye(4)
        a[:3, :3] = self.direction @ np.diag(new)
        a[:3, 3] = self.affine[:3, 3]
        return Grid(tuple(int(s) for s in reversed(new_size)), a)

    def to_sitk_reference(self, pixel_type=sitk.sitkUInt8) -> sitk.Image:
        """An empty SimpleITK image with this geometry (for ``sitk.Resample``)."""
        img = sitk.Image([int(s) for s in self.size_xyz], pixel_type)
        _set_geometry(img, self)
        return img

    def same_as(self, other: "Grid", tol: float = 1e-4) -> bool:
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=tol)


def _set_geometry(img: sitk.Image, grid: Grid) -> None:
    img.SetSpacing([float(s) for s in grid.spacing])
    img.SetOrigin([float(o) for o in grid.origin])
    img.SetDirection([float(d) for d in grid.direction.ravel()])


def grid_of_sitk(img: sitk.Image) -> Grid:
    """The Grid of a SimpleITK image."""
    if img.GetDimension() != 3:
        raise InputError(
            f"expected a 3D image, got {img.GetDimension()}D (size {img.GetSize()}); "
            "pass one 3D volume (extract a frame from a 4D series first)")
    return Grid.from_geometry(tuple(reversed(img.GetSize())), img.GetSpacing(), img.GetOrigin(),
                              np.array(img.GetDirection()).reshape(3, 3))


@dataclass
class Volume:
    """An image on a grid: ``array`` (z, y, x[, c]) and the index-to-LPS ``affine``.

    ``meta`` carries what the pixels do not: ``modality`` (CT, MR, RTDOSE, ...),
    ``frame_of_reference`` (DICOM UID), ``units`` (HU, Gy), ``name``.
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim not in (3, 4):
            raise InputError(f"a volume must be 3D (z, y, x) or a 3D vector image, got shape {self.array.shape}")

    @property
    def grid(self) -> Grid:
        return Grid(self.array.shape[:3], self.affine)

    @property
    def is_vector(self) -> bool:
        return self.array.ndim == 4

    def with_array(self, array: np.ndarray, **meta: Any) -> "Volume":
        """A new Volume on the same grid with another array (meta copied, then updated)."""
        m = dict(self.meta)
        m.update(meta)
        return Volume(array, self.affine.copy(), m)

    def to_sitk(self, dtype=None) -> sitk.Image:
        arr = self.array if dtype is None else self.array.astype(dtype)
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=self.is_vector)
        _set_geometry(img, self.grid)
        return img

    @classmethod
    def from_sitk(cls, img: sitk.Image, **meta: Any) -> "Volume":
        grid = grid_of_sitk(img)
        return cls(sitk.GetArrayFromImage(img), grid.affine, dict(meta))


def check_finite(volume: Volume, role: str) -> None:
    """Raise InputError if the volume has NaN or infinite voxels."""
    bad = ~np.isfinite(volume.array)
    if bad.any():
        raise InputError(
            f"the {role} image has {int(bad.sum())} NaN or infinite voxels; "
            "replace them (e.g. with the background value) before registering")


# ---------------------------------------------------------------- reading and writing
_IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
# meta written into NRRD and MHA headers (NIfTI has no place for them) and read back: the modality tells the
# methods an MR from a CT when the Slicer modules hand their volumes to the engine as files
FILE_META = ("modality", "units")
FILE_META_PREFIX = "rtreg_"


def read_volume(path: PathLike) -> Volume:
    """Read a NIfTI/NRRD/MHA file, or a DICOM CT/MR series (a folder), into a Volume.

    For DICOM, ``meta`` holds ``modality``, ``frame_of_reference``,
    ``series_uid`` and ``sop_uids`` (used to check that an RTSTRUCT belongs).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p} does not exist; check the path")
    if p.is_dir():
        from .dicomrt import read_dicom_series
        return read_dicom_series(p)
    if p.suffix.lower() == ".dcm":
        from .dicomrt import read_dicom_series
        return read_dicom_series(p.parent)
    try:
        img = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise InputError(f"cannot read {p} as an image ({exc.args[0].splitlines()[-1] if exc.args else exc}); "
                         f"use a NIfTI, NRRD, MHA file or a DICOM folder") from None
    if img.GetDimension() == 4:
        raise InputError(f"{p} is a 4D image ({img.GetSize()[3]} frames of {img.GetSize()[:3]}); a 3D volume is "
                         "needed here: register its frames with `rtreg register-series --series` or extract "
                         "one frame first")
    if img.GetDimension() != 3:
        raise InputError(f"{p} is a {img.GetDimension()}D image (size {img.GetSize()}); "
                         "registration needs a 3D volume")
    if p.name.lower().endswith((".nii", ".nii.gz")) and _nifti_has_nonfinite(p):
        raise InputError(f"{p} has NaN or infinite voxels (ITK would read them as 0); replace them (e.g. with "
                         "the background value) before registering")
    kept = {key: img.GetMetaData(FILE_META_PREFIX + key) for key in FILE_META
            if img.HasMetaDataKey(FILE_META_PREFIX + key)}
    if img.GetNumberOfComponentsPerPixel() == 1 and "units" not in kept:
        # no units written: integer voxels are taken as CT numbers, unless a modality other than CT is known
        ct = kept.get("modality", "CT").upper() == "CT"
        kept["units"] = "HU" if ct and img.GetPixelID() in (sitk.sitkInt16, sitk.sitkInt32) else ""
    return Volume.from_sitk(img, name=_stem(p), path=str(p), **kept)


def read_frames(path: PathLike) -> List[Volume]:
    """The 3D frames of a 4D image file (4D NIfTI, NRRD or MHA; time is the 4th axis), in order."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p} does not exist or is not a file; give a 4D NIfTI/NRRD/MHA image")
    try:
        img = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise InputError(f"cannot read {p} as an image ({exc.args[0].splitlines()[-1] if exc.args else exc})"
                         ) from None
    if img.GetDimension() != 4:
        raise InputError(f"{p} is a {img.GetDimension()}D image (size {img.GetSize()}); a 4D series is needed "
                         "here (for two 3D images use `rtreg register`)")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{p} has {img.GetNumberOfComponentsPerPixel()} components per voxel; give a scalar series")
    if p.name.lower().endswith((".nii", ".nii.gz")) and _nifti_has_nonfinite(p):
        raise InputError(f"{p} has NaN or infinite voxels (ITK would read them as 0); replace them before "
                         "registering")
    size = list(img.GetSize())
    frames = []
    for k in range(size[3]):
        frame = sitk.Extract(img, size[:3] + [0], [0, 0, 0, k])
        vol = Volume.from_sitk(frame, name=f"{_stem(p)} frame {k}", path=str(p), frame=k)
        check_finite(vol, f"frame {k} of the series")
        frames.append(vol)
    return frames


def write_frames(frames: Sequence[Volume], path: PathLike, dtype=None) -> Path:
    """Write 3D frames on one grid as a 4D image (time the 4th axis, spacing 1)."""
    p = Path(path)
    if any(not f.grid.same_as(frames[0].grid) for f in frames):
        raise ValueError("the frames of a series must share one grid")
    p.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.JoinSeries([f.to_sitk(dtype) for f in frames]), str(p), useCompression=True)
    return p


def _nifti_has_nonfinite(p: Path) -> bool:
    """True if a float NIfTI-1 file holds NaN/inf (ITK's NIfTI reader silently turns NaN into 0)."""
    import gzip
    opener = gzip.open if p.name.lower().endswith(".gz") else open
    with opener(p, "rb") as fh:
        header = fh.read(348)
        if len(header) < 348:
            return False
        for endian in ("<", ">"):
            if np.frombuffer(header[:4], f"{endian}i4")[0] == 348:
                break
        else:
            return False  # NIfTI-2 or unknown: nothing more we can check
        datatype = int(np.frombuffer(header[70:72], f"{endian}i2")[0])
        dtypes = {16: "f4", 64: "f8"}
        if datatype not in dtypes:
            return False
        offset = int(np.frombuffer(header[108:112], f"{endian}f4")[0])
        fh.read(max(offset - 348, 0))
        data = np.frombuffer(fh.read(), f"{endian}{dtypes[datatype]}")
    return not bool(np.isfinite(data).all())


def _stem(p: Path) -> str:
    name = p.name
    for s in _IMAGE_SUFFIXES:
        if name.lower().endswith(s):
            return name[: -len(s)]
    return p.stem


def write_volume(volume: Volume, path: PathLike, dtype=None) -> Path:
    """Write a Volume as NIfTI, NRRD or MHA (chosen by the suffix); returns the path. NRRD and MHA keep its
    ``modality`` and ``units`` in the header (:data:`FILE_META`), for :func:`read_volume`."""
    p = Path(path)
    if not any(p.name.lower().endswith(s) for s in _IMAGE_SUFFIXES):
        raise InputError(f"unsupported output format {p.name}; use .nii.gz, .nrrd or .mha")
    p.parent.mkdir(parents=True, exist_ok=True)
    img = volume.to_sitk(dtype)
    for key in FILE_META:
        if volume.meta.get(key):
            img.SetMetaData(FILE_META_PREFIX + key, str(volume.meta[key]))
    sitk.WriteImage(img, str(p), useCompression=True)
    return p


# ---------------------------------------------------------------- resampling
_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor,
                  "label": sitk.sitkLabelLinear, "bspline": sitk.sitkBSpline}


def crop_to_mask(volume: Volume, mask: np.ndarray, margin_mm: float = 10.0) -> Volume:
    """The part of ``volume`` inside the bounding box of ``mask`` (same grid, z y x) widened by ``margin_mm``
    on every side (clipped at the image edge); voxels and geometry are unchanged, only the extent shrinks."""
    if mask.shape != volume.array.shape[:3]:
        raise InputError(f"the mask {mask.shape} is not on the image grid {volume.array.shape[:3]}")
    idx = np.argwhere(mask)
    if idx.size == 0:
        raise InputError("the mask to crop to is empty; check the mask (or the body threshold)")
    pad = np.ceil(margin_mm / volume.grid.spacing[::-1]).astype(int)
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, volume.array.shape[:3])
    affine = volume.affine.copy()
    affine[:3, 3] = volume.grid.index_to_world(lo[None, ::-1].astype(float))[0]
    sub = volume.array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].copy()
    return Volume(sub, affine, dict(volume.meta))


def resample(volume: Volume, grid: Grid, mode: str = "linear", transform: Optional[sitk.Transform] = None,
             fill: float = 0.0) -> Volume:
    """Resample ``volume`` onto ``grid`` (through ``transform`` if given).

    ``transform`` maps a point of ``grid`` (LPS mm) to a point of ``volume``
    (ITK's resampling direction). ``mode``: ``linear``; ``nearest``; ``label``
    (label-aware: each label interpolated linearly, the most likely one kept,
    for masks and label maps); ``mask`` (linear then >= 0.5, for one binary
    mask, returns uint8). Points outside ``volume`` get ``fill``.
    """
    img = volume.to_sitk()
    if mode == "mask":
        img = sitk.Cast(img > 0, sitk.sitkFloat32)
        interp, fill = sitk.sitkLinear, 0.0
    else:
        if mode not in _INTERPOLATORS:
            raise ValueError(f"unknown interpolation {mode!r}; use one of {sorted(_INTERPOLATORS) + ['mask']}")
        interp = _INTERPOLATORS[mode]
        if mode == "label" and img.GetPixelID() not in (sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkInt16,
                                                         sitk.sitkInt32, sitk.sitkUInt32, sitk.sitkInt8):
            img = sitk.Cast(img, sitk.sitkUInt16)
    out = sitk.Resample(img, grid.to_sitk_reference(), transform if transform is not None else sitk.Transform(),
                        interp, float(fill), img.GetPixelID())
    arr = sitk.GetArrayFromImage(out)
    if mode == "mask":
        arr = (arr >= 0.5).astype(np.uint8)
    return Volume(arr, grid.affine.copy(), dict(volume.meta))


def smooth_for_downsampling(volume: Volume, target_spacing_mm: float) -> Volume:
    """Gaussian anti-aliasing before resampling to ``target_spacing_mm`` (sigma = 0.4 x the spacing ratio)."""
    sp = volume.grid.spacing
    sigma = [0.4 * max(target_spacing_mm - s, 0.0) for s in sp]
    if max(sigma) <= 0:
        return volume
    img = sitk.Cast(volume.to_sitk(), sitk.sitkFloat32)
    out = sitk.SmoothingRecursiveGaussian(img, [max(s, 1e-3) for s in sigma])
    return volume.with_array(sitk.GetArrayFromImage(out))


# ---------------------------------------------------------------- intensities
def window_ct(array: np.ndarray, level: float = 40.0, width: float = 400.0) -> np.ndarray:
    """Clip HU to a window and scale to [0, 1] (display and CT similarity)."""
    lo, hi = level - width / 2, level + width / 2
    return ((np.clip(array.astype(np.float32), lo, hi) - lo) / (hi - lo)).astype(np.float32)


def normalize_intensity(volume: Volume, mask: Optional[np.ndarray] = None,
                        lower_pct: float = 0.5, upper_pct: float = 99.5) -> np.ndarray:
    """Robust [0, 1] scaling for any modality: percentiles (inside ``mask`` if given) map to 0 and 1.

    CT is first clipped to [-1000, 2000] HU so metal and padding do not set the range.
    """
    a = volume.array.astype(np.float32)
    if volume.meta.get("modality", "").upper() == "CT" or volume.meta.get("units") == "HU":
        a = np.clip(a, -1000.0, 2000.0)
    sample = a[mask > 0] if mask is not None and np.any(mask) else a
    lo, hi = np.percentile(sample, [lower_pct, upper_pct])
    if hi - lo < 1e-6:
        raise InputError(f"the image {volume.meta.get('name', '')!r} is constant ({lo:g}); "
                         "check that the right file was given")
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
