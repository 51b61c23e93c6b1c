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
from ase.calculators.emt import EMT

from mlpot.models import build_potential
from mlpot.units import KCAL_PER_MOL_TO_EV

HERE = Path(__file__).resolve().parent
HPARAMS = {
    "egnn": {"num_features": 4, "lmax": 1, "num_layers": 1, "radial_hidden": 8},
    "schnet": {"num_features": 8, "num_layers": 1},
    "gcn": {"num_features": 8, "num_layers": 1},
}
SPECIES = (1, 6, 8)
# per-species energy shifts of a plausible size (eV), so that a shift that is lost shows
SHIFTS = {1: -13.6, 6: -1029.5, 8: -2041.3}


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
