"""DCPT head phantom resampled to 2 mm with a known weight-loss deformation and setup error (the case of
`Testing/test_mrml.py::test_logic_on_dcpt_phantom_with_rtstruct`): the real CTV carried from the planning CT
to the repeat CT by `io`, at each working spacing given. Prints, per spacing, the CTV's Dice with the truth,
its volume against the truth's, the mean mapping error of its voxels (LPS mm) and the TRE of 50 body points.

Run: python3 bench/dcpt_ctv_dice.py [--working-spacing 2 3]
Needs ../shared/data/dcpt_headphantom (MIT, nbassler/dicomexport).
"""
import argparse
from pathlib import Path

import numpy as np

DCPT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "dcpt_headphantom" / "DCPT_headphantom"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--working-spacing", type=float, nargs="+", default=[2.0, 3.0])
    args = ap.parse_args()
    from rtreg.case import RegisterOptions, RegistrationCase
    from rtreg.dicomrt import read_rtstruct
    from rtreg.field import invert, warp
    from rtreg.image import read_volume, resample
    from rtreg.methods import get_method
    from rtreg.metrics import structure_metrics
    from rtreg.synth import deform_real_ct
    ct = read_volume(DCPT)
    ct2 = resample(ct, ct.grid.with_spacing(2.0))
    ctv = read_rtstruct(next(DCPT.glob("RS.*.dcm")), ct2, names=["CTV"])[0].mask > 0
    case = deform_real_ct(ct2, "weight_loss", seed=5, amplitude_mm=6.0, n_points=50)
    true_ctv = warp(ct2.with_array(ctv.astype(np.uint8)), invert(case.truth, case.repeat.grid).transform,
                    case.repeat.grid, "mask").array
    voxels = ct2.grid.index_to_world(np.argwhere(ctv)[:, ::-1].astype(float))
    print("| working spacing | CTV Dice | CTV voxels (truth) | CTV voxel error mean / max | TRE 50 points |")
    print("|---|---|---|---|---|")
    for spacing in args.working_spacing:
        result = get_method("io")(RegistrationCase(ct2, case.repeat),
                                  RegisterOptions(device="cpu", working_spacing_mm=spacing))
        got = warp(ct2.with_array(ctv.astype(np.uint8)), invert(result.transform, case.repeat.grid).transform,
                   case.repeat.grid, "mask").array
        dice = structure_metrics(got, true_ctv, case.repeat.grid.spacing)["dice"]
        err = np.linalg.norm(result.transform.transform_points(voxels) - case.truth.transform_points(voxels), axis=1)
        tre = np.linalg.norm(result.transform.transform_points(case.points_planning) - case.points_repeat, axis=1)
        print(f"| {spacing:g} mm | {dice:.3f} | {int(got.sum())} ({int(true_ctv.sum())}) | "
              f"{err.mean():.2f} / {err.max():.2f} mm | {tre.mean():.2f} mm |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
