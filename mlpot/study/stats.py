"""Statistics over study runs: mean and spread per (model, size), bootstrap confidence intervals on log-log
learning-curve slopes, and paired tests between two models trained on the same seeds and splits.

Rows are the learning curve's CSV rows (dicts with ``model``, ``size``, ``seed``, optionally ``split``, and the
error columns). Everything is seeded, so a rerun gives the same intervals.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np

ERROR_KEYS = ("energy_mae_meV", "forces_mae_meV_per_A")


def _values(rows: Sequence[dict], model: str, key: str) -> Dict[int, List[float]]:
    """size -> the errors of every run of ``model`` at that size."""
    by_size: Dict[int, List[float]] = {}
    for r in rows:
        if r["model"] == model and r.get(key) not in (None, ""):
            by_size.setdefault(int(r["size"]), []).append(float(r[key]))
    return dict(sorted(by_size.items()))


def aggregate(rows: Sequence[dict], key: str) -> Dict[str, Dict[int, dict]]:
    """model -> size -> {mean, std (sample, 0 for one run), n, min, max} of ``key``."""
    out: Dict[str, Dict[int, dict]] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        out[model] = {}
        for size, vals in _values(rows, model, key).items():
            v = np.asarray(vals)
            out[model][size] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                                "n": int(len(v)), "min": float(v.min()), "max": float(v.max())}
    return out


def _slope(sizes: np.ndarray, means: np.ndarray) -> tuple:
    slope, intercept = np.polyfit(np.log10(sizes), np.log10(means), 1)
    return float(slope), float(intercept)


def slope_with_ci(rows: Sequence[dict], key: str, model: str, level: float = 0.95, n_boot: int = 2000,
                  seed: int = 0) -> Optional[dict]:
    """Least-squares slope of log10(mean MAE) against log10(N), with a bootstrap interval: the runs at each size
    are resampled with replacement (sizes kept), the slope refitted ``n_boot`` times, the percentile interval
    taken. ``None`` with fewer than two sizes. With one run per size the interval collapses to the slope
    (``ci_from_one_run_per_size`` says so)."""
    by_size = _values(rows, model, key)
    if len(by_size) < 2:
        return None
    sizes = np.array(list(by_size), dtype=float)
    groups = [np.asarray(v) for v in by_size.values()]
    slope, intercept = _slope(sizes, np.array([g.mean() for g in groups]))
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    for b in range(n_boot):
        means = np.array([rng.choice(g, size=len(g), replace=True).mean() for g in groups])
        boot[b] = _slope(sizes, means)[0]
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    return {"slope": slope, "intercept": intercept, "ci": [float(lo), float(hi)], "level": level,
            "n_boot": n_boot, "sizes": [int(s) for s in sizes], "runs_per_size": [len(g) for g in groups],
            "mae": [float(g.mean()) for g in groups],
            "ci_from_one_run_per_size": all(len(g) == 1 for g in groups)}


def _pair_key(r: dict) -> tuple:
    return int(r["size"]), int(r.get("seed") or 0), str(r.get("split") or "")


def paired_test(rows: Sequence[dict], key: str, model_a: str, model_b: str, sizes: Optional[Sequence[int]] = None) -> dict:
    """Paired comparison of ``model_a`` and ``model_b`` on runs sharing size, seed and split: the differences
    d = log(MAE_a) - log(MAE_b), their mean as a ratio exp(mean d) (< 1: ``model_a`` is better), a paired t-test
    and a Wilcoxon signed-rank test on d (two-sided p-values; NaN below 2 pairs)."""
    from scipy import stats

    a = {_pair_key(r): float(r[key]) for r in rows if r["model"] == model_a and r.get(key) not in (None, "")}
    b = {_pair_key(r): float(r[key]) for r in rows if r["model"] == model_b and r.get(key) not in (None, "")}
    pairs = sorted(k for k in a.keys() & b.keys() if sizes is None or k[0] in set(sizes))
    d = np.array([math.log(a[k]) - math.log(b[k]) for k in pairs])
    result = {"a": model_a, "b": model_b, "key": key, "n_pairs": len(pairs),
              "sizes": sorted({k[0] for k in pairs}), "ratio_a_over_b": float(np.exp(d.mean())) if len(d) else float("nan"),
              "a_better_in": int((d < 0).sum()), "t_p": float("nan"), "wilcoxon_p": float("nan")}
    if len(d) >= 2 and np.any(d != d[0]):
        result["t_p"] = float(stats.ttest_rel(np.log([a[k] for k in pairs]), np.log([b[k] for k in pairs])).pvalue)
    if len(d) >= 2 and np.any(d != 0):
        result["wilcoxon_p"] = float(stats.wilcoxon(d).pvalue)
    return result


def format_stats(rows: Sequence[dict], compare: Sequence[tuple] = ()) -> str:
    """Markdown: mean ± std (n) per model and size, slopes with 95 % intervals, and the paired tests asked for."""
    lines = []
    for key in ERROR_KEYS:
        agg = aggregate(rows, key)
        sizes = sorted({s for m in agg.values() for s in m})
        lines += [f"### test {key}", "", "| model | " + " | ".join(f"N={s}" for s in sizes) + " | slope (95 % CI) |",
                  "|---|" + "---|" * (len(sizes) + 1)]
        for model, per_size in agg.items():
            cells = [f"{per_size[s]['mean']:.2f} ± {per_size[s]['std']:.2f} ({per_size[s]['n']})" if s in per_size else "-"
                     for s in sizes]
            fit = slope_with_ci(rows, key, model)
            slope = "-" if fit is None else f"{fit['slope']:.2f} [{fit['ci'][0]:.2f}, {fit['ci'][1]:.2f}]"
            lines.append(f"| {model} | " + " | ".join(cells) + f" | {slope} |")
        lines.append("")
    if compare:
        lines += ["### paired tests (same size, seed and split)", "",
                  "| a | b | error | pairs | MAE a / b | a better in | paired t p | Wilcoxon p |", "|---|---|---|---|---|---|---|---|"]
        for a, b in compare:
            for key in ERROR_KEYS:
                t = paired_test(rows, key, a, b)
                lines.append(f"| {a} | {b} | {key} | {t['n_pairs']} | {t['ratio_a_over_b']:.3f} | {t['a_better_in']} | "
                             f"{t['t_p']:.3g} | {t['wilcoxon_p']:.3g} |")
        lines.append("")
    return "\n".join(lines)


def run_stats(csv_path, compare: Sequence[str] = (), output=None) -> dict:
    """``mlpot study stats``: read a learning-curve CSV, write ``stats.md`` and ``stats.json`` beside it (or in
    ``output``) and print the markdown."""
    import csv
    from pathlib import Path

    from mlpot import files
    from mlpot.study.common import write_json

    path = Path(csv_path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file (give the learning_curve.csv of a learning-curve run)")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{path}: no runs in it yet")
    models = set(r["model"] for r in rows)
    pairs = []
    for item in compare:
        a, sep, b = item.partition(",")
        if not sep or a not in models or b not in models:
            raise ValueError(f"--compare {item!r}: give A,B with two models of the CSV ({', '.join(sorted(models))})")
        pairs.append((a, b))
    out = Path(output) if output else path.parent
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "csv": str(path),
        "aggregate": {k: {m: {str(n): v for n, v in per.items()} for m, per in aggregate(rows, k).items()} for k in ERROR_KEYS},
        "slopes": {k: {m: slope_with_ci(rows, k, m) for m in dict.fromkeys(r["model"] for r in rows)} for k in ERROR_KEYS},
        "paired": [paired_test(rows, k, a, b) for a, b in pairs for k in ERROR_KEYS],
    }
    text = format_stats(rows, pairs)
    files.write_text(out / "stats.md", text)
    write_json(out / "stats.json", result)
    print(text)
    print(f"wrote {out / 'stats.md'}, {out / 'stats.json'}")
    return result
