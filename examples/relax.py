"""Relax ethanol with the shipped model in float64 and print energy, max force and bond lengths.

Usage: python examples/relax.py [--model deploy/ethanol.pt] [--structure ethanol] [--fmax 0.001]
Same as: mlpot relax deploy/ethanol.pt ethanol --fmax 0.001
Needs the rMD17 ethanol file in $MLPOT_DATA_DIR. MLPOT_EXAMPLE_QUICK=1 stops at fmax 0.01 eV/Å.
"""

import argparse
import os
from pathlib import Path

import torch

from mlpot.calculators import load_calculator
from mlpot.workflows.analysis import load_structure
from mlpot.workflows.relax import format_relax, relax, write_structure

ROOT = Path(__file__).resolve().parents[1]
QUICK = os.environ.get("MLPOT_EXAMPLE_QUICK") == "1"  # the short run tests/test_examples.py checks in CI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "deploy" / "ethanol.pt"))
    parser.add_argument("--structure", default="ethanol", help="molecule name or structure file")
    parser.add_argument("--fmax", type=float, default=1e-2 if QUICK else 1e-3, help="eV/Å")
    parser.add_argument("--output", default="relaxed-ethanol.xyz")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small molecules: one thread is fastest

    atoms = load_structure(args.structure)  # first training frame of rMD17 ethanol ($MLPOT_DATA_DIR)
    calc = load_calculator(args.model, dtype="float64")
    atoms.calc = calc
    print(f"start: energy {atoms.get_potential_energy():.4f} eV")
    result = relax(atoms, calc, fmax=args.fmax, optimizer="bfgs")
    write_structure(result, args.output)
    print(format_relax(result))


if __name__ == "__main__":
    main()
