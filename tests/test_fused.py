"""The fused EGNN layers (mlpot.nn.equivariant) against e3nn's modules evaluated path by path."""

import contextlib
import itertools

import numpy as np
import pytest
import torch
from e3nn import o3

from mlpot import keys
from mlpot.data.graph import make_graph
from mlpot.models import build_potential
from mlpot.models.egnn import unrolled_products

from conftest import perturbed_ethanol

CASES = list(itertools.product([0, 1, 2, 3], [False, True]))


def ethanol_graph(dtype=torch.float64):
    atoms = perturbed_ethanol(seed=3)
    return make_graph(atoms.numbers, atoms.positions, 4.0, dtype=dtype)


def both_paths(potential, graph, unrolled=False):
    """(fused output, e3nn output) of the same weights on the same graph; ``unrolled``: the fused layers'
    form for compiled training (sums of outer products over the nonzero Wigner 3j blocks)."""
    potential.model.use_e3nn = False
    with unrolled_products(potential) if unrolled else contextlib.nullcontext():
        fused = potential(graph)
    potential.model.use_e3nn = True
    reference = potential(graph)
    return fused, reference


@pytest.fixture
def float64_default():
    """e3nn keeps its Wigner 3j buffers in the default dtype at construction; float64 makes both paths exact."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("unrolled", [False, True], ids=["dense", "unrolled"])
@pytest.mark.parametrize("lmax,parity", CASES)
def test_fused_layers_equal_e3nn(lmax, parity, unrolled, float64_default):
    torch.manual_seed(lmax)
    potential = build_potential(
        "egnn", [1, 6, 8], 4.0, torch.float64, num_features=6, lmax=lmax, num_layers=3, radial_hidden=12, parity=parity
    ).eval()
    fusable = all(layer.fusable for layer in potential.model.layers)
    # one parity per l (the recipes) always fuses; both parities fuse only while e3nn's sorted gate order allows
    assert fusable or parity
    if not fusable:
        assert potential.model.use_e3nn
        return
    graph = ethanol_graph()
    fused, reference = both_paths(potential, graph, unrolled)
    for key in (keys.ENERGY, keys.FORCES, keys.NODE_FEATURES):
        assert torch.allclose(fused[key], reference[key], rtol=1e-10, atol=1e-12), key


def test_fused_tables_stay_exact_when_converted_to_float64():
    """Built in float32 then converted: the fused tables come from float64 originals, not float32 roundings."""
    potential = build_potential("egnn", [1, 6, 8], 4.0, torch.float32, num_features=4, lmax=2, num_layers=1, parity=False)
    layer = potential.to(torch.float64).model.layers[0]
    for name in ("coupling", "grouped"):
        assert getattr(layer, name).dtype == torch.float64
        assert torch.equal(getattr(layer, name), layer._tables64[name])


@pytest.mark.parametrize("unrolled", [False, True], ids=["dense", "unrolled"])
def test_fused_layers_train_like_e3nn(unrolled, float64_default):
    """Parameter gradients of a force loss agree, so training the fused model trains the same model."""
    torch.manual_seed(0)
    potential = build_potential("egnn", [1, 6, 8], 4.0, torch.float64, num_features=6, lmax=2, num_layers=2, parity=False)
    potential.train()
    graph = ethanol_graph()
    grads = []
    for use_e3nn in (False, True):
        potential.model.use_e3nn = use_e3nn
        potential.zero_grad()
        with unrolled_products(potential) if unrolled and not use_e3nn else contextlib.nullcontext():
            out = potential(graph)
        (out[keys.ENERGY].sum() + (out[keys.FORCES] ** 2).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in potential.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-9, atol=1e-12), name


def test_layers_work_on_blocked_features():
    """Layer outputs are (N, M, U): the m components of every irrep along M, channels along U; the last
    layer computes only its scalars, the only features the energy reads."""
    potential = build_potential("egnn", [1, 6, 8], 4.0, torch.float64, num_features=6, lmax=2, num_layers=2, parity=False)
    seen = []
    for layer in potential.model.layers:
        layer.register_forward_hook(lambda module, args, out: seen.append(out))
    potential(ethanol_graph())
    irreps = potential.model.layers[0].irreps_out
    assert seen[0].shape == (9, irreps.dim // 6, 6) == (9, 1 + 3 + 5, 6)
    assert seen[1].shape == (9, 1, 6)


def test_both_parities_fall_back_to_e3nn_and_stay_invariant():
    torch.manual_seed(1)
    potential = build_potential("egnn", [1, 6, 8], 4.0, torch.float64, num_features=4, lmax=2, num_layers=2, parity=True)
    assert potential.model.use_e3nn
    atoms = perturbed_ethanol(seed=5)
    rotation = o3.rand_matrix(dtype=torch.float64).numpy()
    energies = [
        float(potential(make_graph(atoms.numbers, positions, 4.0, dtype=torch.float64))[keys.ENERGY])
        for positions in (atoms.positions, atoms.positions @ rotation.T, -atoms.positions)
    ]
    assert np.ptp(energies) < 1e-10


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
    torch.manual_seed(5)
    potential = build_potential("egnn", [1, 6, 8], 4.0, torch.float64, num_features=6, lmax=2, num_layers=2, parity=False).eval()
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


def test_unrolled_products_is_scoped():
    """The unrolled form is on only inside the block (TorchScript and AOTInductor keep the dense one)."""
    potential = build_potential("egnn", [1, 6, 8], 4.0, torch.float64, num_features=4, lmax=2, num_layers=2, parity=False)
    layers = potential.model.layers
    with unrolled_products(potential):
        assert all(layer.unrolled for layer in layers)
    assert not any(layer.unrolled for layer in layers)
    with pytest.raises(RuntimeError), unrolled_products(potential):
        raise RuntimeError
    assert not any(layer.unrolled for layer in layers)
