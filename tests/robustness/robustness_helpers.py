"""Shared helpers of the robustness tests: synthetic labelled data, tiny configs and tiny deployed models.

Not a conftest.py: the top-level tests import ``conftest`` by name, and a second module of that name
would shadow it.
"""

import contextlib
import warnings
from pathlib import Path

import ase.build
import numpy as np
import torch
import yaml

from conftest import write_sgdml_npz  # noqa: F401  (re-exported for the robustness tests)
from mlpot.models import build_potential

HERE = Path(__file__).resolve().parent
HPARAMS = {
    "egnn": {"num_features": 4, "lmax": 1, "num_layers": 1, "radial_hidden": 8},
    "schnet": {"num_features": 8, "num_layers": 1},
    "gcn": {"num_features": 8, "num_layers": 1},
}
SPECIES = (1, 6, 8)
# per-species energy shifts of a plausible size (eV), so that a shift that is lost shows
SHIFTS = {1: -13.6, 6: -1029.5, 8: -2041.3}


def make_config(train_file, test_file, run_dir, kind="gcn", epochs=6, train_size=10, val_size=4, **train) -> dict:
    """A float64 config of a tiny model on one CPU thread; ``train`` entries override the train section."""
    return {
        "data": {"dataset": str(train_file), "test_dataset": str(test_file), "train_size": train_size, "val_size": val_size},
        "model": {"kind": kind, "cutoff": 5.0, "dtype": "float64", "hparams": dict(HPARAMS[kind])},
        "train": {"epochs": epochs, "batch_size": 5, "lr": 2e-3, "num_threads": 1, "device": "cpu", **train},
        "run_dir": str(run_dir),
    }


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def tiny_potential(kind, dtype=torch.float64, seed=0, species=SPECIES, shifts=True):
    """A tiny untrained Potential in eval mode, weights fixed by ``seed``, with realistic energy shifts."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        shift = torch.tensor([SHIFTS.get(z, -100.0 * z) for z in sorted(species)]) if shifts else None
        potential = build_potential(kind, species, 5.0, dtype, energy_shift=shift, **HPARAMS[kind])
    finally:
        torch.random.set_rng_state(state)
    return potential.eval()


@contextlib.contextmanager
def quiet_torchscript():
    """Silence torch's TorchScript deprecation warnings (TorchScript is the deployed format)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.(script|save|load)` is deprecated", DeprecationWarning)
        yield


def tmp_files(folder: Path):
    return sorted(p.name for p in Path(folder).rglob("*.tmp"))


def perturbed_ethanol(seed=0, amplitude=0.05):
    atoms = ase.build.molecule("CH3CH2OH")
    atoms.positions += np.random.default_rng(seed).uniform(-amplitude, amplitude, atoms.positions.shape)
    return atoms
