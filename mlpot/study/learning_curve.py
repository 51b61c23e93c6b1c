"""Learning curves: every model at every training-set size under one budget rule, test MAE, log-log slopes.

Budget rule (the same for every model and size): ``steps`` optimizer steps of ``batch_size`` structures
(epochs = ceil(steps / ceil(train_size / batch_size)), so small sets get many epochs and large sets few),
cosine schedule from the recipe's learning rate to 1e-5 over those epochs, no early stopping, EMA weights,
the best validation epoch is tested. ``max_time`` (seconds of training) optionally caps each run too.
For converged curves, ``patience`` turns on early stopping on validation and ``steps_per_config`` scales the
budget with N (max(steps, steps_per_config * N) steps); ``splits`` picks rMD17 splits (1-5) beside the seeds, and
every figure and table shows the mean and spread over them (statistics in :mod:`mlpot.study.stats`).
A "size" N counts training configurations as rMD17 does: N = train + validation frames, with
validation max(5, round(0.05 N)) frames drawn from the same training file (1000 -> 950 + 50, as in
training/*.yaml). Every run is tested on the same frames: the dataset's test file (rMD17 split 01's
1000 frames), or a fixed random subset of ``test_size`` of them.

Training goes through :func:`mlpot.train.train` (the same loop, checkpoints and metrics as
``mlpot-train``); each finished run appends one row to the CSV, and a rerun skips rows already there
and resumes runs that were interrupted, so a crash loses at most the run in progress.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from mlpot.data.registry import study_dataset
from mlpot.study.common import output_dir, pyplot, write_json
from mlpot.study.stats import aggregate

# Hyperparameters and learning rates of the recipes in training/<molecule>-<kind>.yaml.
RECIPES: Dict[str, dict] = {
    "gcn": {"kind": "gcn", "hparams": {"num_features": 64, "num_layers": 3}, "lr": 1.0e-3},
    "schnet": {"kind": "schnet", "hparams": {"num_features": 64, "num_layers": 3}, "lr": 1.0e-3},
    "egnn": {"kind": "egnn", "hparams": {"num_features": 32, "lmax": 2, "num_layers": 3, "parity": False}, "lr": 5.0e-3},
}
DEFAULT_MODELS = "gcn,schnet,egnn-l0,egnn-l1,egnn-l2"
DEFAULT_SIZES = "50,100,250,500,1000"
DEFAULT_STEPS = 4000
BATCH_SIZE = 5
CSV_FIELDS = [
    "molecule", "dataset", "model", "kind", "lmax", "size", "train_size", "val_size", "seed", "split", "steps", "patience",
    "steps_run", "epochs_run", "best_epoch", "stopped_by", "train_time_s", "wall_s", "num_parameters",
    "test_frames", "energy_mae_meV", "forces_mae_meV_per_A", "energy_rmse_meV", "forces_rmse_meV_per_A", "run_dir", "note",
]


def parse_model(name: str, base_hparams: Optional[dict] = None) -> dict:
    """``gcn``, ``schnet``, ``egnn`` or ``egnn-lK`` (the egnn recipe with lmax=K) -> kind, hparams, lr."""
    name = name.strip()
    kind, _, suffix = name.partition("-")
    if kind not in RECIPES:
        raise ValueError(f"unknown model {name!r}: use gcn, schnet, egnn or egnn-lK (K = 0..3)")
    recipe = {**RECIPES[kind], "hparams": dict(base_hparams if base_hparams is not None else RECIPES[kind]["hparams"])}
    if suffix:
        if kind != "egnn" or not suffix.startswith("l") or not suffix[1:].isdigit():
            raise ValueError(f"unknown model {name!r}: only egnn takes a suffix, -lK with K = 0..3")
        lmax = int(suffix[1:])
        if not 0 <= lmax <= 3:
            raise ValueError(f"{name}: lmax must be 0..3")
        recipe["hparams"]["lmax"] = lmax
    recipe["name"] = name
    return recipe


def split_sizes(size: int) -> tuple:
    """N training configurations -> (train, validation) frames."""
    val = max(5, int(round(0.05 * size)))
    if size - val < 1:
        raise ValueError(f"size {size} is too small: it must leave at least one training frame after {val} validation frames")
    return size - val, val


def make_config(recipe: dict, dataset: str, size: int, steps: int, run_dir, seed: int = 0, test_size: Optional[int] = None,
                max_time: Optional[float] = None, threads: Optional[int] = 1, data_dir=None, overrides: Sequence[str] = (),
                test_dataset: Optional[str] = None, split: int = 1, patience: Optional[int] = None):
    """The mlpot.train Config of one run under the budget rule (``split``: the rMD17 split whose training and
    test indices are used; ``patience``: stop after that many epochs without a better validation loss)."""
    from mlpot.train.config import config_from_dict

    train_size, val_size = split_sizes(size)
    steps_per_epoch = math.ceil(train_size / BATCH_SIZE)
    epochs = max(1, math.ceil(steps / steps_per_epoch))
    raw = {
        "data": {"dataset": dataset, "test_dataset": test_dataset, "train_size": train_size, "val_size": val_size,
                 "test_size": test_size, "seed": seed, "data_dir": data_dir, "index": split},
        "model": {"kind": recipe["kind"], "cutoff": 5.0, "dtype": "float32", "hparams": dict(recipe["hparams"])},
        "train": {
            "epochs": epochs, "max_time": max_time, "batch_size": BATCH_SIZE, "lr": recipe["lr"], "scheduler": "cosine",
            "warmup_epochs": int(round(0.02 * epochs)), "min_lr": 1.0e-5, "forces_weight": 100.0, "ema_decay": 0.99,
            "early_stopping_patience": patience, "num_threads": threads, "seed": seed, "device": "cpu",
        },
        "run_dir": str(run_dir),
    }
    return config_from_dict(raw, list(overrides))


def _read_rows(path: Path) -> List[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _row_key(r: dict) -> tuple:
    """(model, size, seed, split, steps, patience) of a CSV row; rows written before splits and patience
    existed were split 1 without early stopping."""
    return (r["model"], int(r["size"]), int(r["seed"]), int(r.get("split") or 1), int(r["steps"]), int(r.get("patience") or 0))


def _append_row(path: Path, row: dict) -> None:
    new = not path.is_file() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as fh:
            header = next(csv.reader(fh), [])
        if header != CSV_FIELDS:  # a file from before a column was added: rewrite it with today's columns first
            old_rows = _read_rows(path)
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
                writer.writeheader()
                for r in old_rows:
                    writer.writerow({k: r.get(k, "") for k in CSV_FIELDS})
            tmp.replace(path)
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in CSV_FIELDS})
        fh.flush()


def train_one(cfg, progress: bool = False) -> dict:
    """Train (or resume, or just read) the run of ``cfg``; returns its metrics.json content."""
    from mlpot.train import train

    run_dir = Path(cfg.run_dir)
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file() and (run_dir / "model.pt").is_file():
        return json.loads(metrics_path.read_text())
    resume = (run_dir / "last.pt").is_file() or (run_dir / "config.yaml").is_file()
    try:
        return train(cfg, resume=resume, progress=progress)
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


def fit_slopes(rows: List[dict], key: str) -> Dict[str, dict]:
    """Slope of log10(mean MAE) against log10(N) per model, with its 95 % bootstrap interval (runs resampled
    within each size; see :func:`mlpot.study.stats.slope_with_ci`)."""
    from mlpot.study.stats import slope_with_ci

    fits = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        fit = slope_with_ci(rows, key, model)
        if fit is not None:
            fits[model] = fit
    return fits


def plot(rows: List[dict], path: Path, title: str = "") -> Dict[str, dict]:
    """Log-log test MAE (energy, forces) against N with fitted lines; returns the fits."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    fits = {}
    for ax, key, label in ((axes[0], "energy_mae_meV", "energy MAE (meV)"),
                           (axes[1], "forces_mae_meV_per_A", "force MAE (meV/Å)")):
        fits[key] = fit_slopes(rows, key)
        for i, model in enumerate(dict.fromkeys(r["model"] for r in rows)):
            color = f"C{i}"
            per_size = aggregate(rows, key).get(model, {})
            fit = fits[key].get(model)
            sizes = list(per_size)
            ax.errorbar(sizes, [per_size[n]["mean"] for n in sizes], yerr=[per_size[n]["std"] for n in sizes],
                        fmt="o", color=color, capsize=3, label=None if fit else model)
            ax.set_xscale("log")
            ax.set_yscale("log")
            if fit:
                xs = np.array([fit["sizes"][0], fit["sizes"][-1]], dtype=float)
                ax.loglog(xs, 10 ** (fit["intercept"] + fit["slope"] * np.log10(xs)), "-", color=color,
                          label=f"{model} (slope {fit['slope']:.2f} [{fit['ci'][0]:.2f}, {fit['ci'][1]:.2f}])")
        ax.set(xlabel="training configurations N", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fits


def format_table(rows: List[dict]) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows))
    sizes = sorted({int(r["size"]) for r in rows})
    lines = ["test energy MAE meV / force MAE meV/Å (mean over runs; ± sample std when there are several)",
             "model".ljust(10) + "".join(f"N={s}".rjust(24) for s in sizes)]
    for m in models:
        cells = []
        for s in sizes:
            hit = [r for r in rows if r["model"] == m and int(r["size"]) == s]
            if hit:
                e = np.array([float(r["energy_mae_meV"]) for r in hit])
                f = np.array([float(r["forces_mae_meV_per_A"]) for r in hit])
                cell = f"{e.mean():.1f} / {f.mean():.1f}"
                if len(hit) > 1:
                    cell += f" ±{e.std(ddof=1):.1f}/{f.std(ddof=1):.1f}"
                cells.append(cell.rjust(24))
            else:
                cells.append("-".rjust(24))
        lines.append(m.ljust(10) + "".join(cells))
    return "\n".join(lines)


def run_learning_curve(
    molecule: str = "ethanol", models: str = DEFAULT_MODELS, sizes: str = DEFAULT_SIZES, steps: int = DEFAULT_STEPS,
    max_time: Optional[float] = None, seeds: str = "0", dataset: Optional[str] = None, test_size: Optional[int] = None,
    output=None, runs_dir=None, data_dir=None, threads: int = 1, overrides: Sequence[str] = (), progress: bool = False,
    test_dataset: Optional[str] = None, splits: str = "1", patience: Optional[int] = None, steps_per_config: float = 0.0,
) -> dict:
    """Train every (model, size, split, seed), append results to ``learning_curve.csv`` in ``output``, plot, fit slopes.

    ``patience`` turns on early stopping on validation; ``steps_per_config`` scales the step budget with N
    (each run gets max(steps, steps_per_config * N) steps), so that small and large sets can both converge."""
    dataset = dataset or study_dataset(molecule)
    model_names = [m.strip() for m in str(models).split(",") if m.strip()]
    recipes = [parse_model(m) for m in model_names]
    size_list = [int(s) for s in str(sizes).split(",") if s.strip()]
    seed_list = [int(s) for s in str(seeds).split(",") if s.strip()]
    split_list = [int(s) for s in str(splits).split(",") if s.strip()]
    for s in size_list:
        split_sizes(s)
    out = output_dir(output, f"mlpot-study-learning-curve-{molecule}")
    runs = Path(runs_dir or Path("runs") / "study" / f"learning-curve-{molecule}")
    csv_path = out / "learning_curve.csv"
    done = {_row_key(r) for r in _read_rows(csv_path)}
    t_start = time.perf_counter()
    todo = [(rec, n, split, seed) for n in size_list for rec in recipes for split in split_list for seed in seed_list]
    for k, (recipe, size, split, seed) in enumerate(todo, 1):
        run_steps = max(steps, int(math.ceil(steps_per_config * size)))
        key = (recipe["name"], size, seed, split, run_steps, patience or 0)
        label = f"{recipe['name']} N={size} split {split} seed {seed}"
        if key in done:
            print(f"[{k}/{len(todo)}] {label}: already in {csv_path}, skipped", flush=True)
            continue
        name = f"n{size}-seed{seed}-steps{run_steps}" + (f"-split{split}" if split != 1 else "") + (f"-patience{patience}" if patience else "")
        run_dir = runs / recipe["name"] / name
        cfg = make_config(recipe, dataset, size, run_steps, run_dir, seed, test_size, max_time, threads, data_dir, overrides,
                          test_dataset, split, patience)
        tic = time.perf_counter()
        metrics = train_one(cfg, progress)
        wall = time.perf_counter() - tic
        steps_per_epoch = math.ceil(cfg.data.train_size / cfg.train.batch_size)
        test = metrics["test"]
        row = {
            "molecule": molecule, "dataset": dataset, "model": recipe["name"], "kind": recipe["kind"],
            "lmax": cfg.model.hparams.get("lmax", ""), "size": size, "train_size": cfg.data.train_size,
            "val_size": cfg.data.val_size, "seed": seed, "split": split, "steps": run_steps, "patience": patience or "",
            "steps_run": metrics["epochs_run"] * steps_per_epoch, "epochs_run": metrics["epochs_run"],
            "best_epoch": metrics["best_epoch"], "stopped_by": metrics["stopped_by"],
            "train_time_s": metrics["train_time_s"], "wall_s": round(wall, 1), "num_parameters": metrics["num_parameters"],
            "test_frames": test["num_structures"], "energy_mae_meV": round(test["energy_mae_meV"], 4),
            "forces_mae_meV_per_A": round(test["forces_mae_meV_per_A"], 4),
            "energy_rmse_meV": round(test["energy_rmse_meV"], 4),
            "forces_rmse_meV_per_A": round(test["forces_rmse_meV_per_A"], 4), "run_dir": str(run_dir),
            "note": metrics.get("note", ""),
        }
        _append_row(csv_path, row)
        print(
            f"[{k}/{len(todo)}] {label}: E MAE {row['energy_mae_meV']:.2f} meV, "
            f"F MAE {row['forces_mae_meV_per_A']:.2f} meV/Å, {row['steps_run']} steps, {wall:.0f} s "
            f"(total {time.perf_counter() - t_start:.0f} s)",
            flush=True,
        )
    wanted = {(rec["name"], n, seed, split, max(steps, int(math.ceil(steps_per_config * n))), patience or 0)
              for rec in recipes for n in size_list for seed in seed_list for split in split_list}
    rows = [r for r in _read_rows(csv_path) if _row_key(r) in wanted]
    budget = f"max({steps}, {steps_per_config:g} N) steps" if steps_per_config else f"{steps} steps"
    if patience:
        budget += f", early stopping after {patience} epochs"
    title = f"{molecule} ({dataset}): {budget} of {BATCH_SIZE} per run, test on {rows[0]['test_frames'] if rows else '?'} frames"
    fits = plot(rows, out / "learning_curve.png", title)
    summary = {
        "molecule": molecule, "dataset": dataset, "models": model_names, "sizes": size_list, "seeds": seed_list,
        "splits": split_list,
        "budget": {"steps": steps, "steps_per_config": steps_per_config, "patience": patience, "batch_size": BATCH_SIZE,
                   "max_time_s": max_time,
                   "rule": f"{budget} per run; epochs = ceil(steps / ceil(train/batch)); cosine LR; "
                           + ("early stopping on validation; " if patience else "no early stopping; ")
                           + "best-validation EMA weights tested; N = train + val (val = max(5, 5% of N))"},
        "overrides": list(overrides),
        "slopes": {k: {m: round(v["slope"], 4) for m, v in f.items()} for k, f in fits.items()},
        "slope_ci95": {k: {m: [round(c, 4) for c in v["ci"]] for m, v in f.items()} for k, f in fits.items()},
        "fits": fits,
        "wall_s_this_call": round(time.perf_counter() - t_start, 1),
        "rows": len(rows),
    }
    write_json(out / "learning_curve.json", summary)
    print(format_table(rows))
    for key, fit in summary["slopes"].items():
        print(f"slopes of log {key} vs log N (95 % bootstrap CI): " + ", ".join(
            f"{m} {s:.2f} [{summary['slope_ci95'][key][m][0]:.2f}, {summary['slope_ci95'][key][m][1]:.2f}]" for m, s in fit.items()))
    print(f"wrote {csv_path}, {out / 'learning_curve.png'}, {out / 'learning_curve.json'}")
    summary["csv"] = str(csv_path)
    summary["table"] = rows
    return summary
