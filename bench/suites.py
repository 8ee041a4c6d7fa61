"""The benchmark's four suites: cases with a known truth, written as ``rtreg eval`` reads them.

Every case folder holds ``planning_ct.nii.gz`` (fixed), ``repeat_ct.nii.gz``
(moving; an MR in the multimodal suite), ``structures/`` on the fixed image,
``truth_structures_on_repeat/``, ``points_planning.csv`` and
``points_repeat_truth.csv`` (LPS mm), ``truth_transform.h5`` and ``case.json``
(suite, description, whether the pair is multimodal).

* ``rt-phantom``: synthetic pelvis, thorax and head-and-neck phantoms with setup
  error, organ motion, bladder/rectum filling, tumour shrinkage and weight loss.
* ``real-anatomy``: real CTs from ``../shared/data`` (thorax CT, DCPT head
  phantom, TotalSegmentator abdomen) with breathing, soft-tissue or weight-loss
  deformations plus a rigid setup error; 300 keypoints inside the body.
* ``multimodal``: fixed = CT, moving = MR. T1-weighted-like MRs rendered from
  real CTs (:func:`rtreg.synth.t1_weighted_like`: same anatomy and frame, so the
  truth is exact) with a known deformation; and the IBSI soft-tissue sarcoma T1
  MRs with a known deformation, whose truth assumes the MR and CT share their
  frame. They do not, exactly (``python3 bench/sts_frame_check.py``): two
  independent rigid MI registrations from identity (``rtreg``'s and
  SimpleITK's Mattes MI) move STS_002's tumour centre by 3.0 mm each, 0.7 mm
  apart; STS_003's by 5.9 and 7.6 mm, 4.0 mm apart; STS_001's by 20 and 56 mm
  (38 mm apart: a thigh with a large tumour in a 5 cm crop is ill-posed for
  MI), so STS_001's truth is unknown to tens of mm. STS_002 and STS_003 are
  training sources of QuizRigid and GlideReg (``rtreg.train.sources``). So the
  default set holds the T1-like cases only; the STS cases run with ``--full``
  or ``--cases``.
* ``large-offset``: real CTs moved by up to 60 mm and 15 degrees and seen
  through a cropped field of view.
* ``inter-subject``: two different people's abdominal CTs (TotalSegmentator's
  examples), each way round; the truth is each subject's own TotalSegmentator
  organ labels (Dice and HD95 of the organs carried from the fixed onto the
  moving subject), there are no points. The subjects sit in unrelated scanner
  frames: the fixed subject is cut to the 40 mm slab the other covers (found
  by the translation that best overlaps the labels both share), and the moving
  subject starts with its body centre on the fixed one's. (Starting from that
  label-optimal translation instead, no method, ours or a peer, improved the
  mean Dice on it: an oracle start measures nothing.)

Real CTs are resampled to the suite's spacing (3 mm by default, 2 mm with
``--full``) and cropped to the body (15 mm margin) before the deformation is
applied, so every method sees the same voxels.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
from scipy import ndimage, signal

from rtreg.dicomrt import Structure, read_rtstruct
from rtreg.image import Grid, Volume, crop_to_mask, read_volume, resample
from rtreg.priors import body_mask
from rtreg.synth import (SyntheticCase, deform_real_ct, large_offset_case, rt_phantom, t1_weighted_like,
                          write_case)

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
SUITES = ("rt-phantom", "real-anatomy", "multimodal", "large-offset", "inter-subject")
DEFAULT_SUITES = ("rt-phantom", "real-anatomy")   # bench/README's main table; the others have their own commands
_COLORS = [(255, 0, 0), (0, 200, 0), (0, 128, 255), (255, 200, 0), (255, 0, 255), (0, 255, 255)]


@dataclass(frozen=True)
class CaseSpec:
    """One benchmark case: how to build it, and whether the default subset includes it."""

    suite: str
    name: str
    description: str
    build: Callable[[float], SyntheticCase]
    needs: Optional[Path] = None       # data the case is made from (the case is skipped without it)
    default: bool = True               # in the default subset (otherwise only with --full)
    multimodal: bool = False

    @property
    def available(self) -> bool:
        return self.needs is None or self.needs.exists()


# ---------------------------------------------------------------- real images with their structures
def _as_ct(volume: Volume) -> Volume:
    volume.meta.update(modality="CT", units="HU")
    return volume


def _on_spacing(volume: Volume, spacing_mm: float) -> Volume:
    return resample(volume, volume.grid.with_spacing(spacing_mm)) if spacing_mm else volume


def _body_region(ct: Volume, spacing_mm: float) -> Volume:
    """A real CT at the suite's spacing, cropped to its body with a 15 mm margin (the couch and the air of
    a 50 cm field of view cost every method time and say nothing about registration)."""
    ct = _on_spacing(ct, spacing_mm)
    return crop_to_mask(ct, body_mask(ct), margin_mm=15.0)


def _structure(name: str, number: int, mask: np.ndarray) -> Structure:
    return Structure(name, number, _COLORS[(number - 1) % len(_COLORS)], mask.astype(np.uint8))


def _body(ct: Volume) -> Structure:
    return _structure("BODY", 1, body_mask(ct))


def thorax(spacing_mm: float):
    """Thorax CT with BODY and the lungs (threshold below -400 HU inside the body, two largest parts)."""
    ct = _body_region(_as_ct(read_volume(DATA / "thorax_ct" / "ct_phase00.nii.gz")), spacing_mm)
    body = body_mask(ct).astype(bool)
    lungs = ndimage.binary_opening((ct.array < -400) & body, iterations=1)
    labels, n = ndimage.label(lungs)
    sizes = ndimage.sum_labels(lungs, labels, np.arange(1, n + 1))
    lungs = np.isin(labels, np.argsort(sizes)[::-1][:2] + 1)
    return ct, [_structure("BODY", 1, body), _structure("Lungs", 2, lungs)]


def dcpt(spacing_mm: float):
    """DCPT head phantom CT with its RTSTRUCT ROIs BODY, CTV and BrainStem."""
    folder = DATA / "dcpt_headphantom" / "DCPT_headphantom"
    ct = _body_region(read_volume(folder), spacing_mm)
    rs = next(f for f in sorted(folder.iterdir()) if f.name.startswith("RS"))
    return ct, read_rtstruct(rs, ct, names=["BODY", "CTV", "BrainStem"])


# TotalSegmentator class ids (the same in its v1 and v2 class maps)
_TOTALSEG_ORGANS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver", 6: "stomach"}


def totalseg(spacing_mm: float):
    """TotalSegmentator abdominal CT (its 30-slice example, which the label map covers) with BODY and
    five organs."""
    folder = DATA / "totalsegmentator"
    ct = _body_region(_as_ct(read_volume(folder / "example_ct_sm.nii.gz")), spacing_mm)
    seg = read_volume(folder / "example_seg.nii.gz")
    structs = [_body(ct)]
    for i, (label, name) in enumerate(_TOTALSEG_ORGANS.items(), start=2):
        m = resample(seg.with_array((seg.array == label).astype(np.uint8)), ct.grid, "mask").array
        if m.any():
            structs.append(_structure(name, i, m))
    return ct, structs


def sts(patient: str, spacing_mm: float):
    """IBSI STS patient: CT (fixed) and T1 MR on their own grids in one frame, with the CT's GTV."""
    folder = DATA / "ibsi_sts" / "nifti" / patient
    ct = _on_spacing(_as_ct(read_volume(folder / "CT_image.nii.gz")), spacing_mm)
    mr = _on_spacing(read_volume(folder / "MR_T1_image.nii.gz"), spacing_mm)
    mr.meta.update(modality="MR", units="")
    gtv = read_volume(folder / "CT_mask.nii.gz")
    return ct, mr, [_structure("GTV", 1, resample(gtv, ct.grid, "mask").array)]


# TotalSegmentator v2 classes (its examples hold labels up to 117, v2's numbering) present in both subjects' maps
_SHARED_ORGANS = {1: "spleen", 5: "liver", 6: "stomach", 7: "pancreas", 32: "vertebrae_T12", 33: "vertebrae_T11",
                  52: "aorta", 63: "inferior_vena_cava", 64: "portal_vein_and_splenic_vein", 79: "spinal_cord",
                  86: "autochthon_left", 87: "autochthon_right"}
MIN_ORGAN_ML = 2.0      # an organ is scored when both subjects show at least this much of it


def _subject(image: Path, labels: Path, spacing_mm: float):
    """A TotalSegmentator subject: its CT at the suite's spacing cropped to the body, and its label map on
    that grid (resampled through world coordinates: ``example_seg_dicom``'s header flips the row axis and its
    origin against its CT's, consistently, so the world positions agree)."""
    ct = _body_region(_as_ct(read_volume(image)), spacing_mm)
    return ct, resample(read_volume(labels), ct.grid, "nearest").array


def _axis_aligned(labels: Volume, spacing_mm: float) -> Volume:
    """``labels`` on an LPS-axis-aligned grid of ``spacing_mm`` covering its extent (nearest neighbour)."""
    size = np.array(labels.grid.size_xyz, float) - 1
    corners = labels.grid.index_to_world(np.array([[i, j, k] for i in (0, size[0]) for j in (0, size[1])
                                                    for k in (0, size[2])]))
    lo, hi = corners.min(0), corners.max(0)
    shape_xyz = np.round((hi - lo) / spacing_mm).astype(int) + 1
    return resample(labels, Grid.from_geometry(shape_xyz[::-1], [spacing_mm] * 3, lo), "nearest")


def shared_label_translation(fixed: Volume, moving: Volume, classes, spacing_mm: float = 3.0) -> np.ndarray:
    """The translation (LPS mm, added to the moving image's coordinates) that maximises the mean Dice of
    the label classes both label maps hold, over every shift of ``spacing_mm`` (FFT correlation)."""
    a, b = _axis_aligned(fixed, spacing_mm), _axis_aligned(moving, spacing_mm)
    score = None
    for c in classes:
        fa, fb = (a.array == c).astype(np.float32), (b.array == c).astype(np.float32)
        if not fa.any() or not fb.any():
            continue
        overlap = signal.fftconvolve(fa, fb[::-1, ::-1, ::-1], mode="full")
        term = 2.0 * overlap / (fa.sum() + fb.sum())
        score = term if score is None else score + term
    if score is None:
        raise ValueError("the two label maps share no class: no overlap to place them by")
    shift_zyx = np.array(np.unravel_index(int(np.argmax(score)), score.shape)) - (np.array(b.array.shape) - 1)
    return a.grid.origin - b.grid.origin + shift_zyx[::-1] * spacing_mm


def _translated(volume: Volume, offset_mm: np.ndarray) -> Volume:
    affine = volume.affine.copy()
    affine[:3, 3] += offset_mm
    return Volume(volume.array, affine, dict(volume.meta))


def _body_centre(ct: Volume) -> np.ndarray:
    """LPS mm of the centroid of the body mask."""
    return ct.grid.index_to_world(np.argwhere(body_mask(ct))[:, ::-1].mean(0)[None].astype(float))[0]


def _within_z(volume: Volume, other: Volume) -> np.ndarray:
    """Voxels of ``volume`` whose LPS z lies within ``other``'s extent in z."""
    z_other = other.grid.world_points()[..., 2]
    z = volume.grid.world_points()[..., 2]
    return (z >= z_other.min() - 1e-3) & (z <= z_other.max() + 1e-3)


def inter_subject(spacing_mm: float, reverse: bool = False) -> SyntheticCase:
    """Subject 1 (``example_ct_sm``, 3 mm) and subject 2 (``example_ct_dicom``, 0.98 x 0.98 x 2 mm, 40 mm
    long): subject 1 cut to the slab that subject 2 covers once placed by :func:`shared_label_translation`;
    then subject 2 placed with its body centre on subject 1's; fixed = subject 1 (``reverse``: subject 2).
    Structures: BODY and the organs of ``_SHARED_ORGANS`` that both show with at least ``MIN_ORGAN_ML``;
    the truth is the moving subject's labels."""
    folder = DATA / "totalsegmentator"
    ct1, lab1 = _subject(folder / "example_ct_sm.nii.gz", folder / "example_seg.nii.gz", spacing_mm)
    ct2, lab2 = _subject(folder / "example_ct_dicom", folder / "example_seg_dicom.nii.gz", spacing_mm)
    by_labels = shared_label_translation(ct1.with_array(lab1), ct2.with_array(lab2), _SHARED_ORGANS)
    keep = _within_z(ct1, _translated(ct2, by_labels))
    lab1 = crop_to_mask(ct1.with_array(lab1), keep, margin_mm=0.0)
    ct1 = crop_to_mask(ct1, keep, margin_mm=0.0)
    # the start: body centres together (what any method's initialisation would do), not the label optimum
    offset = _body_centre(ct1) - _body_centre(ct2)
    ct2, lab2 = _translated(ct2, offset), _translated(ct2.with_array(lab2), offset)
    subjects = [(ct1, lab1.array), (ct2, lab2.array)]
    (fixed, lab_f), (moving, lab_m) = subjects[::-1] if reverse else subjects
    structs_f, structs_m = [_body(fixed)], [_body(moving)]
    for label, name in _SHARED_ORGANS.items():
        mf, mm = lab_f == label, lab_m == label
        if min(mf.sum() * np.prod(fixed.grid.spacing), mm.sum() * np.prod(moving.grid.spacing)) >= MIN_ORGAN_ML * 1e3:
            structs_f.append(_structure(name, len(structs_f) + 1, mf))
            structs_m.append(_structure(name, len(structs_m) + 1, mm))
    empty = np.zeros((0, 3))
    return SyntheticCase("abdomen", fixed, moving, structs_f, structs_m, None, None, None, empty, empty,
                         notes={"placement_translation_mm": [float(v) for v in offset],
                                "label_translation_mm": [float(v) for v in by_labels]})


# ---------------------------------------------------------------- the cases
def _phantom(site: str, seed: int, severity: float = 1.0) -> Callable[[float], SyntheticCase]:
    return lambda spacing: rt_phantom(site, seed=seed, spacing_mm=max(spacing, 3.0), severity=severity)


def _deformed(load, kind: str, seed: int, amplitude: float) -> Callable[[float], SyntheticCase]:
    def build(spacing: float) -> SyntheticCase:
        ct, structs = load(spacing)
        return deform_real_ct(ct, kind, seed=seed, amplitude_mm=amplitude, structures=structs)
    return build


def _multimodal(patient: str, seed: int, amplitude: float) -> Callable[[float], SyntheticCase]:
    def build(spacing: float) -> SyntheticCase:
        ct, mr, structs = sts(patient, spacing)
        # the MR and CT share one frame (IBSI: the MR GTV resampled onto the CT has Dice 1.000), so the
        # CT's GTV carried through the deformation onto the MR grid is the GTV the deformed MR shows
        case = deform_real_ct(ct, "soft_tissue", seed=seed, amplitude_mm=amplitude, structures=structs,
                              moving_source=mr, field_spacing_mm=2.0)
        return case
    return build


def _t1_like(load, kind: str, seed: int, amplitude: float) -> Callable[[float], SyntheticCase]:
    def build(spacing: float) -> SyntheticCase:
        ct, structs = load(spacing)
        mr = t1_weighted_like(ct, np.random.default_rng(seed))
        return deform_real_ct(ct, kind, seed=seed, amplitude_mm=amplitude, structures=structs, moving_source=mr)
    return build


def _offset(load, seed: int, keep: float, cbct: bool = False) -> Callable[[float], SyntheticCase]:
    def build(spacing: float) -> SyntheticCase:
        ct, structs = load(spacing)
        return large_offset_case(ct, seed=seed, keep_fraction=keep, structures=structs, cbct=cbct)
    return build


def _phantom_ct(site: str, seed: int):
    def load(spacing: float):
        case = rt_phantom(site, seed=seed, spacing_mm=spacing)
        return case.planning, case.planning_structures
    return load


def cases() -> List[CaseSpec]:
    """Every case of every suite (the default subset and the --full extras)."""
    thorax_needs = DATA / "thorax_ct" / "ct_phase00.nii.gz"
    dcpt_needs = DATA / "dcpt_headphantom" / "DCPT_headphantom"
    ts_needs = DATA / "totalsegmentator" / "example_ct_sm.nii.gz"
    out = []
    for i, (site, seed) in enumerate([("pelvis", 11), ("thorax", 12), ("headneck", 13),
                                      ("pelvis", 21), ("thorax", 22), ("headneck", 23)]):
        out.append(CaseSpec("rt-phantom", f"{site}-{seed}",
                            f"{site} phantom, seed {seed}: setup error, organ motion, filling, weight loss",
                            _phantom(site, seed, 1.0 if i < 3 else 1.5), default=i < 3))
    out += [
        CaseSpec("real-anatomy", "thorax-breathing", "thorax CT, breathing 10 mm with sliding + setup error",
                 _deformed(thorax, "breathing", 1, 10.0), thorax_needs),
        CaseSpec("real-anatomy", "dcpt-soft-tissue", "DCPT head phantom, soft tissue 8 mm + setup error",
                 _deformed(dcpt, "soft_tissue", 3, 8.0), dcpt_needs),
        CaseSpec("real-anatomy", "abdomen-weight-loss", "TotalSegmentator abdomen, weight loss 8 mm + setup error",
                 _deformed(totalseg, "weight_loss", 5, 8.0), ts_needs),
        CaseSpec("real-anatomy", "dcpt-weight-loss", "DCPT head phantom, weight loss 6 mm + setup error",
                 _deformed(dcpt, "weight_loss", 6, 6.0), dcpt_needs, default=False),
        CaseSpec("real-anatomy", "abdomen-soft-tissue", "TotalSegmentator abdomen, soft tissue 8 mm + setup error",
                 _deformed(totalseg, "soft_tissue", 7, 8.0), ts_needs, default=False),
    ]
    out += [
        CaseSpec("multimodal", "thorax-t1-like", "thorax CT and a T1-like MR of it, breathing 10 mm + setup error",
                 _t1_like(thorax, "breathing", 36, 10.0), thorax_needs, multimodal=True),
        CaseSpec("multimodal", "abdomen-t1-like", "abdomen CT and a T1-like MR of it, soft tissue 8 mm + setup error",
                 _t1_like(totalseg, "soft_tissue", 37, 8.0), ts_needs, multimodal=True),
    ]
    for j, patient in enumerate(("STS_001", "STS_002", "STS_003")):
        out.append(CaseSpec("multimodal", f"sts{j + 1}-mr-to-ct",
                            f"IBSI {patient}: T1 MR with a 6 mm soft-tissue deformation + setup error, to CT "
                            "(truth: the MR and CT share a frame, to within the offsets above)",
                            _multimodal(patient, 30 + j, 6.0), DATA / "ibsi_sts" / "nifti" / patient,
                            default=False, multimodal=True))
    out += [
        CaseSpec("large-offset", "thorax-offset", "thorax CT moved 60 mm / up to 15 deg, 60 % field of view",
                 _offset(thorax, 41, 0.6), thorax_needs, default=False),
        CaseSpec("large-offset", "dcpt-offset", "DCPT head moved 60 mm / up to 15 deg, 70 % field of view",
                 _offset(dcpt, 42, 0.7), dcpt_needs),
        CaseSpec("large-offset", "abdomen-offset", "abdomen CT moved 60 mm / up to 15 deg, 80 % field of view",
                 _offset(totalseg, 43, 0.8), ts_needs, default=False),
        CaseSpec("large-offset", "dcpt-offset-cbct", "DCPT head moved 60 mm / up to 15 deg, 60 % field of view, "
                 "CBCT-like (cupping, streaks, noise, circular field of view)", _offset(dcpt, 44, 0.6, True),
                 dcpt_needs, default=False),
        CaseSpec("large-offset", "abdomen-offset-cbct", "abdomen CT moved 60 mm / up to 15 deg, 70 % field of view, "
                 "CBCT-like", _offset(totalseg, 45, 0.7, True), ts_needs, default=False),
        *[CaseSpec("large-offset", f"{site}-phantom-offset", f"{site} phantom moved 60 mm / up to 15 deg, "
                   f"{int(keep * 100)} % field of view", _offset(_phantom_ct(site, seed), seed, keep), default=False)
          for site, seed, keep in (("pelvis", 46, 0.5), ("thorax", 47, 0.6), ("headneck", 48, 0.5))],
    ]
    ts_pair = DATA / "totalsegmentator" / "example_seg_dicom.nii.gz"
    out += [CaseSpec("inter-subject", "abdomen-1-to-2", "TotalSegmentator abdomen: subject 1 (fixed) to subject 2 "
                     "(moving), organ Dice", lambda spacing: inter_subject(spacing), ts_pair),
            CaseSpec("inter-subject", "abdomen-2-to-1", "TotalSegmentator abdomen: subject 2 (fixed) to subject 1 "
                     "(moving), organ Dice", lambda spacing: inter_subject(spacing, reverse=True), ts_pair)]
    return out


def select(suites: List[str], full: bool, only: Optional[List[str]] = None) -> List[CaseSpec]:
    """The cases of ``suites`` (default subset unless ``full``; ``only``: these case names, in or out of it)."""
    unknown = set(suites) - set(SUITES)
    if unknown:
        raise SystemExit(f"unknown suite(s) {sorted(unknown)}; choose from {SUITES}")
    return [c for c in cases() if c.suite in suites and ((c.name in only) if only else (full or c.default))]


def build_case(spec: CaseSpec, folder: Path, spacing_mm: float) -> Path:
    """Write ``spec``'s case into ``folder`` (kept if it is already complete for this spacing)."""
    info = {"suite": spec.suite, "name": spec.name, "description": spec.description,
            "multimodal": spec.multimodal, "spacing_mm": spacing_mm}
    marker = folder / "case.json"
    if marker.exists() and json.loads(marker.read_text()).get("spacing_mm") == spacing_mm:
        return folder
    case = spec.build(spacing_mm)
    write_case(case, folder)
    info.update(case.notes, points=int(len(case.points_planning)))
    if len(case.points_planning):
        info["tre_before_mm"] = float(np.linalg.norm(case.points_planning - case.points_repeat, axis=1).mean())
    marker.write_text(json.dumps(info, indent=2))
    return folder


def describe(folder: Path) -> Dict:
    return json.loads((folder / "case.json").read_text())
