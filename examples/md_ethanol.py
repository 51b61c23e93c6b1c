"""Langevin MD of ethanol at 500 K with the shipped equivariant model (deploy/ethanol.pt).

Usage: python examples/md_ethanol.py [--steps 400] [--model deploy/ethanol.pt]
MLPOT_EXAMPLE_QUICK=1 runs 20 steps instead of 400.
"""

import argparse
import os
import time
from pathlib import Path

from ase import units
from ase.build import molecule
from ase.md.langevin import Langevin
import numpy as np
import torch
from ase.constraints import FixCom
from ase.md.velocitydistribution import thermalize_momenta

from mlpot.calculators import EGNNCalculator

ROOT = Path(__file__).resolve().parents[1]
QUICK = os.environ.get("MLPOT_EXAMPLE_QUICK") == "1"  # the short run tests/test_examples.py checks in CI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20 if QUICK else 400)
    parser.add_argument("--model", default=str(ROOT / "deploy" / "ethanol.pt"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # a 9-atom molecule gains nothing from more threads, and loses a lot on a busy machine

    atoms = molecule("CH3CH2OH")
    atoms.calc = EGNNCalculator(args.model)
    atoms.set_constraint(FixCom())
    thermalize_momenta(atoms, temperature_K=500, rng=np.random.default_rng(0))
    dyn = Langevin(atoms, timestep=0.5 * units.fs, temperature_K=500, friction=0.01 / units.fs, fixcm=False, rng=np.random.default_rng(1))

    def report() -> None:
        epot, ekin = atoms.get_potential_energy(), atoms.get_kinetic_energy()
        temperature = ekin / (1.5 * units.kB * len(atoms))
        print(f"{dyn.get_time() / units.fs:7.1f} fs  Epot {epot:12.4f} eV  T {temperature:6.1f} K")

    dyn.attach(report, interval=max(1, args.steps // 10))
    tic = time.perf_counter()
    dyn.run(args.steps)
    elapsed = time.perf_counter() - tic
    print(f"{args.steps} steps ({args.steps * 0.5 / 1000:.2f} ps) in {elapsed:.1f} s: {1000 * elapsed / args.steps:.2f} ms/step")


if __name__ == "__main__":
    main()
