"""Path-integral MD of ethanol at 300 K in i-PI, forces from the shipped model through ASE's socket client.

Usage: python examples/engines/ipi_ethanol.py [--beads 4] [--steps 200] [--model deploy/ethanol.pt] [--out ipi-ethanol]
MLPOT_EXAMPLE_QUICK=1 runs 10 steps. Needs i-PI (pip install ipi==3.3.1). i-PI's files go to --out.
"""

import argparse
import os
import time
from pathlib import Path

import torch
from ase.build import molecule

from mlpot.calculators import MLPotCalculator
from mlpot.engines.ipi import run_path_integral

ROOT = Path(__file__).resolve().parents[2]
QUICK = os.environ.get("MLPOT_EXAMPLE_QUICK") == "1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10 if QUICK else 200)
    parser.add_argument("--model", default=str(ROOT / "deploy" / "ethanol.pt"))
    parser.add_argument("--out", default="ipi-ethanol")
    args = parser.parse_args()
    torch.set_num_threads(1)

    atoms = molecule("CH3CH2OH")
    calculator = MLPotCalculator(args.model)
    print(f"ASE energy of the start: {calculator.get_potential_energy(atoms):.5f} eV")
    tic = time.perf_counter()
    props = run_path_integral(atoms, calculator, args.out, beads=args.beads, steps=args.steps)
    elapsed = time.perf_counter() - tic
    for k in range(0, args.steps + 1, max(1, args.steps // 10)):
        print(f"step {int(props['step'][k]):4d}  potential {props['potential'][k]:.5f} eV  "
              f"T {props['temperature'][k]:6.1f} K  conserved {props['conserved'][k]:.5f} eV")
    print(f"{args.steps} steps x {args.beads} beads in {elapsed:.1f} s (i-PI's start included); files in {args.out}/")


if __name__ == "__main__":
    main()
