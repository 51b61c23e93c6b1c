"""Short NVE molecular dynamics with a deployed model conserves the total energy."""

import numpy as np
import torch
from ase import units
from ase.md.velocitydistribution import Stationary, thermalize_momenta
from ase.md.verlet import VelocityVerlet

from mlpot import export
from mlpot.calculators import MLPotCalculator

from conftest import make_tiny_potential, perturbed_ethanol


def test_nve_energy_is_conserved(kind, tmp_path):
    path = tmp_path / f"{kind}.pt"
    export.save(make_tiny_potential(kind, torch.float64), path)
    atoms = perturbed_ethanol()
    # an untrained model barely binds: atoms fly apart and may pass close, which is fine for this check
    atoms.calc = MLPotCalculator(path, skin=0.5, min_distance=0.0)
    # Maxwell-Boltzmann momenta (ASE 3.29's name for MaxwellBoltzmannDistribution), fixed rng
    thermalize_momenta(atoms, 300, rng=np.random.default_rng(42))
    Stationary(atoms)

    potential, total = [], []

    def record():
        epot = atoms.get_potential_energy()
        potential.append(epot)
        total.append(epot + atoms.get_kinetic_energy())

    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dyn.attach(record, interval=1)
    record()
    dyn.run(200)

    potential, total = np.array(potential), np.array(total)
    assert len(total) == 202  # the initial point, then ASE calls observers at step 0 and after each step
    drift = np.abs(total - total[0]).max()
    variation = potential.max() - potential.min()
    assert drift < 1e-3, f"total energy drifts by {drift:.2e} eV"
    # not trivial: the potential energy changes by much more than the total energy drifts
    assert variation > 100 * drift, (variation, drift)
    assert variation > 1e-3
