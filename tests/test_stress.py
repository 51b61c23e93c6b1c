"""Stress (eV/Å^3, ASE's sign and Voigt order) in the calculators: against the finite-difference strain
derivative of the energy, symmetry, rotations, supercells, the deployed file against the eager model,
committees, and structures without a 3D cell; every test runs for every model kind.

The cells are larger than twice the cutoff: the GCN is known wrong in smaller ones (tests/test_periodic.py).
"""

import ase.build
import numpy as np
import pytest
import torch
from ase.calculators.calculator import PropertyNotImplementedError
from ase.stress import voigt_6_to_full_3x3_stress
from scipy.spatial.transform import Rotation

from mlpot import export, keys
from mlpot.calculators import CommitteeCalculator, MLPotCalculator
from mlpot.data import atoms_to_graph

from conftest import five_point_derivative, make_tiny_potential

CUTOFF = 3.5
SPECIES = (29, 79)


def copper(seed=0, triclinic=False):
    """A rattled 32-atom fcc Cu cell (2x2x2 cubic cells, a = 3.6 Å: 7.2 Å > 2 cutoffs of 3.5 Å) with every
    third atom Au (with one element, the GCN's normalised sums of equal features hardly see distances);
    ``triclinic`` shears it (scaling the atoms with it) so that no two cell vectors are perpendicular."""
    atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    atoms.numbers[::3] = 79
    if triclinic:
        shear = np.array([[1.0, 0.08, -0.05], [0.03, 1.02, 0.06], [-0.07, 0.04, 0.97]])
        atoms.set_cell(atoms.cell.array @ shear, scale_atoms=True)
    atoms.rattle(0.1, seed=seed)
    return atoms


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``models(kind, seed=0)``: (path, potential) of a tiny Cu model deployed as periodic, written once."""
    folder, cache = tmp_path_factory.mktemp("stress"), {}

    def get(kind, seed=0):
        if (kind, seed) not in cache:
            potential = make_tiny_potential(kind, torch.float64, species=SPECIES, cutoff=CUTOFF, seed=seed)
            path = folder / f"{kind}-{seed}.pt"
            export.save(potential, path, periodic=True)
            cache[kind, seed] = path, potential
        return cache[kind, seed]

    return get


def energy(potential, atoms) -> float:
    return float(potential(atoms_to_graph(atoms, CUTOFF, dtype=torch.float64))[keys.ENERGY].detach().sum())


def stress_of(path, atoms, **kwargs) -> np.ndarray:
    atoms = atoms.copy()
    atoms.calc = MLPotCalculator(path, **kwargs)
    return atoms.get_stress()


@pytest.mark.parametrize("triclinic", [False, True], ids=["cubic", "triclinic"])
def test_stress_matches_finite_difference_strain_derivative(kind, models, triclinic):
    path, potential = models(kind)
    atoms = copper(triclinic=triclinic)
    cell = atoms.cell.array.copy()

    def strained_energy(x):
        eps = x.reshape(3, 3)
        strained = atoms.copy()
        strained.set_cell(cell @ (np.eye(3) + 0.5 * (eps + eps.T)), scale_atoms=True)
        return energy(potential, strained)

    # d E(sym(x)) / d x_ij = (dE/d eps_ij + dE/d eps_ji) / 2 = V sigma_ij
    expected = five_point_derivative(strained_energy, np.zeros(9), 2e-4).reshape(3, 3) / atoms.get_volume()
    stress = voigt_6_to_full_3x3_stress(stress_of(path, atoms))
    assert np.abs(expected).max() > 5e-6  # not trivially zero (eV/Å^3)
    np.testing.assert_allclose(stress, expected, rtol=0, atol=1e-8 * np.abs(expected).max())


def test_stress_is_symmetric_and_the_3x3_form_agrees(kind, models):
    path, _ = models(kind)
    atoms = copper(seed=1, triclinic=True)
    atoms.calc = MLPotCalculator(path)
    full = atoms.get_stress(voigt=False)
    assert full.shape == (3, 3)
    np.testing.assert_allclose(full, full.T, rtol=0, atol=1e-14 * np.abs(full).max())
    np.testing.assert_allclose(voigt_6_to_full_3x3_stress(atoms.get_stress()), full, rtol=0, atol=0)


def test_stress_rotates_with_the_structure(kind, models):
    path, _ = models(kind)
    atoms = copper(seed=2, triclinic=True)
    stress = voigt_6_to_full_3x3_stress(stress_of(path, atoms))
    rotation = Rotation.random(random_state=3).as_matrix()
    rotated = atoms.copy()
    rotated.set_cell(atoms.cell.array @ rotation.T, scale_atoms=False)
    rotated.positions = atoms.positions @ rotation.T
    rotated_stress = voigt_6_to_full_3x3_stress(stress_of(path, rotated))
    np.testing.assert_allclose(rotated_stress, rotation @ stress @ rotation.T, rtol=0, atol=1e-10 * np.abs(stress).max())


def test_stress_of_a_supercell_equals_the_primitive_cells(kind, models):
    path, _ = models(kind)
    atoms = copper(seed=4, triclinic=True)
    stress = stress_of(path, atoms)
    np.testing.assert_allclose(stress_of(path, atoms.repeat((2, 1, 1))), stress, rtol=0, atol=1e-10 * np.abs(stress).max())


def test_deployed_stress_equals_eager(kind, models):
    path, potential = models(kind)
    atoms = copper(seed=5, triclinic=True)
    out = potential.energy_and_forces(atoms_to_graph(atoms, CUTOFF, dtype=torch.float64), True)
    eager = -out[keys.VIRIAL].detach().double().numpy()[0] / atoms.get_volume()
    atoms.calc = MLPotCalculator(path)
    np.testing.assert_allclose(atoms.get_stress(voigt=False), eager, rtol=0, atol=1e-10 * np.abs(eager).max())
    # the forces of the stress call are the forces of a forces-only call
    forces = atoms.get_forces()
    atoms.calc.reset()
    np.testing.assert_allclose(atoms.get_forces(), forces, rtol=0, atol=1e-12)


class _Recorder:
    """Wraps a deployed model and records whether each call computed the virial."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, graph):
        self.calls.append("plain")
        return self.model(graph)

    def energy_and_forces(self, graph, virial, create_graph, check_species):
        self.calls.append("virial" if virial else "plain")
        return self.model.energy_and_forces(graph, virial, create_graph, check_species)


def test_virial_is_computed_only_when_stress_is_asked_for(models):
    path, _ = models("schnet")
    atoms = copper(seed=6)
    atoms.calc = MLPotCalculator(path)
    atoms.calc.model = recorder = _Recorder(atoms.calc.model)
    atoms.get_potential_energy()
    atoms.get_forces()
    assert recorder.calls == ["plain"]
    atoms.get_stress()
    assert recorder.calls == ["plain", "virial"]


def test_committee_stress_is_the_members_mean_with_its_spread(models):
    paths = [models("schnet", seed)[0] for seed in (0, 1)]
    atoms = copper(seed=7)
    members = np.stack([stress_of(p, atoms) for p in paths])
    atoms.calc = CommitteeCalculator(paths)
    np.testing.assert_allclose(atoms.get_stress(), members.mean(axis=0), rtol=0, atol=1e-14)
    std = atoms.calc.get_property("stress_std", atoms)
    np.testing.assert_allclose(std, members.std(axis=0), rtol=0, atol=1e-14)
    assert std.max() > 0


def test_stress_of_a_slab_or_a_molecule_is_not_implemented(models):
    path, _ = models("schnet")
    slab = copper(seed=8)
    slab.pbc = [True, True, False]
    slab.calc = MLPotCalculator(path)
    slab.get_forces()  # energies and forces of a slab work
    with pytest.raises(PropertyNotImplementedError, match="periodic in all three"):
        slab.get_stress()
    molecule = copper(seed=8)
    molecule.pbc = False
    molecule.calc = MLPotCalculator(path, check_pbc=False)
    with pytest.raises(PropertyNotImplementedError, match="periodic in all three"):
        molecule.get_stress()


def test_relax_cell_brings_the_stress_below_its_fmax_equivalent(models):
    from mlpot.workflows.relax import relax

    path, _ = models("schnet")
    atoms = copper(seed=9)
    atoms.set_cell(atoms.cell.array * 1.03, scale_atoms=True)  # strained: a large stress to start from
    calc = MLPotCalculator(path)
    start = np.abs(stress_of(path, atoms)).max()
    fmax = 1e-3
    result = relax(atoms, calc, fmax=fmax, optimizer="fire", max_steps=1000, cell=True)
    assert result.converged
    # FrechetCellFilter's cell "forces" are -V stress / N (per component), so |stress| <= fmax N / V
    limit = fmax * len(atoms) / result.atoms.get_volume()
    assert result.max_stress_eV_A3 <= limit < start
    assert result.max_stress_eV_A3 == pytest.approx(np.abs(result.atoms.get_stress()).max(), rel=1e-12)
    assert result.atoms.get_volume() != pytest.approx(atoms.get_volume(), rel=1e-4)


def test_npt_changes_the_volume(models):
    from mlpot.workflows.md import make_dynamics

    path, _ = models("schnet")
    atoms = copper(seed=10)
    atoms.calc = MLPotCalculator(path)
    volume = atoms.get_volume()
    dyn = make_dynamics(atoms, "npt", 2.0, 300.0, pressure_bar=1e4)
    dyn.run(5)
    assert np.isfinite(atoms.positions).all()
    assert abs(atoms.get_volume() / volume - 1.0) > 1e-6
    np.testing.assert_allclose(atoms.cell.angles(), [90.0, 90.0, 90.0], atol=1e-8)  # isotropic


@pytest.mark.parametrize("command", [["md", "--ensemble", "npt", "--time", "2fs"], ["relax", "--cell"]])
def test_a_molecule_with_npt_or_a_cell_relaxation_is_a_one_line_error(models, tmp_path, capsys, command):
    from mlpot.commands import main

    from test_cli import one_error_line

    path, _ = models("schnet")
    molecule = copper(seed=11)[:4]
    molecule.pbc = False
    molecule.cell = None
    structure = tmp_path / "cluster.xyz"
    molecule.write(structure)
    name, *options = command
    assert main([name, str(path), str(structure), "--output", str(tmp_path / "out"), *options]) == 2
    message = one_error_line(capsys, f"mlpot {name}")
    assert "periodic in all three directions" in message
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.fixture(scope="module")
def aoti_models(models, tmp_path_factory):
    """``aoti_models(kind)``: (AOTI path, TorchScript path) of the tiny periodic model, compiled once (slow)."""
    folder, cache = tmp_path_factory.mktemp("stress-aoti"), {}

    def get(kind):
        if kind not in cache:
            path, potential = models(kind)
            export.save(potential, folder / f"{kind}.pt2", format="aoti", periodic=True)
            cache[kind] = folder / f"{kind}.pt2", path
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", ["schnet", "egnn"])
def test_aoti_stress_equals_eager(kind, aoti_models):
    aoti_path, torchscript_path = aoti_models(kind)
    assert export.read_metadata(aoti_path)["outputs"] == ["energy", "forces", "node_energy", "virial"]
    atoms = copper(seed=12, triclinic=True)
    expected = stress_of(torchscript_path, atoms)
    np.testing.assert_allclose(stress_of(aoti_path, atoms), expected, rtol=0, atol=1e-10 * np.abs(expected).max())


def test_aoti_file_without_a_virial_output_still_loads_and_refuses_stress(aoti_models):
    from mlpot.export.aoti import load_aoti

    aoti_path, torchscript_path = aoti_models("schnet")
    meta = export.read_metadata(aoti_path)
    del meta["outputs"]  # as files built before the virial output
    atoms = copper(seed=13)
    atoms.calc = MLPotCalculator(aoti_path)
    atoms.calc.model = load_aoti(aoti_path, "cpu", None, meta)
    reference = copper(seed=13)
    reference.calc = MLPotCalculator(torchscript_path)
    np.testing.assert_allclose(atoms.get_forces(), reference.get_forces(), rtol=0, atol=1e-10)
    with pytest.raises(PropertyNotImplementedError, match="without a virial output"):
        atoms.get_stress()
