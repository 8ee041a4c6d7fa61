"""How the io baseline's diffusion weight trades accuracy across the RT phantoms (mean and p95 TRE, mm).

Run: python bench/io_regularization_sweep.py [--weights 1,5,20] [--spacing 3]
This is the measurement behind the default weight of local NCC + diffusion (5.0).
"""
import argparse

from rtreg.case import RegisterOptions, RegistrationCase
from rtreg.evaluation import point_errors
from rtreg.methods import get_method
from rtreg.synth import SITES, rt_phantom


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default="1,5,20")
    ap.add_argument("--spacing", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    weights = [float(w) for w in args.weights.split(",")]
    print("| site | " + " | ".join(f"w={w:g} mean / p95" for w in weights) + " |")
    print("|---|" + "---|" * len(weights))
    for site in SITES:
        case = rt_phantom(site, seed=args.seed, spacing_mm=args.spacing)
        cells = []
        for w in weights:
            res = get_method("io")(RegistrationCase(case.planning, case.repeat),
                                   RegisterOptions(device="cpu", working_spacing_mm=args.spacing,
                                                   regularization_weight=w))
            e = point_errors(res.transform, case.points_planning, case.points_repeat)
            cells.append(f"{e['mean']:.2f} / {e['p95']:.2f}")
        print(f"| {site} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
