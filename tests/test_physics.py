"""Physical consistency of every model kind: symmetries, derivatives, locality, batching, smoothness."""

import ase
import ase.build
import numpy as np
import pytest
import torch

from mlpot import keys
from mlpot.data import collate, make_graph

from conftest import five_point_derivative

CUTOFF = 5.0
# absolute tolerance as a fraction of the scale of the compared quantity, per dtype
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def graph_of(atoms, dtype, cutoff=CUTOFF):
    return make_graph(atoms.numbers, atoms.positions, cutoff, dtype=dtype)


def evaluate(potential, atoms, dtype, cutoff=CUTOFF):
    """(energy float, forces (N, 3) float64, node energies (N,) float64) of one structure."""
    out = potential(graph_of(atoms, dtype, cutoff))
    return (
        float(out[keys.ENERGY].detach().sum()),
        out[keys.FORCES].detach().double().numpy(),
        out[keys.NODE_ENERGY].detach().double().numpy(),
    )


def random_rotation(rng, proper=True):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q if proper else -q  # -q: inversion times a rotation, det -1


def assert_close(actual, expected, dtype, scale=None):
    scale = np.abs(expected).max() if scale is None else scale
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOL[dtype] * scale)


def test_output_keys_and_shapes(kind, dtype, tiny_potential, ethanol):
    potential = tiny_potential(kind, dtype)
    graph = collate([graph_of(ethanol, dtype), graph_of(ase.build.molecule("H2O"), dtype)])
    out = potential(graph)
    n = len(ethanol) + 3
    assert out[keys.ENERGY].shape == (2,)
    assert out[keys.FORCES].shape == (n, 3)
    assert out[keys.NODE_ENERGY].shape == (n,)
    assert out[keys.NODE_FEATURES].shape[0] == n and out[keys.NODE_FEATURES].ndim == 2
    for key in (keys.ENERGY, keys.FORCES, keys.NODE_ENERGY, keys.NODE_FEATURES):
        # energies are summed in float64 in every precision; the rest is in the model's dtype
        expected = torch.float64 if key in (keys.ENERGY, keys.NODE_ENERGY) else dtype
        assert out[key].dtype == expected, key
        assert torch.isfinite(out[key]).all(), key
    torch.testing.assert_close(out[keys.ENERGY][0], out[keys.NODE_ENERGY][: len(ethanol)].sum())
    # untrained but not trivial: the tests below would pass for a model that outputs zeros otherwise
    assert out[keys.FORCES].norm() > 1e-4


@pytest.mark.parametrize("proper", [True, False], ids=["rotation", "improper"])
def test_rotation_invariance_and_force_equivariance(kind, dtype, tiny_potential, ethanol, proper):
    potential = tiny_potential(kind, dtype)
    energy, forces, node_energy = evaluate(potential, ethanol, dtype)
    rng = np.random.default_rng(7)
    for _ in range(3):
        rot = random_rotation(rng, proper)
        rotated = ethanol.copy()
        rotated.positions = ethanol.positions @ rot.T
        energy_r, forces_r, node_energy_r = evaluate(potential, rotated, dtype)
        assert_close(energy_r, energy, dtype, scale=np.abs(node_energy).sum())
        assert_close(node_energy_r, node_energy, dtype)
        assert_close(forces_r, forces @ rot.T, dtype)


def test_translation_invariance(kind, dtype, tiny_potential, ethanol):
    potential = tiny_potential(kind, dtype)
    energy, forces, node_energy = evaluate(potential, ethanol, dtype)
    moved = ethanol.copy()
    moved.positions += np.array([1.7, -2.3, 0.9])
    energy_t, forces_t, _ = evaluate(potential, moved, dtype)
    assert_close(energy_t, energy, dtype, scale=np.abs(node_energy).sum())
    assert_close(forces_t, forces, dtype)
    # translation invariance implies zero net force
    assert np.abs(forces.sum(0)).max() < TOL[dtype] * 10 * np.abs(forces).max()


def test_permutation_equivariance(kind, dtype, tiny_potential, ethanol):
    potential = tiny_potential(kind, dtype)
    energy, forces, node_energy = evaluate(potential, ethanol, dtype)
    perm = np.random.default_rng(3).permutation(len(ethanol))
    permuted = ethanol[perm]
    energy_p, forces_p, node_energy_p = evaluate(potential, permuted, dtype)
    assert_close(energy_p, energy, dtype, scale=np.abs(node_energy).sum())
    assert_close(node_energy_p, node_energy[perm], dtype)
    assert_close(forces_p, forces[perm], dtype)


def _displaced(atoms, flat_positions):
    moved = atoms.copy()
    moved.positions = flat_positions.reshape(-1, 3)
    return moved


def test_forces_are_minus_energy_gradient(kind, tiny_potential, ethanol):
    dtype = torch.float64
    potential = tiny_potential(kind, dtype)
    _, forces, _ = evaluate(potential, ethanol, dtype)
    assert np.linalg.norm(forces) > 1e-4
    numerical = -five_point_derivative(lambda x: evaluate(potential, _displaced(ethanol, x), dtype)[0],
                                       ethanol.positions.reshape(-1), h=1e-3).reshape(-1, 3)
    # measured: 0.3-1.7e-10 of the largest force
    np.testing.assert_allclose(forces, numerical, rtol=0, atol=1e-8 * np.abs(forces).max())


def test_gradcheck_positions(kind, tiny_potential):
    # training mode keeps the graph of the forces, so the energy can be differentiated again
    potential = tiny_potential(kind, torch.float64).train()
    atoms = ase.build.molecule("H2O")
    atoms.positions += np.random.default_rng(0).uniform(-0.05, 0.05, (3, 3))
    graph = graph_of(atoms, torch.float64)

    def energy(pos):
        g = dict(graph)
        g[keys.POSITIONS] = pos
        return potential(g)[keys.ENERGY]

    pos = graph[keys.POSITIONS].clone().requires_grad_(True)
    # a two-point difference with eps 1e-5 Å: truncation and rounding both ~1e-10 eV/Å here
    assert torch.autograd.gradcheck(energy, (pos,), eps=1e-5, atol=1e-9, rtol=1e-8)


def test_hessian_symmetric_and_matches_force_differences(kind, tiny_potential, ethanol):
    dtype = torch.float64
    potential = tiny_potential(kind, dtype)
    hessian = potential.hessian(graph_of(ethanol, dtype)).numpy()
    n = 3 * len(ethanol)
    assert hessian.shape == (n, n)
    assert np.abs(hessian).max() > 1e-4
    np.testing.assert_allclose(hessian, hessian.T, rtol=0, atol=1e-10 * np.abs(hessian).max())
    numerical = -five_point_derivative(lambda x: evaluate(potential, _displaced(ethanol, x), dtype)[1].reshape(-1),
                                       ethanol.positions.reshape(-1), h=1e-3)
    # measured: 0.4-6.4e-10 of the largest element
    np.testing.assert_allclose(hessian, numerical, rtol=0, atol=1e-8 * np.abs(hessian).max())


def test_energy_adds_up_for_distant_molecules(kind, dtype, tiny_potential, ethanol):
    potential = tiny_potential(kind, dtype)
    water = ase.build.molecule("H2O")
    water.positions += [40.0, 0.0, 0.0]
    e1, f1, n1 = evaluate(potential, ethanol, dtype)
    e2, f2, n2 = evaluate(potential, water, dtype)
    e12, f12, _ = evaluate(potential, ethanol + water, dtype)
    assert_close(e12, e1 + e2, dtype, scale=np.abs(n1).sum() + np.abs(n2).sum())
    assert_close(f12, np.concatenate([f1, f2]), dtype)


def test_batch_equals_single_structures(kind, dtype, tiny_potential, ethanol):
    potential = tiny_potential(kind, dtype)
    structures = [ethanol, ase.build.molecule("H2O"), ase.build.molecule("CH3OH"), ethanol]
    structures[3] = ethanol.copy()
    structures[3].positions += np.random.default_rng(5).uniform(-0.1, 0.1, (len(ethanol), 3))
    singles = [evaluate(potential, atoms, dtype) for atoms in structures]
    out = potential(collate([graph_of(atoms, dtype) for atoms in structures]))
    energies = out[keys.ENERGY].detach().double().numpy()
    forces = out[keys.FORCES].detach().double().numpy()
    scale = max(np.abs(s[2]).sum() for s in singles)
    assert_close(energies, np.array([s[0] for s in singles]), dtype, scale=scale)
    assert_close(forces, np.concatenate([s[1] for s in singles]), dtype)


def test_no_gradient_across_frames(kind, tiny_potential, ethanol):
    dtype = torch.float64
    potential = tiny_potential(kind, dtype).train()  # training mode keeps the graph for a second grad
    water = ase.build.molecule("H2O")
    graph = collate([graph_of(ethanol, dtype), graph_of(water, dtype)])
    pos = graph[keys.POSITIONS].clone().requires_grad_(True)
    graph[keys.POSITIONS] = pos
    energy = potential(graph)[keys.ENERGY]
    n = len(ethanol)
    grad0 = torch.autograd.grad(energy[0], pos, retain_graph=True)[0]
    grad1 = torch.autograd.grad(energy[1], pos)[0]
    assert grad0[:n].norm() > 1e-4 and grad1[n:].norm() > 1e-4
    assert torch.all(grad0[n:] == 0)
    assert torch.all(grad1[:n] == 0)


def pair(distance, numbers=(6, 8)):
    return ase.Atoms(numbers=list(numbers), positions=[[0.0, 0.0, 0.0], [distance, 0.0, 0.0]])


def test_smooth_at_cutoff(kind, tiny_potential):
    dtype = torch.float64
    potential = tiny_potential(kind, dtype)
    isolated, _, _ = evaluate(potential, pair(40.0), dtype)
    inside, inside_forces, _ = evaluate(potential, pair(CUTOFF - 2.0), dtype)
    # the pair interacts inside the cutoff ...
    assert abs(inside - isolated) > 1e-5 and np.abs(inside_forces).max() > 1e-5

    # ... and beyond it contributes exactly nothing, even when the graph holds the edge (neighbour skin)
    for distance in (CUTOFF + 1e-9, CUTOFF + 0.01, CUTOFF + 0.4):
        energy, forces, _ = evaluate(potential, pair(distance), dtype, cutoff=CUTOFF + 0.5)
        assert energy == pytest.approx(isolated, abs=1e-12)
        assert np.abs(forces).max() < 1e-12

    # energy and force go continuously to their isolated values as the pair approaches the cutoff
    previous_gap, previous_force = None, None
    for delta in (1e-1, 1e-2, 1e-3):
        energy, forces, _ = evaluate(potential, pair(CUTOFF - delta), dtype, cutoff=CUTOFF + 0.5)
        gap, force = abs(energy - isolated), np.abs(forces).max()
        if previous_gap is not None:
            # at least quadratic in delta for the energy, linear for the force (cosine or polynomial cutoffs)
            assert gap <= previous_gap * 0.02 + 1e-13
            assert force <= previous_force * 0.11 + 1e-13
        previous_gap, previous_force = gap, force
    assert previous_gap < 1e-6 and previous_force < 1e-4

    # a scan across the cutoff has no jump larger than the neighbouring steps
    distances = np.linspace(CUTOFF - 0.02, CUTOFF + 0.02, 41)
    energies = np.array([evaluate(potential, pair(d), dtype, cutoff=CUTOFF + 0.5)[0] for d in distances])
    steps = np.abs(np.diff(energies))
    assert steps.max() < 1e-6


def test_unknown_element_raises(kind, dtype, tiny_potential):
    potential = tiny_potential(kind, dtype)
    atoms = ase.build.molecule("CH3SH")  # sulfur is not among the species (H, C, O)
    with pytest.raises(ValueError, match="element"):
        potential(graph_of(atoms, dtype))
