"""DICOM RT readers on the real sets in ../shared/data, and on RTSTRUCTs built here for edge cases."""
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from conftest import data_path
from rtreg.dicomrt import read_dicom_series, read_rtdose, read_rtplan, read_rtstruct, write_rtstruct
from rtreg.errors import InputError
from rtreg.image import Grid, Volume, read_volume, resample
from rtreg.metrics import dice

DCPT = ("dcpt_headphantom", "DCPT_headphantom")
DCPT_RS = "RS.1.2.246.352.205.5439556202947041733.367077883804944283.dcm"
DCPT_RN = "RN.1.2.246.352.71.5.37402163639.265919.20240227185649.dcm"


@pytest.fixture(scope="module")
def dcpt_ct():
    return read_volume(data_path(*DCPT))


def test_dcpt_ct_series_geometry(dcpt_ct):
    assert dcpt_ct.array.shape == (177, 512, 512)
    np.testing.assert_allclose(dcpt_ct.grid.spacing, [0.5859375, 0.5859375, 1.5], atol=1e-6)
    assert dcpt_ct.meta["modality"] == "CT" and dcpt_ct.meta["units"] == "HU"
    assert dcpt_ct.array.min() >= -1100 and dcpt_ct.array.max() > 500
    first = pydicom.dcmread(sorted(data_path(*DCPT).glob("CT.*.dcm"))[0], stop_before_pixels=True)
    assert dcpt_ct.meta["frame_of_reference"] == first.FrameOfReferenceUID


def test_dcpt_rtstruct_rois_names_colours(dcpt_ct):
    structs = {s.name: s for s in read_rtstruct(data_path(*DCPT, DCPT_RS), dcpt_ct)}
    assert {"BODY", "BrainStem", "CTV"} <= set(structs)
    body, ctv, bs = structs["BODY"].mask, structs["CTV"].mask, structs["BrainStem"].mask
    assert ctv.any() and bs.any()
    assert np.all(body[ctv > 0]) and np.all(body[bs > 0])  # inside the body
    assert structs["CTV"].color == (255, 128, 128)
    ctv_cc = ctv.sum() * np.prod(dcpt_ct.grid.spacing) / 1000
    assert 50 < ctv_cc < 200  # about 121 cm3
    only = read_rtstruct(data_path(*DCPT, DCPT_RS), dcpt_ct, names=["ctv"])
    assert [s.name for s in only] == ["CTV"]
    with pytest.raises(InputError, match="not in"):
        read_rtstruct(data_path(*DCPT, DCPT_RS), dcpt_ct, names=["Parotid"])


def test_dcpt_rt_ion_plan_summary():
    plan = read_rtplan(data_path(*DCPT, DCPT_RN))
    assert plan.is_ion and plan.radiation == "PROTON"
    assert len(plan.beams) == 3 and plan.fractions == 5
    assert plan.prescription_gy == pytest.approx(8.6387, abs=1e-3)
    text = plan.text()
    assert "Proton plan Brain_fin2" in text and "3 proton beams" in text and "5 fractions" in text


@pytest.mark.parametrize("patient", ["STS_001", "STS_002", "STS_003"])
@pytest.mark.parametrize("modality", ["CT", "MR_T1"])
def test_ibsi_rtstruct_matches_nifti_mask(patient, modality):
    img = read_volume(data_path("ibsi_sts", "dicom", patient, modality, "image"))
    gtv = read_rtstruct(data_path("ibsi_sts", "dicom", patient, modality, "mask", "RS.dcm"), img)
    assert len(gtv) == 1 and gtv[0].name.startswith("GTV")
    ref = read_volume(data_path("ibsi_sts", "nifti", patient, f"{modality}_mask.nii.gz"))
    ref_on_img = resample(ref, img.grid, "mask").array
    assert dice(gtv[0].mask, ref_on_img) >= 0.95


def test_breast_rtdose_and_rtplan():
    dose = read_rtdose(data_path("dicompyler_breast", "rtdose.dcm"))
    assert dose.array.shape == (98, 129, 194)
    assert dose.array.max() == pytest.approx(14.68, abs=0.01)
    assert dose.meta["units"] == "Gy"
    np.testing.assert_allclose(dose.grid.spacing, [2.5, 2.5, 3.0])
    np.testing.assert_allclose(dose.grid.origin, [-228.6541915, -419.2444776, -122.4407])
    plan = read_rtplan(data_path("dicompyler_breast", "rtplan.dcm"))
    assert not plan.is_ion and plan.radiation == "PHOTON"
    assert plan.prescription_gy == 14.0 and plan.fractions == 7 and len(plan.beams) == 4
    assert [b.gantry_deg for b in plan.beams] == [327.0, 0.0, 56.0, 150.0]
    assert "Breast" in plan.target_names


def test_pydicom_fixtures():
    plan = read_rtplan(data_path("pydicom_rt", "rtplan.dcm"))
    assert plan.fractions == 30 and plan.prescription_gy == pytest.approx(30.826203)
    with pytest.raises(InputError, match="RELATIVE"):
        read_rtdose(data_path("pydicom_rt", "rtdose.dcm"))
    rel = read_rtdose(data_path("pydicom_rt", "rtdose.dcm"), allow_relative=True)
    assert rel.array.shape == (15, 10, 10) and rel.meta["units"] == "relative"
    ref = Volume(np.zeros((5, 40, 50), np.int16), Grid.from_geometry((5, 40, 50), (10, 10, 10),
                                                                      (-245, -195, -210)).affine)
    structs = read_rtstruct(data_path("pydicom_rt", "rtstruct.dcm"), ref, check_frame=False)
    assert [s.name for s in structs] == ["patient"]  # the two point ROIs carry no volume
    mask = structs[0].mask
    # the contour edges pass exactly through voxel centres: the half-open rule keeps one side of each
    assert mask[1:4].all(axis=0).sum() == 40 * 30 and mask[0].sum() == 0 and mask[4].sum() == 0


def test_rtstruct_of_another_ct_is_refused(dcpt_ct):
    with pytest.raises(InputError, match="frame of reference"):
        read_rtstruct(data_path("ibsi_sts", "dicom", "STS_001", "CT", "mask", "RS.dcm"), dcpt_ct)


def test_corrupt_dicom_and_unsupported_transfer_syntax(tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(InputError, match="not a readable DICOM"):
        read_rtdose(bad)
    src = data_path("ibsi_sts", "dicom", "STS_001", "CT", "image")
    series = tmp_path / "series"
    series.mkdir()
    for f in sorted(src.glob("*.dcm"))[:6]:
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"  # JPEG 2000 frames that no decoder can read
        ds.PixelData = encapsulate([b"\xff\x4f" + b"\x00" * 64])
        ds["PixelData"].VR = "OB"
        ds.save_as(series / f.name, enforce_file_format=True)
    with pytest.raises(InputError, match="transfer syntax"):
        read_dicom_series(series)


def _rtstruct(path, frame_uid, contours_by_roi):
    """Write a minimal RTSTRUCT: {name: [contour point arrays (N, 3) LPS mm]}."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, \
        "RTSTRUCT"
    ref = Dataset()
    ref.FrameOfReferenceUID = frame_uid
    ds.ReferencedFrameOfReferenceSequence = Sequence([ref])
    ds.StructureSetROISequence, ds.ROIContourSequence = Sequence(), Sequence()
    for n, (name, contours) in enumerate(contours_by_roi.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = n, name, frame_uid
        ds.StructureSetROISequence.append(roi)
        rc = Dataset()
        rc.ReferencedROINumber, rc.ROIDisplayColor = n, [10, 20, 30]
        rc.ContourSequence = Sequence()
        for pts in contours:
            c = Dataset()
            c.ContourGeometricType, c.NumberOfContourPoints = "CLOSED_PLANAR", len(pts)
            c.ContourData = [f"{v:.3f}" for v in np.asarray(pts).ravel()]
            rc.ContourSequence.append(c)
        ds.ROIContourSequence.append(rc)
    ds.save_as(path, enforce_file_format=True)
    return path


def _square(cx, cy, half, z):
    return [(cx - half, cy - half, z), (cx + half, cy - half, z), (cx + half, cy + half, z), (cx - half, cy + half, z)]


def test_rtstruct_holes_several_contours_and_partly_outside(tmp_path):
    grid = Grid.from_geometry((5, 40, 40), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    ct = Volume(np.zeros(grid.shape, np.int16), grid.affine, {"frame_of_reference": "1.2.3"})
    path = _rtstruct(tmp_path / "rs.dcm", "1.2.3", {
        "ring": [_square(20, 20, 10.2, 4.0), _square(20, 20, 4.2, 4.0)],          # a square with a hole, slice 2
        "two": [_square(8, 8, 3.2, 2.0), _square(30, 30, 3.2, 2.0)],              # two islands, slice 1
        "edge": [_square(0, 20, 5.2, 6.0)],                                       # half outside the grid, slice 3
    })
    s = {x.name: x.mask for x in read_rtstruct(path, ct)}
    ring = s["ring"][2]
    assert ring[20, 20] == 0 and ring[20, 12] == 1 and ring.sum() == 21 * 21 - 9 * 9
    assert s["two"][1].sum() == 2 * 7 * 7 and s["two"][1][8, 8] == 1 and s["two"][1][30, 30] == 1
    assert s["edge"][3].sum() == 6 * 11 and s["edge"][3][20, 0] == 1
    assert s["ring"][[0, 1, 3, 4]].sum() == 0
    with pytest.raises(InputError, match="does not belong|no contour"):
        far = _rtstruct(tmp_path / "far.dcm", "1.2.3", {"far": [_square(500, 500, 5, 4.0)]})
        read_rtstruct(far, ct)
    with pytest.raises(InputError, match="frame of reference"):
        read_rtstruct(_rtstruct(tmp_path / "other.dcm", "9.9.9", {"x": [_square(20, 20, 5, 4.0)]}), ct)


def test_empty_roi_requested_is_an_error(tmp_path):
    grid = Grid.from_geometry((5, 20, 20), (1.0, 1.0, 2.0))
    ct = Volume(np.zeros(grid.shape, np.int16), grid.affine, {"frame_of_reference": "1.2.3"})
    path = _rtstruct(tmp_path / "rs.dcm", "1.2.3", {"ok": [_square(10, 10, 3, 4.0)], "empty": []})
    with pytest.raises(InputError, match="no voxels"):
        read_rtstruct(path, ct, names=["empty"])


def test_series_folder_errors(tmp_path):
    with pytest.raises(InputError, match="no DICOM image series"):
        read_dicom_series(tmp_path)
    src = data_path("ibsi_sts", "dicom", "STS_001", "CT", "image")
    gap = tmp_path / "gap"
    gap.mkdir()
    files = sorted(src.glob("*.dcm"))[:8]
    for f in files[:4] + files[5:]:
        shutil.copy(f, gap / f.name)
    with pytest.raises(InputError, match="unevenly spaced"):
        read_dicom_series(gap)


def test_write_dicom_series_round_trip(tmp_path):
    from conftest import oblique_grid, smooth_image
    from rtreg.dicomrt import write_dicom_series
    vol = smooth_image(oblique_grid())
    vol.array = np.round(vol.array).astype(np.int16)
    vol.meta.update(modality="CT", units="HU")
    write_dicom_series(vol, tmp_path / "ct", frame_of_reference="1.2.826.0.1.5")
    back = read_volume(tmp_path / "ct")
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    np.testing.assert_array_equal(back.array, vol.array)
    assert back.meta["modality"] == "CT" and back.meta["frame_of_reference"] == "1.2.826.0.1.5"
    with pytest.raises(InputError, match="16-bit"):
        write_dicom_series(vol.with_array(vol.array * 1000.0), tmp_path / "big")


def test_mask_contours_fill_back_to_the_mask_with_holes_and_diagonals():
    from scipy import ndimage
    from rtreg.dicomrt import _fill_polygon, mask_contours
    rng = np.random.default_rng(0)
    for trial in range(60):
        m = rng.random((20, 25)) > 0.5 if trial % 2 else ndimage.binary_opening(rng.random((20, 25)) > 0.45)
        back = np.zeros(m.shape, np.uint8)
        for loop in mask_contours(m):
            back ^= _fill_polygon(loop[:, 0], loop[:, 1], *m.shape)
        assert np.array_equal(back, m), trial
    ring = np.zeros((10, 10), bool)
    ring[2:8, 2:8], ring[4:6, 4:6] = True, False
    assert sorted(len(c) for c in mask_contours(ring)) == [4, 4]          # outer square and the hole, corners only


def test_rtstruct_written_on_the_dcpt_ct_reads_back_identically(tmp_path):
    folder = data_path("dcpt_headphantom", "DCPT_headphantom")
    ct = read_dicom_series(folder)
    rs = next(f for f in sorted(folder.iterdir()) if f.name.startswith("RS"))
    structs = read_rtstruct(rs, ct, names=["CTV", "BrainStem"])
    path = write_rtstruct(structs, ct, tmp_path / "rs.dcm")
    back = {s.name: s.mask for s in read_rtstruct(path, ct)}
    for s in structs:
        assert dice(back[s.name], s.mask) == 1.0
    import pydicom
    ds = pydicom.dcmread(path)
    ref = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == ct.meta["series_uid"] and len(ref.ContourImageSequence) == ct.array.shape[0]
    assert ds.FrameOfReferenceUID == ct.meta["frame_of_reference"]
