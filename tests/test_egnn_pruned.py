"""EGNN with pruned hidden irreps (``hidden_ls``, issue 17 item 7): l in {0, 2} only, edge harmonics still
up to 2. Its irreps, its symmetries and forces, every backend, TorchScript export and compiled training."""

import numpy as np
import pytest
import torch
from e3nn import o3
from e3nn.util.test import assert_equivariant

from mlpot import export, keys
from mlpot.data.graph import make_graph
from mlpot.export import example_graph
from mlpot.models import build_potential
from mlpot.models.egnn import BACKENDS, using_backend

from conftest import assert_compiled_step_equals_eager, five_point_derivative, perturbed_ethanol

HPARAMS = {"num_features": 4, "lmax": 2, "num_layers": 3, "radial_hidden": 8, "hidden_ls": [0, 2]}
TOLERANCE = 1e-9  # float64, features and forces of order 1


pytestmark = pytest.mark.usefixtures("float64_default")  # conftest.py


def pruned(parity=False, seed=7, **overrides):
    torch.manual_seed(seed)
    return build_potential("egnn", [1, 6, 8], 4.0, torch.float64, **{**HPARAMS, "parity": parity, **overrides}).eval()


def ethanol_graph(seed=2):
    atoms = perturbed_ethanol(seed=seed)
    return atoms, make_graph(atoms.numbers, atoms.positions, 4.0, dtype=torch.float64)


def sh_paths(layer):
    """(l_in, l_sh, l_out) of every tensor-product path of an interaction."""
    tp = layer.tp
    return {(tp.irreps_in1[i.i_in1].ir.l, tp.irreps_in2[i.i_in2].ir.l, tp.irreps_out[i.i_out].ir.l) for i in tp.instructions}


@pytest.mark.parametrize("parity", [False, True])
def test_no_l1_features_but_harmonics_up_to_2(parity):
    model = pruned(parity).model
    assert model.sh.irreps_out == o3.Irreps("0e+1o+2e")
    for layer in model.layers:
        assert {ir.l for _, ir in layer.irreps_out} == {0, 2}, layer.irreps_out
        assert all(l_in != 1 and l_out != 1 for l_in, _, l_out in sh_paths(layer))
    # Y^1 enters a path only where parity lets even x odd land in a hidden irrep (2e x 1o -> 2o)
    uses_y1 = any(l_sh == 1 for layer in model.layers for _, l_sh, _ in sh_paths(layer))
    assert uses_y1 == parity


def test_default_and_full_hidden_ls_are_the_unpruned_model():
    _, graph = ethanol_graph()
    torch.manual_seed(7)
    unpruned = {k: v for k, v in HPARAMS.items() if k != "hidden_ls"}
    reference = build_potential("egnn", [1, 6, 8], 4.0, torch.float64, **unpruned).eval()
    full = pruned(hidden_ls=[2, 1, 0])
    assert str(reference.model.irreps_out) == str(full.model.irreps_out) == "4x0e+4x1o+4x2e"
    assert reference.state_dict().keys() == full.state_dict().keys()
    for (name, a), (_, b) in zip(reference.state_dict().items(), full.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(reference(graph)[keys.FORCES], full(graph)[keys.FORCES])
    assert sum(p.numel() for p in pruned().parameters()) < sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("bad", [[1, 2], [0, 3], [0, 2, 2], [0, -1], [0, 1.5], "02"])
def test_bad_hidden_ls_is_a_one_line_error(bad):
    with pytest.raises(ValueError, match="hidden_ls must be") as err:
        pruned(hidden_ls=bad)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("parity", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_energy_invariant_and_forces_equivariant(backend, parity):
    """Rotations, inversion and translations (e3nn's assert_equivariant on cartesian points), and permutations."""
    potential = pruned(parity)
    atoms, graph = ethanol_graph()

    def energy_and_forces(pos):
        out = potential({**graph, keys.POSITIONS: pos})
        return out[keys.ENERGY], out[keys.FORCES]

    with using_backend(potential, backend):
        energy, forces = energy_and_forces(graph[keys.POSITIONS])
        assert forces.abs().max() > 1e-3
        assert_equivariant(energy_and_forces, [graph[keys.POSITIONS]], ["cartesian_points"], ["0e", "1o"], tolerance=TOLERANCE)
        perm = np.random.default_rng(3).permutation(len(atoms))
        permuted = atoms[perm]
        out = potential(make_graph(permuted.numbers, permuted.positions, 4.0, dtype=torch.float64))
    torch.testing.assert_close(out[keys.ENERGY], energy, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(out[keys.FORCES], forces[perm], rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("parity", [False, True])
def test_forces_are_minus_energy_gradient(parity):
    potential = pruned(parity)
    atoms, _ = ethanol_graph()

    def energy(flat):
        return float(potential(make_graph(atoms.numbers, flat.reshape(-1, 3), 4.0, dtype=torch.float64))[keys.ENERGY].detach().sum())

    forces = potential(make_graph(atoms.numbers, atoms.positions, 4.0, dtype=torch.float64))[keys.FORCES].detach().numpy()
    numerical = -five_point_derivative(energy, atoms.positions.reshape(-1), h=1e-3).reshape(-1, 3)
    np.testing.assert_allclose(forces, numerical, rtol=0, atol=1e-8 * np.abs(forces).max())


@pytest.mark.parametrize("lmax,hidden_ls", [(2, [0, 2]), (3, [0, 2]), (3, [0, 1, 3])])
@pytest.mark.parametrize("parity", [False, True])
def test_fused_backends_equal_e3nn(lmax, hidden_ls, parity):
    potential = pruned(parity, lmax=lmax, hidden_ls=hidden_ls)
    _, graph = ethanol_graph()
    outs = []
    for backend in BACKENDS:
        with using_backend(potential, backend):
            outs.append(potential(graph))
    for out in outs[1:]:
        for key in (keys.ENERGY, keys.FORCES, keys.NODE_FEATURES):
            torch.testing.assert_close(out[key], outs[0][key], rtol=1e-10, atol=1e-12, msg=key)


def test_torchscript_export_round_trip(tmp_path):
    potential = pruned()
    graph = example_graph(potential, sizes=(7, 5), seed=1)
    expected = potential(dict(graph))
    path = tmp_path / "pruned.pt"
    meta = export.save(potential, path)
    assert meta["hparams"]["hidden_ls"] == [0, 2]
    module, _ = export.load(path)
    rebuilt = export.potential_from_deployed(path)
    assert str(rebuilt.model.irreps_out) == "4x0e+4x2e"
    for out in (module(dict(graph)), rebuilt(dict(graph))):
        for key in (keys.ENERGY, keys.FORCES):
            torch.testing.assert_close(out[key], expected[key], rtol=1e-10, atol=1e-12)


# traced only (torch.compile -> identity), as tests/test_egnn_compiled.py: an Inductor build costs minutes here
def test_compiled_training_equals_eager(monkeypatch):
    """The traced step (unrolled backend) gives the eager energies, forces and weight gradients of a force loss."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    model = pruned().train()
    assert_compiled_step_equals_eager(model)
