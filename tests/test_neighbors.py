"""The neighbour list against ASE's for every kind of cell; edge order, pairing and cell errors."""

import ase
import ase.build
import numpy as np
import pytest
from ase.neighborlist import neighbor_list as ase_neighbor_list

from mlpot.data.neighbors import edge_pairs, neighbor_list

from conftest import perturbed_ethanol


def cubic():
    atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.1, seed=1)
    return atoms, 4.0


def small_cell():
    # a 2.5 Å primitive fcc cell with a 6 Å cutoff: dozens of images of every atom, itself included
    atoms = ase.build.bulk("Cu", "fcc", a=3.6)
    atoms.positions += 0.3  # outside the cell: images must still be found
    return atoms, 6.0


def triclinic():
    atoms = ase.Atoms("Cu3", cell=[[4.0, 0.0, 0.0], [1.3, 3.7, 0.0], [-0.8, 1.1, 4.2]], pbc=True)
    atoms.set_scaled_positions([[0.1, 0.2, 0.3], [0.6, 0.5, 0.1], [0.3, 0.9, 0.7]])
    return atoms, 5.0


def slab():
    # periodic in x and y only, with no cell vector at all along z
    atoms = ase.build.fcc111("Cu", (2, 2, 3), a=3.6, vacuum=0.0)
    atoms.rattle(0.05, seed=2)
    atoms.cell[2] = 0.0
    atoms.pbc = [True, True, False]
    return atoms, 4.5


def molecule():
    return perturbed_ethanol(), 3.0


STRUCTURES = {f.__name__: f for f in (cubic, small_cell, triclinic, slab, molecule)}


def triples(i, j, shift, cell):
    """Set of (i, j, integer cell shift) for shifts in Å (rows of ``shift`` = n @ cell)."""
    n = np.zeros((len(i), 3)) if not np.any(shift) else np.linalg.lstsq(cell.T, shift.T, rcond=None)[0].T
    assert np.allclose(n, np.round(n), atol=1e-8)
    return set(zip(np.asarray(i).tolist(), np.asarray(j).tolist(), map(tuple, np.round(n).astype(int).tolist())))


@pytest.mark.parametrize("name", STRUCTURES)
def test_same_edges_as_ase(name):
    atoms, cutoff = STRUCTURES[name]()
    periodic = atoms.pbc.any()
    edge_index, shift = neighbor_list(
        atoms.positions, cutoff, atoms.cell.array if periodic else None, atoms.pbc if periodic else None
    )
    assert edge_index.dtype == np.int64 and shift.dtype == np.float64 and shift.shape == (edge_index.shape[1], 3)
    ref_i, ref_j, ref_shift = ase_neighbor_list("ijS", atoms, cutoff)
    assert edge_index.shape[1] == len(ref_i) > 0
    cell = atoms.cell.array
    assert triples(*edge_index, shift, cell) == triples(ref_i, ref_j, ref_shift @ cell, cell)
    vectors = atoms.positions[edge_index[1]] - atoms.positions[edge_index[0]] + shift
    assert np.linalg.norm(vectors, axis=1).max() < cutoff
    if name == "small_cell":
        assert (edge_index[0] == edge_index[1]).sum() > 10  # many images of the same atom
    if name == "slab":
        assert not shift[:, 2].any()
    if name == "molecule":
        assert not shift.any()
    pair_edge, edge_pair = edge_pairs(edge_index, shift)  # each edge has its reverse
    assert 2 * len(pair_edge) == edge_index.shape[1]


@pytest.mark.parametrize("name", ["small_cell", "triclinic", "molecule"])
def test_edges_are_sorted_and_reproducible(name):
    atoms, cutoff = STRUCTURES[name]()
    cell, pbc = (atoms.cell.array, atoms.pbc) if atoms.pbc.any() else (None, None)
    edge_index, shift = neighbor_list(atoms.positions, cutoff, cell, pbc)
    cell_shift = np.zeros_like(shift) if cell is None else np.round(shift @ np.linalg.inv(cell))
    rows = np.concatenate([edge_index.T, cell_shift], axis=1)
    order = np.lexsort(rows.T[::-1])
    assert (order == np.arange(len(rows))).all()  # sorted by (i, j, shift)
    again = neighbor_list(atoms.positions.copy(), cutoff, cell, pbc)
    assert np.array_equal(again[0], edge_index) and np.array_equal(again[1], shift)


def test_isolated_atom_and_far_apart_atoms_have_no_edges():
    edge_index, shift = neighbor_list(np.zeros((1, 3)), 5.0)
    assert edge_index.shape == (2, 0) and shift.shape == (0, 3)
    edge_index, _ = neighbor_list(np.array([[0.0, 0, 0], [0, 0, 6.0]]), 5.0)
    assert edge_index.shape == (2, 0)


@pytest.mark.parametrize(
    "cell, pbc",
    [(np.zeros((3, 3)), [True, True, True]), (np.diag([3.0, 0.0, 5.0]), [True, True, False]),
     ([[3.0, 0, 0], [6.0, 0, 0], [0, 0, 5.0]], [True, True, True])],
    ids=["zero", "zero-periodic-vector", "parallel"],
)
def test_periodic_directions_without_cell_vectors_raise(cell, pbc):
    with pytest.raises(ValueError, match="non-zero volume.*set atoms.cell"):
        neighbor_list(np.array([[0.0, 0, 0], [1.0, 0, 0]]), 2.0, np.asarray(cell), np.array(pbc))
