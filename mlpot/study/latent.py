"""What the last layer knows: pooled invariant node features, t-SNE maps and numbers that test them.

Per structure, the model's last-layer invariant node features (``node_features``: for EGNN the 0e
output of ``to_invariants``, for GCN/SchNet the last hidden layer) are pooled over atoms (mean by
default; for one molecule sum = mean x atom count, so nothing but the scale changes). Numbers:

* Spearman rank correlation, over random pairs of structures, between the Euclidean distance of
  their pooled features and |ΔE|, |Δ geometry| (the norm of the difference of all interatomic
  distances) and, for ethanol, |Δ C-C|, |Δ C-O|, |Δ C-C-O|.
* R^2 of k-nearest-neighbour regression (k = 10, 5-fold cross-validation) of E, and for ethanol
  C-C, C-O and C-C-O, from the pooled features.
* The same numbers for two controls: the same architecture with random (untrained) weights, and the
  raw geometry (the vector of all interatomic distances) in place of the features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from mlpot.study.common import (
    load_model_and_data, output_dir, pooled_features, pyplot, write_json,
)
from mlpot.workflows.analysis import ethanol_internals, is_ethanol, pair_distances


def targets_of(frames) -> Dict[str, np.ndarray]:
    """Energy (eV, relative to the mean) and, for ethanol, C-C / C-O (Å) and C-C-O (degrees)."""
    energy = frames.energy - frames.energy.mean()
    out = {"energy_eV": energy}
    numbers = frames.numbers[0]
    if all(len(z) == len(numbers) and (z == numbers).all() for z in frames.numbers) and is_ethanol(numbers):
        internals = ethanol_internals(numbers, np.stack(frames.positions))
        out.update({"C-C_A": internals["C-C"], "C-O_A": internals["C-O"], "C-C-O_deg": internals["C-C-O"]})
    return out


def distance_correlations(x: np.ndarray, targets: Dict[str, np.ndarray], geometry: Optional[np.ndarray],
                          pairs: int, seed: int) -> Dict[str, float]:
    """Spearman rho between ||x_i - x_j|| and |t_i - t_j| on ``pairs`` random pairs i != j."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(seed)
    n = len(x)
    i = rng.integers(0, n, size=pairs)
    j = rng.integers(0, n - 1, size=pairs)
    j = j + (j >= i)  # j != i
    dist = np.linalg.norm(x[i] - x[j], axis=1)
    rho = {}
    for name, t in targets.items():
        rho[name] = float(spearmanr(dist, np.abs(t[i] - t[j])).statistic)
    if geometry is not None:
        rho["geometry"] = float(spearmanr(dist, np.linalg.norm(geometry[i] - geometry[j], axis=1)).statistic)
    return rho


def knn_r2(x: np.ndarray, targets: Dict[str, np.ndarray], k: int, folds: int, seed: int,
           standardize: bool = False) -> Dict[str, dict]:
    """Cross-validated R^2 (mean, std over folds) of k-NN regression of each target from ``x``
    (optionally with every feature z-scored on the training folds)."""
    from sklearn.model_selection import KFold, cross_val_score
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cv = KFold(n_splits=folds, shuffle=True, random_state=seed)
    result = {}
    for name, t in targets.items():
        knn = KNeighborsRegressor(n_neighbors=k)
        estimator = make_pipeline(StandardScaler(), knn) if standardize else knn
        scores = cross_val_score(estimator, x, t, cv=cv, scoring="r2")
        result[name] = {"mean": float(scores.mean()), "std": float(scores.std())}
    return result


def tsne(x: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    perplexity = min(perplexity, max(2.0, (len(x) - 1) / 3.0))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def plot_maps(emb: np.ndarray, targets: Dict[str, np.ndarray], path: Path, title: str) -> None:
    plt = pyplot()
    labels = {"energy_eV": "energy - mean (eV)", "C-C_A": "C-C bond (Å)", "C-O_A": "C-O bond (Å)",
              "C-C-O_deg": "C-C-O angle (°)"}
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 4), squeeze=False)
    for ax, (name, t) in zip(axes[0], targets.items()):
        sc = ax.scatter(emb[:, 0], emb[:, 1], c=t, s=5, cmap="viridis")
        fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.04)
        ax.set(title=labels.get(name, name), xticks=[], yticks=[])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _untrained_like(model):
    """The same architecture with fresh random weights (seed 0), and the trained model's scale and shift."""
    from mlpot.models import build_potential

    meta = model.meta
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        fresh = build_potential(meta["kind"], meta["species"], meta["cutoff"], dtype=model.dtype, **meta["hparams"])
    finally:
        torch.random.set_rng_state(state)
    return fresh.eval()


def run_latent(model_spec, data: Optional[str] = None, frames: int = 1000, split: str = "test", pool: str = "mean",
               perplexity: float = 30.0, pairs: int = 20000, k: int = 10, folds: int = 5, seed: int = 0,
               output=None, data_dir=None, controls: bool = True) -> dict:
    model, data, fr, graphs = load_model_and_data(model_spec, data, split, frames, seed, data_dir)
    out = output_dir(output, f"mlpot-study-latent-{model.kind}")
    x = pooled_features(model.potential, graphs, pool)
    if not np.isfinite(x).all():
        raise ValueError("the model's node features contain NaN/inf")
    targets = targets_of(fr)
    geometry = pair_distances(np.stack(fr.positions)) if len({len(z) for z in fr.numbers}) == 1 else None
    k = min(k, max(1, int(len(x) * (folds - 1) / folds) - 1))
    result = {
        "model": model.path, "kind": model.kind, "hparams": model.meta.get("hparams"), "data": str(data),
        "split": split, "frames": len(fr), "pool": pool, "feature_dim": int(x.shape[1]), "rebuild_check": model.checked,
        "spearman_latent_distance_vs": distance_correlations(x, targets, geometry, pairs, seed),
        "knn_r2": knn_r2(x, targets, k, folds, seed),
        "knn_r2_standardized": knn_r2(x, targets, k, folds, seed, standardize=True),
        "knn_k": k, "folds": folds, "pairs": pairs,
        "tsne": {"perplexity": perplexity, "seed": seed, "init": "pca"},
    }
    if controls:
        x0 = pooled_features(_untrained_like(model), graphs, pool)
        result["control_untrained"] = {
            "spearman_latent_distance_vs": distance_correlations(x0, targets, geometry, pairs, seed),
            "knn_r2": knn_r2(x0, targets, k, folds, seed),
            "knn_r2_standardized": knn_r2(x0, targets, k, folds, seed, standardize=True),
        }
        if geometry is not None:
            result["control_distances"] = {
                "spearman_latent_distance_vs": distance_correlations(geometry, targets, geometry, pairs, seed),
                "knn_r2": knn_r2(geometry, targets, k, folds, seed),
                "knn_r2_standardized": knn_r2(geometry, targets, k, folds, seed, standardize=True),
            }
    emb = tsne(x, perplexity, seed)
    np.savetxt(out / "tsne.csv", np.column_stack([emb, *targets.values()]), delimiter=",",
               header="tsne_1,tsne_2," + ",".join(targets), comments="", fmt="%.6g")
    title = f"{model.label}: t-SNE of {pool}-pooled last-layer features, {len(fr)} frames of {data} ({split})"
    plot_maps(emb, targets, out / "latent_tsne.png", title)
    write_json(out / "latent.json", result)
    print(format_latent(result))
    print(f"wrote {out / 'latent_tsne.png'}, {out / 'latent.json'}, {out / 'tsne.csv'}")
    result["output"] = str(out)
    result["embedding"] = emb
    return result


def format_latent(result: dict) -> str:
    names = list(result["knn_r2"])
    lines = [f"latent study of {result['kind']} ({result['model']}), {result['frames']} frames, {result['pool']} pooling"]
    header = "".ljust(34) + "".join(n.rjust(11) for n in [*names, "geometry"])
    lines.append(header)

    def row(label, block):
        rho = block["spearman_latent_distance_vs"]
        r2 = block["knn_r2"]
        lines.append(label.ljust(34) + "".join(f"{rho.get(n, float('nan')):11.3f}" for n in [*names, "geometry"]))
        lines.append(("  kNN R^2 (k=%d, %d-fold)" % (result["knn_k"], result["folds"])).ljust(34)
                     + "".join(f"{r2[n]['mean']:11.3f}" for n in names))
        z = block["knn_r2_standardized"]
        lines.append("  kNN R^2, z-scored features".ljust(34) + "".join(f"{z[n]['mean']:11.3f}" for n in names))

    row("Spearman(latent dist, |Δ|)", result)
    if "control_untrained" in result:
        row("untrained: Spearman", result["control_untrained"])
    if "control_distances" in result:
        row("raw distances: Spearman", result["control_distances"])
    return "\n".join(lines)
