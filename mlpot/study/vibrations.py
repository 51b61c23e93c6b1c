"""``mlpot study vibrations``: harmonic spectra of learning-curve models against reference frequencies.

For every selected run of one learning-curve CSV or several (read as one, as ``mlpot study stats`` does)
whose ``run_dir/model.pt`` exists, the model (float64) relaxes the molecule to a minimum from the start
geometry (the ``relaxed.xyz`` beside the reference file if there is one, else the dataset's first frame)
with :func:`mlpot.workflows.vibrations.relax_to_minimum`, and gives its harmonic frequencies from the
autograd Hessian (no finite differences). Each run's frequencies are cached beside the CSV it came from,
``<csv folder>/vibrations/<model>/<run folder>.json``, because run folders are not committed: a rerun, or
a run whose folder is gone, reads the cache.

Against the reference (``--reference``, a vibrations.json with ``reference_cm``; rMD17 ethanol's default
is the project's PBE/def2-SVP one, the level of its training data) each run gives the mean and largest
|model - reference| over the sorted modes, the zero-point energy difference and its imaginary modes. The
table and ``vibrations.json`` give mean ± std over replicates per (model, size) next to the test force MAE
of the same runs, and the log-log slopes of both against N: the data efficiency of the Hessian as well as
of the forces.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from mlpot import files
from mlpot.study import stats
from mlpot.study.common import output_dir, pyplot, save_figure, write_json
from mlpot.study.protocol import select_rows

REPOSITORY = Path(__file__).resolve().parents[2]
DEFAULT_REFERENCES = {"rmd17_ethanol": "deploy/in-use/ethanol-vibrations/vibrations.json"}
FREQUENCY_KEY = "frequency_mae_cm"
FORCES_KEY = "forces_mae_meV_per_A"
PLOTTED = {FREQUENCY_KEY: "harmonic frequency MAE (cm$^{-1}$)", FORCES_KEY: "test force MAE (meV/Å)"}


# === reference ===
def reference_path(dataset: str, reference=None) -> Path:
    """The reference file: ``reference``, else the dataset's default in the repository."""
    if reference:
        return Path(reference)
    if dataset not in DEFAULT_REFERENCES:
        raise ValueError(f"no default reference frequencies for dataset {dataset}: give --reference FILE "
                         "(a vibrations.json with reference_cm)")
    return REPOSITORY / DEFAULT_REFERENCES[dataset]


def load_reference(path: Path) -> dict:
    """``reference_cm`` (sorted), ``zpe_eV`` and ``method`` of a vibrations.json; ValueError when it has none."""
    from mlpot.workflows.vibrations import zero_point_energy

    if not path.is_file():
        raise FileNotFoundError(f"no reference file at {path}")
    try:
        data = json.loads(path.read_text())
    except ValueError:
        raise ValueError(f"reference {path} is not JSON") from None
    if not isinstance(data, dict) or not data.get("reference_cm"):
        raise ValueError(f"reference {path} has no reference_cm (the frequencies of mlpot vibrations --reference)")
    cm = np.sort(np.asarray(data["reference_cm"], float))
    zpe = data.get("reference_zpe_eV")
    return {"path": str(path), "method": data.get("reference_method", ""), "reference_cm": cm,
            "zpe_eV": zero_point_energy(cm) if zpe is None else float(zpe)}


def start_geometry(dataset: str, reference: Path, data_dir=None):
    """(atoms, label): the ``relaxed.xyz`` beside the reference file, else the dataset's first frame."""
    import ase.io

    from mlpot.workflows.analysis import load_structure

    beside = reference.parent / "relaxed.xyz"
    if beside.is_file():
        atoms = ase.io.read(beside)
        atoms.calc = None
        return atoms, str(beside)
    return load_structure(dataset, data_dir), f"{dataset} (first frame)"


def compare(model_cm, reference_cm, reference_zpe_eV: Optional[float] = None) -> dict:
    """Model against reference frequencies (cm^-1, negative = imaginary), both sorted: model - reference per
    mode, its mean and largest absolute value, the ZPE difference (meV) and the imaginary modes."""
    from mlpot.workflows.vibrations import zero_point_energy

    model, ref = np.sort(np.asarray(model_cm, float)), np.sort(np.asarray(reference_cm, float))
    if len(model) != len(ref):
        raise ValueError(f"the model has {len(model)} modes and the reference {len(ref)}")
    diff = model - ref
    zpe_ref = zero_point_energy(ref) if reference_zpe_eV is None else reference_zpe_eV
    return {"diff_cm": diff, "mae_cm": float(np.abs(diff).mean()), "max_abs_cm": float(np.abs(diff).max()),
            "zpe_diff_meV": 1000.0 * (zero_point_energy(model) - zpe_ref), "imaginary": int((model < 0).sum()),
            "lowest_cm": float(model[0])}


# === runs ===
def cache_path(csv_folder, row: dict) -> Path:
    """Where a run's frequencies are kept: ``<csv folder>/vibrations/<model>/<run folder>.json``."""
    return Path(csv_folder) / "vibrations" / row["model"] / f"{Path(row['run_dir']).name}.json"


def model_spectrum(model_path: Path, start, fmax: float) -> dict:
    """Relax ``start`` with the model (float64) to a minimum; its autograd-Hessian frequencies and the
    relaxation's outcome. A model that fails (atoms pushed together, ...) gives ``failed``: the message."""
    from mlpot.calculators import load_calculator
    from mlpot.workflows import vibrations as harmonic
    from mlpot.workflows.analysis import find_bonds

    tic = time.perf_counter()
    calc = load_calculator(model_path, "float64")
    try:
        relaxed, hessian = harmonic.relax_to_minimum(start.copy(), calc, fmax, calc.get_hessian)
    except (ValueError, RuntimeError) as error:
        return {"failed": " ".join(str(error).split()) or type(error).__name__}
    atoms = relaxed.atoms
    frequencies = harmonic.harmonic_frequencies(atoms, hessian)
    bonds = {tuple(b) for b in find_bonds(start.numbers, start.positions).tolist()}
    return {"failed": None, "frequencies_cm": frequencies, "energy_eV": relaxed.energy_eV,
            "max_force_eV_A": relaxed.max_force_eV_A, "converged": bool(relaxed.converged), "steps": relaxed.steps,
            "bonds_intact": bonds == {tuple(b) for b in find_bonds(atoms.numbers, atoms.positions).tolist()},
            "numbers": atoms.numbers, "positions": atoms.positions, "wall_s": round(time.perf_counter() - tic, 2)}


def run_spectrum(row: dict, start, start_label: str, fmax: float) -> Optional[dict]:
    """A run's cached spectrum, computed (and cached) when its model.pt is here and the cache is not, or was
    made with another ``fmax``; None when there is neither."""
    cache, model = cache_path(row["csv_folder"], row), Path(row["run_dir"]) / "model.pt"
    cached = json.loads(cache.read_text()) if cache.is_file() else None
    if cached is not None and (cached["fmax"] == fmax or not model.is_file()):
        if cached["fmax"] != fmax:
            print(f"note: {_label(row)}: cached with fmax {cached['fmax']:g}, no model.pt to redo it", flush=True)
        return cached
    if not model.is_file():
        return None
    result = {"model": row["model"], "size": int(row["size"]), "seed": int(row.get("seed") or 0),
              "split": stats.split_of(row), "run_dir": row["run_dir"], "fmax": fmax, "start": start_label,
              **model_spectrum(model, start, fmax)}
    write_json(cache, result)
    return json.loads(cache.read_text())


def _label(row: dict) -> str:
    return f"{row['model']} N={row['size']} seed {row.get('seed') or 0} split {stats.split_of(row)}"


# === summary ===
def summarise(rows: List[dict], reports: Dict[int, dict], missing: Sequence[dict]) -> List[dict]:
    """Per (series, size): runs, missing, failed, mean ± std of the frequency MAE, max |diff| and ZPE
    difference, runs with imaginary modes or broken bonds, and the test force MAE of the same runs."""
    out = []
    gone = {id(m["row"]) for m in missing}
    for name, rs in stats.series(rows).items():
        for size in sorted({int(r["size"]) for r in rs}):
            here = [r for r in rs if int(r["size"]) == size]
            done = [reports[id(r)] for r in here if id(r) in reports and not reports[id(r)]["failed"]]
            forces = [float(r[FORCES_KEY]) for r in here if id(r) in reports and not reports[id(r)]["failed"]]
            entry = {"series": name, "model": here[0]["model"], "size": size, "runs": len(done),
                     "missing": sum(id(r) in gone for r in here),
                     "failed": sum(id(r) in reports and bool(reports[id(r)]["failed"]) for r in here),
                     "imaginary_runs": sum(d["imaginary"] > 0 for d in done),
                     "broken_bond_runs": sum(not d["bonds_intact"] for d in done)}
            for key, values in (("mae_cm", [d["mae_cm"] for d in done]), ("max_abs_cm", [d["max_abs_cm"] for d in done]),
                                ("zpe_diff_meV", [d["zpe_diff_meV"] for d in done]), ("test_" + FORCES_KEY, forces)):
                entry[key] = stats.summary(values) if values else None
            out.append(entry)
    return out


def _mean_std(s: Optional[dict], digits: int = 3) -> str:
    return "-" if s is None else f"{s['mean']:.{digits}g} ± {s['std']:.2g}"


def _slope(fit: Optional[dict]) -> str:
    if fit is None:
        return "-"
    return f"{fit['slope']:+.3f}" + (f" [{fit['ci'][0]:+.3f}, {fit['ci'][1]:+.3f}]" if fit["ci"] else " (one run per size)")


def markdown(result: dict) -> str:
    """The tables of :func:`run_vibrations_study`'s result."""
    ref = result["reference"]
    lines = [f"# Harmonic frequencies: {result['dataset']}, budget {result['budget']}", "",
             f"Autograd-Hessian frequencies at each model's minimum (float64, fmax {result['fmax']:g} eV/Å, from "
             f"{result['start']}) against {len(ref['reference_cm'])} reference modes ({ref['method'] or ref['path']}), "
             "sorted; mean ± std over replicates; test force MAE of the same runs from the CSV.", "",
             "| model | N | runs | missing | failed | freq MAE (cm⁻¹) | max abs diff (cm⁻¹) | ZPE diff (meV) | "
             "imaginary | broken bonds | test force MAE (meV/Å) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in result["summary"]:
        lines.append(f"| {s['series']} | {s['size']} | {s['runs']} | {s['missing']} | {s['failed']} | "
                     f"{_mean_std(s['mae_cm'])} | {_mean_std(s['max_abs_cm'])} | {_mean_std(s['zpe_diff_meV'])} | "
                     f"{s['imaginary_runs']} | {s['broken_bond_runs']} | {_mean_std(s['test_' + FORCES_KEY])} |")
    lines += ["", "## log-log slopes against N [95 % bootstrap CI], over the runs above", "",
              "| model | frequency MAE | test force MAE |", "|---|---|---|"]
    for name in result["slopes"][FREQUENCY_KEY] | result["slopes"][FORCES_KEY]:
        lines.append(f"| {name} | {_slope(result['slopes'][FREQUENCY_KEY].get(name))} | "
                     f"{_slope(result['slopes'][FORCES_KEY].get(name))} |")
    if result["missing_runs"]:
        lines += ["", "missing runs (no model.pt, no cache): " + "; ".join(m["run"] for m in result["missing_runs"])]
    failed = [r for r in result["runs"] if r["failed"]]
    if failed:
        lines += ["", "failed runs: " + "; ".join(f"{r['model']} N={r['size']} seed {r['seed']} split {r['split']} "
                                                  f"({r['failed']})" for r in failed)]
    return "\n".join(lines)


# === figures ===
def plot_mae(rows: List[dict], fits: Dict[str, dict], path: Path, title: str) -> None:
    """Frequency MAE and test force MAE against N, log-log: every run (faint), mean ± std, fitted line."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(5.5 * len(PLOTTED), 4.2))
    for ax, (key, label) in zip(axes, PLOTTED.items()):
        agg = stats.aggregate(rows, key)
        for i, (name, rs) in enumerate(stats.series(rows).items()):
            color = f"C{i % 10}"
            ax.plot([int(r["size"]) for r in rs], [float(r[key]) for r in rs], ".", color=color, alpha=0.3)
            sizes = sorted(agg.get(name, {}))
            fit = fits[key].get(name)
            if fit:
                xs = np.array([fit["sizes"][0], fit["sizes"][-1]], float)
                ax.plot(xs, 10 ** (fit["intercept"] + fit["slope"] * np.log10(xs)), "-", color=color, lw=1)
            ax.errorbar(sizes, [agg[name][n]["mean"] for n in sizes], yerr=[agg[name][n]["std"] for n in sizes],
                        fmt="o", color=color, ms=4, capsize=3,
                        label=f"{name} (slope {fit['slope']:.2f})" if fit else name)
        ax.set(xscale="log", yscale="log", xlabel="training configurations N", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path, title)


def plot_spectra(runs: List[dict], reference_cm, path: Path, title: str) -> None:
    """Model minus reference per mode against the reference frequency: one panel per model, one line per size."""
    plt = pyplot()
    models = sorted({r["model"] for r in runs})
    fig, axes = plt.subplots(len(models), 1, figsize=(8, 2.6 * len(models)), squeeze=False, sharex=True)
    for ax, model in zip(axes[:, 0], models):
        for i, r in enumerate(sorted((r for r in runs if r["model"] == model), key=lambda r: r["size"])):
            ax.plot(reference_cm, r["diff_cm"], "o-", color=f"C{i % 10}", ms=3, lw=0.8,
                    label=f"N={r['size']} (seed {r['seed']}, split {r['split']}): MAE {r['mae_cm']:.3g}")
        ax.axhline(0.0, color="0.5", lw=0.8)
        ax.set(ylabel="model - reference (cm$^{-1}$)", title=model)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("reference frequency (cm$^{-1}$)")
    save_figure(fig, path, title)


# === the command ===
def run_vibrations_study(csv_path, models: Optional[str] = None, sizes: Optional[str] = None,
                         budget: Optional[str] = None, reference=None, fmax: float = 1e-4, output=None,
                         data_dir=None, n_boot: int = 2000) -> dict:
    """``mlpot study vibrations``: per-run caches beside the CSVs; table, figures and JSON in ``output``."""
    from mlpot.study.learning_curve import fit_slopes
    from mlpot.workflows.vibrations import rigid_motions

    if not fmax > 0:
        raise ValueError(f"--fmax {fmax:g}: give a positive force criterion in eV/Å")
    paths, _ = stats.read_csv_paths(csv_path)  # checks the files and that no run is in two of them
    rows = [{**r, "csv_folder": str(p.parent)} for p in paths for r in stats.read_rows(p)]
    rows = select_rows(rows, models, sizes, budget)
    if not rows:
        raise ValueError(f"{', '.join(map(str, paths))}: no runs")
    dataset = rows[0].get("dataset", "")
    ref = load_reference(reference_path(dataset, reference))
    start, start_label = start_geometry(dataset, Path(ref["path"]), data_dir)
    modes = rigid_motions(start)[1].shape[1]
    if modes != len(ref["reference_cm"]):
        raise ValueError(f"reference {ref['path']} has {len(ref['reference_cm'])} frequencies, but the molecule "
                         f"({len(start)} atoms, {start_label}) has {modes} modes")

    reports: Dict[int, dict] = {}
    missing = []
    for r in rows:
        spectrum = run_spectrum(r, start, start_label, fmax)
        if spectrum is None:
            cache = cache_path(r["csv_folder"], r)
            print(f"warning: {_label(r)}: no {Path(r['run_dir']) / 'model.pt'} and no cached {cache}; left out", flush=True)
            missing.append({"row": r, "run": _label(r), "run_dir": r["run_dir"], "cache": str(cache)})
            continue
        report = {k: spectrum[k] for k in ("model", "size", "seed", "split", "run_dir", "failed")}
        report.update(cache=str(cache_path(r["csv_folder"], r)), test_forces_mae_meV_per_A=float(r[FORCES_KEY]))
        if not spectrum["failed"]:
            report.update(frequencies_cm=spectrum["frequencies_cm"], converged=spectrum["converged"],
                          max_force_eV_A=spectrum["max_force_eV_A"], bonds_intact=spectrum["bonds_intact"],
                          **compare(spectrum["frequencies_cm"], ref["reference_cm"], ref["zpe_eV"]))
            print(f"{_label(r)}: frequency MAE {report['mae_cm']:.3g} cm^-1, max |diff| {report['max_abs_cm']:.3g}, "
                  f"ZPE diff {report['zpe_diff_meV']:+.3g} meV, {report['imaginary']} imaginary", flush=True)
        else:
            print(f"warning: {_label(r)}: the relaxation failed: {spectrum['failed']}", flush=True)
        reports[id(r)] = report
    if not reports:
        raise ValueError(f"none of the {len(rows)} runs has its model.pt or a cached spectrum beside its CSV; "
                         "run from the folder the runs were trained in")

    done = [{**r, FREQUENCY_KEY: reports[id(r)]["mae_cm"]} for r in rows
            if id(r) in reports and not reports[id(r)]["failed"]]
    fits = {key: fit_slopes(done, key, n_boot) for key in PLOTTED}
    label = stats.budget_of(rows[0])
    result = {"csv": [str(p) for p in paths], "dataset": dataset, "budget": label, "models": models, "sizes": sizes,
              "fmax": fmax, "start": start_label, "reference": ref,
              "summary": summarise(rows, reports, missing), "slopes": fits,
              "runs": list(reports.values()), "missing_runs": [{k: v for k, v in m.items() if k != "row"} for m in missing]}
    out = output_dir(output, f"mlpot-study-vibrations-{rows[0].get('molecule') or Path(dataset).stem}")
    figures = []
    if done:
        figures.append(out / "vibrations_mae.png")
        plot_mae(done, fits, figures[-1], f"{dataset}, budget {label}: harmonic frequencies against "
                                          f"{ref['method'] or 'the reference'}; error bars 1 std over runs")
        first = {}  # the lowest (seed, split) of each model and size
        for rep in sorted((x for x in reports.values() if not x["failed"]), key=lambda x: (x["seed"], x["split"])):
            first.setdefault((rep["model"], rep["size"]), rep)
        figures.append(out / "vibrations_spectra.png")
        plot_spectra(list(first.values()), ref["reference_cm"], figures[-1],
                     f"{dataset}: model - reference per mode, one run per model and size")
    result["figures"] = [str(f) for f in figures]
    text = markdown(result)
    files.write_text(out / "vibrations.md", text + "\n")
    write_json(out / "vibrations.json", result)
    print(text)
    print("wrote " + ", ".join(map(str, [*figures, out / "vibrations.md", out / "vibrations.json"])))
    return result
