"""Harmonic frequencies of ethanol: finite differences (ase.vibrations) against the double-backward Hessian.

Usage: python examples/vibrations.py [--model deploy/ethanol.pt] [--delta 0.005] [--nfree 2]
Same as: mlpot vibrations deploy/ethanol.pt ethanol [--reference]
Needs the rMD17 ethanol file in $MLPOT_DATA_DIR. MLPOT_EXAMPLE_QUICK=1 relaxes to fmax 1e-3 eV/Å instead of 1e-4.
"""

import argparse
import os
from pathlib import Path

import torch

from mlpot.calculators import load_calculator
from mlpot.workflows.analysis import load_structure, plot_spectrum
from mlpot.workflows.vibrations import analyse, format_vibrations

ROOT = Path(__file__).resolve().parents[1]
QUICK = os.environ.get("MLPOT_EXAMPLE_QUICK") == "1"  # the short run tests/test_examples.py checks in CI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "deploy" / "ethanol.pt"))
    parser.add_argument("--structure", default="ethanol", help="molecule name or structure file")
    parser.add_argument("--delta", type=float, default=0.005, help="displacement, Å")
    parser.add_argument("--nfree", type=int, default=2, choices=[2, 4])
    parser.add_argument("--figure", default="ethanol-spectrum.png")
    args = parser.parse_args()
    torch.set_num_threads(1)

    calc = load_calculator(args.model, dtype="float64")  # float64: FD and Hessian agree to < 1 cm^-1
    result = analyse(load_structure(args.structure), calc, delta=args.delta, nfree=args.nfree,
                     fmax=1e-3 if QUICK else 1e-4)
    print(format_vibrations(result))
    plot_spectrum(result.fd_cm, result.hessian_cm, args.figure, title=f"{args.structure}: harmonic frequencies")
    print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
