"""``mlpot study protocol``: the blog's protocol as a row of its own, next to the force-trained models.

From learning-curve runs (one CSV or several, read as one, as ``mlpot study stats`` does):

1. Per-epoch curves: train (dashed) and validation (solid) energy and force MAE against the epoch for every
   (model, size), mean over the replicate runs with a min-max band, each energy-only model (``X+energy``)
   on the axes of its force-trained twin ``X``; one figure per size and ``protocol_curves.csv`` with every
   run's log.csv rows. Energies are per atom on both curves (log.csv has train per atom, validation per
   structure). The train MAE is the running mean over the epoch of the weights being trained; the validation
   MAE is of the EMA weights at the epoch's end, so the two differ even without overfitting.
2. Histograms of ethanol's C-C and C-O bond lengths and C-C-O angle: a Langevin MD (:func:`mlpot.workflows.md.run_md`)
   of one run per (model, size) (the lowest seed and split with a model.pt; ``md_runs="all"``: every run)
   from the reference's first frame, against the reference frames (the dataset's train + test frames; rMD17
   ethanol was sampled at 500 K). Per coordinate: mean, std, the Jensen-Shannon distance of the histograms
   and the Wasserstein-1 distance of the samples; the run *collapsed* when a bond left its reference mean
   length by more than 0.5 Å (the ``mlpot md`` check). The first 10 % of the samples are discarded. The MD runs
   in the model file's own precision; its internals are kept in ``md/*.npz`` and reused by a rerun with the
   same settings.
3. A table (printed and ``protocol.md``) and ``protocol.json`` with all numbers.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from mlpot import files
from mlpot.study import stats
from mlpot.study.common import output_dir, pyplot, save_figure, write_json

ENERGY_ONLY_SUFFIX = "+energy"
COORDINATES = {"C-C": "Å", "C-O": "Å", "C-C-O": "degrees"}
HIST_BINS = 60
EQUILIBRATION = 0.1  # share of the MD samples discarded before the histograms
CURVE_FIELDS = [
    "model", "size", "seed", "split", "budget", "lr", "energy_only", "twin", "epoch", "time_s", "epoch_lr",
    "train_energy_mae_meV_per_atom", "val_energy_mae_meV_per_atom", "train_forces_mae_meV_per_A",
    "val_forces_mae_meV_per_A", "val_energy_mae_meV", "run_dir",
]
PLOTTED = {  # panel -> (train column, validation column), as in the curves CSV
    "energy MAE (meV/atom)": ("train_energy_mae_meV_per_atom", "val_energy_mae_meV_per_atom"),
    "force MAE (meV/Å)": ("train_forces_mae_meV_per_A", "val_forces_mae_meV_per_A"),
}


# === runs ===
def is_energy_only(row: dict) -> bool:
    """Whether a run was trained on energies alone (rows of older CSVs: by the ``+energy`` name)."""
    flag = str(row.get("energy_only") or "").strip()
    return flag == "1" if flag else row["model"].endswith(ENERGY_ONLY_SUFFIX)


def twin_of(model: str) -> str:
    """The force-trained twin of an energy-only model (``gcn+energy`` -> ``gcn``); other names unchanged."""
    return model[: -len(ENERGY_ONLY_SUFFIX)] if model.endswith(ENERGY_ONLY_SUFFIX) else model


def _names(text: Optional[str]) -> List[str]:
    return [s.strip() for s in str(text or "").split(",") if s.strip()]


def select_rows(rows: List[dict], models: Optional[str] = None, sizes: Optional[str] = None,
                budget: Optional[str] = None) -> List[dict]:
    """The rows of the chosen models, sizes and budget; ValueError for a filter no row matches, or when the
    rows left mix datasets or budgets (their curves would be averaged together)."""
    for option, wanted, have in (("--models", _names(models), {r["model"] for r in rows}),
                                 ("--sizes", _names(sizes), {r["size"] for r in rows}),
                                 ("--budget", [budget] if budget else [], {stats.budget_of(r) for r in rows})):
        unknown = [w for w in wanted if w not in have]
        if unknown:
            raise ValueError(f"{option}: no runs of {', '.join(unknown)} in the CSV (there are: {', '.join(sorted(have))})")
    rows = [r for r in rows if (not models or r["model"] in _names(models)) and (not sizes or r["size"] in _names(sizes))
            and (not budget or stats.budget_of(r) == budget)]
    datasets = sorted({r.get("dataset", "") for r in rows})
    if len(datasets) > 1:
        raise ValueError(f"the runs are of several datasets ({', '.join(datasets)}): give the CSVs of one")
    budgets = sorted({stats.budget_of(r) for r in rows})
    if len(budgets) > 1:
        raise ValueError(f"the runs have several budgets ({', '.join(budgets)}): choose one with --budget")
    return rows


def read_log(row: dict, csv_folders: Sequence[Path] = ()) -> Optional[List[dict]]:
    """The per-epoch rows of a run's log.csv: from its run folder, else the copy that the learning curve kept
    beside one of the CSVs (``logs/<model>/<run>.csv.gz``); None when neither is there."""
    import gzip

    from mlpot.study.learning_curve import kept_log_path

    if not row.get("run_dir"):
        return None
    path = Path(row["run_dir"]) / "log.csv"
    if path.is_file():
        return stats.read_rows(path)
    for folder in csv_folders:
        kept = kept_log_path(folder, row["model"], row["run_dir"])
        if kept.is_file():
            return list(csv.DictReader(io.StringIO(gzip.decompress(kept.read_bytes()).decode())))
    return None


def _run_label(row: dict) -> str:
    return f"{row['model']} N={row['size']} seed {row.get('seed', 0)} split {stats.split_of(row)}"


def _series_of(rows: List[dict]) -> Dict[Tuple[str, int], List[dict]]:
    """(series name, size) -> rows: the series as ``mlpot study stats`` names them (model, or model (lr X))."""
    out: Dict[Tuple[str, int], List[dict]] = {}
    for name, rs in stats.series(rows).items():
        for r in rs:
            out.setdefault((name, int(r["size"])), []).append(r)
    return out


def number_of_atoms(dataset: str, data_dir=None) -> int:
    """Atoms per structure of a dataset (its first training frame)."""
    from mlpot.study.common import load_frames

    return len(load_frames(dataset, "train", num_frames=1, data_dir=data_dir).numbers[0])


# === curves ===
def curve_rows(row: dict, log: List[dict], num_atoms: int) -> List[dict]:
    """One curves-CSV row per epoch of a run's log."""
    out = []
    for entry in log:
        val_e = float(entry["val_energy_mae_meV"])
        out.append({
            "model": row["model"], "size": int(row["size"]), "seed": int(row.get("seed") or 0), "split": stats.split_of(row),
            "budget": stats.budget_of(row), "lr": row.get("lr", ""), "energy_only": int(is_energy_only(row)),
            "twin": twin_of(row["model"]) if is_energy_only(row) else "", "epoch": int(entry["epoch"]),
            "time_s": entry.get("time_s", ""), "epoch_lr": entry.get("lr", ""),
            "train_energy_mae_meV_per_atom": float(entry["train_energy_mae_meV_per_atom"]),
            "val_energy_mae_meV_per_atom": val_e / num_atoms,
            "train_forces_mae_meV_per_A": float(entry["train_forces_mae_meV_per_A"]),
            "val_forces_mae_meV_per_A": float(entry["val_forces_mae_meV_per_A"]), "val_energy_mae_meV": val_e,
            "run_dir": row["run_dir"],
        })
    return out


def band(runs: Sequence[Sequence[dict]], column: str) -> dict:
    """Mean, min, max and number of runs per epoch of ``column`` over runs' curve rows (runs may stop at
    different epochs: each epoch averages the runs that reached it)."""
    by_epoch: Dict[int, List[float]] = {}
    for run in runs:
        for entry in run:
            by_epoch.setdefault(int(entry["epoch"]), []).append(float(entry[column]))
    epochs = sorted(by_epoch)
    values = [np.asarray(by_epoch[e]) for e in epochs]
    return {"epoch": np.asarray(epochs), "mean": np.array([v.mean() for v in values]),
            "min": np.array([v.min() for v in values]), "max": np.array([v.max() for v in values]),
            "n": np.array([len(v) for v in values])}


def families(names: Sequence[str]) -> Dict[str, List[str]]:
    """Series grouped with their twins: force-trained model first, then its energy-only twin."""
    out: Dict[str, List[str]] = {}
    for name in sorted(names, key=lambda n: (twin_of(n.split(" (lr")[0]), ENERGY_ONLY_SUFFIX in n, n)):
        out.setdefault(twin_of(name.split(" (lr")[0]), []).append(name)
    return out


def plot_curves(curves: Dict[str, List[List[dict]]], path: Path, title: str) -> None:
    """One row of panels (energy, forces) per family: each series' validation mean (solid) and train mean
    (dashed) with min-max bands over its runs."""
    plt = pyplot()
    groups = families(list(curves))
    fig, axes = plt.subplots(len(groups), len(PLOTTED), figsize=(5.5 * len(PLOTTED), 3.2 * len(groups)), squeeze=False)
    for ax_row, (family, names) in zip(axes, groups.items()):
        for ax, (label, (train_col, val_col)) in zip(ax_row, PLOTTED.items()):
            for i, name in enumerate(names):
                color = f"C{i % 10}"
                runs = curves[name]
                for column, style, alpha in ((val_col, "-", 0.25), (train_col, "--", 0.12)):
                    b = band(runs, column)
                    kind = "validation" if column == val_col else "train"
                    ax.plot(b["epoch"], b["mean"], style, color=color, lw=1.2, label=f"{name} {kind} ({len(runs)} runs)")
                    ax.fill_between(b["epoch"], b["min"], b["max"], color=color, alpha=alpha, lw=0)
            ax.set(xlabel="epoch", ylabel=label, yscale="log", title=family)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    save_figure(fig, path, title)


def _write_csv(path: Path, rows: List[dict], fields: Sequence[str]) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(fields))
    writer.writeheader()
    writer.writerows(rows)
    files.write_text(path, text.getvalue())


def curve_summary(name: str, size: int, rows: List[dict], runs: List[List[dict]], missing: int) -> dict:
    """The numbers of one (series, size): runs, epochs, the last epoch's train and validation means, the
    best validation force MAE (mean over runs) and the test MAE of the CSV."""
    model = rows[0]["model"]
    out = {"series": name, "model": model, "size": size, "energy_only": is_energy_only(rows[0]),
           "twin": twin_of(model) if is_energy_only(rows[0]) else None, "runs": len(runs), "missing": missing}
    for key in stats.METRICS:
        values = [stats._value(r, key) for r in rows]
        values = [v for v in values if v is not None]
        out[f"test_{key}"] = stats.summary(values) if values else None
    if runs:
        out["epochs"] = [min(len(r) for r in runs), max(len(r) for r in runs)]
        for column in [c for pair in PLOTTED.values() for c in pair]:
            out[f"last_{column}"] = float(np.mean([float(r[-1][column]) for r in runs]))
        out["best_val_forces_mae_meV_per_A"] = float(np.mean([min(float(e["val_forces_mae_meV_per_A"]) for e in r)
                                                              for r in runs]))
    return out


# === histograms ===
def histogram_distances(values, reference, bins: int = HIST_BINS) -> dict:
    """How far a sample's distribution is from a reference sample's: the Jensen-Shannon distance of their
    histograms on a shared grid (base 2: 0 equal, 1 disjoint) and the Wasserstein-1 distance of the samples
    (in their units). None for an empty sample."""
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import wasserstein_distance

    values, reference = np.asarray(values, float), np.asarray(reference, float)
    if not len(values) or not len(reference):
        return {"js": None, "w1": None}
    grid = (min(values.min(), reference.min()), max(values.max(), reference.max()))
    p = np.histogram(values, bins=bins, range=grid)[0]
    q = np.histogram(reference, bins=bins, range=grid)[0]
    return {"js": float(jensenshannon(p, q, base=2)), "w1": float(wasserstein_distance(values, reference))}


def _moments(values) -> dict:
    values = np.asarray(values, float)
    return {"mean": float(values.mean()), "std": float(values.std())} if len(values) else {"mean": None, "std": None}


def ethanol_md(model_path, reference, steps: int, timestep_fs: float, temperature_K: float, seed: int,
               cache: Optional[Path] = None) -> dict:
    """Langevin MD of ``model_path`` from the reference's first frame; ethanol's internals of its samples
    after the first 10 %, and how it ended. ``cache`` (.npz): reused when run with the same settings."""
    from ase import Atoms

    from mlpot.calculators import load_calculator
    from mlpot.workflows import analysis, md

    settings = json.dumps({"model": str(model_path), "steps": steps, "timestep_fs": timestep_fs,
                           "temperature_K": temperature_K, "seed": seed, "reference": reference.name})
    if cache is not None and cache.is_file():
        with np.load(cache) as saved:
            if str(saved["settings"]) == settings:
                return {"steps_done": int(saved["steps_done"]), "collapse_step": int(saved["collapse_step"]),
                        "wall_s": float(saved["wall_s"]), "internals": {k: saved[k] for k in COORDINATES}}
    start = Atoms(numbers=reference.numbers, positions=reference.positions[0])
    bonds, lengths = md.reference_bonds(reference, start)
    run = md.run_md(start, load_calculator(model_path, None), temperature_K, steps * timestep_fs, timestep_fs,
                    "langevin", bonds, lengths, seed=seed, progress=False)
    kept = run.positions[int(EQUILIBRATION * len(run.positions)):]
    # the atoms are told apart on the reference frame, as a distorted frame may not show ethanol's bonds
    internals = analysis.ethanol_internals(reference.numbers, np.concatenate([reference.positions[:1], kept]))
    result = {"steps_done": run.steps, "collapse_step": -1 if run.collapse_step is None else run.collapse_step,
              "wall_s": run.wall_time_s, "internals": {k: v[1:] for k, v in internals.items()}}
    if cache is not None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, settings=settings, steps_done=result["steps_done"], collapse_step=result["collapse_step"],
                         wall_s=result["wall_s"], **result["internals"])

        files.atomic_write(cache, write)
    return result


def md_report(row: dict, result: dict, reference_internals: dict, steps: int, timestep_fs: float) -> dict:
    """The numbers of one MD run against the reference."""
    collapsed = result["collapse_step"] >= 0
    out = {"model": row["model"], "size": int(row["size"]), "seed": int(row.get("seed") or 0), "split": stats.split_of(row),
           "energy_only": is_energy_only(row), "run_dir": row["run_dir"], "steps": steps,
           "steps_done": result["steps_done"], "wall_s": round(result["wall_s"], 1), "collapsed": collapsed,
           "collapse_time_ps": result["collapse_step"] * timestep_fs / 1000.0 if collapsed else None,
           "samples": len(result["internals"]["C-C"]), "internals": {}}
    for name, values in result["internals"].items():
        out["internals"][name] = {**_moments(values), **histogram_distances(values, reference_internals[name])}
    return out


def plot_histograms(results: List[Tuple[str, dict]], reference: dict, path: Path, title: str) -> None:
    """One panel per coordinate: the reference filled, each MD run a line."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(COORDINATES), figsize=(4.5 * len(COORDINATES), 3.4))
    for ax, (name, unit) in zip(axes, COORDINATES.items()):
        ref = reference[name]
        lo, hi = float(ref.min()), float(ref.max())
        grid = np.linspace(lo - 0.5 * (hi - lo), hi + 0.5 * (hi - lo), HIST_BINS + 1)
        ax.hist(ref, bins=grid, density=True, histtype="stepfilled", color="0.75", label="reference")
        for i, (label, internals) in enumerate(results):
            if len(internals[name]):
                ax.hist(internals[name], bins=grid, density=True, histtype="step", color=f"C{i % 10}", lw=1.3, label=label)
        ax.set(xlabel=f"{name} ({unit})", ylabel="density")
    axes[0].legend(fontsize=7)
    save_figure(fig, path, title)


# === table ===
def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def markdown(result: dict) -> str:
    """The tables of :func:`run_protocol`'s result."""
    lines = [f"# Protocol: {result['dataset']}, budget {result['budget']}", "",
             "## curves: last epoch, mean over runs (train = running mean over the epoch; validation = EMA weights); "
             "test MAE of the CSV, mean ± std", "",
             "| model | N | runs | missing | epochs | train / val E (meV/atom) | train / val F (meV/Å) | best val F | "
             "test E (meV) | test F (meV/Å) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in result["curves"]["series"]:
        test = [f"{t['mean']:.3g} ± {t['std']:.2g}" if t else "-"
                for t in (s["test_energy_mae_meV"], s["test_forces_mae_meV_per_A"])]
        if s["runs"]:
            cells = [f"{s['epochs'][0]}-{s['epochs'][1]}" if s["epochs"][0] != s["epochs"][1] else str(s["epochs"][0]),
                     f"{s['last_train_energy_mae_meV_per_atom']:.3g} / {s['last_val_energy_mae_meV_per_atom']:.3g}",
                     f"{s['last_train_forces_mae_meV_per_A']:.3g} / {s['last_val_forces_mae_meV_per_A']:.3g}",
                     f"{s['best_val_forces_mae_meV_per_A']:.3g}"]
        else:
            cells = ["-"] * 4
        lines.append(f"| {s['series']} | {s['size']} | {s['runs']} | {s['missing']} | " + " | ".join(cells + test) + " |")
    md = result.get("md")
    if md:
        st = md["settings"]
        lines += ["", f"## ethanol internals: Langevin MD, {st['steps']} steps of {st['timestep_fs']:g} fs at "
                      f"{st['temperature_K']:g} K (first {int(100 * EQUILIBRATION)} % discarded), against "
                      f"{md['reference']['frames']} reference frames; JS: Jensen-Shannon distance of the histograms "
                      "(0-1), W1: Wasserstein-1 (Å, degrees)", "",
                  "| model | N | seed | split | steps done | collapsed | " +
                  " | ".join(f"{c} mean ± std | {c} JS | {c} W1" for c in COORDINATES) + " |",
                  "|---|---|---|---|---|---|" + "---|" * (3 * len(COORDINATES))]
        ref = md["reference"]
        lines.append("| reference | | | | | | " + " | ".join(
            f"{ref['internals'][c]['mean']:.4g} ± {ref['internals'][c]['std']:.2g} | "
            f"{_num(ref['halves'][c]['js'])} (halves) | {_num(ref['halves'][c]['w1'])} (halves)" for c in COORDINATES) + " |")
        for r in md["runs"]:
            cells = []
            for c in COORDINATES:
                x = r["internals"][c]
                cells.append(f"{_num(x['mean'], 4)} ± {_num(x['std'], 2)} | {_num(x['js'])} | {_num(x['w1'])}")
            collapsed = f"yes, {r['collapse_time_ps']:.3g} ps" if r["collapsed"] else "no"
            lines.append(f"| {r['model']} | {r['size']} | {r['seed']} | {r['split']} | {r['steps_done']} | {collapsed} | "
                         + " | ".join(cells) + " |")
    if result["missing_runs"]:
        lines += ["", "missing runs: " + "; ".join(f"{m['run']} ({m['reason']})" for m in result["missing_runs"])]
    return "\n".join(lines)


# === the command ===
def run_protocol(csv_path, models: Optional[str] = None, sizes: Optional[str] = None, budget: Optional[str] = None,
                 output=None, md: bool = True, md_steps: int = 20000, md_timestep_fs: float = 0.5,
                 temperature_K: float = 500.0, md_seed: int = 0, md_runs: str = "first", data_dir=None) -> dict:
    """``mlpot study protocol``: curves, ethanol histograms (unless ``md`` is False), table and JSON in ``output``."""
    from mlpot.workflows import analysis

    if md and md_steps < 1:
        raise ValueError(f"--md-steps {md_steps}: give a positive number of steps")
    if md and not md_timestep_fs > 0:
        raise ValueError(f"--md-timestep {md_timestep_fs:g}: give a positive time step in fs")
    if md_runs not in ("first", "all"):
        raise ValueError(f"--md-runs {md_runs!r}: first or all")
    paths, rows = stats.read_csv_paths(csv_path)
    rows = select_rows(rows, models, sizes, budget)
    if not rows:
        raise ValueError(f"{', '.join(map(str, paths))}: no runs")
    dataset, label = rows[0].get("dataset", ""), stats.budget_of(rows[0])
    reference = None
    if md:  # checked before any work: the histograms are of ethanol's coordinates
        reference = analysis.load_ensemble(dataset, data_dir)
        if not analysis.is_ethanol(reference.numbers):
            raise ValueError(f"the histograms are of ethanol's C-C, C-O and C-C-O, and {dataset} is not ethanol "
                             "(give --no-md for the curves alone)")
    num_atoms = len(reference.numbers) if reference is not None else number_of_atoms(dataset, data_dir)
    out = output_dir(output, f"mlpot-study-protocol-{rows[0].get('molecule') or Path(dataset).stem}")

    # 1. curves
    logs, missing, table = {}, [], []
    for r in rows:
        log = read_log(r, [p.parent for p in paths])
        if log:
            logs[id(r)] = curve_rows(r, log, num_atoms)
            table += logs[id(r)]
        else:
            missing.append({"run": _run_label(r), "run_dir": r.get("run_dir", ""), "reason": "no run folder or kept log"})
    for m in missing:
        print(f"warning: {m['run']}: {m['run_dir'] or 'no run_dir'} has no log.csv and no copy was kept beside the CSV; left out", flush=True)
    if not logs:
        raise ValueError(f"none of the {len(rows)} runs has its run folder (log.csv) any more; "
                         "run from the folder the runs were trained in")
    series = _series_of(rows)
    summaries, figures = [], []
    for size in sorted({n for _, n in series}):
        curves = {name: [logs[id(r)] for r in rs if id(r) in logs] for (name, n), rs in series.items() if n == size}
        for name, runs in curves.items():
            rs = series[(name, size)]
            summaries.append(curve_summary(name, size, rs, runs, len(rs) - len(runs)))
        curves = {name: runs for name, runs in curves.items() if runs}
        if curves:
            figure = out / f"protocol_curves_n{size}.png"
            plot_curves(curves, figure, f"{dataset}, N = {size}, budget {label}: validation solid, train dashed; "
                                        "mean over runs, band min-max")
            figures.append(str(figure))
    curves_csv = out / "protocol_curves.csv"
    _write_csv(curves_csv, table, CURVE_FIELDS)
    result = {"csv": [str(p) for p in paths], "dataset": dataset, "budget": label, "models": models, "sizes": sizes,
              "num_atoms": num_atoms, "missing_runs": missing,
              "curves": {"csv": str(curves_csv), "figures": figures, "series": summaries}, "md": None}

    # 2. histograms
    if md:
        ref_internals = analysis.ethanol_internals(reference.numbers, reference.positions)
        half = len(reference.positions) // 2
        result["md"] = {
            "settings": {"steps": md_steps, "timestep_fs": md_timestep_fs, "temperature_K": temperature_K,
                         "seed": md_seed, "thermostat": "langevin, friction 0.01/fs", "runs": md_runs,
                         "discarded_share": EQUILIBRATION, "collapse_threshold_A": analysis.COLLAPSE_THRESHOLD},
            "reference": {"name": reference.name, "frames": len(reference.positions),
                          "internals": {c: _moments(v) for c, v in ref_internals.items()},
                          "halves": {c: histogram_distances(v[:half], v[half:]) for c, v in ref_internals.items()}},
            "runs": [], "figures": []}
        runs_by_size: Dict[int, List[Tuple[str, dict]]] = {}
        for (name, size), rs in sorted(series.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            ready = sorted((r for r in rs if r.get("run_dir") and (Path(r["run_dir"]) / "model.pt").is_file()),
                           key=stats.replicate)
            if not ready:
                print(f"warning: {name} N={size}: no run with a model.pt; no MD", flush=True)
                continue
            for r in ready if md_runs == "all" else ready[:1]:
                tag = f"{r['model']}-n{size}-seed{r.get('seed') or 0}-split{stats.split_of(r)}"
                md_out = ethanol_md(Path(r["run_dir"]) / "model.pt", reference, md_steps, md_timestep_fs, temperature_K,
                                    md_seed, cache=out / "md" / f"{tag}.npz")
                report = md_report(r, md_out, ref_internals, md_steps, md_timestep_fs)
                result["md"]["runs"].append(report)
                label_run = name if md_runs == "first" else f"{name} seed {r.get('seed') or 0}"
                if report["collapsed"]:
                    label_run += f" (collapsed at {report['collapse_time_ps']:.3g} ps)"
                runs_by_size.setdefault(size, []).append((label_run, md_out["internals"]))
                state = f"collapsed at {report['collapse_time_ps']:.3g} ps" if report["collapsed"] else "stable"
                print(f"MD {_run_label(r)}: {report['steps_done']} steps, {state}; W1 " + ", ".join(
                    f"{c} {_num(x['w1'])}" for c, x in report["internals"].items()), flush=True)
        for size, results in runs_by_size.items():
            figure = out / f"protocol_histograms_n{size}.png"
            plot_histograms(results, ref_internals, figure,
                            f"ethanol N = {size}: Langevin {temperature_K:g} K, {md_steps} x {md_timestep_fs:g} fs, "
                            f"against {len(reference.positions)} frames of {reference.name}")
            result["md"]["figures"].append(str(figure))

    # 3. table and JSON
    text = markdown(result)
    files.write_text(out / "protocol.md", text + "\n")
    write_json(out / "protocol.json", result)
    print(text)
    written = [curves_csv, *figures, *(result["md"]["figures"] if result["md"] else []), out / "protocol.md",
               out / "protocol.json"]
    print("wrote " + ", ".join(map(str, written)))
    return result
