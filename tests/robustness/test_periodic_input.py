"""Periodic input that is unusual but valid gives the right numbers, never a silent wrong one: a
left-handed cell is the same crystal as its right-handed twin, and a cell changed between MD steps
is seen (the neighbour list is rebuilt) rather than served from the old one."""

import ase.build
import numpy as np
import pytest
from ase.md.verlet import VelocityVerlet
from ase import units

from mlpot import export
from mlpot.calculators import MLPotCalculator

from robustness_helpers import perturbed_ethanol, tiny_potential


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("periodic") / "periodic.pt"
    export.save(tiny_potential("schnet"), path, periodic=True)
    return path


def crystal(cell):
    atoms = perturbed_ethanol(seed=2)
    atoms.cell = cell
    atoms.pbc = True
    atoms.wrap()
    return atoms


def results(model, atoms, skin=0.5):
    atoms.calc = MLPotCalculator(model, skin=skin)
    return atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()


def test_left_handed_cell_is_its_right_handed_twin(model):
    right = [[6.0, 0.0, 0.0], [0.5, 5.5, 0.0], [0.3, -0.4, 6.2]]
    left = [right[1], right[0], right[2]]  # two vectors swapped: the same lattice, det < 0
    assert np.linalg.det(left) < 0 < np.linalg.det(right)
    e_r, f_r, s_r = results(model, crystal(right))
    e_l, f_l, s_l = results(model, crystal(left))
    np.testing.assert_allclose(e_l, e_r, rtol=0, atol=1e-10)
    np.testing.assert_allclose(f_l, f_r, rtol=0, atol=1e-10)
    np.testing.assert_allclose(s_l, s_r, rtol=0, atol=1e-12)  # the volume is |det|: the stress keeps its sign


def test_a_cell_changed_between_md_steps_is_seen(model):
    atoms = crystal(np.diag([6.5, 6.0, 6.2]))
    atoms.calc = MLPotCalculator(model)
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dyn.run(3)
    atoms.set_cell(atoms.cell.array * 1.04, scale_atoms=True)  # a step of a barostat, done by hand
    changed = atoms.get_potential_energy(), atoms.get_forces().copy(), atoms.get_stress()
    fresh = results(model, atoms.copy(), skin=0.0)
    for got, want in zip(changed, fresh):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    dyn.run(3)  # and the run goes on with the new cell
    np.testing.assert_allclose(atoms.get_potential_energy(), results(model, atoms.copy(), skin=0.0)[0], rtol=0, atol=1e-10)
