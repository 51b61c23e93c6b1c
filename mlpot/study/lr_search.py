"""``mlpot study lr-search``: the small, documented learning-rate search of the learning-curve study.

Every model is trained at one size (default N = 250) with each rate of a grid (default 1e-3, 3e-3, 1e-2),
under the same budget rule and on the same seeds/splits as the learning curve will use; the runs are
ordinary learning-curve runs (rows of ``lr_search.csv``, resumable, skipped on a rerun). The rate of each
model is the one with the lowest **validation** error (never the test error): the force MAE, or the
energy MAE for energy-only (``+energy``) models, averaged over the runs. ``lr_search.json`` holds the
whole grid and ``best`` (model -> rate), which ``mlpot study learning-curve --lr lr_search.json`` reads.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np

from mlpot import files
from mlpot.study import learning_curve as lc
from mlpot.study import stats
from mlpot.study.common import output_dir, pyplot, save_figure, write_json
from mlpot.study.variants import parse_model

DEFAULT_LRS = "1e-3,3e-3,1e-2"


def criterion(row: dict) -> str:
    """The validation column that ranks the rates of a row's model."""
    return "val_energy_mae_meV" if str(row.get("energy_only", "0")) == "1" else "val_forces_mae_meV_per_A"


def choose(rows: List[dict]) -> dict:
    """model -> {rate: mean validation error}, and ``best``: model -> the rate with the lowest mean."""
    table: Dict[str, Dict[str, List[float]]] = {}
    for r in rows:
        value = r.get(criterion(r))
        if value in (None, ""):
            continue
        table.setdefault(r["model"], {}).setdefault(lc.lr_text(r["lr"]), []).append(float(value))
    means = {m: {lr: float(np.mean(v)) for lr, v in per.items()} for m, per in table.items()}
    runs = {m: {lr: len(v) for lr, v in per.items()} for m, per in table.items()}
    best = {m: float(min(per, key=lambda lr: (per[lr] if np.isfinite(per[lr]) else np.inf))) for m, per in means.items()}
    return {"validation_error": means, "runs": runs, "best": best}


def rate_table(chosen: dict, names: List[str], rates: List[float]) -> str:
    """Markdown: mean validation error of each model (rows) at each rate (columns), and the rate chosen."""
    lines = ["| model | " + " | ".join(f"{r:g}" for r in rates) + " | best |",
             "|---|" + "---|" * (len(rates) + 1)]
    for m in names:
        per = chosen["validation_error"].get(m, {})
        cells = " | ".join(f"{per[lc.lr_text(r)]:.2f}" if lc.lr_text(r) in per else "-" for r in rates)
        lines.append(f"| {m} | {cells} | {chosen['best'].get(m, float('nan')):g} |")
    return "\n".join(lines)


def plot_rates(chosen: dict, names: List[str], path, title: str = "") -> None:
    """Mean validation error against learning rate (log-log), one line per model, its chosen rate marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m in names:
        per = chosen["validation_error"].get(m, {})
        pts = sorted((float(lr), v) for lr, v in per.items() if np.isfinite(v))
        if not pts:
            continue
        (line,) = ax.plot(*zip(*pts), "o-", label=m)
        best = chosen["best"][m]
        ax.plot([best], [per[lc.lr_text(best)]], "*", ms=14, color=line.get_color())
    ax.set(xscale="log", yscale="log", xlabel="learning rate",
           ylabel="validation MAE (forces meV/Å; energy meV for +energy)")
    ax.legend(fontsize=8)
    save_figure(fig, path, title)


def run_lr_search(molecule: str = "ethanol", models: str = lc.DEFAULT_MODELS, lrs: str = DEFAULT_LRS, size: int = 250,
                  output=None, **kwargs) -> dict:
    """Learning-curve runs at ``size`` for every rate of ``lrs``; writes lr_search.{csv,json,png,md} to ``output``."""
    try:
        rates = [float(x) for x in str(lrs).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--lrs {lrs!r}: give a comma list of learning rates") from None
    if not rates or min(rates) <= 0:
        raise ValueError(f"--lrs {lrs!r}: give at least one learning rate, each above 0")
    names = [m.strip() for m in str(models).split(",") if m.strip()]
    for name in names:
        parse_model(name)
    out = output_dir(output, f"mlpot-study-lr-search-{molecule}")
    kwargs.setdefault("runs_dir", None)
    if kwargs["runs_dir"] is None:
        kwargs["runs_dir"] = f"runs/study/lr-search-{molecule}"
    results = []
    for rate in rates:
        print(f"=== learning rate {rate:g} ===", flush=True)
        # only the CSV: lr_search.json keeps the last finished search (which --lr may be reading) until this one ends
        results.append(lc.run_learning_curve(molecule=molecule, models=models, sizes=str(size), output=out, lr=rate,
                                             csv_name="lr_search.csv", write_summary=False, **kwargs))
    # every row of this size and budget in the folder, so that searches run separately (gcn, which cannot be
    # compiled, with other --set options) end up in one ``best``
    label = results[0]["budget"]["label"]
    rows = [r for r in stats.read_rows(out / "lr_search.csv") if int(r["size"]) == size and r["budget"] == label]
    chosen = choose(rows)
    names = list(dict.fromkeys([r["model"] for r in rows] + names))
    rates = sorted(set(rates) | {float(r["lr"]) for r in rows if r.get("lr")})
    summary = {
        "molecule": molecule, "dataset": results[0]["dataset"], "size": size, "rates": rates, "models": names,
        "budget": results[0]["budget"], "seeds": results[0]["seeds"], "splits": results[0]["splits"],
        "criterion": "lowest mean validation force MAE (energy MAE for +energy models) over the runs; test errors unused",
        **chosen,
        "cpu_s_of_rows": round(sum(float(r["cpu_s"]) for r in rows if r.get("cpu_s")), 1),
    }
    write_json(out / "lr_search.json", summary)
    table = rate_table(chosen, names, rates)
    plot_rates(chosen, names, out / "lr_search.png", f"{molecule}: N = {size}, budget {label}")
    files.write_text(out / "lr_search.md", f"# Learning-rate search: {out / 'lr_search.csv'}\n\n"
                     f"N = {size}, budget {label}; {summary['criterion']}.\n\n{table}\n")
    print(table)
    print(f"wrote {out / 'lr_search.json'}, {out / 'lr_search.md'}; use it with: "
          f"mlpot study learning-curve --lr {out / 'lr_search.json'}")
    return summary


def lr_kwargs(args) -> dict:
    """The learning-curve keyword arguments shared by ``lr-search`` (from parsed CLI args)."""
    return {k: getattr(args, k) for k in (
        "steps", "max_time", "seeds", "dataset", "test_size", "runs_dir", "data_dir", "threads", "overrides",
        "progress", "test_dataset", "splits", "pairing", "budget", "steps_per_frame", "min_steps", "max_steps",
        "patience", "n_boot")}

