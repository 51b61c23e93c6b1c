"""Graph construction: keys, shapes, dtypes, neighbour lists, the edge convention and batching."""

import ase
import ase.build
import numpy as np
import pytest
import torch
from ase.neighborlist import neighbor_list as ase_neighbor_list

from mlpot import keys
from mlpot.data import atoms_to_graph, collate, make_graph, neighbor_list
from mlpot.data.neighbors import edge_pairs
from mlpot.nn.radial import edge_vectors


def brute_force_pairs(positions, cutoff):
    """Every ordered pair (i, j), i != j, closer than cutoff, by a double loop."""
    pairs = set()
    for i in range(len(positions)):
        for j in range(len(positions)):
            if i != j and np.linalg.norm(positions[j] - positions[i]) < cutoff:
                pairs.add((i, j))
    return pairs


def edge_set(i, j, vectors, decimals=6):
    """Edges as a set of (centre, neighbour, rounded edge vector): direction matters."""
    return {(int(a), int(b), *np.round(v, decimals).tolist()) for a, b, v in zip(i, j, vectors)}


def test_graph_keys_shapes_dtypes(ethanol, dtype):
    graph = atoms_to_graph(ethanol, cutoff=5.0, dtype=dtype)
    n = len(ethanol)
    num_edges = graph[keys.EDGE_INDEX].shape[1]
    expected = {
        keys.POSITIONS: ((n, 3), dtype),
        keys.ATOMIC_NUMBERS: ((n,), torch.int64),
        keys.EDGE_INDEX: ((2, num_edges), torch.int64),
        keys.SHIFT: ((num_edges, 3), dtype),
        keys.BATCH: ((n,), torch.int64),
        keys.NUM_ATOMS: ((1,), torch.int64),
        keys.CELL: ((1, 3, 3), dtype),
        keys.PBC: ((1, 3), torch.bool),
        keys.PAIR_EDGE: ((num_edges // 2,), torch.int64),
        keys.EDGE_PAIR: ((num_edges,), torch.int64),
    }
    assert set(graph) == set(expected)
    for key, (shape, key_dtype) in expected.items():
        assert tuple(graph[key].shape) == shape, key
        assert graph[key].dtype == key_dtype, key
    assert num_edges == n * (n - 1)  # ethanol is smaller than the 5 Å cutoff: every ordered pair
    # float64 positions pass through unchanged; float32 ones are rounded to 24 bits
    np.testing.assert_allclose(graph[keys.POSITIONS].double().numpy(), ethanol.positions,
                               rtol=1e-7 if dtype == torch.float32 else 0)
    assert graph[keys.ATOMIC_NUMBERS].tolist() == ethanol.numbers.tolist()
    assert graph[keys.NUM_ATOMS].tolist() == [n]
    assert not graph[keys.BATCH].any()
    assert not graph[keys.SHIFT].any() and not graph[keys.CELL].any() and not graph[keys.PBC].any()


@pytest.mark.parametrize("cutoff", [1.2, 2.0, 3.0])
def test_molecule_neighbors_match_brute_force(ethanol, cutoff):
    edge_index, shift = neighbor_list(ethanol.positions, cutoff)
    pairs = set(map(tuple, edge_index.T.tolist()))
    assert len(pairs) == edge_index.shape[1]  # no duplicates
    assert pairs == brute_force_pairs(ethanol.positions, cutoff)
    assert 0 < len(pairs) < len(ethanol) * (len(ethanol) - 1)
    assert shift.shape == (edge_index.shape[1], 3) and not shift.any()


def test_large_molecule_uses_cell_lists_and_matches_brute_force():
    # more atoms than the all-pairs branch handles, so the binned (ASE) branch runs
    rng = np.random.default_rng(1)
    positions = rng.uniform(0.0, 18.0, size=(450, 3))
    edge_index, shift = neighbor_list(positions, 2.5)
    diff = positions[None] - positions[:, None]
    dist = np.linalg.norm(diff, axis=-1)
    np.fill_diagonal(dist, np.inf)
    expected = set(zip(*np.nonzero(dist < 2.5)))
    assert set(map(tuple, edge_index.T.tolist())) == {(int(i), int(j)) for i, j in expected}
    assert edge_index.shape[1] == len(expected)
    assert not shift.any()


@pytest.mark.parametrize(
    "pbc, cutoff", [((True, True, True), 4.0), ((True, True, True), 2.6), ((True, False, True), 3.0)]
)
def test_periodic_neighbors_match_ase(pbc, cutoff):
    atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.1, seed=3)
    atoms.set_pbc(pbc)
    if not pbc[1]:
        atoms.center(vacuum=4.0, axis=1)
    edge_index, shift = neighbor_list(atoms.positions, cutoff, atoms.cell.array, atoms.pbc)
    i, j = edge_index
    vectors = atoms.positions[j] - atoms.positions[i] + shift
    ref_i, ref_j, ref_d = ase_neighbor_list("ijD", atoms, cutoff)
    assert edge_index.shape[1] == len(ref_i)
    assert edge_set(i, j, vectors) == edge_set(ref_i, ref_j, ref_d)
    assert np.linalg.norm(vectors, axis=1).max() < cutoff
    assert np.abs(shift).max() > 0  # periodic images are present (the cutoff exceeds the cell)
    if not pbc[1]:
        assert np.all(shift[:, 1] == 0)

    # atoms_to_graph uses the cell and the same convention
    graph = atoms_to_graph(atoms, cutoff, dtype=torch.float64)
    vec, length = edge_vectors(graph[keys.POSITIONS], graph[keys.EDGE_INDEX], graph[keys.SHIFT])
    gi, gj = graph[keys.EDGE_INDEX].numpy()
    assert edge_set(gi, gj, vec.numpy()) == edge_set(ref_i, ref_j, ref_d)
    np.testing.assert_allclose(length.numpy(), np.linalg.norm(vec.numpy(), axis=1))
    assert graph[keys.PBC].tolist() == [list(pbc)]
    np.testing.assert_allclose(graph[keys.CELL][0].numpy(), atoms.cell.array)


def test_periodic_cell_without_volume_raises():
    with pytest.raises(ValueError, match="non-zero volume"):
        neighbor_list(np.zeros((2, 3)) + [[0, 0, 0], [1, 0, 0]], 2.0, np.zeros((3, 3)), np.array([True] * 3))


def test_edge_convention_centre_first_and_vector_points_to_neighbour():
    # one directed edge written by hand: atom 0 is the centre, atom 1 the neighbour
    pos = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    edge_index = torch.tensor([[0], [1]])
    shift = torch.tensor([[10.0, 0.0, 0.0]], dtype=torch.float64)
    vec, length = edge_vectors(pos, edge_index, shift)
    assert vec.tolist() == [[11.0, 2.0, 3.0]]  # pos[j] - pos[i] + shift; a flip would give [[9, -2, -3]]
    assert torch.allclose(length, torch.tensor([np.sqrt(134.0)], dtype=torch.float64))

    # a periodic pair whose only neighbour is an image: the sign of the shift fixes the direction
    atoms = ase.Atoms("H2", positions=[[0.2, 0.0, 0.0], [2.6, 0.0, 0.0]], cell=[3.0, 10.0, 10.0], pbc=True)
    edge_index, shift = neighbor_list(atoms.positions, 1.0, atoms.cell.array, atoms.pbc)
    assert edge_index.tolist() == [[0, 1], [1, 0]]
    # from 0 (at 0.2) the nearest image of 1 sits at 2.6 - 3.0 = -0.4, so the vector is -0.6 along x
    np.testing.assert_allclose(shift, [[-3.0, 0, 0], [3.0, 0, 0]])
    vec = atoms.positions[edge_index[1]] - atoms.positions[edge_index[0]] + shift
    np.testing.assert_allclose(vec, [[-0.6, 0, 0], [0.6, 0, 0]], atol=1e-12)


def test_collate_offsets_edges_and_batch(ethanol):
    water = ase.build.molecule("H2O")
    g1 = atoms_to_graph(ethanol, 2.0, dtype=torch.float64)
    g2 = atoms_to_graph(water, 2.0, dtype=torch.float64)
    g1[keys.ENERGY_REF] = torch.tensor([1.0], dtype=torch.float64)
    g2[keys.ENERGY_REF] = torch.tensor([2.0], dtype=torch.float64)
    g1[keys.FORCES_REF] = torch.zeros(len(ethanol), 3, dtype=torch.float64)
    g2[keys.FORCES_REF] = torch.ones(len(water), 3, dtype=torch.float64)
    batch = collate([g1, g2, g1])
    n1, n2 = len(ethanol), len(water)
    e1, e2 = g1[keys.EDGE_INDEX].shape[1], g2[keys.EDGE_INDEX].shape[1]
    assert batch[keys.NUM_ATOMS].tolist() == [n1, n2, n1]
    assert batch[keys.BATCH].tolist() == [0] * n1 + [1] * n2 + [2] * n1
    assert batch[keys.POSITIONS].shape == (2 * n1 + n2, 3)
    assert batch[keys.ATOMIC_NUMBERS].tolist() == ethanol.numbers.tolist() + water.numbers.tolist() + ethanol.numbers.tolist()
    edges = batch[keys.EDGE_INDEX]
    assert edges.shape == (2, 2 * e1 + e2)
    assert torch.equal(edges[:, :e1], g1[keys.EDGE_INDEX])
    assert torch.equal(edges[:, e1 : e1 + e2], g2[keys.EDGE_INDEX] + n1)
    assert torch.equal(edges[:, e1 + e2 :], g1[keys.EDGE_INDEX] + n1 + n2)
    assert batch[keys.SHIFT].shape == (2 * e1 + e2, 3)
    assert batch[keys.CELL].shape == (3, 3, 3) and batch[keys.PBC].shape == (3, 3)
    assert batch[keys.ENERGY_REF].tolist() == [1.0, 2.0, 1.0]
    assert batch[keys.FORCES_REF].shape == (2 * n1 + n2, 3)
    # every edge stays inside its own structure
    assert torch.equal(batch[keys.BATCH][edges[0]], batch[keys.BATCH][edges[1]])
    # the batched edge vectors are those of the single graphs
    vec, _ = edge_vectors(batch[keys.POSITIONS], edges, batch[keys.SHIFT])
    vec1, _ = edge_vectors(g1[keys.POSITIONS], g1[keys.EDGE_INDEX], g1[keys.SHIFT])
    assert torch.equal(vec[:e1], vec1)

    single = collate([g2])
    assert single is not g2 and torch.equal(single[keys.EDGE_INDEX], g2[keys.EDGE_INDEX])


def test_make_graph_dtype_and_device(ethanol):
    graph = make_graph(ethanol.numbers, ethanol.positions, 3.0, dtype=torch.float32, device="cpu")
    assert graph[keys.POSITIONS].dtype == torch.float32
    assert all(t.device.type == "cpu" for t in graph.values())


def test_edge_pairs_join_each_edge_with_its_reverse():
    """Radial functions are computed once per pair: both edges of a pair must have the same length."""
    rng = np.random.default_rng(3)
    positions = rng.uniform(0, 3, (7, 3))
    for cell, pbc in ((None, None), (np.diag([3.0, 3.5, 6.0]), np.array([True, True, False]))):
        edge_index, shift = neighbor_list(positions, 4.0, cell, pbc)
        pair_edge, edge_pair = edge_pairs(edge_index, shift)
        assert 2 * len(pair_edge) == edge_index.shape[1] and np.bincount(edge_pair).tolist() == [2] * len(pair_edge)
        length = np.linalg.norm(positions[edge_index[1]] - positions[edge_index[0]] + shift, axis=1)
        np.testing.assert_allclose(length, length[pair_edge[edge_pair]], atol=1e-12)
        if cell is not None:
            assert (edge_index[0] == edge_index[1]).any()  # images of an atom pair up too
    with pytest.raises(ValueError, match="not symmetric"):
        edge_pairs(np.array([[0, 1, 0], [1, 0, 2]]), np.zeros((3, 3)))


def test_collate_offsets_pairs():
    graphs = [atoms_to_graph(ase.build.molecule(name), 4.0) for name in ("H2O", "CH3OH", "CH4")]
    batch = collate(graphs)
    assert batch[keys.EDGE_PAIR].max() + 1 == batch[keys.PAIR_EDGE].shape[0]
    vec = batch[keys.POSITIONS][batch[keys.EDGE_INDEX][1]] - batch[keys.POSITIONS][batch[keys.EDGE_INDEX][0]]
    length = vec.norm(dim=1)
    torch.testing.assert_close(length, length[batch[keys.PAIR_EDGE][batch[keys.EDGE_PAIR]]])
