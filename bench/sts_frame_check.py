"""Do the IBSI sarcoma T1 MRs share their CT's frame? Two independent rigid MI registrations from identity.

``python3 bench/sts_frame_check.py`` registers each patient's T1 MR to its CT (both at 2 mm, no deformation
applied) with ``rtreg``'s rigid MI pre-alignment (8, 4, 2 mm levels) and with SimpleITK's Mattes MI
(32 bins, 20 % random samples, 4-2-1 shrink), both started at identity, and prints where each moves the
centre of the CT's GTV (LPS mm) and the distance between the two answers. The multimodal suite's STS
cases take identity as the true MR-to-CT alignment: where both registrations agree on an offset, that
offset is the floor of every method's TRE there; where they disagree, the truth is not known.
Needs ../shared/data/ibsi_sts (CC BY 3.0, IBSI / TCIA Soft-tissue-Sarcoma, Vallieres et al. 2015).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from rtreg.image import read_volume, resample
from rtreg.prealign import optimise_linear
from rtreg.priors import body_mask

STS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "ibsi_sts" / "nifti"


def gtv_centre(folder: Path) -> np.ndarray:
    """Centroid (LPS mm) of the CT's GTV mask."""
    gtv = read_volume(folder / "CT_mask.nii.gz")
    idx = np.argwhere(gtv.array > 0)[:, ::-1].astype(np.float64)
    return gtv.grid.index_to_world(idx).mean(0)


def rtreg_rigid(folder: Path) -> np.ndarray:
    """rtreg's rigid MI (fixed CT -> moving MR, 4x4 LPS)."""
    ct = read_volume(folder / "CT_image.nii.gz")
    ct.meta.update(modality="CT", units="HU")
    mr = read_volume(folder / "MR_T1_image.nii.gz")
    mr.meta.update(modality="MR", units="")
    ct, mr = resample(ct, ct.grid.with_spacing(2.0)), resample(mr, mr.grid.with_spacing(2.0))
    return optimise_linear(ct, mr, np.eye(4), "rigid", body_mask(ct), body_mask(mr), "mi",
                           levels_mm=(8.0, 4.0, 2.0), iterations=(60, 40, 30))


def sitk_rigid(folder: Path, centre: np.ndarray) -> sitk.Transform:
    """SimpleITK's rigid Mattes MI (fixed CT -> moving MR), rotating about ``centre``."""
    ct = sitk.ReadImage(str(folder / "CT_image.nii.gz"), sitk.sitkFloat32)
    mr = sitk.ReadImage(str(folder / "MR_T1_image.nii.gz"), sitk.sitkFloat32)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, 1)
    reg.SetMetricFixedMask(sitk.Cast(ct > -400, sitk.sitkUInt8))
    reg.SetOptimizerAsRegularStepGradientDescent(2.0, 1e-3, 300)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SetInterpolator(sitk.sitkLinear)
    start = sitk.Euler3DTransform()
    start.SetCenter(tuple(float(v) for v in centre))
    reg.SetInitialTransform(start, inPlace=False)
    return reg.Execute(ct, mr)


def main() -> None:
    print("| patient | rtreg rigid MI: GTV centre moves (mm) | SimpleITK Mattes MI (mm) | distance between them (mm) |")
    print("|---|---|---|---|")
    for patient in ("STS_001", "STS_002", "STS_003"):
        folder = STS / patient
        if not folder.exists():
            print(f"| {patient} | skipped: {folder} is absent | | |")
            continue
        c = gtv_centre(folder)
        a = rtreg_rigid(folder)
        ours = a[:3, :3] @ c + a[:3, 3] - c
        theirs = np.array(sitk_rigid(folder, c).TransformPoint(tuple(float(v) for v in c))) - c
        print(f"| {patient} | {np.round(ours, 1).tolist()} ({np.linalg.norm(ours):.1f}) | "
              f"{np.round(theirs, 1).tolist()} ({np.linalg.norm(theirs):.1f}) | {np.linalg.norm(ours - theirs):.1f} |")


if __name__ == "__main__":
    main()
