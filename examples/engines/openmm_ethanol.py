"""Ethanol in OpenMM with the shipped model as its force field: a check against ASE, then Langevin MD at 300 K.

Usage: python examples/engines/openmm_ethanol.py [--steps 400] [--model deploy/ethanol.pt] [--dtype float32]
MLPOT_EXAMPLE_QUICK=1 runs 20 steps. Needs openmm and openmmml (pip install openmm==8.6.1 openmmml==1.8).
"""

import argparse
import os
import time
from pathlib import Path

import numpy as np
import openmm
import torch
from ase.build import molecule
from openmm import unit

from mlpot.calculators import MLPotCalculator
from mlpot.engines.openmm import energy_and_forces, openmm_system

ROOT = Path(__file__).resolve().parents[2]
QUICK = os.environ.get("MLPOT_EXAMPLE_QUICK") == "1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20 if QUICK else 400)
    parser.add_argument("--model", default=str(ROOT / "deploy" / "ethanol.pt"))
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args()
    torch.set_num_threads(1)  # a 9-atom molecule gains nothing from more threads

    atoms = molecule("CH3CH2OH")
    _, system, positions = openmm_system(atoms, args.model, dtype=args.dtype)
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 0.5 * unit.femtosecond)
    integrator.setRandomNumberSeed(1)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)

    energy, forces = energy_and_forces(context)
    reference = MLPotCalculator(args.model, dtype=args.dtype)
    print(f"OpenMM - ASE: energy {energy - reference.get_potential_energy(atoms):.2e} eV, "
          f"forces {np.abs(forces - reference.get_forces(atoms)).max():.2e} eV/Å")

    context.setVelocitiesToTemperature(300 * unit.kelvin, 1)
    dof = 3 * system.getNumParticles()
    tic = time.perf_counter()
    for done in range(0, args.steps + 1, max(1, args.steps // 10)):
        if done:
            integrator.step(max(1, args.steps // 10))
        state = context.getState(getEnergy=True)
        epot = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        ekin = state.getKineticEnergy()
        temperature = (2 * ekin / (dof * unit.MOLAR_GAS_CONSTANT_R)).value_in_unit(unit.kelvin)
        print(f"{done * 0.5:7.1f} fs  Epot {epot:14.3f} kJ/mol  T {temperature:6.1f} K")
    elapsed = time.perf_counter() - tic
    print(f"{args.steps} steps in {elapsed:.1f} s: {1000 * elapsed / args.steps:.2f} ms/step")


if __name__ == "__main__":
    main()
