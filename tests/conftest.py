"""Shared fixtures: a perturbed ethanol, every model kind, both float dtypes, tiny seeded potentials."""

import os
from pathlib import Path

# Tiny models on a shared two-core machine: OpenMP threads that wait for a busy core make TorchScript
# calls ~100x slower, so tests (and the subprocesses they start) use one thread unless told otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import ase.build
import numpy as np
import pytest
import torch

from ase.calculators.emt import EMT

from mlpot.models import MODELS, build_potential
from mlpot.units import KCAL_PER_MOL_TO_EV

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Small enough that the whole suite runs in minutes on two cores, big enough to have every layer type.
TINY_HPARAMS = {
    "gcn": {"num_features": 16, "num_layers": 2},
    "schnet": {"num_features": 16, "num_layers": 2},
    "egnn": {"num_features": 8, "lmax": 2, "num_layers": 2, "radial_hidden": 16, "parity": False},  # as the recipes: fused layers
}
KINDS = sorted(MODELS)
DTYPES = {"float32": torch.float32, "float64": torch.float64}



def make_tiny_potential(kind, dtype=torch.float64, species=(1, 6, 8), cutoff=5.0, seed=0, **overrides):
    """A fresh tiny untrained Potential in eval mode, with weights fixed by ``seed``.

    Built anew on every call rather than deep-copied: a deep copy of e3nn's fx-generated modules
    adds buffers to the state dict that a freshly built model does not have.
    """
    hparams = {**TINY_HPARAMS[kind], **overrides}
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        potential = build_potential(kind, species, cutoff, dtype, **hparams)
    finally:
        torch.random.set_rng_state(state)
    return potential.eval()


def five_point_derivative(function, x, h):
    """d function / d x_k for every k of the flat vector ``x`` by the five-point central stencil.

    Its error is h^4 f^(5) / 30 + ~2 eps |f| / h: with h = 1e-3 Å both are ~1e-12 for these models,
    so float64 derivatives can be checked to 1e-8 relative (a two-point difference at 1e-4 Å reaches 1e-7).

    Args:
        function: maps an array shaped like ``x`` to a float or an array.
        x: (n,) coordinates.
        h: step, in the units of ``x``.

    Returns:
        (n, *shape of function's value) derivatives.
    """
    x = np.asarray(x, dtype=np.float64)
    rows = []
    for k in range(len(x)):
        values = []
        for step in (-2 * h, -h, h, 2 * h):
            displaced = x.copy()
            displaced[k] += step
            values.append(np.asarray(function(displaced), dtype=np.float64))
        rows.append((values[0] - 8 * values[1] + 8 * values[2] - values[3]) / (12 * h))
    return np.stack(rows)


def perturbed_ethanol(seed=0, amplitude=0.05):
    """Ethanol from ase.build with every atom displaced by up to ``amplitude`` Å (no symmetry left)."""
    atoms = ase.build.molecule("CH3CH2OH")
    rng = np.random.default_rng(seed)
    atoms.positions += rng.uniform(-amplitude, amplitude, size=atoms.positions.shape)
    return atoms


@pytest.fixture
def ethanol():
    return perturbed_ethanol()


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture(params=list(DTYPES.values()), ids=list(DTYPES))
def dtype(request):
    return request.param


@pytest.fixture
def tiny_potential():
    """Factory ``tiny_potential(kind, dtype, species=(1, 6, 8), cutoff=5.0, seed=0, **hparams)``."""
    return make_tiny_potential


@pytest.fixture
def float64_default():
    """float64 as torch's default dtype inside the test (e3nn builds its Wigner 3j buffers in it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def assert_compiled_step_equals_eager(model):
    """The traced training step of ``model`` (call with torch.compile patched to the identity) gives the eager
    energies, forces and weight gradients of a force loss."""
    from mlpot import keys
    from mlpot.export import example_graph
    from mlpot.train.compiled import CompiledTraining

    step_model = CompiledTraining(model)
    graph = example_graph(model, sizes=(7, 6, 5), seed=2)
    out = step_model(dict(graph))
    assert step_model.active, step_model.failed
    ref = model(dict(graph))
    for key in (keys.ENERGY, keys.FORCES):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-10, atol=1e-12)
    loss = [(o[keys.FORCES] ** 2).sum() + o[keys.ENERGY].sum() for o in (out, ref)]
    params = [p for p in model.parameters() if p.requires_grad]
    for got, want in zip(torch.autograd.grad(loss[0], params), torch.autograd.grad(loss[1], params)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.fixture(scope="session")
def data_dir():
    """The shared reference data: $MLPOT_DATA_DIR, else ../shared/data next to the project root."""
    env = os.environ.get("MLPOT_DATA_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        message = f"reference data folder {path} not found; set MLPOT_DATA_DIR"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI has ../shared beside it: missing data there is an error, not a skip
        pytest.skip(message)
    return path


def write_sgdml_npz(path: Path, num_frames: int, seed: int) -> Path:
    """Displaced ethanols labelled by EMT, stored like sGDML files: E (M, 1), F, R, z in kcal/mol and Å."""
    base = ase.build.molecule("CH3CH2OH")
    rng = np.random.default_rng(seed)
    positions, energies, forces = [], [], []
    for _ in range(num_frames):
        atoms = base.copy()
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        atoms.calc = EMT()
        positions.append(atoms.positions.copy())
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces())
    np.savez(
        path,
        E=np.array(energies)[:, None] / KCAL_PER_MOL_TO_EV,
        F=np.array(forces) / KCAL_PER_MOL_TO_EV,
        R=np.array(positions),
        z=base.numbers,
    )
    return path
