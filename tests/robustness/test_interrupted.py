"""A training run killed again and again (SIGKILL and SIGTERM) and resumed each time with
``--resume RUN_DIR`` ends bit for bit where an uninterrupted run ends (weights, EMA shadow, optimizer
moments, best.pt, log), and no kill leaves a half-written checkpoint, config or metrics file behind.

The run (tiny float64 GCN, 6 epochs of 10 frames, ``python -c "... from mlpot.cli import train; train(...)"``)
goes through ``killable``: every file write goes out in small flushed chunks and every chunk, rename,
epoch and batch is reported as a numbered event. The four kill points are drawn (seeded) from the
events still ahead of the run: inside a checkpoint write of epoch 1 (before any last.pt), inside the
config.yaml rewrite a resumed run starts with, anywhere (asynchronously, a random delay after a random
event, the run going on meanwhile), and right after the last epoch's checkpoint is in place.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mlpot import export
from mlpot.cli import train as train_cli

from robustness_helpers import HERE, make_config, tmp_files, write_sgdml_npz, write_yaml
import killable

EPOCHS = 6
SEED = 20240611
CHILD = "import sys, killable; killable.install(); from mlpot.cli import train; train(sys.argv[1:])"
ASYNC_BACKSTOP = 60  # an asynchronous kill lands at the latest this many events after its draw
WATCHDOG_S = 240  # no launch may take longer (each takes a few seconds)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return write_sgdml_npz(folder / "train.npz", 14, 0), write_sgdml_npz(folder / "test.npz", 4, 1)


def state_of(run_dir: Path, name: str) -> dict:
    """Every tensor of a checkpoint that must match: weights, EMA shadow, optimizer moments."""
    state = torch.load(run_dir / name, map_location="cpu", weights_only=False)
    tensors = {f"potential.{k}": v for k, v in state["potential"]["state_dict"].items()}
    if state.get("ema"):
        tensors.update({f"ema.{k}": v for k, v in state["ema"].items()})  # n_averaged and the averages
    if state.get("optimizer"):
        for index, moments in state["optimizer"]["state"].items():
            tensors.update({f"optimizer.{index}.{k}": torch.as_tensor(v) for k, v in moments.items()})
    return tensors


def assert_bitwise_equal(got: dict, want: dict, label: str):
    assert got.keys() == want.keys(), label
    for name, value in want.items():
        assert got[name].dtype == value.dtype, f"{label} {name}"
        assert torch.equal(got[name], value), (
            f"{label} {name} differs by {(got[name].double() - value.double()).abs().max().item():.3g}"
        )
    assert any(v.dtype == torch.float64 for v in want.values())


def log_without_times(run_dir: Path):
    rows = (run_dir / "log.csv").read_text().splitlines()
    header = rows[0].split(",")
    keep = [i for i, h in enumerate(header) if h != "time_s"]
    return [[row.split(",")[i] for i in keep] for row in rows]


class Trace:
    """The events of the uninterrupted run, to know which events a resumed run still has ahead of it."""

    def __init__(self, events):
        self.events = events
        self.epoch_start = {int(e.split()[1]): i for i, e in enumerate(events) if e.startswith("epoch ")}
        assert sorted(self.epoch_start) == list(range(1, EPOCHS + 1)), events[:20]
        last_log = max(i for i, e in enumerate(events) if e == "replace log.csv")
        self.finish_start = last_log + 1
        self.startup = events[: self.epoch_start[1]]

    def remaining(self, epochs_done: int):
        """Events of a launch that starts after ``epochs_done`` finished epochs."""
        start = self.epoch_start[epochs_done + 1] if epochs_done < EPOCHS else self.finish_start
        return self.startup + self.events[start:]


def epochs_done(run_dir: Path) -> int:
    last = run_dir / "last.pt"
    return torch.load(last, map_location="cpu", weights_only=False)["epoch"] + 1 if last.is_file() else 0


class Launch:
    """One ``mlpot-train`` process (instrumented), its events read from stdout."""

    def __init__(self, args, folder: Path, pause_at=0, event_sleep=0.0):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "KILLABLE_PAUSE_AT": str(pause_at),
               "KILLABLE_EVENT_SLEEP": str(event_sleep),
               "PYTHONPATH": os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.stderr_path = folder / f"stderr-{time.monotonic_ns()}.txt"
        self.stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, *args, "--quiet"], stdout=subprocess.PIPE,
                                     stderr=self.stderr, env=env)
        self.seen = []
        self.watchdog = threading.Timer(WATCHDOG_S, self.proc.kill)  # a hung run ends the stdout reads below
        self.watchdog.start()

    def tail(self) -> str:
        self.stderr.flush()
        return self.stderr_path.read_text(errors="replace")[-3000:]

    def wait_for_event(self, number: int) -> str:
        for line in self.proc.stdout:
            if line.startswith(b"@@"):
                n, event = line[2:].decode().strip().split(" ", 1)
                self.seen.append(event)
                if int(n) >= number:
                    return event
        self.proc.wait()
        pytest.fail(f"the run ended (exit {self.proc.returncode}) before event {number}; "
                    f"last events {self.seen[-5:]}; stderr:\n{self.tail()}")

    def kill(self, sig, delay: float):
        time.sleep(delay)
        self.proc.send_signal(sig)
        self.proc.wait(timeout=60)
        for line in self.proc.stdout:  # what it reported before it died: the last one is where the kill landed
            if line.startswith(b"@@"):
                self.seen.append(line.decode().split(" ", 1)[1].strip())
        self.close()
        assert self.proc.returncode == -sig, f"exit {self.proc.returncode}; stderr:\n{self.tail()}"

    def finish(self, timeout=300):
        for line in self.proc.stdout:
            if line.startswith(b"@@"):
                self.seen.append(line.decode().split(" ", 1)[1].strip())
        self.proc.wait(timeout=timeout)
        self.close()
        assert self.proc.returncode == 0, f"exit {self.proc.returncode}; stderr:\n{self.tail()}"

    def close(self):
        self.watchdog.cancel()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.stderr.close()


def check_after_kill(run_dir: Path, config_text: str):
    """What a kill may never leave: a checkpoint that does not load, or a changed/half-written config."""
    for name in ("last.pt", "best.pt"):
        if (run_dir / name).exists():
            state = torch.load(run_dir / name, map_location="cpu", weights_only=False)  # raises when half-written
            assert "potential" in state and state["potential"]["state_dict"], name
    assert (run_dir / "config.yaml").read_text() == config_text, "config.yaml changed or half-written by a kill"
    if (run_dir / "metrics.json").exists():
        json.loads((run_dir / "metrics.json").read_text())  # never half-written either
    return tmp_files(run_dir)


def test_killed_and_resumed_run_matches_uninterrupted(data, tmp_path, monkeypatch):
    train_file, test_file = data
    rng = np.random.default_rng(SEED)

    # the reference: uninterrupted, in this process, recording its events
    reference = tmp_path / "reference"
    events = []
    with monkeypatch.context() as patch:
        killable.install(emit=events.append, setattr=patch.setattr)
        train_cli([str(write_yaml(tmp_path / "reference.yaml", make_config(train_file, test_file, reference))), "--quiet"])
    trace = Trace(events)

    run_dir = tmp_path / "run"
    config = write_yaml(tmp_path / "run.yaml", make_config(train_file, test_file, run_dir))
    signals = [signal.SIGKILL, signal.SIGKILL, signal.SIGTERM, signal.SIGTERM]
    rng.shuffle(signals)
    kills, left_tmp = [], []

    def kill(args, point, sig, async_window=0):
        """Start a run, kill it ``sig`` after event ``point`` (paused there, or still running for an async kill)."""
        if async_window:
            launch = Launch(args, tmp_path, pause_at=point + async_window, event_sleep=5e-4)
        else:
            launch = Launch(args, tmp_path, pause_at=point)
        launch.wait_for_event(point)
        launch.kill(sig, rng.uniform(0, 0.03))
        kills.append((sig.name, launch.seen[-1], epochs_done(run_dir)))

    # 1: inside a checkpoint write of epoch 1, before any last.pt exists: --resume must start the run over
    epoch1 = range(trace.epoch_start[1], trace.epoch_start[2])
    writes = [i for i in epoch1 if trace.events[i] in ("write last.pt", "write best.pt")]
    kill([str(config)], int(rng.choice(writes)) + 1, signals[0])
    assert not (run_dir / "last.pt").exists(), "kill 1 was meant to land before the first last.pt"
    config_text = (run_dir / "config.yaml").read_text()
    assert yaml.safe_load(config_text)["train"]["epochs"] == EPOCHS
    left_tmp.append(check_after_kill(run_dir, config_text))

    # 2: inside the rewrite of config.yaml that every resumed run starts with
    resume = ["--resume", str(run_dir)]
    ahead = trace.remaining(epochs_done(run_dir))
    config_writes = [i for i, e in enumerate(ahead) if e.startswith("write config.yaml")]
    kill(resume, int(rng.choice(config_writes[:-1])) + 1, signals[1])  # not after its last chunk
    left_tmp.append(check_after_kill(run_dir, config_text))

    # 3: anywhere, asynchronously: a random delay after a random event, the run going on meanwhile
    ahead = trace.remaining(epochs_done(run_dir))
    kill(resume, int(rng.integers(1, len(ahead) - 2 * ASYNC_BACKSTOP)), signals[2], async_window=ASYNC_BACKSTOP)
    left_tmp.append(check_after_kill(run_dir, config_text))

    # 4: right after the last epoch's checkpoint is in place (or, when kill 3 got past it, anywhere)
    ahead = trace.remaining(epochs_done(run_dir))
    last_checkpoint = [i for i, e in enumerate(ahead) if e == "replace last.pt"]
    if epochs_done(run_dir) < EPOCHS and last_checkpoint:
        point = last_checkpoint[-1] + 1
    else:
        point = int(rng.integers(1, len(ahead) - 10))
    kill(resume, point, signals[3])
    left_tmp.append(check_after_kill(run_dir, config_text))
    print("kills (signal, last event before it, epochs done after it):", *kills, sep="\n  ")

    # the final resume runs to the end
    launch = Launch(resume, tmp_path)
    launch.finish()

    assert len(kills) >= 3 and {k[0] for k in kills} == {"SIGKILL", "SIGTERM"}, kills
    assert any(left_tmp), f"no kill landed inside a write: {kills}"
    assert tmp_files(run_dir) == [], f"temporary files left after the final resume; kills: {kills}"
    assert any(k.startswith("ema.") for k in state_of(reference, "last.pt")), "the EMA shadow is not compared"
    assert_bitwise_equal(state_of(run_dir, "last.pt"), state_of(reference, "last.pt"), f"last.pt after kills {kills}")
    assert_bitwise_equal(state_of(run_dir, "best.pt"), state_of(reference, "best.pt"), f"best.pt after kills {kills}")
    assert epochs_done(run_dir) == EPOCHS
    assert log_without_times(run_dir) == log_without_times(reference), f"log.csv after kills {kills}"
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, reference))
    assert got["test"] == want["test"] and got["best_epoch"] == want["best_epoch"] and got["epochs_run"] == EPOCHS
    assert export.read_metadata(run_dir / "model.pt")["metrics"] == want["test"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == yaml.safe_load(config_text)
