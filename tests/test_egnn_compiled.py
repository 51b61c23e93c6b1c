"""Both parities and lmax 3 through the fused paths that deploy and compiled training use: TorchScript
(dense backend), and compiled training (traced in the unrolled backend), against the eager model."""

import pytest
import torch

from mlpot import keys
from mlpot.export import compile_potential, example_graph
from mlpot.models import build_potential

from conftest import assert_compiled_step_equals_eager

# three layers: the third is the first whose inputs hold both parities (1e, 2o, 3e) and outputs 0o
HPARAMS = {"num_features": 4, "num_layers": 3, "radial_hidden": 8, "avg_num_neighbors": 8.0, "parity": True}


def potential(lmax=3, dtype=torch.float64, parity=True):
    torch.manual_seed(0)
    return build_potential("egnn", [1, 6, 8], 5.0, dtype=dtype, lmax=lmax, **{**HPARAMS, "parity": parity})


@pytest.mark.parametrize("parity", [False, True])
@pytest.mark.parametrize("lmax", [0, 1, 2, 3])
def test_torchscript_equals_eager(lmax, parity):
    """Every lmax and parity compiles (lmax 0 has no gated irreps: empty tables) and gives the eager numbers."""
    model = potential(lmax, parity=parity).eval()
    assert model.model.backend == "dense"
    graph = example_graph(model, sizes=(7, 5), seed=1)
    scripted = compile_potential(model)
    out, ref = scripted(dict(graph)), model(dict(graph))
    for key in (keys.ENERGY, keys.FORCES):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-10, atol=1e-12)


# traced only (torch.compile -> identity): Inductor's build of a both-parity step took over 6 minutes
# on the shared two cores; tests/test_compiled_training.py covers Inductor for the default parity
@pytest.mark.parametrize("lmax", [2, 3])
def test_compiled_training_both_parities_equals_eager(lmax, monkeypatch):
    """The traced step gives the eager energies, forces and weight gradients of a force loss."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    model = potential(lmax).train()
    assert_compiled_step_equals_eager(model)
