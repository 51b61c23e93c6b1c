"""Accuracy at equal budget, side by side: mlpot, NequIP and MACE, each trained by its own command line with the
settings its documentation recommends, at the speed benchmark's model size (protocol.EGNN_SIZE), on the same
frames, with the same threads and the same wall-clock budget; each tested through its own ASE calculator on the
same test frames. Writes accuracy.json, accuracy.md and accuracy-<molecule>-<budget>min.png beside this file.

Usage (after `bash benchmarks/peers/setup.sh nequip mace`), with mlpot's venv, nice'd on a shared machine:
    nice -n 15 python benchmarks/peers/accuracy.py --molecules ethanol,toluene,aspirin --budget 25
    nice -n 15 python benchmarks/peers/accuracy.py --molecules ethanol --budget 60
    nice -n 15 python benchmarks/peers/accuracy.py --quick          # 2 min, ethanol, 100 test frames: accuracy-quick.*
    python benchmarks/peers/accuracy.py --render                    # rewrite accuracy.md and the figures only

Frames (the same for everyone, extxyz in eV and eV/Å, under .cache/accuracy/<molecule>/): train 950 and validation
50 drawn with mlpot.data.split_indices(1000, [950, 50], seed 0) from rMD17 split 01's training file -- exactly the
frames mlpot-train's recipe draws, which is checked -- and test = split 01's 1000 test frames (--quick: every 10th).

Each (molecule, implementation) is one job: train (its own command line, one thread, pinned with taskset to one
core), turn the result into the file its ASE calculator loads, test it there. At most --jobs run at once. The
budget is wall-clock seconds of training from the trainer's own start of training (setup -- reading the frames,
neighbour lists, statistics -- is not counted, for anyone): mlpot-train's train.max_time, Lightning's max_time for
NequIP, and for MACE (which has no time limit) the driver stops it at the budget after the line "Started training"
in its log, then runs its own command again with --restart_latest and --max_num_epochs at the saved checkpoint's
epoch, which trains no further and writes the .model from the best checkpoint. Validation force MAE is read from
each trainer's own log as it appears (mlpot's log.csv, Lightning's metrics.csv, MACE's results/*_train.txt) and
stamped with the wall-clock seconds since the job started. Results merge per (molecule, budget, implementation)
into accuracy.json, so runs can be done in separate sittings.
"""

import argparse
import csv
import datetime
import json
import os
import platform
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from protocol import CUTOFF, EGNN_SIZE  # noqa: E402

CACHE = HERE / ".cache" / "accuracy"
IMPLS = ("mlpot", "nequip", "nequip-compile", "mace")
DEFAULT_IMPLS = "mlpot,nequip,mace"
LABEL = {"mlpot": "mlpot egnn", "nequip": "NequIP", "nequip-compile": "NequIP (compile)", "mace": "MACE"}
# mlpot's recipes for rMD17 split 01 (train 950 + val 50 from train_01, test = test_01), one per molecule
RECIPES = {"ethanol": "training/ethanol-egnn.yaml", "toluene": "training/rmd17-toluene-egnn.yaml",
           "aspirin": "training/rmd17-aspirin-egnn.yaml"}
N_TRAIN, N_VAL = 950, 50
BOX = 20.0  # Å: a non-periodic box around every frame (nequip-compile's self-check needs a finite stress)
GOAL = 0.6  # mlpot force MAE <= 0.6 x the best peer's
POLL_S = 2.0
HARD_LIMIT = 2.0  # x budget (+ 20 min): when the driver stops any trainer
THREAD_ENV = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                               "VECLIB_MAXIMUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS")}


def log(*args):
    print(f"[{datetime.datetime.now().strftime('%H:%M:%S')}]", *args, file=sys.stderr, flush=True)


# === frames ===

def write_frames(molecule: str, seed: int, test_every: int) -> dict:
    """train/val/test extxyz files of ``molecule`` under CACHE/<molecule>/ (written once; checked against
    mlpot-train's own split of the recipe); returns their paths and the indices they hold."""
    import numpy as np
    from ase import Atoms
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator
    from mlpot.data.datasets import load_dataset, split_indices

    d = CACHE / molecule
    d.mkdir(parents=True, exist_ok=True)
    pool = load_dataset(f"rmd17_{molecule}", split="train", index=1)
    test = load_dataset(f"rmd17_{molecule}", split="test", index=1)
    train_idx, val_idx = split_indices(len(pool), [N_TRAIN, N_VAL], seed)
    test_idx = list(range(0, len(test), test_every))
    check_mlpot_split(molecule, seed, pool, train_idx, val_idx)
    paths = {}
    for name, frames, idx in (("train", pool, train_idx), ("val", pool, val_idx),
                              ("test" if test_every == 1 else f"test-every{test_every}", test, test_idx)):
        path = d / f"{name}.extxyz"
        paths[name.split("-")[0]] = str(path)
        if path.is_file():
            continue
        atoms_list = []
        for i in idx:
            a = Atoms(numbers=frames.numbers[i], positions=frames.positions[i], cell=[BOX] * 3, pbc=False)
            e, f = float(frames.energy[i]), np.asarray(frames.forces[i])
            # labels twice: as ASE's calculator results (read by mlpot, NequIP, ASE) and under MACE's default
            # keys REF_energy / REF_forces (MACE ignores a calculator's results)
            a.info["REF_energy"] = e
            a.arrays["REF_forces"] = f.copy()
            a.info["rmd17_index"] = int(i)
            a.calc = SinglePointCalculator(a, energy=e, forces=f.copy())
            atoms_list.append(a)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # per process: two drivers may write the same file at once
        ase.io.write(tmp, atoms_list, format="extxyz")
        tmp.replace(path)
    return {"paths": paths, "train_index": [int(i) for i in train_idx], "val_index": [int(i) for i in val_idx],
            "test_index": test_idx, "source": f"rMD17 split 01 (rmd17_{molecule}_train_01/test_01.npz)"}


def check_mlpot_split(molecule, seed, pool, train_idx, val_idx):
    """The frames mlpot-train draws from its recipe are the ones written here (else SystemExit)."""
    import numpy as np
    from mlpot.train.config import load_config
    from mlpot.train.loop import load_splits

    cfg = load_config(ROOT / RECIPES[molecule], [f"data.seed={seed}"])
    train, val, _ = load_splits(cfg)
    if not (np.array_equal(train.energy, pool.energy[train_idx]) and np.array_equal(val.energy, pool.energy[val_idx])):
        raise SystemExit(f"mlpot-train's split of {RECIPES[molecule]} differs from the frames written here")


# === the implementations: how each trains, what it writes, how its ASE calculator loads it ===

def peer_python(name: str) -> Path:
    venv = HERE / ".venvs" / name / "bin" / "python"
    if not venv.is_file():
        raise RuntimeError(f"{venv} is missing: run `bash benchmarks/peers/setup.sh {name}`")
    return venv


class Job:
    """One (molecule, implementation, budget) run in ``self.dir``."""

    own_time_limit = True  # the trainer stops itself at the budget (else the driver stops it)

    def __init__(self, impl, molecule, budget_s, frames, seed, tag):
        self.impl, self.molecule, self.budget_s, self.frames, self.seed = impl, molecule, budget_s, frames, seed
        self.dir = CACHE / molecule / tag / impl

    @property
    def python(self) -> Path:
        raise NotImplementedError

    def env(self) -> dict:
        env = dict(os.environ, **THREAD_ENV)
        env.pop("PYTHONPATH", None)  # peers' venvs must not see this checkout's mlpot
        return env

    def command(self) -> list:
        """Write the config into self.dir; the training command line."""
        raise NotImplementedError

    def curve(self) -> list:
        """Validation rows logged so far: dicts with epoch, val_forces_mae (meV/Å), val_energy_mae (meV)."""
        raise NotImplementedError

    def training_started(self) -> bool:
        return False

    def has_checkpoint(self) -> bool:
        """Whether a model could be made from what the trainer has saved so far."""
        return True

    def finalize(self, run, killed: bool) -> str:
        """Path of the file the ASE calculator loads (after any conversion step)."""
        raise NotImplementedError

    def settings(self) -> dict:
        return {}

    def versions(self) -> dict:
        code = ("import json, importlib.metadata as m\nout = {}\n"
                "for d in ('mlpot', 'nequip', 'mace-torch', 'torch', 'e3nn', 'ase', 'lightning'):\n"
                "    try: out[d] = m.version(d)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(out))")
        env = self.env() if self.impl != "mlpot" else dict(os.environ)
        out = subprocess.run([str(self.python), "-c", code], capture_output=True, text=True, env=env, timeout=120)
        try:
            return json.loads(out.stdout)
        except ValueError:
            return {}


class MLPotJob(Job):
    python = Path(sys.executable)

    def env(self) -> dict:
        return dict(os.environ, **THREAD_ENV)  # keeps PYTHONPATH: the checkout's mlpot

    def command(self):
        import yaml

        raw = yaml.safe_load((ROOT / RECIPES[self.molecule]).read_text())
        raw["train"]["max_time"] = float(self.budget_s)
        raw["train"]["epochs"] = 100000  # the budget ends it, not the epoch count (as for the peers)
        raw["data"]["seed"] = self.seed
        raw["run_dir"] = str(self.dir / "run")
        self.config = raw
        (self.dir / "mlpot.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        return [str(Path(sys.executable).parent / "mlpot-train"), str(self.dir / "mlpot.yaml"), "--quiet"]

    def curve(self):
        rows = read_csv(self.dir / "run" / "log.csv")
        return [{"epoch": int(r["epoch"]), "own_time_s": float(r["time_s"]),
                 "val_forces_mae": float(r["val_forces_mae_meV_per_A"]), "val_energy_mae": float(r["val_energy_mae_meV"])}
                for r in rows]

    def finalize(self, run, killed):
        path = self.dir / "run" / "model.pt"
        if not path.is_file():
            raise RuntimeError(f"mlpot-train wrote no {path} (rc {run['rc']}); see {self.dir / 'train.log'}")
        return str(path)

    def settings(self):
        t = self.config["train"]
        return {"recipe": RECIPES[self.molecule], "overrides": {"train.max_time": t["max_time"], "train.epochs": t["epochs"]},
                "train": {k: t[k] for k in ("batch_size", "lr", "scheduler", "warmup_epochs", "min_lr", "forces_weight",
                                            "ema_decay", "early_stopping_patience", "compile", "num_threads")},
                "model": self.config["model"]}


NEQUIP_CONFIG = """\
# NequIP {nequip_version}: configs/tutorial.yaml's training settings at the speed benchmark's model size (protocol.py)
run: [train]
seed: {seed}
cutoff_radius: {cutoff}
model_type_names: [H, C, O]
chemical_species: ${{model_type_names}}
monitored_metric: val0_epoch/weighted_sum
data:
  _target_: nequip.data.datamodule.ASEDataModule
  seed: {seed}
  train_file_path: {train}
  val_file_path: {val}
  transforms:
    - _target_: nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper
      model_type_names: ${{model_type_names}}
    - _target_: nequip.data.transforms.NeighborListTransform
      r_max: ${{cutoff_radius}}
  train_dataloader:
    _target_: torch.utils.data.DataLoader
    batch_size: 5
    shuffle: true
  val_dataloader:
    _target_: torch.utils.data.DataLoader
    batch_size: 10
  stats_manager:
    _target_: nequip.data.CommonDataStatisticsManager
    dataloader_kwargs:
      batch_size: 10
    type_names: ${{model_type_names}}
trainer:
  _target_: lightning.Trainer
  accelerator: cpu
  enable_checkpointing: true
  enable_progress_bar: false
  max_epochs: 100000
  max_time: "{max_time}"
  log_every_n_steps: 20
  logger:
    _target_: lightning.pytorch.loggers.CSVLogger
    save_dir: ${{hydra:runtime.output_dir}}
    name: csv
    version: 0
    flush_logs_every_n_steps: 20
  callbacks:
    - _target_: lightning.pytorch.callbacks.EarlyStopping
      monitor: ${{monitored_metric}}
      min_delta: 1e-3
      patience: 20
    - _target_: lightning.pytorch.callbacks.ModelCheckpoint
      monitor: ${{monitored_metric}}
      dirpath: ${{hydra:runtime.output_dir}}
      filename: best
      save_last: true
    - _target_: lightning.pytorch.callbacks.LearningRateMonitor
      logging_interval: epoch
training_module:
  _target_: nequip.train.EMALightningModule
  ema_decay: 0.999
  loss:
    _target_: nequip.train.EnergyForceLoss
    per_atom_energy: true
    coeffs:
      total_energy: 1.0
      forces: 1.0
  val_metrics:
    _target_: nequip.train.EnergyForceMetrics
    coeffs:
      total_energy_mae: 1.0
      forces_mae: 1.0
  train_metrics: ${{training_module.val_metrics}}
  test_metrics: ${{training_module.val_metrics}}
  optimizer:
    _target_: torch.optim.Adam
    lr: 0.01
  lr_scheduler:
    scheduler:
      _target_: torch.optim.lr_scheduler.ReduceLROnPlateau
      factor: 0.6
      patience: 5
      threshold: 0.2
      min_lr: 1e-6
    monitor: ${{monitored_metric}}
    interval: epoch
    frequency: 1
  model:
    _target_: nequip.model.NequIPGNNModel
    compile_mode: {compile_mode}
    seed: {seed}
    model_dtype: float32
    type_names: ${{model_type_names}}
    r_max: ${{cutoff_radius}}
    num_bessels: {num_bessel}
    bessel_trainable: false
    polynomial_cutoff_p: {cutoff_p}
    num_layers: {num_layers}
    l_max: {lmax}
    parity: false
    num_features: {num_features}
    radial_mlp_depth: {radial_depth}
    radial_mlp_width: {radial_width}
    readout_mlp_hidden_layers_depth: 1
    readout_mlp_hidden_layers_width: {readout_hidden}
    avg_num_neighbors: ${{training_data_stats:num_neighbors_mean}}
    per_type_energy_scales: ${{training_data_stats:per_type_forces_rms}}
    per_type_energy_shifts: ${{training_data_stats:per_atom_energy_mean}}
    per_type_energy_scales_trainable: false
    per_type_energy_shifts_trainable: false
global_options:
  allow_tf32: false
"""


def lightning_time(seconds: float) -> str:
    s = int(round(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    return f"{days:02d}:{hours:02d}:{minutes:02d}:{s:02d}"


class NequIPJob(Job):
    compile_mode = "eager"

    @property
    def python(self):
        return peer_python("nequip")

    def command(self):
        s = EGNN_SIZE
        version = self.versions().get("nequip", "?")
        (self.dir / "config.yaml").write_text(NEQUIP_CONFIG.format(
            nequip_version=version, seed=self.seed, cutoff=CUTOFF, train=self.frames["paths"]["train"],
            val=self.frames["paths"]["val"], max_time=lightning_time(self.budget_s), compile_mode=self.compile_mode,
            num_bessel=s["num_bessel"], cutoff_p=s["cutoff_p"], num_layers=s["num_layers"], lmax=s["lmax"],
            num_features=s["num_features"], radial_depth=len(s["radial"]), radial_width=s["radial"][0],
            readout_hidden=s["readout_hidden"]))
        bindir = self.python.parent
        return [str(bindir / "nequip-train"), "-cp", str(self.dir), "-cn", "config", f"hydra.run.dir={self.dir / 'train'}"]

    def curve(self):
        rows = read_csv(self.dir / "train" / "csv" / "version_0" / "metrics.csv")
        out = []
        for r in rows:
            f, e = r.get("val0_epoch/forces_mae"), r.get("val0_epoch/total_energy_mae")
            if f:
                out.append({"epoch": int(float(r["epoch"])) + 1, "val_forces_mae": float(f) * 1000,
                            "val_energy_mae": float(e) * 1000 if e else None})
        return out

    def finalize(self, run, killed):
        train = self.dir / "train"
        ckpt = train / "best.ckpt" if (train / "best.ckpt").is_file() else train / "last.ckpt"
        if not ckpt.is_file():
            raise RuntimeError(f"nequip-train wrote no checkpoint (rc {run['rc']}); see {self.dir / 'train.log'}")
        out = self.dir / "model.nequip.pt2"
        cmd = [str(self.python.parent / "nequip-compile"), str(ckpt), str(out), "--mode", "aotinductor",
               "--device", "cpu", "--target", "ase"]
        run["finalize_cmd"] = " ".join(cmd)
        run["checkpoint"] = ckpt.name
        rc = run_pinned(cmd, run["core"], self.env(), self.dir, self.dir / "finalize.log")
        if rc != 0 or not out.is_file():
            raise RuntimeError(f"nequip-compile failed (rc {rc}); see {self.dir / 'finalize.log'}")
        return str(out)

    def settings(self):
        return {"config": str(self.dir / "config.yaml"), "based_on": "nequip configs/tutorial.yaml",
                "compile_mode": self.compile_mode, "max_time": lightning_time(self.budget_s)}


class NequIPCompileJob(NequIPJob):
    compile_mode = "compile"


class MACEJob(Job):
    own_time_limit = False
    NAME = "MACE"

    @property
    def python(self):
        return peer_python("mace")

    def args(self) -> list:
        s = EGNN_SIZE
        f = s["num_features"]
        return [
            f"--name={self.NAME}", f"--seed={self.seed}", f"--work_dir={self.dir}",
            f"--train_file={self.frames['paths']['train']}", f"--valid_file={self.frames['paths']['val']}",
            "--energy_key=REF_energy", "--forces_key=REF_forces",
            "--E0s=average", "--model=ScaleShiftMACE",
            f"--hidden_irreps={f}x0e + {f}x1o + {f}x2e", f"--max_ell={s['lmax']}",
            f"--num_interactions={s['num_layers']}", "--correlation=3",
            f"--num_radial_basis={s['num_bessel']}", f"--num_cutoff_basis={s['cutoff_p']}",
            f"--radial_MLP={list(s['radial'])}", f"--MLP_irreps={s['readout_hidden']}x0e", f"--r_max={CUTOFF}",
            "--batch_size=5", "--valid_batch_size=10", "--max_num_epochs=100000",
            "--ema", "--ema_decay=0.99", "--amsgrad", "--default_dtype=float32", "--device=cpu",
            "--error_table=PerAtomMAE", "--plot=False", "--save_cpu",
        ]

    def command(self):
        return [str(self.python.parent / "mace_run_train"), *self.args()]

    def log_file(self):
        logs = sorted((self.dir / "logs").glob(f"{self.NAME}_run-{self.seed}*.log"))
        return logs[0] if logs else None

    def training_started(self):
        path = self.log_file()
        return bool(path) and "Started training" in path.read_text(errors="replace")

    def curve(self):
        out = []
        for path in sorted((self.dir / "results").glob(f"{self.NAME}_run-{self.seed}*_train.txt")):
            for line in path.read_text(errors="replace").splitlines():
                try:
                    d = json.loads(line)
                except ValueError:
                    continue  # a line being written
                if d.get("mode") == "eval" and d.get("epoch") is not None and "mae_f" in d:
                    out.append({"epoch": int(d["epoch"]) + 1, "val_forces_mae": float(d["mae_f"]) * 1000,
                                "val_energy_mae": float(d["mae_e"]) * 1000 if "mae_e" in d else None})
        return out

    def checkpoints(self) -> list:
        return sorted((self.dir / "checkpoints").glob(f"{self.NAME}_run-{self.seed}_epoch-*.pt"),
                      key=lambda p: int(re.search(r"epoch-(\d+)", p.name).group(1)))

    def has_checkpoint(self):
        return bool(self.checkpoints())

    def finalize(self, run, killed):
        model = self.dir / f"{self.NAME}.model"
        if model.is_file() and not killed:
            return str(model)
        ckpts = self.checkpoints()
        if not ckpts:
            raise RuntimeError(f"MACE saved no checkpoint (rc {run['rc']}); see {self.dir / 'train.log'}")
        epoch = int(re.search(r"epoch-(\d+)", ckpts[-1].name).group(1))
        run["checkpoint"] = ckpts[-1].name
        # its own command again: loads the latest (best) checkpoint, trains no further (max_num_epochs = its
        # epoch), and writes the .model as at the end of a run
        cmd = [*self.command(), "--restart_latest", f"--max_num_epochs={epoch}"]
        run["finalize_cmd"] = " ".join(f"'{c}'" if " " in c else c for c in cmd)
        rc = run_pinned(cmd, run["core"], self.env(), self.dir, self.dir / "finalize.log")
        if rc != 0 or not model.is_file():
            raise RuntimeError(f"mace_run_train --restart_latest failed (rc {rc}); see {self.dir / 'finalize.log'}")
        return str(model)

    def settings(self):
        return {"args": self.args(), "stopped": "by the driver at the budget after 'Started training'"}


JOBS = {"mlpot": MLPotJob, "nequip": NequIPJob, "nequip-compile": NequIPCompileJob, "mace": MACEJob}


def read_csv(path: Path) -> list:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        text = fh.read()
    lines = text.splitlines()
    if text and not text.endswith("\n"):
        lines = lines[:-1]  # a row being written
    return list(csv.DictReader(lines))


def run_pinned(cmd, core, env, cwd, log_path) -> int:
    with open(log_path, "a") as fh:
        fh.write(f"$ taskset -c {core} {' '.join(cmd)}\n")
        fh.flush()
        return subprocess.run(["taskset", "-c", str(core), *cmd], stdout=fh, stderr=subprocess.STDOUT, env=env,
                              cwd=cwd).returncode


def stop(proc):
    """SIGTERM to the job's process group (it was started in its own session), SIGKILL after 30 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def train(job: Job, core: int) -> dict:
    """Run the training command pinned to ``core``, polling its validation log; stop it at the budget where it
    has no time limit of its own, and in any case at --hard-limit x budget + 20 min (a safety net against a hung
    trainer: mlpot-train and Lightning stop after the step or epoch that passes their limit, and a compile inside
    the first epoch can take minutes on a loaded core)."""
    if job.dir.exists():
        shutil.rmtree(job.dir)
    job.dir.mkdir(parents=True)
    cmd = job.command()
    run = {"core": core, "command": " ".join(f"'{c}'" if " " in c else c for c in cmd), "curve": [], "killed": False}
    logf = open(job.dir / "train.log", "w")
    logf.write(f"$ taskset -c {core} {run['command']}\n")
    logf.flush()
    t0 = time.time()
    proc = subprocess.Popen(["taskset", "-c", str(core), *cmd], stdout=logf, stderr=subprocess.STDOUT, env=job.env(),
                            cwd=job.dir, start_new_session=True)
    started = None
    hard = job.budget_s * HARD_LIMIT + 1200

    def poll():
        now = time.time() - t0
        rows = job.curve()
        for row in rows[len(run["curve"]):]:
            run["curve"].append(dict(row, wall_s=round(now, 1)))

    try:
        while proc.poll() is None:
            time.sleep(POLL_S)
            poll()
            now = time.time() - t0
            if started is None and job.training_started():
                started = now
                run["setup_s"] = round(now, 1)
            if not job.own_time_limit and started is not None and now >= started + job.budget_s:
                if job.has_checkpoint():
                    late = now - started - job.budget_s
                    stop(proc)
                    run["killed"] = True
                    run["stopped_by"] = "driver at the budget" if late < 2 * POLL_S + 1 else \
                        f"driver {late:.0f} s past the budget, at its first checkpoint"
                elif "waiting_for_checkpoint" not in run:  # no model to test yet: wait for the first one
                    run["waiting_for_checkpoint"] = round(now, 1)
                    log(f"{job.molecule}/{job.impl}: budget reached before any checkpoint; waiting for the first one")
            elif now >= hard:
                stop(proc)
                run["killed"] = True
                run["stopped_by"] = f"driver at the hard limit {hard:.0f} s"
        poll()
    finally:
        if proc.poll() is None:
            stop(proc)
        logf.close()
    run["rc"] = proc.returncode
    run["wall_s"] = round(time.time() - t0, 1)
    curve = run["curve"]
    if curve:
        run["train_wall_s"] = curve[-1]["wall_s"]
        if "own_time_s" in curve[0]:  # mlpot: its clock starts at the first epoch
            run["setup_s"] = round(curve[0]["wall_s"] - curve[0]["own_time_s"], 1)
            run["own_train_s"] = curve[-1]["own_time_s"]
    run.setdefault("stopped_by", "itself" if proc.returncode == 0 else f"exit {proc.returncode}")
    return run


def test(job: Job, model: str, core: int) -> dict:
    out = job.dir / "test.json"
    out.unlink(missing_ok=True)
    cmd = [str(job.python), str(HERE / "accuracy_eval.py"), "--impl", job.impl, "--model", model,
           "--frames", job.frames["paths"]["test"], "--out", str(out)]
    rc = run_pinned(cmd, core, job.env(), job.dir, job.dir / "test.log")
    if rc != 0 or not out.is_file():
        raise RuntimeError(f"ASE test failed (rc {rc}); see {job.dir / 'test.log'}")
    return json.loads(out.read_text())


# === results ===

class Results:
    """accuracy[-quick].json, merged per (molecule, budget, implementation); rewritten (with the markdown and the
    figures) after every finished job."""

    def __init__(self, stem: str):
        self.json = HERE / f"{stem}.json"
        self.md = HERE / f"{stem}.md"
        self.stem = stem
        self.lock = threading.Lock()

    def load(self) -> dict:
        if self.json.is_file():
            return json.loads(self.json.read_text())
        return {"runs": {}}

    def add(self, key: str, result: dict):
        with self.lock:
            data = self.load()
            data["runs"][key] = result
            data["updated"] = now_iso()
            tmp = self.json.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1) + "\n")
            tmp.replace(self.json)
            self.render(data)

    def render(self, data=None):
        data = data or self.load()
        self.md.write_text(markdown(data, self.stem))
        try:
            figures(data, self.stem)
        except Exception as err:  # noqa: BLE001 -- a missing matplotlib must not lose the numbers
            log(f"figures failed: {err}")


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def groups(data) -> dict:
    """(molecule, budget_min) -> {impl: result}."""
    out = {}
    for key, r in data["runs"].items():
        molecule, budget, impl = key.split("/")
        out.setdefault((molecule, float(budget)), {})[impl] = r
    order = {m: i for i, m in enumerate(RECIPES)}
    return dict(sorted(out.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])))


def fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def budget_label(minutes: float) -> str:
    return f"{minutes:g}"


def markdown(data, stem) -> str:
    lines = [f"# Accuracy at equal budget: mlpot vs NequIP and MACE ({stem}.json)", "",
             "Each trained by its own command line at the speed benchmark's model size, on the same frames (rMD17 split 01: "
             "train 950 + validation 50 from the training file, test from the test file), one thread pinned to one core, "
             "the same wall-clock training budget; tested through its own ASE calculator. See README.md "
             "(\"Accuracy at equal budget\") for the settings. Energy MAE: total energy per frame; force MAE: over all "
             "components. \"mlpot/this\" = mlpot's test force MAE / this implementation's.", "",
             "| molecule | budget (min) | implementation | energy MAE (meV) | force MAE (meV/Å) | test frames | epochs | "
             "training s (wall) | best val force MAE (meV/Å) | stopped by | mlpot/this force MAE |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    goal_lines = []
    for (molecule, budget), impls in groups(data).items():
        mine = impls.get("mlpot", {}).get("test", {}).get("forces_mae_meV_per_A")
        for impl in [i for i in IMPLS if i in impls]:
            r = impls[impl]
            t = r.get("test") or {}
            f = t.get("forces_mae_meV_per_A")
            ratio = fmt(mine / f, 2) if (mine and f and impl != "mlpot") else "-"
            curve = r.get("curve") or []
            best_val = min((c["val_forces_mae"] for c in curve), default=None)
            train_s = r.get("own_train_s") or (r["train_wall_s"] - r.get("setup_s", 0) if r.get("train_wall_s") else None)
            status = r.get("stopped_by", "-") if not r.get("error") else f"error: {r['error'][:80]}"
            lines.append(f"| {molecule} | {budget_label(budget)} | {LABEL.get(impl, impl)} | {fmt(t.get('energy_mae_meV'))} | "
                         f"{fmt(f)} | {t.get('frames', '-')} | {curve[-1]['epoch'] if curve else '-'} | {fmt(train_s, 0)} | "
                         f"{fmt(best_val)} | {status} | {ratio} |")
        peers = {i: impls[i]["test"]["forces_mae_meV_per_A"] for i in impls
                 if i != "mlpot" and (impls[i].get("test") or {}).get("forces_mae_meV_per_A")}
        if mine and peers:
            best = min(peers, key=peers.get)
            ratio = mine / peers[best]
            goal_lines.append(f"| {molecule} | {budget_label(budget)} | {fmt(mine)} | {LABEL[best]} {fmt(peers[best])} | "
                              f"{ratio:.2f} | {'yes' if ratio <= GOAL else 'no'} |")
    lines += ["", f"Goal: mlpot's test force MAE <= {GOAL}x the best peer's, at every budget and molecule measured.", "",
              "| molecule | budget (min) | mlpot force MAE (meV/Å) | best peer (meV/Å) | mlpot/best peer | "
              f"<= {GOAL}x |", "|---|---|---|---|---|---|", *goal_lines, ""]
    lines += ["Training s: mlpot's own clock (train.max_time counts it); for the peers, wall-clock seconds from the start "
              "of training (MACE: its \"Started training\" line; NequIP: the job's start, so its setup is included) to its "
              "last validation. Figures: accuracy" + ("-quick" if "quick" in stem else "") +
              "-<molecule>-<budget>min.png (validation force MAE against wall-clock seconds since the job started).", ""]
    for (molecule, budget), impls in groups(data).items():
        for impl in [i for i in IMPLS if i in impls]:
            r = impls[impl]
            v = r.get("versions", {})
            lines.append(f"- {molecule} {budget_label(budget)} min {LABEL.get(impl, impl)}: {r.get('date', '?')}, core "
                         f"{r.get('core', '?')}, {', '.join(f'{k} {x}' for k, x in v.items())}; mlpot commit "
                         f"{r.get('git', '?')}; load average at start {r.get('loadavg', '?')}")
    return "\n".join(lines) + "\n"


def figures(data, stem):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix = "accuracy-quick" if "quick" in stem else "accuracy"
    for (molecule, budget), impls in groups(data).items():
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for impl in [i for i in IMPLS if i in impls]:
            curve = impls[impl].get("curve") or []
            if not curve:
                continue
            test = (impls[impl].get("test") or {}).get("forces_mae_meV_per_A")
            label = LABEL.get(impl, impl) + (f" (test {test:.1f})" if test else "")
            ax.plot([c["wall_s"] for c in curve], [c["val_forces_mae"] for c in curve], label=label, lw=1.3)
        ax.axvline(budget * 60, color="0.6", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("wall-clock seconds since the job started")
        ax.set_ylabel("validation force MAE (meV/Å)")
        ax.set_title(f"rMD17 {molecule}, {budget_label(budget)} min budget, 1 thread each")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        fig.savefig(HERE / f"{prefix}-{molecule}-{budget_label(budget)}min.png", dpi=110)
        plt.close(fig)


def git_describe() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "mlpot"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return "?"


def run_job(job: Job, core: int, results: Results, key: str):
    log(f"{key}: training on core {core} (budget {job.budget_s:.0f} s) in {job.dir}")
    result = {"date": now_iso(), "core": core, "budget_s": job.budget_s, "git": git_describe(),
              "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()), "host": platform.node(),
              "frames": {"source": job.frames["source"], "paths": job.frames["paths"],
                         "train": len(job.frames["train_index"]), "val": len(job.frames["val_index"]),
                         "test": len(job.frames["test_index"])}}
    try:
        result["versions"] = job.versions()
        run = train(job, core)
        result.update(run)
        result["settings"] = job.settings()
        log(f"{key}: trained ({run['stopped_by']}, {len(run['curve'])} validations, {run['wall_s']:.0f} s); finalizing")
        model = job.finalize(result, run["killed"])
        result["model"] = model
        log(f"{key}: testing {model} through its ASE calculator")
        result["test"] = test(job, model, core)
        log(f"{key}: test force MAE {result['test']['forces_mae_meV_per_A']:.2f} meV/Å, energy MAE "
            f"{result['test']['energy_mae_meV']:.2f} meV")
    except Exception as err:  # noqa: BLE001 -- recorded with the results, the other jobs go on
        result["error"] = f"{type(err).__name__}: {err}"
        log(f"{key}: FAILED {result['error']}")
    results.add(key, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--molecules", default="ethanol,toluene,aspirin")
    parser.add_argument("--budget", type=float, default=25.0, help="minutes of training per job (default 25)")
    parser.add_argument("--impls", default=DEFAULT_IMPLS, help=f"comma-separated, of {','.join(IMPLS)}")
    parser.add_argument("--jobs", type=int, default=2, help="jobs at once, each on its own core (default 2)")
    parser.add_argument("--cores", default=None, help="cores to pin jobs to (default 0..jobs-1)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (0: mlpot-train's recipes' own split)")
    parser.add_argument("--test-every", type=int, default=None, help="test on every n-th test frame (default 1; quick 10)")
    parser.add_argument("--quick", action="store_true", help="2-minute budget, ethanol, every 10th test frame; "
                        "writes accuracy-quick.* (gitignored)")
    parser.add_argument("--render", action="store_true", help="rewrite the markdown and figures from the json only")
    args = parser.parse_args()

    stem = "accuracy-quick" if args.quick else "accuracy"
    results = Results(stem)
    if args.render:
        results.render()
        print(f"wrote {results.md}")
        return
    if args.quick:
        args.budget = 2.0 if args.budget == 25.0 else args.budget
        args.molecules = "ethanol" if args.molecules == "ethanol,toluene,aspirin" else args.molecules
    test_every = args.test_every or (10 if args.quick else 1)
    molecules = [m for m in args.molecules.split(",") if m]
    impls = [i for i in args.impls.split(",") if i]
    for name in molecules:
        if name not in RECIPES:
            raise SystemExit(f"unknown molecule {name!r} ({', '.join(RECIPES)})")
    for name in impls:
        if name not in JOBS:
            raise SystemExit(f"unknown implementation {name!r} ({', '.join(IMPLS)})")
    cores = [int(c) for c in args.cores.split(",")] if args.cores else list(range(args.jobs))
    if len(cores) < args.jobs:
        raise SystemExit(f"--jobs {args.jobs} needs {args.jobs} cores, --cores gives {len(cores)}")
    tag = "quick" if args.quick else f"{budget_label(args.budget)}min"
    budget_s = args.budget * 60

    tasks = []
    for molecule in molecules:
        frames = write_frames(molecule, args.seed, test_every)
        log(f"{molecule}: frames in {CACHE / molecule} (train {N_TRAIN}, val {N_VAL}, test {len(frames['test_index'])})")
        for impl in impls:
            job = JOBS[impl](impl, molecule, budget_s, frames, args.seed, tag)
            tasks.append((f"{molecule}/{budget_label(args.budget)}/{impl}", job))

    free = queue.Queue()
    for c in cores[:args.jobs]:
        free.put(c)
    threads = []
    for key, job in tasks:
        core = free.get()  # waits for a free core

        def work(key=key, job=job, core=core):
            try:
                run_job(job, core, results, key)
            finally:
                free.put(core)

        t = threading.Thread(target=work, name=key)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    log(f"wrote {results.json}, {results.md}")


if __name__ == "__main__":
    main()
