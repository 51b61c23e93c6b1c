"""Periodic structures: extensivity, equivalent cells, finite differences, rotations, float32 far from
the origin, and the ASE calculator on cells; every test runs for every model kind."""

import ase
import ase.build
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from mlpot import export, keys
from mlpot.calculators import MLPotCalculator
from mlpot.data import atoms_to_graph, make_graph

from conftest import make_tiny_potential, perturbed_ethanol

CUTOFF = 4.0


def crystal(a=5.0, seed=0):
    """A rattled 8-atom C3HO4 rocksalt-type cubic cell, edge ``a`` Å; the default is between one and two
    cutoffs, so an atom meets several images of the same neighbour."""
    atoms = ase.build.bulk("CO", "rocksalt", a=a, cubic=True)
    atoms.numbers[0] = 1
    atoms.rattle(0.1, seed=seed)
    return atoms


def energy_forces(potential, atoms, dtype=torch.float64):
    out = potential(atoms_to_graph(atoms, CUTOFF, dtype=dtype))
    return float(out[keys.ENERGY].detach().sum()), out[keys.FORCES].detach().double().numpy()


@pytest.fixture
def potential(kind):
    return make_tiny_potential(kind, torch.float64, cutoff=CUTOFF)


def test_supercell_energy_per_atom_equals_primitive(potential):
    atoms = crystal()
    energy, forces = energy_forces(potential, atoms)
    assert np.abs(forces).max() > 1e-4  # forces are not trivially zero
    supercell = atoms.repeat((2, 2, 2))
    energy8, forces8 = energy_forces(potential, supercell)
    assert energy8 / len(supercell) == pytest.approx(energy / len(atoms), rel=1e-10)
    np.testing.assert_allclose(forces8, np.tile(forces, (8, 1)), rtol=0, atol=1e-10)


def test_cell_smaller_than_the_cutoff_matches_its_supercell(kind):
    # 3.2 Å < cutoff: every atom sees images of itself; the 3x3x3 supercell (9.6 Å) is larger than 2 cutoffs
    potential = make_tiny_potential(kind, torch.float64, cutoff=CUTOFF)
    atoms = crystal(a=3.2)
    energy, forces = energy_forces(potential, atoms)
    supercell = atoms.repeat(3)
    energy27, forces27 = energy_forces(potential, supercell)
    assert energy27 / len(supercell) == pytest.approx(energy / len(atoms), rel=1e-10)
    np.testing.assert_allclose(forces27, np.tile(forces, (27, 1)), rtol=0, atol=1e-10)


def test_gcn_layer_equals_pyg_gcnconv_where_no_atom_meets_its_own_image():
    # the self loops mlpot's GCN adds itself (so that an edge to an atom's own image stays an edge) give
    # PyG's GCNConv numbers wherever PyG's own loops are right: on graphs without i -> i edges
    from torch_geometric.nn import GCNConv

    from mlpot.models.gcn import DistanceGCNConv

    torch.manual_seed(0)
    ours, pyg = DistanceGCNConv(6, 5).double(), GCNConv(6, 5).double()
    pyg.load_state_dict(ours.state_dict())
    x = torch.randn(7, 6, dtype=torch.float64)
    edge_index = torch.tensor([[0, 1, 1, 2, 3, 4, 5, 6, 2], [1, 0, 2, 1, 4, 3, 6, 5, 5]])
    weight = torch.rand(edge_index.shape[1], dtype=torch.float64)
    torch.testing.assert_close(ours(x, edge_index, weight), pyg(x, edge_index, weight), rtol=1e-12, atol=1e-12)
    # with an i -> i edge (an image of itself), it is a neighbour beside the loop, not the loop
    loops = torch.cat([edge_index, torch.tensor([[3], [3]])], dim=1)
    w = torch.cat([weight, torch.tensor([0.5], dtype=torch.float64)])
    assert not torch.allclose(ours(x, loops, w), pyg(x, loops, w))


def test_equivalent_cells_give_the_same_energy_and_forces(potential):
    atoms = crystal()
    energy, forces = energy_forces(potential, atoms)
    rng = np.random.default_rng(1)
    sheared = atoms.copy()  # the same lattice from another basis: c + a - b, b + 2a (determinant 1)
    a, b, c = atoms.cell.array
    sheared.set_cell([a, b + 2 * a, c + a - b], scale_atoms=False)
    wrapped = atoms.copy()  # each atom moved by its own lattice vector
    wrapped.positions += rng.integers(-2, 3, (len(atoms), 3)) @ atoms.cell.array
    for other in (sheared, wrapped):
        other_energy, other_forces = energy_forces(potential, other)
        assert other_energy == pytest.approx(energy, rel=1e-10)
        np.testing.assert_allclose(other_forces, forces, rtol=0, atol=1e-10)


def test_forces_match_finite_differences_in_a_cell(potential):
    atoms = crystal(seed=3)
    _, forces = energy_forces(potential, atoms)
    h = 1e-5
    numerical = np.zeros_like(forces)
    for k in range(atoms.positions.size):
        energies = []
        for sign in (1, -1):
            displaced = atoms.copy()
            displaced.positions.reshape(-1)[k] += sign * h
            energies.append(energy_forces(potential, displaced)[0])
        numerical.reshape(-1)[k] = -(energies[0] - energies[1]) / (2 * h)
    np.testing.assert_allclose(forces, numerical, rtol=0, atol=1e-7 + 1e-5 * np.abs(forces).max())


def test_forces_rotate_with_structure_and_cell(potential):
    atoms = crystal(seed=4)
    atoms.set_cell([[5.0, 0.0, 0.0], [0.8, 4.9, 0.0], [-0.6, 0.7, 5.1]], scale_atoms=True)  # triclinic
    energy, forces = energy_forces(potential, atoms)
    rotation = Rotation.random(random_state=5).as_matrix()
    rotated = atoms.copy()
    rotated.set_cell(atoms.cell.array @ rotation.T, scale_atoms=False)
    rotated.positions = atoms.positions @ rotation.T
    rotated_energy, rotated_forces = energy_forces(potential, rotated)
    assert rotated_energy == pytest.approx(energy, rel=1e-10)
    np.testing.assert_allclose(rotated_forces, forces @ rotation.T, rtol=0, atol=1e-10)


TRANSLATION_DIRECTION = np.array([0.62, -0.48, 0.62])


@pytest.mark.parametrize("distance", [1e3, 1e4, 1e5])
def test_float32_forces_do_not_depend_on_distance_from_origin(kind, distance):
    potential = make_tiny_potential(kind, torch.float32)
    atoms = perturbed_ethanol()
    _, forces = energy_forces(potential, atoms, torch.float32)
    # a translation that is not a whole number of Å in any direction
    moved = atoms.copy()
    moved.positions += distance * TRANSLATION_DIRECTION + 0.37
    _, moved_forces = energy_forces(potential, moved, torch.float32)
    # the float32 floor: the same fractional shift near the origin (rounding of the local positions), which
    # on some CPUs is just above 1e-6 of the largest force for the tiny GCN; far away must be no worse
    near = atoms.copy()
    near.positions += 0.37
    _, near_forces = energy_forces(potential, near, torch.float32)
    floor = 2 * np.abs(near_forces - forces).max()
    np.testing.assert_allclose(moved_forces, forces, rtol=0, atol=max(1e-6 * np.abs(forces).max(), floor))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_periodic_crystal_translated_by_a_non_lattice_vector(kind, dtype):
    potential = make_tiny_potential(kind, dtype, cutoff=CUTOFF)
    atoms = crystal(seed=6)
    energy, forces = energy_forces(potential, atoms, dtype)
    moved = atoms.copy()
    moved.positions += 1e4 * TRANSLATION_DIRECTION + [0.37, 1.9, -2.3]
    moved_energy, moved_forces = energy_forces(potential, moved, dtype)
    # float32: the wrapped positions are other numbers than the original ones, rounded afresh (~1e-6);
    # without the local frame the error at 1e4 Å is 1e-3 Å in every position
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert moved_energy == pytest.approx(energy, rel=tol)
    np.testing.assert_allclose(moved_forces, forces, rtol=0, atol=tol * np.abs(forces).max())


def test_graph_positions_are_small_but_give_the_same_edge_vectors():
    atoms = crystal()
    atoms.positions += [1e4, -3e3, 0.4]
    graph = make_graph(atoms.numbers, atoms.positions, CUTOFF, atoms.cell.array, atoms.pbc, dtype=torch.float64)
    pos = graph[keys.POSITIONS].numpy()
    assert np.abs(pos).max() < 2 * atoms.cell.lengths().max()
    moved = pos - atoms.positions  # a constant per atom: the rounded centroid plus whole cell vectors
    cells = (moved - moved[0]) @ np.linalg.inv(atoms.cell.array)
    np.testing.assert_allclose(cells, np.round(cells), atol=1e-9)
    # a molecule near the origin keeps its coordinates exactly
    ethanol = perturbed_ethanol()
    assert np.array_equal(make_graph(ethanol.numbers, ethanol.positions, CUTOFF, dtype=torch.float64)[keys.POSITIONS].numpy(),
                          ethanol.positions)


@pytest.fixture(scope="module")
def periodic_models(tmp_path_factory):
    """``periodic_models(kind)``: (path, potential) of a tiny model deployed as periodic, written once."""
    folder, cache = tmp_path_factory.mktemp("periodic"), {}

    def get(kind):
        if kind not in cache:
            potential = make_tiny_potential(kind, torch.float64, cutoff=CUTOFF)
            export.save(potential, folder / f"{kind}.pt", periodic=True)
            cache[kind] = folder / f"{kind}.pt", potential
        return cache[kind]

    return get


@pytest.fixture
def periodic_model(kind, periodic_models):
    return periodic_models(kind)


def test_calculator_gives_energies_and_forces_of_cells_and_slabs(periodic_model):
    path, potential = periodic_model
    calc = MLPotCalculator(path)
    assert "stress" in calc.implemented_properties  # tested in tests/test_stress.py
    slab = crystal().repeat((1, 1, 2))
    slab.cell[2] = 0.0
    slab.pbc = [True, True, False]
    for atoms in (crystal(), slab):
        atoms.positions[0] += atoms.cell.array[0]  # outside the cell
        atoms.calc = MLPotCalculator(path)
        energy, forces = energy_forces(potential, atoms)
        assert atoms.get_potential_energy() == pytest.approx(energy, rel=1e-12)
        np.testing.assert_allclose(atoms.get_forces(), forces, rtol=0, atol=1e-12)
        np.testing.assert_allclose(atoms.get_potential_energies().sum(), energy, rtol=1e-12)


def test_calculator_reuses_the_list_only_for_the_same_cell(periodic_model, monkeypatch):
    from mlpot import calculators

    path, potential = periodic_model
    builds = []
    original = calculators.make_graph
    monkeypatch.setattr(calculators, "make_graph", lambda *a, **k: builds.append(1) or original(*a, **k))
    atoms = crystal(seed=7)
    atoms.calc = MLPotCalculator(path, skin=0.5)
    atoms.get_potential_energy()
    # small moves across the cell boundary reuse the list and still give the right numbers
    atoms.positions += np.random.default_rng(8).uniform(-0.1, 0.1, atoms.positions.shape) + [0.0, 0.0, -0.05]
    energy, forces = energy_forces(potential, atoms)
    assert atoms.get_potential_energy() == pytest.approx(energy, rel=1e-12)
    np.testing.assert_allclose(atoms.get_forces(), forces, rtol=0, atol=1e-12)
    assert len(builds) == 1
    # a strained cell (atoms scaled with it) needs a new list
    atoms.set_cell(atoms.cell.array * 1.02, scale_atoms=True)
    energy, forces = energy_forces(potential, atoms)
    assert atoms.get_potential_energy() == pytest.approx(energy, rel=1e-12)
    np.testing.assert_allclose(atoms.get_forces(), forces, rtol=0, atol=1e-12)
    assert len(builds) == 2
