"""Fine-tuning (model.init, mlpot train --init): weights, elements, E0s and errors of a run that starts from a
deployed file; resume does not start over."""

import numpy as np
import pytest
import torch
import yaml

from conftest import make_tiny_potential, write_sgdml_npz
from mlpot import export, keys
from mlpot.commands import main
from mlpot.data import collate
from mlpot.data.datasets import read_frames
from mlpot.data.splits import frames_to_graphs
from mlpot.train.config import ConfigError, config_from_dict
from mlpot.train.finetune import transfer_weights
from mlpot.train.loop import Trainer

SCHNET = {"num_features": 16, "num_layers": 2}
E0 = [-13.0, -1020.0, -2040.0]  # the deployed file's shift, eV


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetune")
    potential = make_tiny_potential("schnet", species=(1, 6, 8))
    with torch.no_grad():
        potential.energy_shift.copy_(torch.tensor(E0, dtype=torch.float64))
    model = folder / "model.pt"
    export.save(potential, model, dataset="synthetic", e0s={"mode": "given", "eV": dict(zip("HCO", E0))})
    return {"model": model, "data": write_sgdml_npz(folder / "new.npz", 12, 5), "folder": folder}


def config(files, run_dir, **model):
    return config_from_dict({
        "data": {"dataset": str(files["data"]), "train_size": 8, "val_size": 2, "test_size": 2},
        "model": {"kind": "schnet", "cutoff": 5.0, "dtype": "float64", "init": str(files["model"]), **model},
        "train": {"epochs": 1, "batch_size": 4, "num_threads": 1, "device": "cpu", "ema_decay": None},
        "run_dir": str(run_dir),
    })


def test_step_zero_loss_is_the_deployed_models_loss(files, tmp_path):
    trainer = Trainer(config(files, tmp_path / "run"))
    deployed, _ = export.load(files["model"])
    idx = [0, 1, 2, 3]
    batch = collate([trainer.train_graphs[i] for i in idx])
    out = deployed(dict(batch))
    e_err = (out[keys.ENERGY] - batch[keys.ENERGY_REF]) / batch[keys.NUM_ATOMS]
    f_err = out[keys.FORCES] - batch[keys.FORCES_REF]
    t = trainer.cfg.train
    expected = t.energy_weight * (e_err**2).mean() + t.forces_weight * (f_err**2).mean()
    trainer.potential.train()
    loss, _ = trainer.batch_loss(idx)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-12)
    assert trainer.stats["e0s"]["mode"] == "from model.pt" and trainer.stats["energy_shift"] == E0
    # and it trains on from there
    sums, steps = trainer.train_epoch(0, progress=False)
    assert steps == 2 and np.isfinite(sums["loss"])


def test_explicit_e0s_are_refitted(files, tmp_path):
    trainer = Trainer(config(files, tmp_path / "run", e0s="average"))
    frames = read_frames(files["data"])
    assert trainer.stats["e0s"]["mode"] == "average"
    assert trainer.stats["energy_shift"][0] == pytest.approx(np.mean(frames.energy / 9), abs=0.05)


@pytest.mark.parametrize("kind", ["gcn", "schnet", "egnn"])
def test_new_elements_get_fresh_weights_and_old_ones_keep_theirs(files, kind):
    old = make_tiny_potential(kind, species=(1, 6, 8), seed=0)
    new = make_tiny_potential(kind, species=(1, 6, 7, 8), seed=1)
    with torch.no_grad():
        new.energy_shift.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    transfer_weights(old, new)
    frames = read_frames(files["data"])
    batch = collate(frames_to_graphs(frames.subset([0, 1]), 5.0, torch.float64))  # no nitrogen
    want, got = old(dict(batch)), new(dict(batch))
    torch.testing.assert_close(got[keys.ENERGY], want[keys.ENERGY], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[keys.FORCES], want[keys.FORCES], rtol=1e-12, atol=1e-12)
    fresh = make_tiny_potential(kind, species=(1, 6, 7, 8), seed=1)
    assert any(not torch.equal(a, b) for a, b in zip(new.state_dict().values(), fresh.state_dict().values()))


def test_errors(files, tmp_path):
    with pytest.raises(ConfigError, match="model.init: .*model.pt is a schnet model but the config trains a gcn; set model.kind: schnet"):
        Trainer(config(files, tmp_path / "a", kind="gcn"))
    with pytest.raises(ConfigError, match="model.init: .*model.pt has cutoff 5.0 Å but the config says 4.0"):
        Trainer(config(files, tmp_path / "b", cutoff=4.0))
    with pytest.raises(ConfigError, match=r"model.init: model.hparams num_layers=3 differ from .*\(num_layers=2\); leave them out"):
        Trainer(config(files, tmp_path / "c", hparams={"num_layers": 3}))
    nitrogen = make_tiny_potential("schnet", species=(1, 6, 7, 8))
    export.save(nitrogen, tmp_path / "n.pt")
    with pytest.raises(ConfigError, match=r"model.init: .*n.pt knows elements \[7\] that no training frame has"):
        Trainer(config(files, tmp_path / "d", init=str(tmp_path / "n.pt")))
    with pytest.raises(ConfigError, match="model.init: .*nothing.pt does not exist"):
        Trainer(config(files, tmp_path / "e", init=str(tmp_path / "nothing.pt")))


def test_cli_init_then_resume_does_not_start_over(files, tmp_path, capsys):
    cfg = config(files, tmp_path / "run").to_dict()
    cfg["model"]["init"] = None
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    init = tmp_path / "init.pt"
    init.write_bytes(files["model"].read_bytes())
    assert main(["train", str(path), "--init", str(init), "--quiet"]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["init"] == str(init.resolve())
    assert export.read_metadata(tmp_path / "run" / "model.pt")["init"] == str(init.resolve())
    init.unlink()  # a resume takes the weights from last.pt, not from the init file
    assert main(["train", "--resume", str(tmp_path / "run"), "--set", "train.epochs=2", "--quiet"]) == 0
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert len(log) == 3  # header and two epochs
    assert main(["train", str(path), "--init", "x.pt", "--resume", str(tmp_path / "run")]) == 2
    assert "--init starts a new run" in capsys.readouterr().err
