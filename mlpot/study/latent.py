"""What the last layer knows: pooled invariant node features, t-SNE maps and numbers that test them.

Per structure, the model's last-layer invariant node features (``node_features``: for EGNN the 0e
output of ``to_invariants``, for GCN/SchNet the last hidden layer) are pooled over atoms (mean by
default; for one molecule sum = mean x atom count, so nothing but the scale changes). Numbers:

* Spearman rank correlation ρ, over ``--pairs`` random pairs of structures, between the Euclidean
  distance of their pooled features and |ΔE|, |Δ geometry| (the norm of the difference of all
  interatomic distances) and, for ethanol, |Δ C-C|, |Δ C-O|, |Δ C-C-O|.
* R^2 of k-nearest-neighbour regression (``--k``, 5-fold cross-validation) of E, and for ethanol
  C-C, C-O and C-C-O, from the pooled features (as they are, and z-scored on the training folds).
* A p-value for every ρ and R^2: a one-sided permutation test of "no relation". The target is
  permuted across frames ``--permutations`` times (seeded by ``--seed``; the pairs, folds and
  features stay fixed, and every feature set meets the same permutations), and
  p = (1 + #{permuted statistic >= observed}) / (N + 1), so p >= 1 / (N + 1). Frames, not pairs, are
  permuted: pairs that share a frame are not independent, and the test keeps that. Not corrected
  for the number of tests.
* The same numbers for two controls: the same architecture with random (untrained) weights, once
  per seed of ``--init-seeds`` (each seed's numbers, and their mean, std (ddof 1), min and max over
  the seeds), and the raw geometry (the vector of all interatomic distances) in place of the features.

t-SNE maps (scikit-learn) of the pooled features, coloured by each target: at every perplexity of
``--perplexities`` one map from a PCA initialisation (deterministic: its seed changes nothing) and one
from a random initialisation per seed of ``--tsne-seeds``. The PCA map at the first perplexity gives
``latent_tsne.png`` and ``tsne.csv``; with several maps, ``latent_tsne_grid.png`` shows one row per
map and ``tsne_runs.csv`` holds them all. Whether the maps agree: for each map, the k-NN R^2 of each
target from its 2-D coordinates, and for every two maps the Spearman ρ of their distances on the
same random pairs (1 when they order all distances alike, whatever their rotation or scale).

The printed summary ends with each claim "latent distance tracks X" (X = energy and, for ethanol,
C-C, C-O and C-C-O) as ρ and k-NN R^2, each with its p-value and the untrained control's spread.
Everything is written to ``latent.json``.
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mlpot.study.common import (
    load_model_and_data, output_dir, pooled_features, pyplot, write_json,
)
from mlpot.workflows.analysis import ethanol_internals, is_ethanol, pair_distances

DEFAULT_INIT_SEEDS = "0,1,2,3,4"
DEFAULT_TSNE_SEEDS = "0,1,2"
DEFAULT_PERPLEXITIES = "30,10,50"
DEFAULT_PERMUTATIONS = 1000
PERMUTATION_TEST = ("one-sided: p = (1 + #{statistic of a permuted target >= observed}) / (N + 1); the target "
                    "permuted across frames, pairs, folds and features fixed; not corrected for multiple tests")
TARGET_LABELS = {"energy_eV": "energy - mean (eV)", "C-C_A": "C-C bond (Å)", "C-O_A": "C-O bond (Å)",
                 "C-C-O_deg": "C-C-O angle (°)"}
CLAIM_NAMES = {"energy_eV": "energy", "C-C_A": "C-C", "C-O_A": "C-O", "C-C-O_deg": "C-C-O"}
_CHUNK_ELEMENTS = 4_000_000  # permuted pair differences held at once (32 MB)


# === options ===
def _items(value) -> list:
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    return list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]


def parse_seeds(value, option: str) -> List[int]:
    """A comma list (or sequence) of distinct integers given to ``option``; a one-line ValueError otherwise."""
    try:
        seeds = [int(s) if isinstance(s, str) else operator.index(s) for s in _items(value)]
    except (TypeError, ValueError):
        raise ValueError(f"{option} {value!r}: give a comma list of integers") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"{option} {value!r}: give at least one seed, each once")
    return seeds


def parse_perplexities(value, option: str = "--perplexities") -> List[float]:
    """A comma list (or sequence) of distinct t-SNE perplexities > 0; a one-line ValueError otherwise."""
    try:
        values = [float(s) for s in _items(value)]
    except (TypeError, ValueError):
        raise ValueError(f"{option} {value!r}: give a comma list of numbers") from None
    if not values or len(set(values)) != len(values):
        raise ValueError(f"{option} {value!r}: give at least one perplexity, each once")
    if not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{option} {value!r}: every perplexity must be a number > 0")
    return values


def check_permutations(value, option: str = "--permutations") -> int:
    """The number of permutations of each test: an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{option} {value!r}: give an integer >= 1")
    return int(value)


# === targets ===
def targets_of(frames) -> Dict[str, np.ndarray]:
    """Energy (eV, relative to the mean) and, for ethanol, C-C / C-O (Å) and C-C-O (degrees)."""
    energy = frames.energy - frames.energy.mean()
    out = {"energy_eV": energy}
    numbers = frames.numbers[0]
    if all(len(z) == len(numbers) and (z == numbers).all() for z in frames.numbers) and is_ethanol(numbers):
        internals = ethanol_internals(numbers, np.stack(frames.positions))
        out.update({"C-C_A": internals["C-C"], "C-O_A": internals["C-O"], "C-C-O_deg": internals["C-C-O"]})
    return out


# === statistics ===
def random_pairs(frames: int, pairs: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """``pairs`` random pairs (i, j) of frame indices with i != j."""
    rng = np.random.default_rng(seed)
    i = rng.integers(0, frames, size=pairs)
    j = rng.integers(0, frames - 1, size=pairs)
    return i, j + (j >= i)


def frame_permutations(frames: int, count: int, seed: int) -> np.ndarray:
    """(count, frames) random permutations of the frame indices, from a stream of ``seed`` of their own."""
    rng = np.random.default_rng([seed, 1])  # not the stream of random_pairs(seed)
    return rng.permuted(np.tile(np.arange(frames), (count, 1)), axis=1)


def pair_differences(target: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """|t_i - t_j| of a (frames,) target, ||t_i - t_j|| of a (frames, d) one; i, j index arrays of any shape."""
    diff = target[i] - target[j]
    return np.abs(diff) if target.ndim == 1 else np.linalg.norm(diff, axis=-1)


def _unit_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks along the last axis (ties averaged), centred and scaled to norm 1: the dot product of two such
    rows is their Spearman ρ (NaN for a constant row)."""
    from scipy.stats import rankdata

    ranks = rankdata(values, axis=-1)
    ranks -= ranks.mean(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ranks / np.linalg.norm(ranks, axis=-1, keepdims=True)


def p_value(observed: float, null: np.ndarray) -> float:
    """One-sided permutation p-value (1 + #{null >= observed}) / (N + 1); NaN for a NaN statistic."""
    if not np.isfinite(observed):
        return float("nan")
    return float((np.count_nonzero(null >= observed) + 1) / (len(null) + 1))


def spearman_tests(features: Dict[str, np.ndarray], targets: Dict[str, np.ndarray], i: np.ndarray, j: np.ndarray,
                   permutations: Optional[np.ndarray] = None) -> Dict[str, dict]:
    """For each feature set, Spearman ρ between the latent distance ||x_i - x_j|| and the target difference
    on the pairs (i, j) (``"spearman_latent_distance_vs"``) and, given (N, frames) ``permutations``, the
    permutation p-value of each ρ (``"spearman_p"``)."""
    distance_ranks = {name: _unit_ranks(np.linalg.norm(x[i] - x[j], axis=1)) for name, x in features.items()}
    out = {name: {"spearman_latent_distance_vs": {}, "spearman_p": {}} for name in features}
    for target_name, target in targets.items():
        observed = _unit_ranks(pair_differences(target, i, j))
        nulls = {name: [] for name in features}
        if permutations is not None:
            chunk = max(1, _CHUNK_ELEMENTS // (len(i) * int(np.prod(target.shape[1:]))))
            for start in range(0, len(permutations), chunk):
                perm = permutations[start : start + chunk]
                null_ranks = _unit_ranks(pair_differences(target, perm[:, i], perm[:, j]))
                for name, ranks in distance_ranks.items():
                    nulls[name].append(null_ranks @ ranks)
        for name, ranks in distance_ranks.items():
            rho = float(observed @ ranks)
            out[name]["spearman_latent_distance_vs"][target_name] = rho
            if permutations is not None:
                out[name]["spearman_p"][target_name] = p_value(rho, np.concatenate(nulls[name]))
    if permutations is None:
        for block in out.values():
            del block["spearman_p"]
    return out


def _r2(y: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Coefficient of determination along the last axis (sklearn's r2_score of each row)."""
    residual = ((y - prediction) ** 2).sum(axis=-1)
    total = ((y - y.mean(axis=-1, keepdims=True)) ** 2).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1.0 - residual / total


def knn_r2(x: np.ndarray, targets: Dict[str, np.ndarray], k: int, folds: int, seed: int, standardize: bool = False,
           permutations: Optional[np.ndarray] = None) -> Dict[str, dict]:
    """Cross-validated R^2 of k-NN regression (uniform weights) of each target from ``x``: the mean and std
    over ``folds`` shuffled folds (optionally with every feature z-scored on the training folds) and, given
    (N, frames) ``permutations``, the permutation p-value of the mean (``"p"``).

    The neighbours do not depend on the target, so they are found once and serve every permutation; the
    numbers equal sklearn's ``cross_val_score`` of a ``KNeighborsRegressor``."""
    from sklearn.model_selection import KFold
    from sklearn.neighbors import NearestNeighbors
    from sklearn.preprocessing import StandardScaler

    folds_neighbours = []  # (test frames, their k nearest training frames)
    for train, test in KFold(n_splits=folds, shuffle=True, random_state=seed).split(x):
        x_train, x_test = x[train], x[test]
        if standardize:
            scaler = StandardScaler().fit(x_train)
            x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
        nearest = NearestNeighbors(n_neighbors=k).fit(x_train).kneighbors(x_test, return_distance=False)
        folds_neighbours.append((test, train[nearest]))
    result = {}
    for name, target in targets.items():
        values = target[None] if permutations is None else np.vstack([target, target[permutations]])  # row 0: as is
        scores = np.stack([_r2(values[:, test], values[:, nearest].mean(axis=-1))
                           for test, nearest in folds_neighbours], axis=1)
        means = scores.mean(axis=1)
        result[name] = {"mean": float(means[0]), "std": float(scores[0].std())}
        if permutations is not None:
            result[name]["p"] = p_value(means[0], means[1:])
    return result


def feature_numbers(features: Dict[str, np.ndarray], targets: Dict[str, np.ndarray], geometry: Optional[np.ndarray],
                    i: np.ndarray, j: np.ndarray, k: int, folds: int, seed: int,
                    permutations: Optional[np.ndarray]) -> Dict[str, dict]:
    """Every number of every feature set: Spearman ρ (with "geometry" when given) and k-NN R^2, raw and
    z-scored, each with its p-value when ``permutations`` are given."""
    rank_targets = dict(targets) if geometry is None else {**targets, "geometry": geometry}
    blocks = spearman_tests(features, rank_targets, i, j, permutations)
    for name, x in features.items():
        blocks[name]["knn_r2"] = knn_r2(x, targets, k, folds, seed, permutations=permutations)
        blocks[name]["knn_r2_standardized"] = knn_r2(x, targets, k, folds, seed, True, permutations)
    return blocks


def spread(values: Sequence[float]) -> Dict[str, float]:
    """Mean, std (ddof 1; NaN for one value), min and max."""
    values = np.asarray(values, dtype=float)
    std = values.std(ddof=1) if len(values) > 1 else float("nan")
    return {"mean": float(values.mean()), "std": float(std), "min": float(values.min()), "max": float(values.max())}


def seed_spread(blocks: Sequence[dict]) -> dict:
    """The spread over the untrained seeds of each ρ, R^2 and p-value (the R^2 of a seed: its mean over folds)."""
    out = {}
    for key in ("spearman_latent_distance_vs", "spearman_p"):
        if key in blocks[0]:
            out[key] = {t: spread([b[key][t] for b in blocks]) for t in blocks[0][key]}
    for key in ("knn_r2", "knn_r2_standardized"):
        out[key] = {t: spread([b[key][t]["mean"] for b in blocks]) for t in blocks[0][key]}
        if all("p" in v for v in blocks[0][key].values()):
            out[f"{key}_p"] = {t: spread([b[key][t]["p"] for b in blocks]) for t in blocks[0][key]}
    return out


# === t-SNE ===
def perplexity_used(perplexity: float, frames: int) -> float:
    """The perplexity t-SNE runs with: at most (frames - 1) / 3 (scikit-learn needs it below the frame count)."""
    return min(perplexity, max(2.0, (frames - 1) / 3.0))


def tsne(x: np.ndarray, perplexity: float, seed: int, init: str = "pca") -> np.ndarray:
    from sklearn.manifold import TSNE

    return TSNE(n_components=2, perplexity=perplexity_used(perplexity, len(x)), init=init,
                random_state=seed).fit_transform(x)


def map_agreement(embeddings: Sequence[np.ndarray], i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """(R, R) Spearman ρ between the distances of every two maps on the pairs (i, j)."""
    ranks = _unit_ranks(np.stack([np.linalg.norm(e[i] - e[j], axis=1) for e in embeddings]))
    return ranks @ ranks.T


def plot_maps(rows: Sequence[Tuple[str, np.ndarray]], targets: Dict[str, np.ndarray], path: Path, title: str) -> None:
    """One row of panels per (label, map), one panel per target, coloured by it."""
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), len(targets), figsize=(4.2 * len(targets), 4 * len(rows)), squeeze=False)
    for (label, emb), row in zip(rows, axes):
        for ax, (name, t) in zip(row, targets.items()):
            sc = ax.scatter(emb[:, 0], emb[:, 1], c=t, s=5, cmap="viridis")
            fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.04)
            ax.set(title=TARGET_LABELS.get(name, name), xticks=[], yticks=[])
        if label:
            row[0].set_ylabel(label)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def tsne_study(x: np.ndarray, targets: Dict[str, np.ndarray], perplexities: Sequence[float], seeds: Sequence[int],
               i: np.ndarray, j: np.ndarray, k: int, folds: int, seed: int) -> Tuple[dict, List[np.ndarray]]:
    """At every perplexity a PCA-initialised t-SNE map (random state ``seed``) and a randomly initialised one
    per seed of ``seeds``, the k-NN R^2 of each target from each map and the maps' agreement; returns the
    numbers and the maps (in the order of ``numbers["runs"]``, the first PCA map first)."""
    runs, maps = [], []
    for perplexity in perplexities:
        for init, tsne_seed in [("pca", seed), *(("random", s) for s in seeds)]:
            emb = tsne(x, perplexity, tsne_seed, init)
            maps.append(emb)
            runs.append({"perplexity": perplexity, "perplexity_used": perplexity_used(perplexity, len(x)),
                         "init": init, "seed": tsne_seed, "knn_r2_from_map": knn_r2(emb, targets, k, folds, seed)})
    numbers = {"init": "pca", "perplexity": perplexities[0], "seed": seed, "perplexities": list(perplexities),
               "random_init_seeds": list(seeds), "runs": runs}
    if len(maps) > 1:
        matrix = map_agreement(maps, i, j)
        off_diagonal = matrix[np.triu_indices(len(maps), k=1)]
        numbers["map_agreement"] = {
            "statistic": "Spearman rho between two maps' distances on the random pairs",
            "matrix": matrix, "min": float(off_diagonal.min()), "median": float(np.median(off_diagonal)),
        }
    return numbers, maps


# === the study ===
def _untrained_like(model, seed: int):
    """The same architecture with fresh random weights drawn with ``seed`` (the pooled features do not depend
    on the energy scale and shift, so they are left at their defaults)."""
    from mlpot.models import build_potential

    meta = model.meta
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        fresh = build_potential(meta["kind"], meta["species"], meta["cutoff"], dtype=model.dtype, **meta["hparams"])
    finally:
        torch.random.set_rng_state(state)
    return fresh.eval()


def _finite(x: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(x).all():
        raise ValueError(f"the {what}'s node features contain NaN/inf")
    return x


def run_latent(model_spec, data: Optional[str] = None, frames: int = 1000, split: str = "test", pool: str = "mean",
               perplexities=DEFAULT_PERPLEXITIES, pairs: int = 20000, k: int = 10, folds: int = 5, seed: int = 0,
               output=None, data_dir=None, controls: bool = True, init_seeds=DEFAULT_INIT_SEEDS,
               tsne_seeds=DEFAULT_TSNE_SEEDS, permutations: int = DEFAULT_PERMUTATIONS) -> dict:
    """The latent study of one model (see the module docstring); writes latent.json, the t-SNE figures and
    CSVs to ``output``, prints the summary and returns the numbers (with the first map as ``"embedding"``)."""
    perplexities = parse_perplexities(perplexities)
    tsne_seeds = parse_seeds(tsne_seeds, "--tsne-seeds")
    init_seeds = parse_seeds(init_seeds, "--init-seeds")
    permutations = check_permutations(permutations)
    model, data, fr, graphs = load_model_and_data(model_spec, data, split, frames, seed, data_dir)
    out = output_dir(output, f"mlpot-study-latent-{model.kind}")
    x = _finite(pooled_features(model.potential, graphs, pool), "model")
    targets = targets_of(fr)
    geometry = pair_distances(np.stack(fr.positions)) if len({len(z) for z in fr.numbers}) == 1 else None
    k = min(k, max(1, int(len(x) * (folds - 1) / folds) - 1))

    features = {"model": x}
    if controls:
        for init_seed in init_seeds:
            untrained = pooled_features(_untrained_like(model, init_seed), graphs, pool)
            features[f"untrained {init_seed}"] = _finite(untrained, f"untrained model (seed {init_seed})")
        if geometry is not None:
            features["distances"] = geometry
    i, j = random_pairs(len(x), pairs, seed)
    blocks = feature_numbers(features, targets, geometry, i, j, k, folds, seed,
                             frame_permutations(len(x), permutations, seed))
    result = {
        "model": model.path, "kind": model.kind, "hparams": model.meta.get("hparams"), "data": str(data),
        "split": split, "frames": len(fr), "pool": pool, "feature_dim": int(x.shape[1]), "rebuild_check": model.checked,
        **blocks["model"],
        "knn_k": k, "folds": folds, "pairs": pairs,
        "permutations": {"count": permutations, "seed": seed, "smallest_p": 1.0 / (permutations + 1),
                         "test": PERMUTATION_TEST},
    }
    if controls:
        per_seed = [{"init_seed": s, **blocks[f"untrained {s}"]} for s in init_seeds]
        result["control_untrained"] = {
            "init_seeds": init_seeds, "spread": "mean, std (ddof 1), min and max over the init seeds",
            **seed_spread(per_seed), "per_seed": per_seed,
        }
        if geometry is not None:
            result["control_distances"] = blocks["distances"]

    result["tsne"], maps = tsne_study(x, targets, perplexities, tsne_seeds, i, j, k, folds, seed)
    title = f"{model.label}: t-SNE of {pool}-pooled last-layer features, {len(fr)} frames of {data} ({split})"
    written = _write_maps(out, maps, result["tsne"]["runs"], targets, title)
    write_json(out / "latent.json", result)
    print(format_latent(result))
    print(f"wrote {', '.join(str(p) for p in [*written, out / 'latent.json'])}")
    result["output"] = str(out)
    result["embedding"] = maps[0]
    return result


def _write_maps(out: Path, maps: List[np.ndarray], runs: List[dict], targets: Dict[str, np.ndarray],
                title: str) -> List[Path]:
    """latent_tsne.png and tsne.csv of the first map; with several, latent_tsne_grid.png and tsne_runs.csv."""
    first = runs[0]
    np.savetxt(out / "tsne.csv", np.column_stack([maps[0], *targets.values()]), delimiter=",",
               header="tsne_1,tsne_2," + ",".join(targets), comments="", fmt="%.6g")
    plot_maps([("", maps[0])], targets, out / "latent_tsne.png", f"{title}\n{_map_label(first)}")
    written = [out / "latent_tsne.png", out / "tsne.csv"]
    if len(maps) > 1:
        plot_maps([(_map_label(r), m) for r, m in zip(runs, maps)], targets, out / "latent_tsne_grid.png", title)
        rows = [np.column_stack([np.full(len(m), r["perplexity"]), np.full(len(m), r["perplexity_used"]),
                                 np.full(len(m), r["init"] == "random"), np.full(len(m), r["seed"]),
                                 np.arange(len(m)), m]) for r, m in zip(runs, maps)]
        np.savetxt(out / "tsne_runs.csv", np.concatenate(rows), delimiter=",", comments="", fmt="%.6g",
                   header="perplexity,perplexity_used,random_init,seed,frame,tsne_1,tsne_2")
        written += [out / "latent_tsne_grid.png", out / "tsne_runs.csv"]
    return written


def _map_label(run: dict) -> str:
    start = "PCA init" if run["init"] == "pca" else f"random init, seed {run['seed']}"
    return f"perplexity {run['perplexity_used']:g}, {start}"


# === the printed summary ===
def _p(p) -> str:
    return "nan" if p is None or not np.isfinite(p) else f"{p:.2g}"


def _spread(s: dict) -> str:
    std = "-" if not np.isfinite(s["std"]) else f"{s['std']:.3f}"
    return f"{s['mean']:.3f} ± {std} [{s['min']:.3f}, {s['max']:.3f}]"


def format_latent(result: dict) -> str:
    """The numbers table (model and controls, with p-values) and the claims, as printed."""
    columns = [*result["knn_r2"], "geometry"]
    perm = result["permutations"]
    lines = [f"latent study of {result['kind']} ({result['model']}), {result['frames']} frames, {result['pool']} "
             f"pooling; p: one-sided permutation test, {perm['count']} permutations (p >= {_p(perm['smallest_p'])})",
             "".ljust(34) + "".join(n.rjust(11) for n in columns)]

    def numbers(label, values, p_values=False):
        cells = [values.get(n) for n in columns]
        lines.append(label.ljust(34) + "".join(
            "".rjust(11) if v is None else (f"{_p(v):>11}" if p_values else f"{v:11.3f}") for v in cells))

    def rows(label, block):
        numbers(label, block["spearman_latent_distance_vs"])
        numbers("  p", block["spearman_p"], p_values=True)
        for key, text in (("knn_r2", "  kNN R^2 (k=%d, %d-fold)" % (result["knn_k"], result["folds"])),
                          ("knn_r2_standardized", "  kNN R^2, z-scored features")):
            numbers(text, {n: v["mean"] for n, v in block[key].items()})
            numbers("  p", {n: v["p"] for n, v in block[key].items()}, p_values=True)

    rows("Spearman(latent dist, |Δ|)", result)
    untrained = result.get("control_untrained")
    if untrained:
        count = len(untrained["init_seeds"])
        numbers(f"untrained, mean of {count} seeds: ρ",
                {n: v["mean"] for n, v in untrained["spearman_latent_distance_vs"].items()})
        numbers("  std over seeds", {n: v["std"] for n, v in untrained["spearman_latent_distance_vs"].items()})
        numbers("  kNN R^2, mean", {n: v["mean"] for n, v in untrained["knn_r2"].items()})
        numbers("  std over seeds", {n: v["std"] for n, v in untrained["knn_r2"].items()})
        numbers("  kNN R^2 z-scored, mean", {n: v["mean"] for n, v in untrained["knn_r2_standardized"].items()})
    if "control_distances" in result:
        rows("raw distances: Spearman", result["control_distances"])
    lines += _format_tsne(result["tsne"]), *_format_claims(result)
    return "\n".join(lines)


def _format_tsne(numbers: dict) -> str:
    runs = numbers["runs"]
    energy = [r["knn_r2_from_map"]["energy_eV"]["mean"] for r in runs]
    text = (f"t-SNE: {len(runs)} maps (perplexities {', '.join(f'{p:g}' for p in numbers['perplexities'])}; PCA init "
            f"and random init seeds {', '.join(map(str, numbers['random_init_seeds']))}): kNN R^2 of energy from a map "
            f"{min(energy):.3f}..{max(energy):.3f}")
    if "map_agreement" in numbers:
        agreement = numbers["map_agreement"]
        text += (f"; Spearman ρ of two maps' distances: min {agreement['min']:.3f}, "
                 f"median {agreement['median']:.3f}")
    return text


def _format_claims(result: dict) -> List[str]:
    """One row per claim "latent distance tracks X": ρ and k-NN R^2 with p-values and the untrained spread."""
    untrained = result.get("control_untrained")
    lines = ["", "claims: latent distance tracks X (ρ: Spearman of latent distance vs |ΔX|; R^2: kNN of X from "
                 "the latent; p: permutation test"
             + (f"; untrained: mean ± std [min, max] over init seeds {','.join(map(str, untrained['init_seeds']))}, "
                "> all: above every seed" if untrained else "") + ")"]
    table = [["X", "ρ", "p"] + (["untrained ρ", "> all"] if untrained else [])
             + ["R^2", "p"] + (["untrained R^2", "> all"] if untrained else [])]
    for name in result["knn_r2"]:
        rho, r2 = result["spearman_latent_distance_vs"][name], result["knn_r2"][name]["mean"]
        row = [CLAIM_NAMES.get(name, name), f"{rho:.3f}", _p(result["spearman_p"][name])]
        if untrained:
            control = untrained["spearman_latent_distance_vs"][name]
            row += [_spread(control), "yes" if rho > control["max"] else "no"]
        row += [f"{r2:.3f}", _p(result["knn_r2"][name]["p"])]
        if untrained:
            control = untrained["knn_r2"][name]
            row += [_spread(control), "yes" if r2 > control["max"] else "no"]
        table.append(row)
    widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]
    lines += ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
              for row in table]
    return lines
