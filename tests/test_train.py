"""Training: config checks, an end-to-end mlpot-train run, exact resume (also after SIGKILL), mlpot-eval, DDP.

Everything runs on tiny float64 models and a synthetic ethanol set (EMT energies and forces in an
sGDML-layout npz, kcal/mol), so that whole runs take about a second and weights can be compared bit for bit.
"""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import write_sgdml_npz
from mlpot import checkpoint, export, keys
from mlpot.cli import evaluate, train as train_cli
from mlpot.data import collate
from mlpot.data.datasets import read_frames
from mlpot.data.splits import frames_to_graphs
from mlpot.train.config import ConfigError, config_from_dict
from mlpot.train.loop import averaged_weights, epoch_batches, make_ema, train as run_training
from mlpot.train.metrics import error_metrics, predict
from mlpot.units import EV_TO_MEV, KCAL_PER_MOL_TO_EV

HPARAMS = {
    "egnn": {"num_features": 4, "lmax": 1, "num_layers": 1, "radial_hidden": 8},
    "schnet": {"num_features": 8, "num_layers": 1},
    "gcn": {"num_features": 8, "num_layers": 1},
}
LR = ["--set", "train.lr=2e-3"]  # every run of the shared egnn config goes through this override
EPOCHS = 3
TMP_PATTERN = "*.tmp"


# === data and configs ===
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return {"train": write_sgdml_npz(folder / "train.npz", 14, 0), "test": write_sgdml_npz(folder / "test.npz", 6, 1)}


def make_config(data, run_dir, kind="egnn", epochs=EPOCHS, train_size=10, **train):
    return {
        "data": {"dataset": str(data["train"]), "test_dataset": str(data["test"]), "train_size": train_size, "val_size": 4},
        "model": {"kind": kind, "cutoff": 5.0, "dtype": "float64", "hparams": dict(HPARAMS[kind])},
        "train": {"epochs": epochs, "batch_size": 5, "num_threads": 1, "device": "cpu", **train},
        "run_dir": str(run_dir),
    }


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def weights(run_dir: Path, name="last.pt") -> dict:
    state = torch.load(Path(run_dir) / name, map_location="cpu", weights_only=False)
    tensors = {f"potential.{k}": v for k, v in state["potential"]["state_dict"].items()}
    if state.get("ema"):  # AveragedModel's state: n_averaged and the averaged weights
        tensors.update({f"ema.{k}": v for k, v in state["ema"].items()})
    return tensors


def assert_same_weights(a: dict, b: dict, atol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and (a[name].dtype == torch.float64 or not a[name].is_floating_point())
        if atol == 0.0:
            assert torch.equal(a[name], b[name]), f"{name} differs by {(a[name] - b[name]).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


def read_log(run_dir: Path):
    with open(Path(run_dir) / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def no_tmp_files(run_dir: Path):
    return sorted(p.name for p in Path(run_dir).rglob(TMP_PATTERN)) == []


# === 1. configuration errors: named by key, before any work ===
def _set(section, **values):
    return lambda cfg: cfg[section].update(values)


CONFIG_ERRORS = {
    "unknown_top_level": (lambda cfg: cfg.update(trian={"lr": 1e-3}), "unknown key(s) trian"),
    "unknown_in_section": (_set("train", lrr=1e-3), "unknown key(s) train.lrr"),
    "wrong_type": (_set("train", epochs="ten"), "train.epochs: expected int, got str 'ten'"),
    "float_for_int": (_set("train", batch_size=2.5), "train.batch_size: expected int, got float 2.5"),
    "bool_for_float": (_set("train", lr=True), "train.lr: expected float, got bool True"),
    "bad_choice": (_set("model", kind="transformer"), "model.kind: 'transformer' is not one of"),
    "unknown_hparam": (lambda cfg: cfg["model"]["hparams"].update(foo=1), "model.hparams: egnn takes no foo"),
    "section_not_mapping": (lambda cfg: cfg.update(train=5), "train: expected a mapping, got 5"),
    "missing_dataset": (_set("data", dataset="/nonexistent.npz"), "data.dataset: no such file '/nonexistent.npz'"),
    "missing_test_dataset": (_set("data", test_dataset="/nonexistent/test.npz"), "data.test_dataset: no such file '/nonexistent/test.npz'"),
    "too_few_frames": (_set("data", train_size=20), "train_size (20) + val_size (4) = 24 frames, but only 14 are available"),
    "zero_batch": (_set("train", batch_size=0), "train.batch_size must be at least 1"),
    "compile_gcn": (
        lambda cfg: (cfg["model"].update(kind="gcn", hparams=dict(HPARAMS["gcn"])), cfg["train"].update(compile=True)),
        "train.compile: supported for egnn, schnet, not gcn",
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_error_names_the_key_before_any_work(case, data, tmp_path):
    mutate, expected = CONFIG_ERRORS[case]
    config = make_config(data, tmp_path / "run")
    mutate(config)
    path = write_yaml(tmp_path / "config.yaml", config)
    with pytest.raises(ConfigError) as exc:
        train_cli([str(path), "--quiet"])
    assert expected in str(exc.value)
    assert not (tmp_path / "run").exists(), "a bad config must stop the run before it creates run_dir"


def test_config_file_and_resume_dir_must_exist(tmp_path):
    with pytest.raises(ConfigError, match=r"^config file .*nope\.yaml does not exist"):
        train_cli([str(tmp_path / "nope.yaml")])
    with pytest.raises(ConfigError, match=r"^config file .*norun.config\.yaml does not exist"):
        train_cli(["--resume", str(tmp_path / "norun")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [1,\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        train_cli([str(bad)])


def test_overrides_are_typed_and_checked(data, tmp_path):
    raw = make_config(data, tmp_path / "run")
    config = config_from_dict(raw, ["train.lr=1e-3", "train.epochs=7", "train.grad_clip=null", "model.hparams.lmax=0"])
    assert config.train.lr == 1e-3 and type(config.train.lr) is float  # YAML reads 1e-3 as a string
    assert config.train.epochs == 7 and config.train.grad_clip is None and config.model.hparams["lmax"] == 0
    assert raw["train"]["epochs"] == EPOCHS and raw["model"]["hparams"]["lmax"] == 1, "overrides leaked into the input"
    assert config_from_dict({"train": None}, ["train.lr=0.5"]).train.lr == 0.5  # an empty YAML section
    for assignment, key in [
        ("train.epochs=ten", "train.epochs"), ("train.lr=fast", "train.lr"), ("train.lrr=1", "train.lrr"),
        ("model.kind=mace", "model.kind"), ("model.hparams.foo=1", "foo"), ("train.lr.x=1", "train.lr"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config_from_dict(raw, [assignment])
    with pytest.raises(ConfigError, match="key=value"):
        config_from_dict(raw, ["train.lr"])
    path = write_yaml(tmp_path / "config.yaml", raw)
    with pytest.raises(ConfigError, match=r"^train\.epochs: expected int"):
        train_cli([str(path), "--set", "train.epochs=ten"])
    assert not (tmp_path / "run").exists()


# === 2. an end-to-end run through the CLI ===
@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory):
    """An uninterrupted egnn run of EPOCHS epochs, the reference for the resume tests."""
    folder = tmp_path_factory.mktemp("e2e")
    config_path = write_yaml(folder / "config.yaml", make_config(data, folder / "run"))
    train_cli([str(config_path), "--quiet", *LR])
    return {"config": config_path, "run_dir": folder / "run"}


def test_run_writes_every_artefact(finished_run, data):
    run_dir = finished_run["run_dir"]
    names = {p.name for p in run_dir.iterdir()}
    assert names == {"config.yaml", "last.pt", "best.pt", "log.csv", "metrics.json", "parity.png", "learning_curve.png", "model.pt"}

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["lr"] == 2e-3 and saved["run_dir"] == str(run_dir)
    config_from_dict(saved)  # the saved config is itself valid

    log = read_log(run_dir)
    assert [int(row["epoch"]) for row in log] == list(range(1, EPOCHS + 1))
    assert all(math.isfinite(float(row[k])) for row in log for k in row)
    assert float(log[0]["lr"]) == 2e-3

    metrics = json.loads((run_dir / "metrics.json").read_text())
    test = metrics["test"]
    for key in ("energy_mae_meV", "energy_rmse_meV", "forces_mae_meV_per_A", "forces_rmse_meV_per_A",
                "energy_mae_kcal_mol", "forces_mae_kcal_mol_per_A", "energy_per_atom_mae_meV"):
        assert math.isfinite(test[key]) and test[key] > 0, key
    assert test["num_structures"] == 6
    assert test["energy_mae_kcal_mol"] == pytest.approx(test["energy_mae_meV"] / 1000 / KCAL_PER_MOL_TO_EV, rel=1e-12)
    assert test["forces_mae_kcal_mol_per_A"] == pytest.approx(test["forces_mae_meV_per_A"] / 1000 / KCAL_PER_MOL_TO_EV, rel=1e-12)
    assert metrics["epochs_run"] == EPOCHS and metrics["stopped_by"] == "epochs"
    assert 1 <= metrics["best_epoch"] <= EPOCHS and metrics["test_source"] == str(data["test"])
    assert metrics["model"]["kind"] == "egnn" and metrics["model"]["dtype"] == "float64"

    for plot in ("parity.png", "learning_curve.png"):
        blob = (run_dir / plot).read_bytes()
        assert blob.startswith(b"\x89PNG\r\n\x1a\n") and len(blob) > 2000, plot
    assert no_tmp_files(run_dir)


def test_deployed_model_matches_best_checkpoint(finished_run, data):
    run_dir = finished_run["run_dir"]
    eager = checkpoint.load_potential(run_dir / "best.pt").eval()
    deployed, meta = export.load(run_dir / "model.pt")
    assert meta["kind"] == "egnn" and meta["dtype"] == "float64" and meta["species"] == [1, 6, 8]
    assert meta["metrics"] == json.loads((run_dir / "metrics.json").read_text())["test"]
    batch = collate(frames_to_graphs(read_frames(data["test"]), meta["cutoff"], torch.float64))
    want, got = eager(batch), deployed(batch)
    torch.testing.assert_close(got[keys.ENERGY], want[keys.ENERGY], rtol=0, atol=1e-10)
    torch.testing.assert_close(got[keys.FORCES], want[keys.FORCES], rtol=0, atol=1e-10)


def test_refuses_to_overwrite_a_run(finished_run):
    run_dir = finished_run["run_dir"]
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.iterdir()}
    with pytest.raises(ConfigError, match="already holds a run; use --resume"):
        train_cli([str(finished_run["config"]), "--quiet", "--set", "train.epochs=1"])
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.iterdir()}
    assert after == before


def test_compiled_training_matches_eager(data, tmp_path):
    """train.compile: true reaches the same weights as eager training (float64, to rounding)."""
    import warnings

    runs = {}
    for flag in (False, True):
        config = config_from_dict(make_config(data, tmp_path / f"compile-{flag}", kind="schnet", epochs=2, compile=flag))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_training(config, progress=False)
        assert not [str(w.message) for w in caught if "train.compile" in str(w.message)]  # no eager fallback
        runs[flag] = weights(tmp_path / f"compile-{flag}")
    assert_same_weights(runs[True], runs[False], atol=1e-10)


# === 3. resume is exact ===
def test_resume_continues_exactly(finished_run, data, tmp_path):
    run_dir = tmp_path / "run"
    config_path = write_yaml(tmp_path / "config.yaml", make_config(data, run_dir))
    train_cli([str(config_path), "--quiet", *LR, "--set", "train.epochs=1"])
    assert len(read_log(run_dir)) == 1
    train_cli(["--resume", str(run_dir), "--set", f"train.epochs={EPOCHS}", "--quiet"])

    reference = finished_run["run_dir"]
    assert_same_weights(weights(run_dir), weights(reference))
    assert_same_weights(weights(run_dir, "best.pt"), weights(reference, "best.pt"))
    strip = lambda rows: [{k: v for k, v in row.items() if k != "time_s"} for row in rows]  # noqa: E731
    assert strip(read_log(run_dir)) == strip(read_log(reference))
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, reference))
    assert got["test"] == want["test"] and got["best_epoch"] == want["best_epoch"] and got["epochs_run"] == EPOCHS
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["epochs"] == EPOCHS
    assert no_tmp_files(run_dir)


def _train_command():
    script = Path(sys.executable).with_name("mlpot-train")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from mlpot.cli import train; train(sys.argv[1:])"]


def test_resume_after_sigkill(finished_run, data, tmp_path):
    run_dir = tmp_path / "run"
    config_path = write_yaml(tmp_path / "config.yaml", make_config(data, run_dir))
    proc = subprocess.Popen(
        [*_train_command(), str(config_path), "--quiet", *LR],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "last.pt").exists():
            if proc.poll() is not None:
                pytest.fail(f"mlpot-train exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "no last.pt after 120 s"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = torch.load(run_dir / "last.pt", weights_only=False)["epoch"] + 1
    if done >= EPOCHS:
        pytest.skip(f"the run finished all {EPOCHS} epochs before the kill landed; nothing left to resume")
    assert not (run_dir / "metrics.json").exists()
    # a kill in the middle of a checkpoint write leaves its temporary file behind: resume must tidy it
    (run_dir / "last.pt.x7k2q9.tmp").write_bytes(b"half a checkpoint")

    train_cli(["--resume", str(run_dir), "--quiet"])
    reference = finished_run["run_dir"]
    assert_same_weights(weights(run_dir), weights(reference))
    assert_same_weights(weights(run_dir, "best.pt"), weights(reference, "best.pt"))
    assert [r["epoch"] for r in read_log(run_dir)] == [r["epoch"] for r in read_log(reference)]
    assert json.loads((run_dir / "metrics.json").read_text())["test"] == json.loads((reference / "metrics.json").read_text())["test"]
    assert no_tmp_files(run_dir), sorted(p.name for p in run_dir.iterdir())


# === 4. mlpot-eval ===
def test_evaluate_cli_reports_the_metrics(finished_run, data, capsys):
    run_dir = finished_run["run_dir"]
    capsys.readouterr()
    evaluate([str(run_dir / "model.pt"), str(data["test"]), "--json"])
    printed = json.loads(capsys.readouterr().out)

    potential = checkpoint.load_potential(run_dir / "best.pt").eval()
    pred = predict(potential, frames_to_graphs(read_frames(data["test"]), potential.cutoff, torch.float64))
    direct = error_metrics(pred)
    assert printed.keys() == direct.keys()
    for key, value in direct.items():
        assert printed[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
    assert printed == pytest.approx(json.loads((run_dir / "metrics.json").read_text())["test"], rel=1e-9)

    # and by hand, from the file's kcal/mol energies
    with np.load(data["test"]) as raw:
        reference_ev = raw["E"][:, 0] * KCAL_PER_MOL_TO_EV
    assert printed["energy_mae_meV"] == pytest.approx(np.abs(pred["energy"] - reference_ev).mean() * EV_TO_MEV, rel=1e-9)
    assert printed["num_structures"] == 6

    evaluate([str(run_dir / "model.pt"), str(data["test"]), "--limit", "2"])
    text = capsys.readouterr().out
    assert "egnn" in text and "[2 structures]" in text


# === 5. data-parallel training ===
DDP_LAUNCHER = textwrap.dedent(
    """
    import os, sys, time

    import mlpot.train.loop as loop

    if os.environ["RANK"] == "1":
        class FastClock:  # rank 1's clock runs a million times fast: alone, it would stop at train.max_time
            @staticmethod
            def perf_counter():
                return time.perf_counter() * 1e6

        loop.time = FastClock
    from mlpot.cli import train

    train(sys.argv[1:])
    """
)


def test_ddp_two_processes_match_one(data, tmp_path):
    """Two gloo ranks, each taking half of every batch of 4, train exactly like one process with whole batches.

    Rank 1's clock is skewed so that it alone would pass ``train.max_time`` after the first epoch:
    the ranks must still agree on when to stop (else the gradient all-reduce deadlocks).
    """
    runs = {}
    for name in ("ddp", "single"):
        config = make_config(data, tmp_path / name, kind="schnet", epochs=2, train_size=8, batch_size=4, max_time=1000.0,
                             weight_decay=0.01, grad_clip=None)  # Adam alone would not see gradients summed, not averaged
        runs[name] = write_yaml(tmp_path / f"{name}.yaml", config)
    launcher = tmp_path / "launch.py"
    launcher.write_text(DDP_LAUNCHER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(launcher), str(runs["ddp"]), "--quiet"]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun did not finish in 240 s (ranks deadlocked?): {str(err.stderr)[-3000:]}")
    assert done.returncode == 0, done.stderr[-4000:]

    train_cli([str(runs["single"]), "--quiet"])
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    assert_same_weights(weights(ddp), weights(single), atol=1e-10)
    assert_same_weights(weights(ddp, "best.pt"), weights(single, "best.pt"), atol=1e-10)
    ddp_log, single_log = read_log(ddp), read_log(single)
    assert len(ddp_log) == len(single_log) == 2, "the ranks stopped early (max_time decided per rank?)"
    for got, want in zip(ddp_log, single_log):  # training errors averaged over both ranks' shards
        for key in want:
            if key != "time_s":
                assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-9), key
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (ddp, single))
    assert got["test"] == pytest.approx(want["test"], rel=1e-9)
    assert got["stopped_by"] == "epochs" and got["epochs_run"] == 2
    assert {p.name for p in ddp.iterdir()} == {p.name for p in single.iterdir()}
    assert no_tmp_files(ddp)


# === 6. non-finite losses stop the run with a pointer to the cause ===
def test_non_finite_loss_raises(data, tmp_path):
    threads = torch.get_num_threads()
    config = config_from_dict(
        make_config(data, tmp_path / "run", kind="gcn", epochs=3, lr=1e200, grad_clip=None, ema_decay=None,
                    num_threads=threads + 1)
    )
    with pytest.raises(FloatingPointError, match=r"non-finite loss at epoch \d+, batch \d+ \(training frames \[[\d, ]+\]\); stopped .* lower train\.lr"):
        run_training(config, progress=False)
    assert torch.get_num_threads() == threads, "train.num_threads outlived a run that raised"


def test_non_finite_loss_can_skip_batches(data, tmp_path, capsys):
    """A batch whose labels are NaN is skipped with a warning and the weights stay finite."""
    threads = torch.get_num_threads()
    config = config_from_dict(make_config(data, tmp_path / "run", kind="gcn", epochs=1, grad_clip=None, ema_decay=None,
                                          num_threads=threads + 1))
    config.train.on_nonfinite = "skip"
    from mlpot.train import loop

    original = loop.frames_to_graphs
    calls = []

    def poisoned(frames, *args, **kwargs):
        graphs = original(frames, *args, **kwargs)
        if not calls:  # the training set only
            graphs[0][keys.ENERGY_REF] = graphs[0][keys.ENERGY_REF] * float("nan")
        calls.append(len(graphs))
        return graphs

    loop.frames_to_graphs = poisoned
    try:
        metrics = run_training(config, progress=True)
    finally:
        loop.frames_to_graphs = original
    # train.num_threads held during the run (the report names it) and not after it
    assert metrics["hardware"].endswith(f", {threads + 1} torch thread(s)") and torch.get_num_threads() == threads
    captured = capsys.readouterr()
    assert "batch skipped, weights unchanged" in captured.out + captured.err
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["potential"]["state_dict"].values() if v.is_floating_point())


# === 7. the building blocks: batches per epoch, EMA ===
@pytest.mark.parametrize("num_frames", [8, 9, 10, 11])
def test_epoch_batches_are_seeded_and_shared_out(num_frames):
    """One seeded permutation per epoch (the one training has always used); two processes' shares of
    batch k together are batch k of one process, an unevenly shared last batch left out."""
    seed, size = 3, 4
    for epoch in (0, 1):
        single = epoch_batches(num_frames, size, seed, epoch)
        order = torch.randperm(num_frames, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        assert single == [order[i : i + size] for i in range(0, num_frames, size)]
        shares = [epoch_batches(num_frames, size, seed, epoch, rank, 2) for rank in (0, 1)]
        assert [len(b) for b in shares[0]] == [len(b) for b in shares[1]]
        expected = single if num_frames % 2 == 0 else single[:-1]
        assert [sorted(a + b) for a, b in zip(*shares)] == [sorted(b) for b in expected]
    assert epoch_batches(num_frames, size, seed, 0) != epoch_batches(num_frames, size, seed, 1)


def test_ema_averages_and_is_swapped_in_for_a_block():
    weights = torch.nn.ParameterList([torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))])
    ema = make_ema(weights, 0.9)
    expected = weights[0].detach().clone()
    for value in (3.0, -1.0, 5.0):
        with torch.no_grad():
            weights[0].fill_(value)
        ema.update_parameters(weights)
        expected = 0.9 * expected + 0.1 * value
    average = next(ema.module.parameters())
    torch.testing.assert_close(average, expected, rtol=1e-15, atol=0)
    own = torch.full((2,), 5.0, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="inside"):
        with averaged_weights(list(weights), ema):
            assert torch.equal(weights[0], average)
            raise RuntimeError("inside")
    assert torch.equal(weights[0], own), "the weights were not given back after the block"
