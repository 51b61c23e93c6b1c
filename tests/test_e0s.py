"""Reference energies (E0s): the modes of model.e0s, which one auto picks, and where the E0s are recorded."""

from pathlib import Path

import ase.build
import ase.io
import numpy as np
import pytest
import torch

from mlpot import export, keys
from mlpot.data import collate
from mlpot.data.graph import atoms_to_graph
from mlpot.data.datasets import Frames
from mlpot.data.statistics import energy_shift, fit_statistics
from mlpot.train.config import ConfigError, config_from_dict, parse_e0s
from mlpot.train.loop import Trainer, train as run_training

TRUE_E0 = {1: -13.6, 6: -1029.5, 8: -2041.3}  # made-up per-element energies, eV


def sum_of_atoms(num_frames: int, seed: int = 0) -> Frames:
    """Molecules of random composition (1-6 H, 1-3 C, 0-2 O; random positions) whose energy is exactly the
    sum of TRUE_E0 over their atoms."""
    rng = np.random.default_rng(seed)
    numbers, positions, energies = [], [], []
    for _ in range(num_frames):
        z = np.array([1] * rng.integers(1, 7) + [6] * rng.integers(1, 4) + [8] * rng.integers(0, 3))
        numbers.append(z)
        positions.append(np.arange(len(z))[:, None] * np.array([1.2, 0.3, 0.1]) + rng.normal(0, 0.05, (len(z), 3)))
        energies.append(sum(TRUE_E0[int(a)] for a in z))
    forces = [np.zeros((len(z), 3)) for z in numbers]
    return Frames(numbers, positions, np.array(energies), forces, name="sum-of-atoms")


def one_composition(num_frames: int = 12, seed: int = 0) -> Frames:
    """Displaced ethanols with total energies near a DFT ethanol's (-4209 eV, plus 0.1 eV noise)."""
    base = ase.build.molecule("CH3CH2OH")
    rng = np.random.default_rng(seed)
    positions = [base.positions + rng.normal(0, 0.03, base.positions.shape) for _ in range(num_frames)]
    energy = -4209.0 + rng.normal(0, 0.1, num_frames)
    forces = [rng.normal(0, 1.0, base.positions.shape) for _ in range(num_frames)]
    return Frames([base.numbers] * num_frames, positions, energy, forces, name="ethanol")


SPECIES = [1, 6, 8]


def test_least_squares_recovers_the_per_element_energies():
    frames = sum_of_atoms(30)
    for mode in ("least_squares", "auto"):
        shift, used = energy_shift(frames, SPECIES, mode)
        assert used == "least_squares"
        np.testing.assert_allclose(shift, [TRUE_E0[z] for z in SPECIES], rtol=0, atol=1e-9)


def test_average_is_the_mean_per_atom_energy():
    frames = sum_of_atoms(30)
    shift, used = energy_shift(frames, SPECIES, "average")
    per_atom = np.mean([e / len(z) for e, z in zip(frames.energy, frames.numbers)])
    assert used == "average" and np.all(shift == per_atom)


def test_a_given_mapping_is_used_as_is_and_must_cover_every_element():
    given = parse_e0s({"H": -13.0, 6: -1000.0, "O": -2000.0, "N": -1500.0})  # symbols or numbers; extra N unused
    assert given == {1: -13.0, 6: -1000.0, 8: -2000.0, 7: -1500.0}
    shift, used = energy_shift(sum_of_atoms(5), SPECIES, given)
    assert used == "given" and shift.tolist() == [-13.0, -1000.0, -2000.0]
    with pytest.raises(ValueError, match=r"the E0 mapping lacks the training element\(s\) \[6, 8\]"):
        energy_shift(sum_of_atoms(5), SPECIES, {1: -13.0})


def test_one_composition_picks_average_not_an_arbitrary_split():
    frames = one_composition()
    shift, used = energy_shift(frames, SPECIES, "auto")
    assert used == "average"
    assert shift[0] == pytest.approx(-4209.0 / 9, abs=0.05)  # H: -467.7 eV
    # least squares on one composition splits the energy in proportion to the counts: H gets ~-616 eV
    forced, _ = energy_shift(frames, SPECIES, "least_squares")
    assert forced[0] == pytest.approx(-4209.0 * 6 / 41, abs=0.05)


def test_nearly_one_stoichiometry_is_not_fitted():
    """Alkanes CnH(2n+2) with n = 20..22: full rank, but the fit hinges on the +2 (condition number ~1e3)."""
    numbers = [np.array([6] * n + [1] * (2 * n + 2)) for n in (20, 21, 22)]
    frames = Frames(numbers, [np.arange(3 * len(z)).reshape(-1, 3) * 1.0 for z in numbers],
                    np.array([-1000.0 * n for n in (20, 21, 22)]), [np.zeros((len(z), 3)) for z in numbers])
    assert energy_shift(frames, [1, 6], "auto")[1] == "average"


def test_config_checks():
    assert config_from_dict({}).model.e0s is None and parse_e0s(None) == "auto"
    with pytest.raises(ConfigError, match="model.e0s: 'mean' is not one of"):
        config_from_dict({"model": {"e0s": "mean"}})
    with pytest.raises(ConfigError, match="model.e0s: 'Xx' is not an element symbol or atomic number"):
        config_from_dict({"model": {"e0s": {"Xx": 1.0}}})
    with pytest.raises(ConfigError, match="model.e0s: the E0 of H is 'low', not a number of eV"):
        config_from_dict({"model": {"e0s": {"H": "low"}}})


def write_frames(frames: Frames, path):
    images = [frames.to_atoms(i) for i in range(len(frames))]
    ase.io.write(path, images, format="extxyz")
    return path


def run_config(path, run_dir, **model):
    return config_from_dict({
        "data": {"dataset": str(path), "train_size": 8, "val_size": 2, "test_size": 2, "split": "random"},
        "model": {"kind": "schnet", "cutoff": 4.0, "dtype": "float64", "hparams": {"num_features": 8, "num_layers": 1}, **model},
        "train": {"epochs": 1, "batch_size": 4, "num_threads": 1, "device": "cpu"},
        "run_dir": str(run_dir),
    })


def test_per_atom_energies_of_a_one_molecule_model_are_sensible(tmp_path):
    path = write_frames(one_composition(), tmp_path / "ethanol.extxyz")
    trainer = Trainer(run_config(path, tmp_path / "run"))
    assert trainer.stats["e0s"]["mode"] == "average"
    trainer.potential.eval()
    out = trainer.potential(collate(trainer.val_graphs[:1]))
    hydrogen = out[keys.NODE_ENERGY][out[keys.ATOMIC_NUMBERS] == 1]
    assert torch.all((hydrogen + 467.7).abs() < 20), hydrogen  # not -616 eV


def test_the_mapping_must_cover_the_training_elements(tmp_path):
    path = write_frames(one_composition(), tmp_path / "ethanol.extxyz")
    with pytest.raises(ConfigError, match=r"model.e0s: the E0 mapping lacks the training element\(s\) \[6, 8\]"):
        Trainer(run_config(path, tmp_path / "run", e0s={"H": -13.6}))


def test_e0s_go_into_statistics_and_the_deployed_file(tmp_path, capsys):
    path = write_frames(sum_of_atoms(12), tmp_path / "mix.extxyz")
    run_dir = tmp_path / "run"
    run_training(run_config(path, run_dir, e0s={"H": -13.6, "C": -1029.5, "O": -2041.3}), progress=True)
    assert "E0s (given): H -13.6000, C -1029.5000, O -2041.3000 eV" in capsys.readouterr().out
    meta = export.read_metadata(run_dir / "model.pt")
    assert meta["e0s"] == {"mode": "given", "eV": {"H": -13.6, "C": -1029.5, "O": -2041.3}}
    stats = torch.load(run_dir / "last.pt", weights_only=False)["statistics"]
    assert stats["e0s"] == meta["e0s"] and stats["energy_shift"] == [-13.6, -1029.5, -2041.3]


def test_fit_statistics_records_the_mode():
    stats = fit_statistics(sum_of_atoms(10), SPECIES, 4.0)
    assert stats["e0s"]["mode"] == "least_squares"
    assert stats["e0s"]["eV"]["C"] == pytest.approx(-1029.5, abs=1e-9)


SHIPPED = Path(__file__).resolve().parents[1] / "deploy" / "ethanol.pt"


@pytest.mark.skipif(not SHIPPED.is_file(), reason="needs the shipped deploy/ethanol.pt")
def test_the_shipped_ethanol_model_has_average_e0s():
    model, meta = export.load(SHIPPED)
    assert meta["e0s"]["mode"] == "average" and set(meta["e0s"]["eV"]) == {"H", "C", "O"}
    ethanol = ase.build.molecule("CH3CH2OH")
    out = model(collate([atoms_to_graph(ethanol, meta["cutoff"], torch.float32)]))
    per_atom = out[keys.NODE_ENERGY].double()
    assert torch.all((per_atom - meta["e0s"]["eV"]["H"]).abs() < 20), per_atom  # H no longer near -616 eV
