"""DICOM: CT/MR image series, RTSTRUCT -> masks, RTDOSE -> dose in Gy, RT (Ion) Plan -> summary.

All positions are DICOM patient coordinates (LPS mm), the engine's world space.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from .errors import InputError
from .image import Grid, PathLike, Volume, grid_of_sitk

RT_ION_PLAN_SOP = "1.2.840.10008.5.1.4.1.1.481.8"


def read_dataset(path: PathLike, **kw) -> pydicom.Dataset:
    """pydicom.dcmread that turns unreadable or header-less files into an InputError."""
    try:
        return pydicom.dcmread(str(path), **kw)
    except InvalidDicomError:
        try:
            ds = pydicom.dcmread(str(path), force=True, **kw)
        except Exception as exc:  # noqa: BLE001 - any parser failure means a corrupt file
            raise InputError(f"{path} is not a readable DICOM file ({exc}); re-export it from the TPS/PACS") from None
        if "SOPClassUID" not in ds and "Modality" not in ds:
            raise InputError(f"{path} is not a readable DICOM file (no DICOM header); re-export it from the TPS/PACS")
        return ds
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path} is not a readable DICOM file ({exc}); re-export it from the TPS/PACS") from None


# ---------------------------------------------------------------- image series
def read_dicom_series(folder: PathLike, series_uid: Optional[str] = None) -> Volume:
    """Read the CT/MR image series in ``folder`` (the largest one if there are several).

    Raises InputError for a folder without images, unevenly spaced slices, or a
    transfer syntax the decoder cannot read (naming it).
    """
    folder = Path(folder)
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise InputError(f"no DICOM image series in {folder}; point to the folder of the CT/MR slices")
    if series_uid is not None:
        if series_uid not in ids:
            raise InputError(f"series {series_uid} is not in {folder}; found {list(ids)}")
        ids = [series_uid]
    files_by_id = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in ids}
    sid = max(files_by_id, key=lambda s: len(files_by_id[s]))
    files = list(files_by_id[sid])
    headers = [read_dataset(f, stop_before_pixels=True) for f in files]
    h0 = headers[0]
    modality = str(h0.get("Modality", ""))
    if modality in ("RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD"):
        raise InputError(f"{folder} holds {modality} objects, not an image series")
    _check_slice_spacing(headers, folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        ts = getattr(getattr(h0, "file_meta", None), "TransferSyntaxUID", None)
        ts_name = getattr(ts, "name", str(ts))
        raise InputError(f"cannot decode the DICOM series in {folder} (transfer syntax {ts_name}): "
                         f"{str(exc).splitlines()[-1] if str(exc) else exc}; "
                         "convert it to an uncompressed syntax (e.g. `gdcmconv --raw`)") from None
    grid_of_sitk(img)
    arr = sitk.GetArrayFromImage(img)
    if modality == "CT":
        arr = arr.astype(np.int16) if arr.min() >= -32768 and arr.max() <= 32767 else arr.astype(np.float32)
    return Volume(arr, grid_of_sitk(img).affine, {
        "modality": modality, "units": "HU" if modality == "CT" else "",
        "frame_of_reference": str(h0.get("FrameOfReferenceUID", "")),
        "series_uid": sid, "sop_uids": [str(h.get("SOPInstanceUID", "")) for h in headers],
        "sop_class_uid": str(h0.get("SOPClassUID", "")), "study_uid": str(h0.get("StudyInstanceUID", "")),
        "patient_id": str(h0.get("PatientID", "")), "name": str(h0.get("SeriesDescription", "") or modality),
        "path": str(folder)})


def write_dicom_series(volume: Volume, folder: PathLike, series_description: str = "rtreg",
                       patient_id: str = "", study_uid: str = "", frame_of_reference: str = "") -> Path:
    """Write a scalar Volume as a DICOM series: one file a slice, values rounded to int16 (CT HU, MR grey
    levels), LPS geometry kept exactly (oblique too).

    ``frame_of_reference`` defaults to the volume's own (``meta``); give the fixed image's UID for an image
    resampled onto the fixed grid. New Study/Series/SOP Instance UIDs are generated unless a study is given.
    """
    from pydicom.uid import generate_uid
    if volume.is_vector:
        raise InputError("a DICOM image series holds scalar images; write fields as .mha")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    modality = volume.meta.get("modality", "") or ("CT" if volume.meta.get("units") == "HU" else "OT")
    if float(volume.array.min()) < -32768 or float(volume.array.max()) > 32767:
        raise InputError("the image values do not fit 16-bit DICOM pixels; rescale them or write NIfTI/MHA")
    data = np.round(volume.array).astype(np.int16)  # CT HU and MR grey levels are integers in DICOM
    grid = volume.grid
    d = grid.direction
    series_uid, study_uid = generate_uid(), study_uid or generate_uid()
    for_uid = frame_of_reference or volume.meta.get("frame_of_reference", "") or generate_uid()
    iop = "\\".join(f"{v:.10g}" for v in np.concatenate([d[:, 0], d[:, 1]]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(data.shape[0]):
        sl = sitk.GetImageFromArray(data[k])
        sl.SetSpacing([float(grid.spacing[0]), float(grid.spacing[1])])
        ipp = grid.index_to_world(np.array([[0.0, 0.0, float(k)]]))[0]
        tags = {"0008|0060": modality, "0008|0016": "1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else
                "1.2.840.10008.5.1.4.1.1.7", "0008|0018": generate_uid(), "0020|000d": study_uid,
                "0020|000e": series_uid, "0020|0052": for_uid, "0010|0020": patient_id or "ANON",
                "0008|103e": series_description[:64], "0020|0013": str(k + 1),
                "0020|0032": "\\".join(f"{v:.6f}" for v in ipp), "0020|0037": iop,
                "0028|0030": f"{grid.spacing[1]:.6f}\\{grid.spacing[0]:.6f}",
                "0018|0050": f"{grid.spacing[2]:.6f}"}
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(out / f"{modality}.{k + 1:04d}.dcm"))
        writer.Execute(sl)
    return out


def _check_slice_spacing(headers: Sequence[pydicom.Dataset], folder: Path) -> None:
    if len(headers) < 3 or "ImagePositionPatient" not in headers[0]:
        return
    iop = np.array(headers[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    pos = np.array([np.dot(normal, np.array(h.ImagePositionPatient, dtype=np.float64)) for h in headers])
    gaps = np.diff(np.sort(pos))
    if gaps.min() <= 1e-3:
        raise InputError(f"{folder}: two slices share one position; the folder mixes series or has duplicates")
    if gaps.max() - gaps.min() > max(0.01 * np.median(gaps), 0.05):
        raise InputError(f"{folder}: slices are unevenly spaced ({gaps.min():.2f} to {gaps.max():.2f} mm); "
                         "resample the series to uniform spacing (or fill the missing slices) first")


# ---------------------------------------------------------------- RTSTRUCT
@dataclass
class Structure:
    """One ROI rasterised on a reference grid: ``mask`` (z, y, x) uint8, colour as 0-255 RGB."""

    name: str
    number: int
    color: tuple
    mask: np.ndarray
    roi_type: str = ""

    @property
    def empty(self) -> bool:
        return not bool(self.mask.any())


def read_rtstruct(path: PathLike, reference: Volume, names: Optional[Sequence[str]] = None,
                  check_frame: bool = True) -> List[Structure]:
    """Rasterise RTSTRUCT ROIs onto the grid of ``reference`` (the planning CT).

    Closed planar contours are filled slice by slice with the even-odd rule, so
    several contours per slice and holes (inner contours) are handled; contour
    parts outside the grid are clipped. ``names`` picks ROIs (case-insensitive);
    a requested ROI that is missing or empty is an error. Point ROIs (markers,
    isocentres) are skipped.
    """
    ds = read_dataset(path)
    if str(ds.get("Modality", "")) != "RTSTRUCT" or "StructureSetROISequence" not in ds:
        raise InputError(f"{path} is not an RTSTRUCT (modality {ds.get('Modality', '?')})")
    ref_for = [str(r.FrameOfReferenceUID) for r in ds.get("ReferencedFrameOfReferenceSequence", [])
               if "FrameOfReferenceUID" in r]
    ct_for = reference.meta.get("frame_of_reference", "")
    if check_frame and ct_for and ref_for and ct_for not in ref_for:
        raise InputError(f"the RTSTRUCT {Path(path).name} belongs to frame of reference {ref_for[0]}, "
                         f"but the CT is in {ct_for}: it was drawn on another image. Give the matching CT "
                         "(or override with --allow-frame-mismatch if you know the frames coincide)")
    info = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    types = {int(o.ReferencedROINumber): str(o.get("RTROIInterpretedType", ""))
             for o in ds.get("RTROIObservationsSequence", [])}
    wanted = None if names is None else {n.lower() for n in names}
    if wanted is not None:
        missing = wanted - {n.lower() for n in info.values()}
        if missing:
            raise InputError(f"ROI(s) {sorted(missing)} not in {Path(path).name}; available: {sorted(info.values())}")
    grid = reference.grid
    out = []
    any_inside = False
    for rc in ds.get("ROIContourSequence", []):
        number = int(rc.ReferencedROINumber)
        name = info.get(number, f"ROI_{number}")
        if wanted is not None and name.lower() not in wanted:
            continue
        contours = [c for c in rc.get("ContourSequence", []) if str(c.get("ContourGeometricType", "")) ==
                    "CLOSED_PLANAR"]
        if not contours and rc.get("ContourSequence"):
            continue  # point / open ROIs carry no volume
        mask, inside = _rasterise(contours, grid)
        any_inside |= inside
        color = tuple(int(c) for c in rc.get("ROIDisplayColor", [255, 0, 0]))
        s = Structure(name, number, color, mask, types.get(number, ""))
        if s.empty and wanted is not None:
            raise InputError(f"ROI {name!r} has no voxels on the CT grid (no contours, or all outside); "
                             "pick another ROI or check the structure set")
        out.append(s)
    if out and not any_inside:
        raise InputError(f"no contour of {Path(path).name} falls inside the CT grid: the structure set does not "
                         "belong to this CT; give the CT it was drawn on")
    return out


def _fill_polygon(x: np.ndarray, y: np.ndarray, n_rows: int, n_cols: int) -> np.ndarray:
    """Even-odd scanline fill: pixel (row r, col c) is inside if its centre (c, r) is inside the polygon."""
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    out = np.zeros((n_rows, n_cols), dtype=np.uint8)
    cols = np.arange(n_cols, dtype=np.float64)
    for r in range(n_rows):
        crossing = (y <= r) != (y1 <= r)  # half-open rule: each vertex counted once
        if not crossing.any():
            continue
        xa, ya, xb, yb = x[crossing], y[crossing], x1[crossing], y1[crossing]
        xs = np.sort(xa + (r - ya) * (xb - xa) / (yb - ya))
        out[r] = (np.searchsorted(xs, cols, side="right") % 2).astype(np.uint8)
    return out


def _rasterise(contours, grid: Grid):
    """Even-odd fill of planar contours (LPS mm) on ``grid``; returns (mask, whether any slice was inside)."""
    nz, ny, nx = grid.shape
    mask = np.zeros(grid.shape, dtype=np.uint8)
    inside = False
    for c in contours:
        pts = np.asarray(c.ContourData, dtype=np.float64).reshape(-1, 3)
        if len(pts) < 3:
            continue
        ijk = grid.world_to_index(pts)
        k = int(np.round(np.median(ijk[:, 2])))
        if k < 0 or k >= nz:
            continue
        i0, i1 = max(int(np.floor(ijk[:, 0].min())), 0), min(int(np.ceil(ijk[:, 0].max())), nx - 1)
        j0, j1 = max(int(np.floor(ijk[:, 1].min())), 0), min(int(np.ceil(ijk[:, 1].max())), ny - 1)
        if i0 > i1 or j0 > j1:
            continue
        inside = True
        mask[k, j0:j1 + 1, i0:i1 + 1] ^= _fill_polygon(ijk[:, 0] - i0, ijk[:, 1] - j0, j1 - j0 + 1, i1 - i0 + 1)
    return mask, inside


def mask_contours(mask2d: np.ndarray) -> List[np.ndarray]:
    """Closed loops (n, 2) of pixel-corner (i, j) indices tracing the boundary of a 2-D mask (rows j, columns
    i), inside on the left. Filled with the even-odd rule (centre inside), the loops give back the mask
    exactly, holes included, whichever way ambiguous (diagonal) corners are chained."""
    m = np.pad(mask2d > 0, 1)
    edges: Dict[tuple, List[tuple]] = {}
    # horizontal edges between rows r-1 and r (padded indices): inside below -> run along +i
    rows, cols = np.nonzero(m[1:, :] != m[:-1, :])
    for r, c in zip(rows + 1, cols):
        a, b = (c - 0.5, r - 0.5), (c + 0.5, r - 0.5)
        a, b = (a, b) if m[r, c] else (b, a)
        edges.setdefault(a, []).append(b)
    rows, cols = np.nonzero(m[:, 1:] != m[:, :-1])
    for r, c in zip(rows, cols + 1):
        a, b = (c - 0.5, r + 0.5), (c - 0.5, r - 0.5)
        a, b = (a, b) if m[r, c] else (b, a)
        edges.setdefault(a, []).append(b)
    loops = []
    while edges:
        start = next(iter(edges))
        loop, v = [start], start
        while True:
            nxt = edges[v].pop()
            if not edges[v]:
                del edges[v]
            if nxt == start:
                break
            loop.append(nxt)
            v = nxt
        pts = np.asarray(loop, float) - 1.0                       # undo the padding
        turn = np.any(np.roll(pts, -1, 0) - pts != pts - np.roll(pts, 1, 0), axis=1)   # keep the corners only
        loops.append(pts[turn])
    return loops


def write_rtstruct(structures: Sequence[Structure], reference: Volume, path: PathLike,
                   label: str = "rtreg", description: str = "") -> Path:
    """Write ``structures`` (masks on ``reference``'s grid) as a DICOM RTSTRUCT on ``reference``.

    Contours follow the voxel boundaries of each slice (closed planar, LPS mm, even-odd for holes), so
    reading the file back onto the same grid gives the masks again. When ``reference`` was read from a
    DICOM series, the file refers to its study, series, slices and frame of reference; otherwise it refers
    to the frame of reference in ``reference.meta`` (or a new one).
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    if not structures:
        raise InputError("no structures to write into an RTSTRUCT")
    grid = reference.grid
    for st in structures:
        if st.mask.shape != grid.shape:
            raise InputError(f"structure {st.name!r} is not on the reference image grid; resample it first")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    now = datetime.datetime.now()
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    ds.StudyInstanceUID = reference.meta.get("study_uid") or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = reference.meta.get("patient_id") or "ANON"
    ds.PatientName = ""
    ds.StructureSetLabel = label[:16]
    ds.StructureSetDescription = description[:1024]
    ds.StructureSetDate, ds.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.SeriesDescription = label[:64]
    ds.Manufacturer = "SlicerProtonDIR rtreg"
    for_uid = reference.meta.get("frame_of_reference") or generate_uid()
    ds.FrameOfReferenceUID = for_uid
    sop_uids = list(reference.meta.get("sop_uids") or [])
    sop_class = reference.meta.get("sop_class_uid") or "1.2.840.10008.5.1.4.1.1.2"
    ref_for = Dataset()
    ref_for.FrameOfReferenceUID = for_uid
    if len(sop_uids) == grid.shape[0] and reference.meta.get("series_uid"):
        images = []
        for uid in sop_uids:
            im = Dataset()
            im.ReferencedSOPClassUID, im.ReferencedSOPInstanceUID = sop_class, uid
            images.append(im)
        series = Dataset()
        series.SeriesInstanceUID = reference.meta["series_uid"]
        series.ContourImageSequence = DicomSequence(images)
        study = Dataset()
        study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
        study.ReferencedSOPInstanceUID = ds.StudyInstanceUID
        study.RTReferencedSeriesSequence = DicomSequence([series])
        ref_for.RTReferencedStudySequence = DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([ref_for])
    rois, contours, observations = [], [], []
    for n, st in enumerate(structures, start=1):
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = n, for_uid, st.name[:64]
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        rois.append(roi)
        items = []
        for k in np.nonzero(st.mask.reshape(st.mask.shape[0], -1).any(1))[0]:
            for loop in mask_contours(st.mask[k]):
                ijk = np.column_stack([loop, np.full(len(loop), float(k))])
                c = Dataset()
                c.ContourGeometricType = "CLOSED_PLANAR"
                c.NumberOfContourPoints = len(loop)
                c.ContourData = [f"{v:.3f}" for v in grid.index_to_world(ijk).ravel()]
                if len(sop_uids) == grid.shape[0]:
                    im = Dataset()
                    im.ReferencedSOPClassUID, im.ReferencedSOPInstanceUID = sop_class, sop_uids[k]
                    c.ContourImageSequence = DicomSequence([im])
                items.append(c)
        rc = Dataset()
        rc.ReferencedROINumber = n
        rc.ROIDisplayColor = [int(v) for v in st.color]
        rc.ContourSequence = DicomSequence(items)
        contours.append(rc)
        obs = Dataset()
        obs.ObservationNumber, obs.ReferencedROINumber = n, n
        obs.RTROIInterpretedType = st.roi_type or ("EXTERNAL" if st.name.lower() in ("body", "external") else "ORGAN")
        obs.ROIInterpreter = ""
        observations.append(obs)
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(out), enforce_file_format=True)
    return out


# ---------------------------------------------------------------- RTDOSE
def read_rtdose(path: PathLike, allow_relative: bool = False) -> Volume:
    """RTDOSE -> dose Volume in Gy (DoseGridScaling applied, GridFrameOffsetVector honoured)."""
    ds = read_dataset(path)
    if str(ds.get("Modality", "")) != "RTDOSE":
        raise InputError(f"{path} is not an RTDOSE (modality {ds.get('Modality', '?')})")
    units = str(ds.get("DoseUnits", "GY")).upper()
    if units == "RELATIVE" and not allow_relative:
        raise InputError(f"{Path(path).name} holds RELATIVE dose, not Gy; export absolute dose from the TPS")
    try:
        pix = ds.pixel_array.astype(np.float64)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for undecodable pixels
        raise InputError(f"cannot decode the dose pixels of {path} ({exc}); export it uncompressed") from None
    if pix.ndim == 2:
        pix = pix[None]
    if "DoseGridScaling" not in ds and units != "RELATIVE" and np.issubdtype(ds.pixel_array.dtype, np.integer):
        raise InputError(f"{Path(path).name} has integer dose pixels but no DoseGridScaling, so its values are not "
                         "doses; export the RTDOSE again with its scaling")
    dose = pix * float(ds.get("DoseGridScaling", 1.0))
    if units == "CGY":
        dose /= 100.0
    iop = np.array(ds.ImageOrientationPatient, dtype=np.float64)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    ipp = np.array(ds.ImagePositionPatient, dtype=np.float64)
    gfov = np.array(ds.get("GridFrameOffsetVector", [0.0]), dtype=np.float64)
    if len(gfov) != dose.shape[0]:
        raise InputError(f"{path}: GridFrameOffsetVector has {len(gfov)} entries for {dose.shape[0]} frames")
    # Relative offsets (first = 0) or absolute positions (first = IPP along the normal): frame 0 is at IPP either way.
    offsets = gfov - gfov[0]
    if len(offsets) > 1:
        steps = np.diff(offsets)
        if np.ptp(steps) > 1e-3 * max(abs(steps).max(), 1.0):
            raise InputError(f"{path}: dose frames are unevenly spaced; resample the dose grid in the TPS")
        dz = float(steps.mean())
    else:
        dz = float(ds.get("SliceThickness", 1.0) or 1.0)
    ps = [float(v) for v in ds.PixelSpacing]  # row spacing (between rows, y), column spacing (x)
    direction = np.column_stack([row, col, normal * np.sign(dz)])
    grid = Grid.from_geometry(dose.shape, (ps[1], ps[0], abs(dz)), ipp, direction)
    return Volume(dose.astype(np.float32), grid.affine, {
        "modality": "RTDOSE", "units": "Gy" if units != "RELATIVE" else "relative",
        "frame_of_reference": str(ds.get("FrameOfReferenceUID", "")),
        "dose_type": str(ds.get("DoseType", "")), "dose_summation_type": str(ds.get("DoseSummationType", "")),
        "name": "dose"})


# ---------------------------------------------------------------- RT (Ion) Plan
@dataclass
class Beam:
    name: str
    radiation: str
    gantry_deg: Optional[float]
    couch_deg: Optional[float]
    machine: str


@dataclass
class PlanSummary:
    """What a plan says that registration can use (and what the plan prompt is made of)."""

    label: str
    is_ion: bool
    radiation: str
    prescription_gy: Optional[float]
    fractions: Optional[int]
    target_names: List[str] = field(default_factory=list)
    beams: List[Beam] = field(default_factory=list)
    patient_position: str = ""
    frame_of_reference: str = ""

    @property
    def dose_per_fraction_gy(self) -> Optional[float]:
        if self.prescription_gy is None or not self.fractions:
            return None
        return self.prescription_gy / self.fractions

    def text(self) -> str:
        """A short description usable as a plan prompt."""
        kind = f"{self.radiation.lower()} plan" if self.radiation else "plan"
        parts = [f"{kind.capitalize()} {self.label}".strip()]
        if self.beams:
            angles = ", ".join(f"{b.gantry_deg:g}" for b in self.beams if b.gantry_deg is not None)
            parts.append(f"{len(self.beams)} {self.radiation.lower()} beams" +
                         (f" at gantry {angles} deg" if angles else ""))
        if self.prescription_gy is not None:
            rx = f"prescription {self.prescription_gy:.2f} Gy"
            if self.fractions:
                rx += f" in {self.fractions} fractions ({self.dose_per_fraction_gy:.2f} Gy per fraction)"
            parts.append(rx)
        elif self.fractions:
            parts.append(f"{self.fractions} fractions")
        if self.target_names:
            parts.append("targets " + ", ".join(self.target_names))
        if self.patient_position:
            parts.append(f"patient position {self.patient_position}")
        return "; ".join(parts) + "."


def read_rtplan(path: PathLike) -> PlanSummary:
    """RTPLAN (photon/electron) or RT Ion Plan (proton/ion) -> PlanSummary."""
    ds = read_dataset(path)
    if str(ds.get("Modality", "")) != "RTPLAN":
        raise InputError(f"{path} is not an RTPLAN (modality {ds.get('Modality', '?')})")
    is_ion = str(ds.get("SOPClassUID", "")) == RT_ION_PLAN_SOP or "IonBeamSequence" in ds
    beam_seq = ds.get("IonBeamSequence", []) if is_ion else ds.get("BeamSequence", [])
    beams = []
    for b in beam_seq:
        if str(b.get("TreatmentDeliveryType", "TREATMENT")) != "TREATMENT":
            continue
        cps = b.get("IonControlPointSequence") if is_ion else b.get("ControlPointSequence")
        cp0 = cps[0] if cps else {}
        gantry = cp0.get("GantryAngle") if cps else None
        couch = cp0.get("PatientSupportAngle") if cps else None
        beams.append(Beam(str(b.get("BeamName", b.get("BeamNumber", ""))), str(b.get("RadiationType", "")),
                          None if gantry is None else float(gantry), None if couch is None else float(couch),
                          str(b.get("TreatmentMachineName", ""))))
    radiation = beams[0].radiation if beams else ("PROTON" if is_ion else "")
    fg = ds.get("FractionGroupSequence", [None])[0]
    fractions = int(fg.NumberOfFractionsPlanned) if fg is not None and "NumberOfFractionsPlanned" in fg else None
    prescription, targets = _prescription(ds, fg, fractions)
    setup = ds.get("PatientSetupSequence", [])
    return PlanSummary(str(ds.get("RTPlanLabel", "")), is_ion, radiation, prescription, fractions, targets, beams,
                       str(setup[0].get("PatientPosition", "")) if setup else "",
                       str(ds.get("FrameOfReferenceUID", "")))


def _prescription(ds, fg, fractions):
    """Prescription (Gy) from target dose references, else the sum of beam doses x fractions."""
    refs = [r for r in ds.get("DoseReferenceSequence", []) if str(r.get("DoseReferenceType", "")) == "TARGET"]
    targets = [str(r.get("DoseReferenceDescription", "")) for r in refs if r.get("DoseReferenceDescription")]
    with_dose = [r for r in refs if r.get("TargetPrescriptionDose") is not None]
    preferred = [r for r in with_dose if str(r.get("DoseReferenceStructureType", "")) in ("SITE", "VOLUME")]
    pick = (preferred or with_dose)
    if pick:
        return float(pick[0].TargetPrescriptionDose), targets
    if fg is not None and fractions:
        doses = [float(rb.BeamDose) for rb in fg.get("ReferencedBeamSequence", []) if rb.get("BeamDose") is not None]
        if doses:
            return sum(doses) * fractions, targets
    return None, targets


def structures_by_name(structures: Sequence[Structure]) -> Dict[str, Structure]:
    return {s.name: s for s in structures}
