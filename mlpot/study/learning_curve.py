"""Learning curves: every model at every training-set size under one budget rule, test MAE, log-log slopes.

A *run* is one model trained at one size N with one initialisation ``seed`` (weights and batch order) on
one data ``split`` (rMD17: the split files ``rmd17_<molecule>_{train,test}_0K.npz``, K = 1..5; the N
training frames are drawn from split K's training file with data seed K - 1, and the run is tested on
split K's test file; for a file dataset the split number only changes the data seed). Every row of the
CSV records model, size, seed, split, budget, learning rate and parameter count.

Budget rules (``--budget``), the same for every model and size:

* ``steps`` (default): ``steps`` optimizer steps of ``batch_size`` structures (epochs = ceil(steps /
  ceil(train/batch)), so small sets get many epochs and large sets few), cosine schedule from the
  learning rate to 1e-5, no early stopping. The curves then measure accuracy after a fixed amount of
  work, not data efficiency.
* ``converged``: early stopping on validation. The step cap scales with N, clip(steps_per_frame x N,
  min_steps, max_steps) (default 40 x N within [10000, 40000]); the learning rate is halved after
  patience / 4 epochs without a better validation loss (plateau, down to 1e-6) and the run stops after
  ``patience`` epochs without one (default: 10 % of the epoch cap, at least 20 epochs). ``stopped_by``
  says which ended it (``early_stopping`` or ``epochs``: the cap).
* ``time``: every run trains for ``max_time`` seconds of wall clock (equal wall-clock comparison),
  cosine schedule over that time, no early stopping. Only meaningful on an otherwise idle machine.

In every mode EMA weights are used and the best validation epoch is tested. A size N counts training
configurations as rMD17 does: N = train + validation frames, with validation max(5, round(0.05 N))
frames drawn from the same training file (1000 -> 950 + 50, as in training/*.yaml).

Models: see :mod:`mlpot.study.variants` (``egnn-l1``, ``egnn-l0@150k``, ``gcn+energy``, ...).

Training goes through :func:`mlpot.train.train` (the same loop, checkpoints and metrics as
``mlpot-train``); each finished run appends one row to the CSV, and a rerun skips rows already there
and resumes runs that were interrupted, so a crash loses at most the epoch in progress.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from mlpot import files
from mlpot.data.registry import study_dataset
from mlpot.study import stats
from mlpot.study.common import output_dir, pyplot, write_json
from mlpot.study.variants import RECIPES, parse_lrs, parse_model, resolve  # noqa: F401  (RECIPES, parse_model: API)

DEFAULT_MODELS = "gcn,schnet,egnn-l0,egnn-l1,egnn-l2"
DEFAULT_SIZES = "50,100,250,500,1000"
DEFAULT_STEPS = 4000
BATCH_SIZE = 5
BUDGETS = ("steps", "converged", "time")
CSV_FIELDS = [
    "molecule", "dataset", "model", "kind", "lmax", "num_features", "target_params", "num_parameters", "energy_only",
    "size", "train_size", "val_size", "seed", "split", "data_seed", "budget", "lr", "steps", "max_steps", "patience",
    "steps_run", "epochs_run", "best_epoch", "stopped_by", "train_time_s", "wall_s", "cpu_s", "test_frames",
    "energy_mae_meV", "forces_mae_meV_per_A", "energy_rmse_meV", "forces_rmse_meV_per_A", "val_energy_mae_meV",
    "val_forces_mae_meV_per_A", "run_dir", "note",
]
RMD17_PREFIX = "rmd17_"


@dataclass(frozen=True)
class Budget:
    """How long each run trains (see the module docstring)."""

    mode: str = "steps"
    steps: int = DEFAULT_STEPS  # steps: the fixed number of optimizer steps
    steps_per_frame: float = 40.0  # converged: the step cap is clip(steps_per_frame x N, min_steps, max_steps)
    min_steps: int = 10000
    max_steps: int = 40000
    patience: Optional[int] = None  # converged: epochs without a better validation loss; None: 10 % of the cap, >= 20
    max_time: Optional[float] = None  # seconds: the time budget (time), or an extra cap (steps, converged)

    def __post_init__(self):
        if self.mode not in BUDGETS:
            raise ValueError(f"budget {self.mode!r} is not one of {', '.join(BUDGETS)}")
        if self.mode == "time" and not self.max_time:
            raise ValueError("--budget time needs --max-time SECONDS")
        if self.mode == "converged" and not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"converged budget: need 1 <= min_steps ({self.min_steps}) <= max_steps ({self.max_steps})")
        if self.mode == "steps" and self.steps < 1:
            raise ValueError("--steps must be at least 1")

    @property
    def label(self) -> str:
        """A short name of the rule, part of every row's key and run folder."""
        cap = f"-t{self.max_time:g}" if self.max_time else ""
        if self.mode == "steps":
            return f"steps{self.steps}{cap}"
        if self.mode == "converged":
            patience = f"-p{self.patience}" if self.patience else ""
            return f"conv{self.steps_per_frame:g}x{self.min_steps}-{self.max_steps}{patience}{cap}"
        return f"time{self.max_time:g}s"

    def step_cap(self, size: int) -> Optional[int]:
        if self.mode == "steps":
            return self.steps
        if self.mode == "converged":
            return int(min(max(round(self.steps_per_frame * size), self.min_steps), self.max_steps))
        return None

    def patience_epochs(self, epochs: int) -> int:
        return int(self.patience) if self.patience else max(20, math.ceil(0.1 * epochs))

    def train_settings(self, size: int, train_size: int) -> dict:
        """The ``train`` keys of a run of N = ``size`` with ``train_size`` training frames."""
        steps_per_epoch = math.ceil(train_size / BATCH_SIZE)
        if self.mode == "time":
            return {"epochs": 10**7, "max_time": self.max_time, "scheduler": "cosine", "warmup_epochs": 0,
                    "min_lr": 1.0e-5, "early_stopping_patience": None}
        epochs = max(1, math.ceil(self.step_cap(size) / steps_per_epoch))
        if self.mode == "steps":
            return {"epochs": epochs, "max_time": self.max_time, "scheduler": "cosine",
                    "warmup_epochs": int(round(0.02 * epochs)), "min_lr": 1.0e-5, "early_stopping_patience": None}
        patience = self.patience_epochs(epochs)
        return {"epochs": epochs, "max_time": self.max_time, "scheduler": "plateau", "lr_factor": 0.5,
                "lr_patience": max(2, patience // 4), "min_lr": 1.0e-6, "early_stopping_patience": patience}

    def describe(self) -> str:
        if self.mode == "steps":
            return (f"fixed {self.steps} optimizer steps of {BATCH_SIZE} per run; epochs = ceil(steps / ceil(train/batch)); "
                    "cosine LR to 1e-5 (2 % warm-up); no early stopping")
        if self.mode == "converged":
            p = f"{self.patience} epochs" if self.patience else "10 % of the epoch cap (at least 20 epochs)"
            return (f"early stopping on validation: step cap clip({self.steps_per_frame:g} x N, {self.min_steps}, "
                    f"{self.max_steps}); plateau LR (x0.5 after patience/4 epochs, down to 1e-6); stop after {p} "
                    "without a better validation loss")
        return f"{self.max_time:g} s of training per run (equal wall clock); cosine LR over the time; no early stopping"


def split_sizes(size: int) -> tuple:
    """N training configurations -> (train, validation) frames."""
    val = max(5, int(round(0.05 * size)))
    if size - val < 1:
        raise ValueError(f"size {size} is too small: it must leave at least one training frame after {val} validation frames")
    return size - val, val


def is_rmd17(dataset: str) -> bool:
    return not Path(dataset).is_file() and str(dataset).startswith(RMD17_PREFIX)


def make_config(recipe: dict, dataset: str, size: int, steps: int, run_dir, seed: int = 0, test_size: Optional[int] = None,
                max_time: Optional[float] = None, threads: Optional[int] = 1, data_dir=None, overrides: Sequence[str] = (),
                test_dataset: Optional[str] = None, budget: Optional[Budget] = None, split: Optional[int] = None,
                data_seed: Optional[int] = None, lr: Optional[float] = None):
    """The mlpot.train Config of one run under the budget rule.

    ``seed`` seeds the initialisation and batch order, ``data_seed`` (default: ``seed``) the draw of
    train/val (and test) frames; ``split`` (rMD17) picks the split file. ``budget`` defaults to ``steps``
    fixed steps (with ``max_time`` as an extra cap); ``lr`` to the recipe's rate."""
    from mlpot.train.config import config_from_dict

    budget = budget or Budget("steps", steps=steps, max_time=max_time)
    train_size, val_size = split_sizes(size)
    data = {"dataset": dataset, "test_dataset": test_dataset, "train_size": train_size, "val_size": val_size,
            "test_size": test_size, "seed": seed if data_seed is None else data_seed, "data_dir": data_dir}
    if split is not None and is_rmd17(dataset):
        data["index"] = int(split)
    raw = {
        "data": data,
        "model": {"kind": recipe["kind"], "cutoff": 5.0, "dtype": "float32", "hparams": dict(recipe["hparams"])},
        "train": {
            "batch_size": BATCH_SIZE, "lr": recipe["lr"] if lr is None else float(lr),
            "forces_weight": 0.0 if recipe.get("energy_only") else 100.0, "ema_decay": 0.99,
            "num_threads": threads, "seed": seed, "device": "cpu", **budget.train_settings(size, train_size),
        },
        "run_dir": str(run_dir),
    }
    return config_from_dict(raw, list(overrides))


def _read_rows(path: Path) -> List[dict]:
    """The CSV's rows; none before the first run has written it."""
    return stats.read_rows(path) if path.is_file() else []


def _upgrade(row: dict) -> dict:
    """A row of an older CSV in today's columns: split 1, data seed = seed, budget steps<steps>."""
    row = dict(row)
    row.setdefault("split", "1")
    row["split"] = row["split"] or "1"
    if not row.get("data_seed"):
        row["data_seed"] = row.get("seed", "0")
    row["budget"] = stats.budget_of(row)
    return row


def _append_row(path: Path, row: dict) -> None:
    """Append ``row``; a file with other columns (an older version's) is first rewritten in today's."""
    header = None
    if path.is_file() and path.stat().st_size > 0:
        with open(path, newline="") as fh:
            header = next(csv.reader(fh), None)
    if header is not None and header != CSV_FIELDS:
        old = [_upgrade(r) for r in _read_rows(path)]

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
                writer.writeheader()
                for r in old:
                    writer.writerow({k: r.get(k, "") for k in CSV_FIELDS})

        files.atomic_write(path, write)
        header = CSV_FIELDS
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        if header is None:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in CSV_FIELDS})
        fh.flush()


def kept_log_path(folder: Path, model: str, run_dir) -> Path:
    """Where the learning curve keeps a copy of a run's per-epoch log.csv: ``folder/logs/<model>/<run>.csv.gz``."""
    return Path(folder) / "logs" / model / f"{Path(run_dir).name}.csv.gz"


def keep_log(folder: Path, model: str, run_dir) -> None:
    """Copy the run's log.csv (gzipped) beside the learning-curve CSV, which is committed while run folders
    are not, so that per-epoch curves (``mlpot study protocol``) outlive the run folder."""
    import gzip

    source, target = Path(run_dir) / "log.csv", kept_log_path(folder, model, run_dir)
    if not source.is_file() or target.is_file():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    data = source.read_bytes()
    files.atomic_write(target, lambda tmp: tmp.write_bytes(gzip.compress(data, mtime=0)))


def lr_text(lr: float) -> str:
    return f"{float(lr):.3g}"


def row_key(row: dict) -> tuple:
    """What identifies a run in the CSV: model, size, seed, split, budget label, learning rate."""
    r = _upgrade(row)
    lr = lr_text(r["lr"]) if r.get("lr") not in (None, "") else ""
    return r["model"], int(r["size"]), int(r["seed"]), int(r["split"]), r["budget"], lr


def train_one(cfg, progress: bool = False) -> dict:
    """Train (or resume, or just read) the run of ``cfg``; returns its metrics.json content (plus
    ``resumed``: whether it continued an interrupted run)."""
    from mlpot.train import train

    run_dir = Path(cfg.run_dir)
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file() and (run_dir / "model.pt").is_file():
        return {**json.loads(metrics_path.read_text()), "resumed": "finished before"}
    resume = (run_dir / "last.pt").is_file() or (run_dir / "config.yaml").is_file()
    try:
        return {**train(cfg, resume=resume, progress=progress), "resumed": "resumed" if resume else ""}
    except Exception as err:  # noqa: BLE001 - only a failure after testing is tolerated, see below
        # finish() writes metrics.json (the test of the best weights) before it compiles model.pt: a
        # model that trains and tests but does not compile to TorchScript still gives its learning-curve point
        last = run_dir / "last.pt"
        if metrics_path.is_file() and last.is_file() and metrics_path.stat().st_mtime >= last.stat().st_mtime:
            print(f"warning: {run_dir}: tested, but writing model.pt failed ({type(err).__name__}: "
                  f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); using metrics.json", flush=True)
            metrics = json.loads(metrics_path.read_text())
            metrics["note"] = f"model.pt not written: {type(err).__name__}"
            return metrics
        raise


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (compile workers), user + system."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def fit_slopes(rows: List[dict], key: str, n_boot: int = 2000, seed: int = 0) -> Dict[str, dict]:
    """Slope of log10(mean MAE over runs) against log10(N) per model, with its bootstrap CI (see
    :func:`mlpot.study.stats.slope_ci`); ``mae`` and ``std`` are the per-size mean and spread."""
    fits = stats.slopes(rows, key, n_boot, seed)
    agg = stats.aggregate(rows, key)
    for name, fit in fits.items():
        fit["mae"] = fit["mean"]
        fit["std_per_size"] = [agg[name][n]["std"] for n in fit["sizes"]]
    return fits


def plot(rows: List[dict], path: Path, title: str = "", fits: Optional[Dict[str, dict]] = None) -> Dict[str, dict]:
    """Log-log test MAE (energy, forces) against N: every run (faint), the mean over runs with error bars
    of one standard deviation, fitted lines with the slope and its bootstrap CI; returns the fits."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    fits = dict(fits or {})
    groups = stats.series(rows)
    for ax, key in zip(axes, stats.METRICS):
        if key not in fits:
            fits[key] = fit_slopes(rows, key)
        agg = stats.aggregate(rows, key)
        if len({int(r["size"]) for r in rows}) == 1:  # one size (an lr search): give the x axis a width
            ax.set_xscale("log")
            ax.set_xlim(int(rows[0]["size"]) / 1.5, int(rows[0]["size"]) * 1.5)
        for i, (name, rs) in enumerate(groups.items()):
            color = f"C{i % 10}"
            points = [(int(r["size"]), float(r[key])) for r in rs if stats._value(r, key) is not None]
            ax.loglog([p[0] for p in points], [p[1] for p in points], ".", color=color, alpha=0.3)
            per = agg.get(name, {})
            sizes = sorted(per)
            fit = fits[key].get(name)
            label = name
            if fit:
                ci = f" [{fit['ci'][0]:.2f}, {fit['ci'][1]:.2f}]" if fit.get("ci") else ""
                label = f"{name} (slope {fit['slope']:.2f}{ci})"
                xs = np.array([fit["sizes"][0], fit["sizes"][-1]], dtype=float)
                ax.loglog(xs, 10 ** (fit["intercept"] + fit["slope"] * np.log10(xs)), "-", color=color, lw=1)
            ax.errorbar(sizes, [per[n]["mean"] for n in sizes], yerr=[per[n]["std"] for n in sizes], fmt="o",
                        color=color, ms=4, capsize=3, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set(xlabel="training configurations N", ylabel=stats.METRICS[key])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fits


def format_table(rows: List[dict]) -> str:
    """Mean ± std (n) of the test energy and force MAE per model and size."""
    agg_e, agg_f = stats.aggregate(rows, "energy_mae_meV"), stats.aggregate(rows, "forces_mae_meV_per_A")
    sizes = sorted({int(r["size"]) for r in rows})
    params = {}
    for r in rows:
        params.setdefault(next(n for n, rs in stats.series(rows).items() if r in rs), r.get("num_parameters", ""))
    width = max([10] + [len(n) + 1 for n in agg_e])
    lines = ["test energy MAE meV / force MAE meV/Å: mean ± std over runs (n)",
             "model".ljust(width) + "params".rjust(8) + "".join(f"N={s}".rjust(26) for s in sizes)]
    for name in agg_e:
        cells = []
        for s in sizes:
            e, f = agg_e[name].get(s), agg_f.get(name, {}).get(s)
            if e and f:
                cells.append(f"{e['mean']:.1f}±{e['std']:.1f} / {f['mean']:.1f}±{f['std']:.1f} ({e['n']})".rjust(26))
            else:
                cells.append("-".rjust(26))
        lines.append(name.ljust(width) + str(params.get(name, "")).rjust(8) + "".join(cells))
    return "\n".join(lines)


def _ints(text, option: str) -> List[int]:
    """A comma list of integers given to ``option``; a ValueError naming the option otherwise."""
    try:
        return [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"{option} {text!r}: give a comma list of integers") from None


def replicates(seeds: Sequence[int], splits: Sequence[int], pairing: str = "product") -> List[tuple]:
    """(seed, split) pairs: every combination (``product``) or the i-th seed with the i-th split (``zip``)."""
    if pairing == "zip":
        if len(seeds) != len(splits):
            raise ValueError(f"--pairing zip needs as many seeds ({len(seeds)}) as splits ({len(splits)})")
        return list(zip(seeds, splits))
    if pairing != "product":
        raise ValueError(f"--pairing {pairing!r}: product or zip")
    return [(seed, split) for split in splits for seed in seeds]


def dataset_species(dataset: str, data_dir=None) -> List[int]:
    """The elements of a dataset's training frames (what the embedding sizes, and so parameter counts, depend on)."""
    from mlpot.study.common import load_frames

    frames = load_frames(dataset, "train", data_dir=data_dir)
    return sorted({int(z) for zs in frames.numbers for z in zs})


def run_learning_curve(
    molecule: str = "ethanol", models: str = DEFAULT_MODELS, sizes: str = DEFAULT_SIZES, steps: int = DEFAULT_STEPS,
    max_time: Optional[float] = None, seeds: str = "0", dataset: Optional[str] = None, test_size: Optional[int] = None,
    output=None, runs_dir=None, data_dir=None, threads: int = 1, overrides: Sequence[str] = (), progress: bool = False,
    test_dataset: Optional[str] = None, splits: str = "1", pairing: str = "product", budget: str = "steps",
    steps_per_frame: float = 40.0, min_steps: int = 10000, max_steps: int = 40000, patience: Optional[int] = None,
    lr=None, csv_name: str = "learning_curve.csv", n_boot: int = 2000, compare: Sequence[str] = (),
    write_summary: bool = True,
) -> dict:
    """Train every (model, size, seed, split), append results to ``csv_name`` in ``output``, plot with
    error bars, fit slopes with bootstrap CIs, run the paired tests of ``compare`` (``a,b`` strings).
    ``write_summary=False`` writes only the CSV (the lr search writes its own summary files)."""
    dataset = dataset or study_dataset(molecule)
    rule = Budget(budget, steps=steps, steps_per_frame=steps_per_frame, min_steps=min_steps, max_steps=max_steps,
                  patience=patience, max_time=max_time)
    model_names = [m.strip() for m in str(models).split(",") if m.strip()]
    recipes = [parse_model(m) for m in model_names]
    lrs = parse_lrs(lr, model_names)
    size_list = _ints(sizes, "--sizes")
    seed_list, split_list = _ints(seeds, "--seeds"), _ints(splits, "--splits")
    reps = replicates(seed_list, split_list, pairing)
    for s in size_list:
        split_sizes(s)
    for _, split in reps:
        if is_rmd17(dataset) and not 1 <= split <= 5:
            raise ValueError(f"--splits: rMD17 splits are 1..5, got {split}")
    pairs = stats.parse_compare(compare)
    species = dataset_species(dataset, data_dir)
    recipes = [resolve(r, species) for r in recipes]
    out = output_dir(output, f"mlpot-study-learning-curve-{molecule}")
    runs = Path(runs_dir or Path("runs") / "study" / f"learning-curve-{molecule}")
    csv_path = out / csv_name
    done = {row_key(r) for r in _read_rows(csv_path)}
    t_start, cpu_start = time.perf_counter(), cpu_seconds()
    todo = [(rec, n, seed, split) for n in size_list for rec in recipes for seed, split in reps]
    wanted = set()
    for k, (recipe, size, seed, split) in enumerate(todo, 1):
        rate = lrs[recipe["name"]] if lrs[recipe["name"]] is not None else recipe["lr"]
        key = (recipe["name"], size, seed, split, rule.label, lr_text(rate))
        wanted.add(key)
        tag = f"[{k}/{len(todo)}] {recipe['name']} N={size} seed {seed} split {split}"
        run_dir = runs / recipe["name"] / f"n{size}-split{split}-seed{seed}-{rule.label}-lr{lr_text(rate)}"
        if key in done:
            keep_log(out, recipe["name"], run_dir)  # a run of an older version that kept none, if its folder is here
            print(f"{tag}: already in {csv_path}, skipped", flush=True)
            continue
        data_seed = split - 1
        cfg = make_config(recipe, dataset, size, steps, run_dir, seed, test_size, max_time, threads, data_dir, overrides,
                          test_dataset, budget=rule, split=split, data_seed=data_seed, lr=rate)
        tic, cpu0 = time.perf_counter(), cpu_seconds()
        metrics = train_one(cfg, progress)
        wall, cpu = time.perf_counter() - tic, cpu_seconds() - cpu0
        steps_per_epoch = math.ceil(cfg.data.train_size / cfg.train.batch_size)
        test = metrics["test"]
        note = "; ".join(x for x in (metrics.get("note", ""), metrics.get("resumed", "")) if x)
        row = {
            "molecule": molecule, "dataset": dataset, "model": recipe["name"], "kind": recipe["kind"],
            "lmax": cfg.model.hparams.get("lmax", ""), "num_features": cfg.model.hparams.get("num_features", ""),
            "target_params": recipe.get("target_params") or "", "num_parameters": metrics["num_parameters"],
            "energy_only": int(bool(recipe.get("energy_only"))), "size": size, "train_size": cfg.data.train_size,
            "val_size": cfg.data.val_size, "seed": seed, "split": split, "data_seed": data_seed, "budget": rule.label,
            "lr": lr_text(cfg.train.lr), "steps": steps if rule.mode == "steps" else "",
            "max_steps": rule.step_cap(size) or "", "patience": cfg.train.early_stopping_patience or "",
            "steps_run": metrics["epochs_run"] * steps_per_epoch, "epochs_run": metrics["epochs_run"],
            "best_epoch": metrics["best_epoch"], "stopped_by": metrics["stopped_by"],
            "train_time_s": metrics["train_time_s"], "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "test_frames": test["num_structures"], "energy_mae_meV": round(test["energy_mae_meV"], 4),
            "forces_mae_meV_per_A": round(test["forces_mae_meV_per_A"], 4),
            "energy_rmse_meV": round(test["energy_rmse_meV"], 4),
            "forces_rmse_meV_per_A": round(test["forces_rmse_meV_per_A"], 4),
            "val_energy_mae_meV": round(metrics["val"]["energy_mae_meV"], 4),
            "val_forces_mae_meV_per_A": round(metrics["val"]["forces_mae_meV_per_A"], 4), "run_dir": str(run_dir), "note": note,
        }
        _append_row(csv_path, row)
        keep_log(out, recipe["name"], run_dir)
        print(
            f"{tag}: E MAE {row['energy_mae_meV']:.2f} meV, F MAE {row['forces_mae_meV_per_A']:.2f} meV/Å, "
            f"{row['steps_run']} steps ({row['stopped_by']}), {wall:.0f} s wall, {cpu:.0f} s CPU "
            f"(total {time.perf_counter() - t_start:.0f} s)",
            flush=True,
        )
    rows = [r for r in _read_rows(csv_path) if row_key(r) in wanted]
    title = (f"{molecule} ({dataset}): budget {rule.label}, {len(reps)} seed/split replicate(s), "
             f"test on {rows[0]['test_frames'] if rows else '?'} frames; error bars: 1 std over runs")
    fits = {key: fit_slopes(rows, key, n_boot) for key in stats.METRICS}
    stem = Path(csv_name).stem
    if write_summary:
        plot(rows, out / f"{stem}.png", title, fits)
    paired = [stats.paired_test(rows, key, a, b) for a, b in pairs for key in stats.METRICS]
    summary = {
        "molecule": molecule, "dataset": dataset, "models": model_names, "sizes": size_list,
        "seeds": seed_list, "splits": split_list, "pairing": pairing, "replicates": reps,
        "budget": {"mode": rule.mode, "label": rule.label, "steps": steps if rule.mode == "steps" else None,
                   "steps_per_frame": steps_per_frame, "min_steps": min_steps, "max_steps": max_steps,
                   "patience": patience, "batch_size": BATCH_SIZE, "max_time_s": max_time,
                   "rule": rule.describe() + "; best-validation EMA weights tested; N = train + val (val = max(5, 5% of N))"},
        "learning_rates": {r["name"]: (lrs[r["name"]] if lrs[r["name"]] is not None else r["lr"]) for r in recipes},
        "parameters": {r["name"]: r["num_parameters"] for r in recipes},
        "widths": {r["name"]: r["hparams"].get("num_features") for r in recipes},
        "overrides": list(overrides),
        "slopes": {k: {m: round(v["slope"], 4) for m, v in f.items()} for k, f in fits.items()},
        "slope_ci": {k: {m: v["ci"] for m, v in f.items()} for k, f in fits.items()},
        "fits": fits,
        "aggregate": {key: stats.aggregate(rows, key) for key in stats.METRICS},
        "paired": paired,
        "wall_s_this_call": round(time.perf_counter() - t_start, 1),
        "cpu_s_this_call": round(cpu_seconds() - cpu_start, 1),
        "cpu_s_of_rows": round(sum(float(r["cpu_s"]) for r in rows if r.get("cpu_s")), 1),
        "rows": len(rows),
    }
    text = format_table(rows)
    if write_summary:
        write_json(out / f"{stem}.json", summary)
        files.write_text(out / f"{stem}.md", stats.markdown(
            {"csv": str(csv_path), "level": 0.95, "groups": stats.analyse(rows, pairs, n_boot)}) + "\n")
    print(text)
    for key, fit in fits.items():
        print(f"slopes of log {key} vs log N [95 % bootstrap CI]: " + ", ".join(
            f"{m} {v['slope']:.2f}" + (f" [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}]" if v["ci"] else "") for m, v in fit.items()))
    for test in paired:
        s = test["pooled"]
        if s["n"]:
            print(f"paired {test['metric']}: {test['b']}/{test['a']} = {s['ratio_b_over_a']:.3f} over {s['n']} runs, "
                  f"Wilcoxon p {stats._fmt_p(s['wilcoxon_p'])}, paired t p {stats._fmt_p(s['t_p'])}")
    print(f"wrote {csv_path}" + (f", {out / f'{stem}.png'}, {out / f'{stem}.json'}, {out / f'{stem}.md'}"
                                 if write_summary else ""))
    summary["csv"] = str(csv_path)
    summary["table"] = rows
    return summary
