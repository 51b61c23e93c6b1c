"""Every EGNN backend (mlpot.nn.fused) against e3nn's modules evaluated path by path, for every lmax and parity."""

import itertools

import pytest
import torch
from e3nn import o3

from mlpot import keys
from mlpot.data.graph import make_graph
from mlpot.models import build_potential
from mlpot.models.egnn import BACKENDS, Interaction, using_backend
from mlpot.nn import equivariant
from mlpot.nn.fused import DenseInteraction, UnrolledInteraction

from conftest import perturbed_ethanol

FUSED = ["dense", "unrolled"]
CASES = list(itertools.product([0, 1, 2, 3], [False, True]))


def ethanol_graph(dtype=torch.float64):
    atoms = perturbed_ethanol(seed=3)
    return make_graph(atoms.numbers, atoms.positions, 4.0, dtype=dtype)


def egnn(seed=0, **hparams):
    torch.manual_seed(seed)
    hparams = {"num_features": 6, "lmax": 2, "num_layers": 2, "radial_hidden": 12, "parity": False, **hparams}
    return build_potential("egnn", [1, 6, 8], 4.0, torch.float64, **hparams)


def with_each(potential, backends, graph):
    """The potential's outputs on ``graph`` with each of ``backends`` (the same parameters)."""
    outs = []
    for backend in backends:
        with using_backend(potential, backend):
            outs.append(potential(graph))
    return outs



@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("lmax,parity", CASES)
def test_fused_backends_equal_e3nn(lmax, parity, backend, float64_default):
    potential = egnn(seed=lmax, lmax=lmax, num_layers=3, parity=parity).eval()
    assert potential.model.irreps_out.count(o3.Irrep("0o")) == (6 if parity and lmax > 0 else 0)
    fused, reference = with_each(potential, [backend, "e3nn"], ethanol_graph())
    for key in (keys.ENERGY, keys.FORCES, keys.NODE_FEATURES):
        torch.testing.assert_close(fused[key], reference[key], rtol=1e-10, atol=1e-12, msg=key)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("parity", [False, True])
def test_fused_backends_train_like_e3nn(backend, parity, float64_default):
    """Parameter gradients of a force loss agree, so training the fused model trains the same model."""
    potential = egnn(parity=parity).train()
    graph = ethanol_graph()
    grads = []
    for name in (backend, "e3nn"):
        potential.zero_grad()
        with using_backend(potential, name):
            out = potential(graph)
        (out[keys.ENERGY].sum() + (out[keys.FORCES] ** 2).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in potential.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-9, atol=1e-12, msg=name)


def test_one_state_dict_serves_every_backend():
    """Backends share the e3nn modules: the same tensors under the same names, whichever is active."""
    potential = egnn()
    state = potential.state_dict()
    for backend in BACKENDS:
        with using_backend(potential, backend):
            other = potential.state_dict()
            assert list(other) == list(state)
            assert all(other[k].data_ptr() == state[k].data_ptr() for k in state)
            built = egnn(seed=1, backend=backend)
            built.load_state_dict(state)
            torch.testing.assert_close(built(ethanol_graph())[keys.FORCES], potential(ethanol_graph())[keys.FORCES])
    with pytest.raises(ValueError, match="unknown EGNN backend 'fast'"):
        egnn(backend="fast")


def test_using_backend_is_scoped():
    """The unrolled form is on only inside the block; the layers before it come back (TorchScript and
    AOTInductor keep the dense form)."""
    potential = egnn()
    model = potential.model
    layers = list(model.layers)
    assert model.backend == "dense" and all(type(layer) is DenseInteraction for layer in layers)
    with using_backend(potential, "unrolled"):
        assert model.backend == "unrolled" and all(type(layer) is UnrolledInteraction for layer in model.layers)
    assert model.backend == "dense" and all(a is b for a, b in zip(model.layers, layers))
    with pytest.raises(RuntimeError), using_backend(potential, "e3nn"):
        assert all(type(layer) is Interaction for layer in model.layers)
        raise RuntimeError
    assert all(a is b for a, b in zip(model.layers, layers))


def test_fused_tables_stay_exact_when_converted_to_float64():
    """Built in float32 then converted: the fused tables come from float64 originals, not float32 roundings."""
    potential = build_potential("egnn", [1, 6, 8], 4.0, torch.float32, num_features=4, lmax=2, num_layers=1, parity=False)
    layer = potential.to(torch.float64).model.layers[0]
    for name in ("coupling", "grouped"):
        assert getattr(layer, name).dtype == torch.float64
        assert torch.equal(getattr(layer, name), layer._tables64[name])


@pytest.mark.parametrize("parity", [False, True])
def test_layers_work_on_blocked_features(parity):
    """Layer outputs are (N, M, U): the m components of every irrep along M, channels along U; the last
    layer computes only its scalars (0e, and 0o with both parities from the third layer on), the only
    features the energy reads."""
    potential = egnn(parity=parity, num_layers=3)
    seen = []
    for layer in potential.model.layers:
        layer.register_forward_hook(lambda module, args, out: seen.append(out))
    potential(ethanol_graph())
    irreps = potential.model.layers[0].irreps_out
    assert str(irreps) == "6x0e+6x1o+6x2e"  # from 6x0e only the natural parities are reachable
    assert seen[0].shape == (9, irreps.dim // 6, 6) == (9, 1 + 3 + 5, 6)
    assert seen[1].shape == (9, irreps.dim // 6 + (3 + 5 if parity else 0), 6)  # + 1e, 2o
    assert seen[2].shape == (9, 2 if parity else 1, 6)


def test_blocked_layout_round_trip_and_invariants():
    irreps = o3.Irreps("3x0e+3x0o+3x1o+3x1e+3x2e")
    flat = irreps.randn(5, -1, dtype=torch.float64)
    blocked = equivariant.to_blocked(flat, irreps)
    assert blocked.shape == (5, 1 + 1 + 3 + 3 + 5, 3)
    assert torch.equal(blocked[:, 2:5], flat[:, 6:15].view(5, 3, 3).transpose(1, 2))  # 1o: channel-major in e3nn
    assert torch.equal(equivariant.to_flat(blocked, irreps), flat)


def test_model_invariants_read_the_blocked_scalars_like_e3nn(float64_default):
    """EGNN's node features: to_invariants of the last layer (e3nn, flat) equals its blocked 0e-row form."""
    potential = egnn(parity=True).eval()
    model = potential.model
    captured = []
    with using_backend(potential, "e3nn"):
        model.layers[-1].register_forward_hook(lambda module, args, out: captured.append(out))
        features = potential(ethanol_graph())[keys.NODE_FEATURES]
    expected = model.to_invariants(equivariant.to_flat(captured[0], model.irreps_out))
    torch.testing.assert_close(features, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["egnn", "schnet"])
def test_radial_once_per_pair_changes_no_number(kind, float64_default):
    """With the pair keys the radial MLP (filters) run once per pair i->j, j->i; without them once per edge."""
    torch.manual_seed(4)
    hparams = {"egnn": dict(num_features=6, lmax=2, num_layers=3, parity=False), "schnet": dict(num_features=8)}[kind]
    potential = build_potential(kind, [1, 6, 8], 4.0, torch.float64, **hparams).eval()
    graph = ethanol_graph()
    assert keys.PAIR_EDGE in graph
    per_pair = potential(graph)
    per_edge = potential({k: v for k, v in graph.items() if k not in (keys.PAIR_EDGE, keys.EDGE_PAIR)})
    for key in (keys.ENERGY, keys.FORCES):
        torch.testing.assert_close(per_pair[key], per_edge[key], rtol=1e-12, atol=1e-13)


def test_freeze_precomputes_and_train_undoes_it():
    potential = egnn(seed=5).eval()
    graph = ethanol_graph()
    before = potential(graph)[keys.FORCES]
    potential.model.freeze()
    assert all(layer.frozen for layer in potential.model.layers)
    torch.testing.assert_close(potential(graph)[keys.FORCES], before, rtol=0, atol=1e-14)
    potential.train()
    assert not any(layer.frozen for layer in potential.model.layers)
    with torch.no_grad():
        potential.model.layers[0].linear_out.weight.mul_(1.5)  # a training step: must be seen, not a stale copy
    assert not torch.allclose(potential(graph)[keys.FORCES], before)
