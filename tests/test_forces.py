"""mlpot.nn.forces: forces, virial and Hessian by autograd, checked against finite differences and closed forms."""

import numpy as np
import pytest
import torch

from mlpot import export, keys
from mlpot.data.graph import make_graph
from mlpot.nn import forces as derivatives

from conftest import make_tiny_potential, perturbed_ethanol

STRAIN_STEP = 1e-5
# a small triclinic cell (perpendicular widths 3.9-4.4 Å): with a 3 Å cutoff atoms see images of the
# others across the faces; with a 5 Å cutoff they also see images of themselves
CELL = np.array([[4.2, 0.0, 0.0], [0.6, 4.0, 0.0], [-0.3, 0.5, 4.4]])
CELL_NUMBERS = [6, 1, 8, 1]
CELL_FRACTIONAL = np.array([[0.1, 0.2, 0.15], [0.35, 0.1, 0.4], [0.6, 0.55, 0.7], [0.8, 0.9, 0.3]])
# case -> (periodic, cutoff Å)
CASES = {"molecule": (False, 5.0), "cell": (True, 3.0), "cell_with_self_images": (True, 5.0)}


def structure(periodic: bool):
    """(numbers, positions Å, cell or None): perturbed ethanol, or four atoms in a periodic cell."""
    if periodic:
        return CELL_NUMBERS, CELL_FRACTIONAL @ CELL, CELL
    atoms = perturbed_ethanol()
    return atoms.numbers, atoms.positions, None


def graph_of(numbers, positions, cell, cutoff=5.0):
    pbc = None if cell is None else np.ones(3, dtype=bool)
    return make_graph(numbers, positions, cutoff, cell=cell, pbc=pbc, dtype=torch.float64)


def strained_energy(potential, numbers, positions, cell, strain: np.ndarray, num_edges: int) -> float:
    """Energy (eV) of the structure deformed by ``1 + strain``, with its neighbour list built anew."""
    deformation = np.eye(3) + strain
    strained_cell = None if cell is None else cell @ deformation
    graph = graph_of(numbers, positions @ deformation, strained_cell, potential.cutoff)
    assert graph[keys.EDGE_INDEX].shape[1] == num_edges, "the strain step moved a pair across the cutoff"
    with torch.no_grad():
        return float(potential.energy(graph)[keys.ENERGY].sum())


@pytest.mark.parametrize("case", list(CASES))
def test_virial_is_minus_the_strain_derivative_of_the_energy(kind, case):
    """W_ab = -dE/d(eps_ab) for a symmetric strain, against central differences of energies whose
    neighbour lists (and hence shifts) are rebuilt from the strained positions and cell."""
    periodic, cutoff = CASES[case]
    if kind == "gcn" and case == "cell_with_self_images":
        # PyG's gcn_norm keeps one of an atom's several self-loop edges (its periodic images) and drops
        # the others, while autograd sends gradients to all of them: the GCN's forces and virial there
        # are not the derivatives of its energy (a limitation of the gcn kind in small cells)
        pytest.skip("gcn: periodic self-images break PyG's self-loop handling")
    potential = make_tiny_potential(kind, torch.float64, cutoff=cutoff)
    numbers, positions, cell = structure(periodic)
    graph = graph_of(numbers, positions, cell, cutoff)
    shift = graph[keys.SHIFT]
    assert bool((shift != 0).any()) == periodic  # the periodic cases do test the strain of the shifts
    virial = potential.energy_and_forces(graph, virial=True)[keys.VIRIAL].detach()
    assert virial.shape == (1, 3, 3)
    num_edges = graph[keys.EDGE_INDEX].shape[1]
    expected = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            step = np.zeros((3, 3))
            step[a, b] += 0.5 * STRAIN_STEP
            step[b, a] += 0.5 * STRAIN_STEP
            plus = strained_energy(potential, numbers, positions, cell, step, num_edges)
            minus = strained_energy(potential, numbers, positions, cell, -step, num_edges)
            expected[a, b] = -(plus - minus) / (2 * STRAIN_STEP)
    scale = np.abs(expected).max()
    assert scale > 1e-4  # a virial of zero would pass any relative check
    np.testing.assert_allclose(virial[0].numpy(), expected, rtol=0, atol=1e-8 * scale)
    np.testing.assert_allclose(virial[0].numpy(), virial[0].numpy().T, rtol=0, atol=1e-12 * scale)


def test_virial_of_a_molecule_is_the_sum_of_position_times_force(kind):
    """Without periodic images the virial is sym(sum_i r_i x F_i), whatever the model."""
    potential = make_tiny_potential(kind, torch.float64)
    numbers, positions, _ = structure(periodic=False)
    out = potential.energy_and_forces(graph_of(numbers, positions, None), virial=True)
    pos, forces = out[keys.POSITIONS].detach(), out[keys.FORCES].detach()
    moment = pos.T @ forces
    expected = 0.5 * (moment + moment.T)
    torch.testing.assert_close(out[keys.VIRIAL][0].detach(), expected, rtol=0, atol=1e-12 * float(expected.abs().max()))


def test_virial_of_a_batch_belongs_to_each_structure(kind):
    """Each structure of a batch gets its own virial: the batched result equals the single ones."""
    from mlpot.data.graph import collate

    potential = make_tiny_potential(kind, torch.float64)
    graphs = [graph_of(*structure(periodic)) for periodic in (True, False)]
    batched = potential.energy_and_forces(collate(graphs), virial=True)[keys.VIRIAL].detach()
    for k, graph in enumerate(graphs):
        single = potential.energy_and_forces(graph, virial=True)[keys.VIRIAL][0].detach()
        torch.testing.assert_close(batched[k], single, rtol=1e-12, atol=1e-14)


def test_asking_for_the_virial_changes_no_other_output(kind):
    """The zero strain changes no value: energies, forces and the inputs carried along stay the same."""
    potential = make_tiny_potential(kind, torch.float64)
    graph = graph_of(*structure(periodic=True))
    plain, with_virial = potential(dict(graph)), potential.energy_and_forces(dict(graph), virial=True)
    assert keys.VIRIAL not in plain and set(with_virial) == set(plain) | {keys.VIRIAL}
    for key in (keys.ENERGY, keys.NODE_ENERGY, keys.FORCES):
        torch.testing.assert_close(with_virial[key], plain[key], rtol=1e-13, atol=1e-13)
    for key in (keys.POSITIONS, keys.SHIFT, keys.CELL):
        assert torch.equal(with_virial[key], graph[key])


def test_closed_forms():
    """Forces, virial and Hessian of E = sum x^3 / 6 + x_0 y_1 (positions only, no shifts): exact."""
    pos = torch.tensor([[0.3, -1.2, 0.8], [1.5, 0.4, -0.7]], dtype=torch.float64)
    graph = {
        keys.POSITIONS: pos, keys.SHIFT: torch.zeros(1, 3, dtype=torch.float64),
        keys.EDGE_INDEX: torch.tensor([[0], [1]]), keys.BATCH: torch.zeros(2, dtype=torch.long),
        keys.NUM_ATOMS: torch.tensor([2]),
    }

    def energy(g):
        x = g[keys.POSITIONS]
        return ((x**3).sum() / 6 + x[0, 0] * x[1, 1]).reshape(1)

    inputs, leaf, strain = derivatives.differentiable_inputs(graph, virial=True)
    forces, virial = derivatives.forces_and_virial(energy(inputs), leaf, strain, create_graph=False)
    gradient = pos**2 / 2
    gradient[0, 0] += pos[1, 1]
    gradient[1, 1] += pos[0, 0]
    torch.testing.assert_close(forces, -gradient, rtol=1e-14, atol=0)
    moment = pos.T @ -gradient
    torch.testing.assert_close(virial[0], 0.5 * (moment + moment.T), rtol=1e-14, atol=1e-15)

    inputs, leaf, _ = derivatives.differentiable_inputs(graph, virial=False)
    hessian = derivatives.hessian(energy(inputs), leaf)
    expected = torch.diag(pos.reshape(-1))
    expected[0, 4] = expected[4, 0] = 1.0  # d2(x_0 y_1) / dx_0 dy_1
    torch.testing.assert_close(hessian, expected, rtol=0, atol=1e-15)


def test_energy_without_position_dependence_has_zero_derivatives():
    """An energy that does not depend on positions (one atom, no edges) has zero forces, virial and Hessian."""
    potential = make_tiny_potential("schnet", torch.float64)
    graph = make_graph([6], np.zeros((1, 3)), 5.0, dtype=torch.float64)
    out = potential.energy_and_forces(graph, virial=True)
    assert torch.equal(out[keys.FORCES], torch.zeros(1, 3, dtype=torch.float64))
    assert torch.equal(out[keys.VIRIAL], torch.zeros(1, 3, 3, dtype=torch.float64))
    assert torch.equal(potential.hessian(graph), torch.zeros(3, 3, dtype=torch.float64))


def test_torchscript_file_computes_the_same_virial(tmp_path):
    """The deployed TorchScript model exports energy_and_forces, virial included, equal to the eager one."""
    potential = make_tiny_potential("schnet", torch.float64)
    export.save(potential, tmp_path / "model.pt")
    module, _ = export.load(tmp_path / "model.pt")
    graph = graph_of(*structure(periodic=True))
    expected = potential.energy_and_forces(dict(graph), virial=True)
    got = module.energy_and_forces(dict(graph), True, False, True)
    for key in (keys.ENERGY, keys.FORCES, keys.VIRIAL):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kind", ["schnet", "egnn"])
def test_float32_energy_differences_are_not_quantised_by_large_shifts(kind):
    """Energies are shifted and summed in float64: with per-atom shifts of -1000 eV (totals near -9000 eV,
    where float32 resolves only ~1e-3 eV) a 1e-3 Å move still changes the energy by -F.dx (~1e-5 eV)."""
    potential = make_tiny_potential(kind, torch.float32)
    potential.energy_shift.fill_(-1000.0)
    atoms = perturbed_ethanol()
    graph = make_graph(atoms.numbers, atoms.positions, potential.cutoff, dtype=torch.float32)
    out = potential(graph)
    assert out[keys.ENERGY].dtype == torch.float64 and out[keys.NODE_ENERGY].dtype == torch.float64
    forces = out[keys.FORCES].detach().double().numpy()
    k = int(np.abs(forces).argmax())
    step = np.zeros(forces.size)
    step[k] = 1e-3

    def energy_at(displacement):
        moved = make_graph(atoms.numbers, atoms.positions + displacement.reshape(-1, 3), potential.cutoff, dtype=torch.float32)
        return float(potential(moved)[keys.ENERGY])

    change = energy_at(step) - energy_at(-step)  # central difference: -2 F dx
    expected = -2 * forces.ravel()[k] * 1e-3
    assert abs(expected) > 1e-5  # far below float32's resolution of a -9000 eV total (~1e-3 eV)
    assert change == pytest.approx(expected, rel=0.05)
