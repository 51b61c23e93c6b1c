"""Statistics of learning-curve rows: spread over seeds and splits, bootstrap CIs of log-log slopes, paired tests.

The input is the rows of ``learning_curve.csv`` (dicts of strings, as :mod:`csv` reads them). A *run* is one
row: a model trained at one size N with one initialisation ``seed`` on one data ``split``. Runs of two
models with the same (N, seed, split) are *paired*: same training frames, same test frames, same batch order.

* :func:`aggregate` - mean, standard deviation (ddof 1), n, min and max of a metric per model and size.
* :func:`fit_loglog` / :func:`slope_ci` - least-squares slope of log10(mean MAE) against log10(N), and its
  percentile bootstrap CI: each bootstrap sample resamples, within every size separately, that size's runs
  with replacement (so every size keeps its n), recomputes the per-size means and refits. Seeded.
* :func:`paired_test` - the paired difference d = log10(MAE_b) - log10(MAE_a) over matched runs, per size
  and pooled over sizes: n, geometric-mean ratio b/a = 10^mean(d), how often a is better, the Wilcoxon
  signed-rank p (two-sided, exact for small n without ties) and the paired t-test p on the log MAEs.
  With 3 pairs the smallest possible two-sided Wilcoxon p is 0.25: per-size claims need the t-test or the
  pooled test (15 pairs over 5 sizes: p down to 6e-5).
* :func:`run_stats` - ``mlpot study stats CSV``: all of it as JSON and markdown.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

METRICS = {"energy_mae_meV": "energy MAE (meV)", "forces_mae_meV_per_A": "force MAE (meV/Å)"}


# === rows ===
def read_rows(path) -> List[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def split_of(row: dict) -> int:
    """The data split of a row (rows written before splits existed: split 1)."""
    return int(row.get("split") or 1)


def replicate(row: dict) -> Tuple[int, int]:
    """(seed, split): what pairs runs of different models."""
    return int(row.get("seed") or 0), split_of(row)


def budget_of(row: dict) -> str:
    """The budget label of a row (rows written before budgets had labels: ``steps<steps>``)."""
    return row.get("budget") or f"steps{row.get('steps', '')}"


def _value(row: dict, key: str) -> Optional[float]:
    text = row.get(key)
    if text in (None, ""):
        return None
    value = float(text)
    return value if math.isfinite(value) and value > 0 else None


def series(rows: Iterable[dict]) -> Dict[str, List[dict]]:
    """Rows by series name: the model, or ``model (lr X)`` where one model appears with several rates."""
    rows = list(rows)
    lrs: Dict[str, set] = {}
    for r in rows:
        lrs.setdefault(r["model"], set()).add(r.get("lr", ""))
    out: Dict[str, List[dict]] = {}
    for r in rows:
        name = r["model"] if len(lrs[r["model"]]) <= 1 else f"{r['model']} (lr {float(r['lr']):g})"
        out.setdefault(name, []).append(r)
    return out


def by_size(rows: Iterable[dict], key: str) -> Dict[int, Dict[Tuple[int, int], float]]:
    """size -> {(seed, split): value} of the rows with a finite positive value (a repeated replicate: the last)."""
    out: Dict[int, Dict[Tuple[int, int], float]] = {}
    for r in rows:
        v = _value(r, key)
        if v is not None:
            out.setdefault(int(r["size"]), {})[replicate(r)] = v
    return dict(sorted(out.items()))


# === spread ===
def summary(values: Sequence[float]) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v)),
            "min": float(v.min()), "max": float(v.max())}


def aggregate(rows: Iterable[dict], key: str) -> Dict[str, Dict[int, dict]]:
    """series -> size -> mean, std (ddof 1; 0 for one run), n, min, max of ``key``."""
    return {name: {n: summary(list(vals.values())) for n, vals in by_size(rs, key).items()}
            for name, rs in series(rows).items()}


# === slopes ===
def fit_loglog(sizes: Sequence[float], values: Sequence[float]) -> Tuple[float, float]:
    """(slope, intercept) of the least-squares line log10(value) = intercept + slope log10(size)."""
    slope, intercept = np.polyfit(np.log10(np.asarray(sizes, float)), np.log10(np.asarray(values, float)), 1)
    return float(slope), float(intercept)


def slope_ci(values_by_size: Dict[int, Sequence[float]], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Slope of log10(mean value per size) on log10(size) and its percentile bootstrap CI (runs resampled
    with replacement within each size). ``ci`` is None when no size has two runs (nothing to resample)."""
    sizes = sorted(values_by_size)
    if len(sizes) < 2:
        raise ValueError("a slope needs at least two sizes")
    vals = [np.asarray(values_by_size[s], float) for s in sizes]
    means = [v.mean() for v in vals]
    slope, intercept = fit_loglog(sizes, means)
    out = {"slope": slope, "intercept": intercept, "sizes": sizes, "mean": [float(m) for m in means],
           "n": [int(len(v)) for v in vals], "ci": None, "level": level, "n_boot": 0}
    if max(len(v) for v in vals) < 2:
        return out
    rng = np.random.default_rng(seed)
    x = np.log10(np.asarray(sizes, float))
    xc = x - x.mean()
    boot_means = np.stack([v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1) for v in vals], axis=1)
    slopes = (np.log10(boot_means) - np.log10(boot_means).mean(axis=1, keepdims=True)) @ xc / (xc @ xc)
    alpha = (1 - level) / 2
    out["ci"] = [float(np.quantile(slopes, alpha)), float(np.quantile(slopes, 1 - alpha))]
    out["std"] = float(slopes.std(ddof=1))
    out["n_boot"] = int(n_boot)
    return out


def slopes(rows: Iterable[dict], key: str, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Dict[str, dict]:
    """series -> :func:`slope_ci` of ``key`` (series with fewer than two sizes are left out)."""
    out = {}
    for name, rs in series(rows).items():
        values = {n: list(v.values()) for n, v in by_size(rs, key).items()}
        if len(values) >= 2:
            out[name] = slope_ci(values, n_boot, seed, level)
    return out


# === paired tests ===
def paired_stats(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired comparison of positive values a_i, b_i on the log scale: d_i = log10(b_i) - log10(a_i)."""
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    d = np.log10(b) - np.log10(a)
    out = {"n": int(len(d)), "ratio_b_over_a": float(10 ** d.mean()) if len(d) else None,
           "mean_log10_ratio": float(d.mean()) if len(d) else None,
           "a_better": int((d > 0).sum()), "b_better": int((d < 0).sum()), "wilcoxon_p": None, "t_p": None, "t": None}
    if len(d) >= 2:
        if np.any(d != 0):
            out["wilcoxon_p"] = float(stats.wilcoxon(d, alternative="two-sided").pvalue)
        if d.std(ddof=1) > 0:
            t = stats.ttest_rel(np.log10(b), np.log10(a))
            out["t"], out["t_p"] = float(t.statistic), float(t.pvalue)
        elif d.mean() != 0:  # identical nonzero differences: the t statistic is infinite
            out["t"], out["t_p"] = float(math.copysign(math.inf, d.mean())), 0.0
    return out


def paired_test(rows: Iterable[dict], key: str, a: str, b: str) -> dict:
    """Paired tests of ``key`` between series ``a`` and ``b`` on the runs they share (same size, seed,
    split): per size and pooled over all sizes."""
    groups = series(rows)
    for name in (a, b):
        if name not in groups:
            raise ValueError(f"no rows of model {name!r} (there are: {', '.join(groups)})")
    va, vb = by_size(groups[a], key), by_size(groups[b], key)
    per_size, pooled_a, pooled_b = {}, [], []
    for n in sorted(set(va) & set(vb)):
        shared = sorted(set(va[n]) & set(vb[n]))
        xs, ys = [va[n][k] for k in shared], [vb[n][k] for k in shared]
        per_size[n] = {**paired_stats(xs, ys), "replicates": [list(k) for k in shared]}
        pooled_a += xs
        pooled_b += ys
    return {"a": a, "b": b, "metric": key, "per_size": per_size, "pooled": paired_stats(pooled_a, pooled_b)}


# === the command ===
def _fmt_p(p: Optional[float]) -> str:
    return "-" if p is None else (f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}")


def markdown(result: dict) -> str:
    """The tables of :func:`run_stats`'s result."""
    source = result["csv"] if isinstance(result["csv"], str) else ", ".join(result["csv"])
    lines = [f"# Learning-curve statistics: {source}", ""]
    for group in result["groups"]:
        lines += [f"## {group['dataset']}, budget {group['budget']}", ""]
        for key, label in METRICS.items():
            agg, fits = group["aggregate"][key], group["slopes"][key]
            sizes = sorted({n for per in agg.values() for n in per})
            lines += [f"### test {label}: mean ± std (n runs), log-log slope [{int(100 * result['level'])} % bootstrap CI]", "",
                      "| model | " + " | ".join(f"N={n}" for n in sizes) + " | slope |",
                      "|---|" + "---|" * (len(sizes) + 1)]
            for name, per in agg.items():
                cells = [f"{per[n]['mean']:.3g} ± {per[n]['std']:.2g} ({per[n]['n']})" if n in per else "-" for n in sizes]
                fit = fits.get(name)
                slope = "-" if fit is None else (f"{fit['slope']:+.3f}" + (f" [{fit['ci'][0]:+.3f}, {fit['ci'][1]:+.3f}]"
                                                                          if fit["ci"] else " (one run per size)"))
                lines.append(f"| {name} | " + " | ".join(cells) + f" | {slope} |")
            lines.append("")
        if group["paired"]:
            lines += ["### paired tests: d = log10(MAE b) - log10(MAE a) on matched (N, seed, split)", "",
                      "| metric | a | b | N | n | MAE ratio b/a | a better | Wilcoxon p | paired t p |", "|---|---|---|---|---|---|---|---|---|"]
            for test in group["paired"]:
                rows = [(str(n), s) for n, s in test["per_size"].items()] + [("all", test["pooled"])]
                for n, s in rows:
                    ratio = "-" if s["ratio_b_over_a"] is None else f"{s['ratio_b_over_a']:.3f}"
                    lines.append(f"| {METRICS[test['metric']].split(' (')[0]} | {test['a']} | {test['b']} | {n} | {s['n']} | "
                                 f"{ratio} | {s['a_better']}/{s['n']} | {_fmt_p(s['wilcoxon_p'])} | {_fmt_p(s['t_p'])} |")
            lines.append("")
    return "\n".join(lines)


def group_rows(rows: Iterable[dict]) -> Dict[Tuple[str, str], List[dict]]:
    """``rows`` by (dataset, budget label), in order of first appearance."""
    groups: Dict[Tuple[str, str], List[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("dataset", ""), budget_of(r)), []).append(r)
    return groups


def analyse(rows: List[dict], compare: Sequence[Tuple[str, str]] = (), n_boot: int = 2000, seed: int = 0,
            level: float = 0.95) -> List[dict]:
    """Aggregates, slopes and paired tests per (dataset, budget) group of ``rows``."""
    out = []
    for (dataset, budget), rs in group_rows(rows).items():
        names = set(series(rs))
        paired = [paired_test(rs, key, a, b) for a, b in compare if a in names and b in names for key in METRICS]
        out.append({"dataset": dataset, "budget": budget, "runs": len(rs),
                    "aggregate": {key: aggregate(rs, key) for key in METRICS},
                    "slopes": {key: slopes(rs, key, n_boot, seed, level) for key in METRICS},
                    "paired": paired})
    return out


def parse_compare(specs: Sequence[str]) -> List[Tuple[str, str]]:
    """``a,b`` strings -> (a, b) pairs."""
    pairs = []
    for spec in specs:
        parts = [p.strip() for p in str(spec).split(",")]
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"--compare {spec!r}: give two model names, a,b")
        pairs.append((parts[0], parts[1]))
    return pairs


def read_csvs(paths: Sequence[Path]) -> List[dict]:
    """The rows of several learning-curve CSVs as one list; a run (model, budget, N, seed, split) twice is an error."""
    rows, seen = [], {}
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"no learning-curve CSV at {path}")
        for row in read_rows(path):
            key = (row["model"], budget_of(row), int(row["size"])) + replicate(row)
            if key in seen and seen[key] != path:
                raise ValueError(f"run {key[0]} {key[1]} N={key[2]} seed {key[3]} split {key[4]} is in both "
                                 f"{seen[key]} and {path}: keep it in one")
            seen[key] = path
            rows.append(row)
    return rows


def read_csv_paths(csv_path) -> Tuple[List[Path], List[dict]]:
    """The paths (a file named twice kept once) and rows of one learning-curve CSV or several, read as one."""
    paths = [Path(p) for p in ([csv_path] if isinstance(csv_path, (str, Path)) else csv_path)]
    paths = [p for i, p in enumerate(paths) if p.resolve() not in {q.resolve() for q in paths[:i]}]
    return paths, read_csvs(paths)


def plot_groups(rows: List[dict], groups: List[dict], out: Path) -> List[Path]:
    """The learning-curve figure (mean ± std per size, every run, the slopes and CIs of :func:`analyse`) of each
    analysed (dataset, budget) group: ``stats.png`` for one group, ``stats-<dataset>-<budget>.png`` for several."""
    from mlpot.study.learning_curve import plot

    grouped = group_rows(rows)
    paths = []
    for group in groups:
        dataset, budget = group["dataset"], group["budget"]
        path = out / ("stats.png" if len(groups) == 1 else f"stats-{dataset}-{budget}.png")
        plot(grouped[(dataset, budget)], path, f"{dataset}, budget {budget}", group["slopes"])
        paths.append(path)
    return paths


def run_stats(csv_path, compare: Sequence[str] = (), output=None, n_boot: int = 2000, seed: int = 0,
              level: float = 0.95, models: Optional[str] = None, budget: Optional[str] = None,
              sizes: Optional[str] = None) -> dict:
    """``mlpot study stats``: read ``csv_path`` (one path or several, read as one), write ``stats.json`` and
    ``stats.md`` next to it (for several, in their common folder) or in ``output``."""
    import os

    from mlpot import files
    from mlpot.study.common import output_dir, write_json

    paths, rows = read_csv_paths(csv_path)
    name = str(paths[0]) if len(paths) == 1 else f"{len(paths)} CSVs"
    if models:
        keep = {m.strip() for m in models.split(",")}
        rows = [r for r in rows if r["model"] in keep]
    if budget:
        rows = [r for r in rows if budget_of(r) == budget]
    if sizes:
        keep_sizes = {int(s) for s in sizes.split(",")}
        rows = [r for r in rows if int(r["size"]) in keep_sizes]
    if not rows:
        raise ValueError(f"{name}: no rows left after the filters")
    pairs = parse_compare(compare)
    known = {r["model"] for r in rows} | {name for name in series(rows)}
    for a, b in pairs:
        for model in (a, b):
            if model not in known:
                raise ValueError(f"--compare: no rows of model {model!r} in {name} (there are: {', '.join(sorted(known))})")
    result = {"csv": [str(p) for p in paths] if len(paths) > 1 else str(paths[0]), "level": level, "n_boot": n_boot, "seed": seed,
              "groups": analyse(rows, pairs, n_boot, seed, level)}
    folder = paths[0].parent if len(paths) == 1 else os.path.commonpath([os.path.abspath(p.parent) for p in paths])
    out = output_dir(output, str(folder))
    write_json(out / "stats.json", result)
    text = markdown(result)
    files.write_text(out / "stats.md", text + "\n")
    figures = plot_groups(rows, result["groups"], out)
    print(text)
    print(f"wrote {out / 'stats.json'}, {out / 'stats.md'}" + "".join(f", {f}" for f in figures))
    result["markdown"] = text
    return result
