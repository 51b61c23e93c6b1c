"""Stress loss: training on periodic EMT frames with ``train.stress_weight`` > 0, eager and compiled.

The frames are rattled, strained 2x2x2 Cu fcc cells (8 atoms) labelled by ASE's EMT, written in the test.
"""

import json
import re

import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.calculators.emt import EMT

from mlpot import keys
from mlpot.data import collate
from mlpot.train.config import ConfigError, config_from_dict
from mlpot.train.loop import Trainer, train as run_training
from mlpot.train.metrics import error_metrics, format_metrics, stress_labels
from mlpot.units import EV_PER_A3_TO_GPA

SCHNET = {"num_features": 8, "num_layers": 1}


def copper_cells(n: int, seed: int = 0) -> list:
    """n rattled 2x2x2 Cu fcc cells, each strained by up to ~2 %, with EMT energy, forces and stress."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        atoms = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 2))
        strain = np.eye(3) + 0.02 * rng.uniform(-1, 1, (3, 3))
        atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
        atoms.rattle(0.05, seed=seed * 1000 + i)
        atoms.calc = EMT()
        atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        images.append(atoms)
    return images


@pytest.fixture(scope="module")
def copper(tmp_path_factory):
    path = tmp_path_factory.mktemp("cu") / "cu.extxyz"
    ase.io.write(path, copper_cells(10), format="extxyz")
    return path


def config(path, run_dir, compile=False, dtype="float64", **train):
    return config_from_dict({
        "data": {"dataset": str(path), "train_size": 6, "val_size": 2, "test_size": 2},
        "model": {"kind": "schnet", "cutoff": 3.5, "dtype": dtype, "hparams": dict(SCHNET)},
        "train": {"epochs": 1, "batch_size": 6, "num_threads": 1, "device": "cpu", "lr": 1e-2, "ema_decay": None,
                  "energy_weight": 0.0, "forces_weight": 0.0, "stress_weight": 100.0, "compile": compile, **train},
        "run_dir": str(run_dir),
    })


def stress_losses(trainer: Trainer, steps: int) -> list:
    """The stress loss of the whole training set (one batch) before each of ``steps`` optimizer steps."""
    idx = list(range(len(trainer.train_graphs)))
    trainer.potential.train()
    losses = []
    for _ in range(steps):
        loss, errors = trainer.batch_loss(idx)
        losses.append(float(loss.detach()))
        assert errors["s"].shape == (6, 3, 3)
        trainer.optimizer.zero_grad()
        loss.backward()
        trainer.optimizer.step()
    return losses


def test_stress_of_the_loss_is_minus_virial_over_volume(copper, tmp_path):
    trainer = Trainer(config(copper, tmp_path / "run"))
    idx = [0, 3]
    trainer.potential.train()
    out = trainer.step_model(collate([trainer.train_graphs[i] for i in idx]))
    errors, _ = trainer._stress_error(out, idx)
    cells = torch.stack([trainer.train_graphs[i][keys.CELL][0] for i in idx])
    stress = -out[keys.VIRIAL] / torch.linalg.det(cells).abs()[:, None, None]
    torch.testing.assert_close(errors + trainer.train_stress[idx], stress, rtol=0, atol=1e-12)
    # the labels are EMT's stress, in ASE's sign and eV/Å^3
    frames = ase.io.read(copper, ":")
    assert any(np.allclose(trainer.train_stress[0].numpy(), a.get_stress(voigt=False), atol=1e-12) for a in frames)


def test_stress_loss_decreases_in_float64(copper, tmp_path):
    trainer = Trainer(config(copper, tmp_path / "run"))
    assert trainer.potential.energy_shift.dtype == torch.float64
    losses = stress_losses(trainer, 8)
    assert losses[-1] < 0.75 * losses[0], losses


def test_no_virial_without_a_stress_loss(copper, tmp_path):
    trainer = Trainer(config(copper, tmp_path / "run", stress_weight=0.0, forces_weight=1.0))
    assert trainer.step_model is trainer.potential  # the plain forward: energy and forces only
    loss, errors = trainer.batch_loss([0, 1])
    assert "s" not in errors and keys.VIRIAL not in trainer.step_model(collate(trainer.train_graphs[:2]))


def test_compiled_stress_loss_agrees_with_eager_and_decreases(copper, tmp_path):
    eager = Trainer(config(copper, tmp_path / "eager"))
    compiled = Trainer(config(copper, tmp_path / "compiled", compile=True))
    idx = list(range(6))
    eager.potential.train()
    compiled.potential.train()
    want, _ = eager.batch_loss(idx)
    got, _ = compiled.batch_loss(idx)  # the first call compiles and checks virials against eager
    assert compiled.step_model.active, compiled.step_model.failed
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-9)
    losses = stress_losses(compiled, 6)
    assert compiled.step_model.active
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses
    np.testing.assert_allclose(losses, stress_losses(eager, 6), rtol=1e-8)  # the same steps as eager ones


def test_training_run_reports_stress(copper, tmp_path, capsys):
    from mlpot.commands import main

    run_dir = tmp_path / "run"
    run_training(config(copper, run_dir, epochs=2, forces_weight=1.0), progress=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["num_structures_with_stress"] == 2 and metrics["test"]["stress_mae_meV_per_A3"] > 0
    assert metrics["val"]["stress_mae_meV_per_A3"] > 0
    assert "val_stress_mae_meV_per_A3" in (run_dir / "log.csv").read_text().splitlines()[0]
    capsys.readouterr()
    assert main(["eval", str(run_dir / "model.pt"), str(copper), "--limit", "3"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"stress MAE [0-9.]+ meV/Å\^3 \([0-9.]+ GPa\)", printed), printed


def test_stress_metrics_units():
    pred = {"energy": np.zeros(2), "energy_ref": np.zeros(2), "forces": np.zeros((3, 3)), "forces_ref": np.zeros((3, 3)),
            "num_atoms": np.array([1, 2]), "stress": np.full((2, 3, 3), 0.002), "stress_ref": np.zeros((2, 3, 3))}
    pred["stress_ref"][1] = np.nan  # a frame without a reference stress is left out
    metrics = error_metrics(pred)
    assert metrics["stress_mae_meV_per_A3"] == pytest.approx(2.0)
    assert metrics["stress_mae_GPa"] == pytest.approx(0.002 * 160.21766, rel=1e-6)
    assert EV_PER_A3_TO_GPA == pytest.approx(160.2176634, rel=1e-12)
    assert metrics["num_structures_with_stress"] == 1
    assert "stress MAE 2.000 meV/Å^3 (0.3204 GPa)" in format_metrics(metrics)


def test_molecules_have_no_stress_labels(tmp_path):
    images = []
    for k in range(6):
        atoms = molecule("CH4")
        atoms.rattle(0.03, seed=k)
        atoms.calc = EMT()
        atoms.get_potential_energy(), atoms.get_forces()
        images.append(atoms)
    path = tmp_path / "ch4.extxyz"
    ase.io.write(path, images, format="extxyz")
    cfg = config(path, tmp_path / "run")
    cfg.data.train_size, cfg.data.val_size, cfg.data.test_size = 3, 2, 1
    with pytest.raises(ConfigError, match="train.stress_weight > 0 but no training frame has a stress"):
        Trainer(cfg)


def test_stress_labels_leave_out_frames_without_a_full_cell(copper):
    from mlpot.data.datasets import read_frames

    frames = read_frames(copper)
    frames.pbc[1] = [True, True, False]
    labels = stress_labels(frames)
    assert np.isnan(labels[1]).all() and np.isfinite(labels[0]).all()
