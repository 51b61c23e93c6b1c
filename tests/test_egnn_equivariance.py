"""e3nn.util.test.assert_equivariant on every equivariant module of the EGNN, each on its own, and on the
whole model's energy and forces (float64; rotations, inversion and translations)."""

import pytest
import torch
from e3nn import o3
from e3nn.util.test import assert_equivariant

from mlpot import keys
from mlpot.data.graph import make_graph
from mlpot.models import build_potential
from mlpot.models.egnn import BACKENDS, using_backend
from mlpot.nn import equivariant

from conftest import perturbed_ethanol

TOLERANCE = 1e-9  # componentwise, float64: the features and forces here are of order 1


pytestmark = pytest.mark.usefixtures("float64_default")  # conftest.py


def ethanol_egnn(lmax, parity):
    torch.manual_seed(7)
    potential = build_potential(
        "egnn", [1, 6, 8], 4.0, torch.float64, num_features=4, lmax=lmax, num_layers=3, radial_hidden=8, parity=parity
    ).eval()
    atoms = perturbed_ethanol(seed=2)
    return potential, make_graph(atoms.numbers, atoms.positions, 4.0, dtype=torch.float64)


def edge_inputs(potential, graph):
    """The model's edge spherical harmonics (E, M_sh), radial features (per pair) and species one-hot."""
    model = potential.model
    vec = graph[keys.POSITIONS][graph[keys.EDGE_INDEX][1]] - graph[keys.POSITIONS][graph[keys.EDGE_INDEX][0]]
    r = vec.norm(dim=1).index_select(0, graph[keys.PAIR_EDGE])
    radial = model.basis(r) * model.envelope(r).unsqueeze(-1)
    species = potential.species_index[graph[keys.ATOMIC_NUMBERS]]
    onehot = torch.nn.functional.one_hot(species, model.num_species).to(torch.float64)
    return model.sh(vec), radial, onehot


@pytest.mark.parametrize("parity", [False, True])
@pytest.mark.parametrize("lmax", [2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_interaction_is_equivariant(backend, lmax, parity):
    """Each layer maps features of its irreps_in and edge harmonics of irreps_sh to features of its
    irreps_out (the last layer of a fused backend: only its scalars, 0e and 0o)."""
    potential, graph = ethanol_egnn(lmax, parity)
    sh, radial, onehot = edge_inputs(potential, graph)
    irreps_sh = potential.model.sh.irreps_out
    with using_backend(potential, backend):
        for layer in potential.model.layers:
            scalars_only = layer.scalars_only and backend != "e3nn"
            irreps_out = o3.Irreps([(m, ir) for m, ir in layer.irreps_out if ir.l == 0]) if scalars_only else layer.irreps_out

            def apply(x, y, layer=layer, irreps_out=irreps_out):
                blocked = equivariant.to_blocked(x, layer.irreps_in)
                out = layer(blocked, onehot, graph[keys.EDGE_INDEX], y, radial, graph[keys.EDGE_PAIR])
                return equivariant.to_flat(out, irreps_out)

            x = layer.irreps_in.randn(onehot.shape[0], -1)
            assert apply(x, sh).abs().max() > 1e-3  # not vacuously equivariant
            assert_equivariant(apply, [x, sh], [layer.irreps_in, irreps_sh], [irreps_out], tolerance=TOLERANCE)


@pytest.mark.parametrize("parity", [False, True])
def test_edge_harmonics_and_invariant_readout(parity):
    """Y(r_ij) is equivariant (1o -> 0e+1o+2e+3o); the node features and energies read from the last
    layer's features are invariant."""
    potential, graph = ethanol_egnn(3, parity)
    model = potential.model
    vec = torch.randn(20, 3)
    assert_equivariant(model.sh, [vec], ["1o"], [model.sh.irreps_out], tolerance=TOLERANCE)

    def readout(h):
        features = model.to_invariants(h)
        return features, model.readout(features)

    h = model.irreps_out.randn(9, -1)
    assert_equivariant(readout, [h], [model.irreps_out], ["4x0e", "0e"], tolerance=TOLERANCE)


@pytest.mark.parametrize("parity", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_energy_invariant_and_forces_equivariant(backend, parity):
    potential, graph = ethanol_egnn(2, parity)

    def energy_and_forces(pos):
        out = potential({**graph, keys.POSITIONS: pos})
        return out[keys.ENERGY], out[keys.FORCES]

    with using_backend(potential, backend):
        _, forces = energy_and_forces(graph[keys.POSITIONS])
        assert forces.abs().max() > 1e-3
        assert_equivariant(
            energy_and_forces, [graph[keys.POSITIONS]], ["cartesian_points"], ["0e", "1o"], tolerance=TOLERANCE
        )
