"""Compiled training steps (``train.compile``): the same energies, forces and weight gradients of a force
loss as the eager model, for batches of new sizes; the make_fx pitfall it corrects; its checks and fallback.

The two real compiles (schnet, egnn) take ~15-30 s each on 2 cores; the other tests replace
``torch.compile`` by the identity, which runs the traced graph itself.
"""

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from mlpot import keys
from mlpot.export import example_graph
from mlpot.models import build_potential
from mlpot.train import compiled
from mlpot.train.compiled import CompiledTraining

MODELS = {
    "schnet": {"num_features": 8, "num_layers": 2},
    # sigmoid gates: the case a traced force graph gets wrong without _reattach_saved_outputs
    "egnn": {"num_features": 4, "lmax": 1, "num_layers": 2, "radial_hidden": 8, "avg_num_neighbors": 8.0},
}
# batches after the first: new atom, edge and structure counts, and one single structure (runs eagerly);
# all with over 32 edges, which Inductor's small-matmul rule would otherwise recompile for
SIZES = [(7, 6, 5), (9, 3, 3, 1), (8, 6), (4,)]


def potential(kind, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return build_potential(kind, [1, 6, 8], 5.0, dtype=dtype, **MODELS[kind]).train()


def force_loss_gradients(model, out):
    """Weight gradients of a loss on forces and energies (fixed random probes)."""
    gen = torch.Generator().manual_seed(1)
    forces, energy = out[keys.FORCES], out[keys.ENERGY]
    loss = (forces * torch.randn(forces.shape, generator=gen, dtype=forces.dtype)).sum() + (energy**2).sum() * 1e-3
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(model.parameters(), grads)]


def assert_matches_eager(model, step_model, graph, rtol=1e-10):
    out = step_model(dict(graph))
    ref = model(dict(graph))
    for key in (keys.ENERGY, keys.FORCES, keys.NODE_ENERGY):
        torch.testing.assert_close(out[key], ref[key], rtol=rtol, atol=rtol * float(ref[key].abs().max()))
    for (name, _), got, want in zip(model.named_parameters(), force_loss_gradients(model, out), force_loss_gradients(model, ref)):
        scale = float(want.abs().max()) + 1e-30
        assert float((got - want).abs().max()) <= rtol * scale, f"{name}: weight gradient differs"


@pytest.mark.parametrize("kind", list(MODELS))
def test_compiled_step_equals_eager(kind):
    model = potential(kind)
    step_model = CompiledTraining(model)
    for k, sizes in enumerate(SIZES):
        with _no_compile_warning():
            assert_matches_eager(model, step_model, example_graph(model, sizes=sizes, seed=k + 3))
        assert step_model.active, step_model.failed
    assert step_model._function is not None


@contextlib.contextmanager
def _no_compile_warning():
    """Fails the test if a train.compile fallback warning is raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    fallbacks = [str(w.message) for w in caught if "train.compile" in str(w.message)]
    assert not fallbacks, fallbacks


@pytest.fixture
def identity_compile(monkeypatch):
    """torch.compile -> identity: the traced graph runs as it is (fast; tests the tracing, not Inductor)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)


@pytest.mark.parametrize("activation", [torch.sigmoid, torch.tanh, torch.exp, F.silu])
def test_traced_force_graph_keeps_second_derivatives(activation):
    """make_fx records the output an op's backward reads as detach(output); without removing it the
    weight gradient of a force loss through sigmoid/tanh/exp is wrong (tens of percent here)."""

    def loss(w, x):
        x = x if x.requires_grad else x.requires_grad_(True)
        (g,) = torch.autograd.grad(activation(x @ w).sum(), x, create_graph=True)
        return (g**2).sum()

    torch.manual_seed(0)
    w = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(20, 3, dtype=torch.float64)
    traced = make_fx(loss)(w, x.clone().requires_grad_(True))
    had_detach = any(n.target is torch.ops.aten.detach.default for n in traced.graph.nodes)
    compiled._reattach_saved_outputs(traced)
    assert not any(n.target is torch.ops.aten.detach.default for n in traced.graph.nodes)
    (want,) = torch.autograd.grad(loss(w, x.clone()), w)
    (got,) = torch.autograd.grad(traced(w, x.clone()), w)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    if activation is not F.silu:  # these backwards read their output: the case the fix is for
        assert had_detach


def test_wrong_trace_is_caught_and_training_goes_on_eagerly(identity_compile, monkeypatch):
    """With the detach fix switched off, the egnn's sigmoid gates give wrong weight gradients: the
    first-batch check must catch it, warn, and hand back the eager result."""
    monkeypatch.setattr(compiled, "_reattach_saved_outputs", lambda traced: None)
    model = potential("egnn")
    step_model = CompiledTraining(model)
    graph = example_graph(model, sizes=(5, 4), seed=2)
    with pytest.warns(RuntimeWarning, match="train.compile: the compiled model disagrees .* weight gradient"):
        out = step_model(dict(graph))
    assert not step_model.active
    assert_matches_eager(model, lambda g: out, graph, rtol=1e-12)


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken(fn, **kw):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    model = potential("schnet")
    step_model = CompiledTraining(model)
    graph = example_graph(model, sizes=(5, 4), seed=2)
    with pytest.warns(RuntimeWarning, match="compiling failed .*no C\\+\\+ compiler.*eager mode"):
        assert_matches_eager(model, step_model, graph, rtol=0)
    assert step_model.failed and not step_model.active


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_traced_graph_equals_eager_in_both_dtypes(identity_compile, dtype):
    for kind in MODELS:
        model = potential(kind, dtype=dtype)
        step_model = CompiledTraining(model)
        for k, sizes in enumerate(SIZES):
            assert_matches_eager(model, step_model, example_graph(model, sizes=sizes, seed=k), rtol=1e-10 if dtype == torch.float64 else 1e-4)
        assert step_model.active, step_model.failed


def test_eval_mode_and_unsupported_models_use_the_potential(identity_compile):
    model = potential("schnet").eval()
    step_model = CompiledTraining(model)
    step_model(example_graph(model, sizes=(3, 2)))
    assert step_model._function is None  # eval: the model itself
    gcn = build_potential("gcn", [1, 6, 8], 5.0, dtype=torch.float64, num_features=8, num_layers=1)
    assert "gcn" in compiled.unsupported_reason(gcn)
    assert not CompiledTraining(gcn).active


def test_unknown_element_is_refused(identity_compile):
    model = potential("schnet")
    graph = example_graph(model, sizes=(3, 2))
    graph[keys.ATOMIC_NUMBERS] = graph[keys.ATOMIC_NUMBERS].clone()
    graph[keys.ATOMIC_NUMBERS][0] = 26
    with pytest.raises(ValueError, match="element this model was not trained on"):
        CompiledTraining(model)(graph)
