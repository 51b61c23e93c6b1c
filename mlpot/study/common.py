"""Shared pieces of the studies: loading models (deployed, checkpoint or run folder) and data, hooks, output."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mlpot import export, files, keys
from mlpot.checkpoint import load_potential
from mlpot.data import datasets
from mlpot.data.datasets import Frames, load_dataset, split_indices
from mlpot.data.graph import Graph, collate
from mlpot.data.registry import study_dataset
from mlpot.dtypes import DTYPES, dtype_of, name_of
from mlpot.models import Potential


# === models ===
@dataclass
class LoadedModel:
    """A model for the studies: the eager Potential (hooks work on it), the TorchScript module when the
    source was a deployed file, and metadata (kind, species, cutoff, dtype, hparams, dataset, ...)."""

    potential: Potential
    scripted: Optional[torch.jit.ScriptModule]
    meta: dict
    path: str
    checked: Dict[str, float] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.meta["dtype"]]

    @property
    def label(self) -> str:
        hp = self.meta.get("hparams", {})
        extra = f" lmax {hp['lmax']}" if "lmax" in hp else ""
        return f"{self.kind}{extra} ({Path(self.path).name})"


def resolve_model_path(spec) -> Path:
    """A model argument as a file: a deployed ``.pt``, a checkpoint, or a run folder (its ``model.pt``,
    else ``best.pt``)."""
    path = Path(spec)
    if path.is_dir():
        for name in ("model.pt", "best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"run folder {path} holds no model.pt, best.pt or last.pt")
    if not path.is_file():
        raise FileNotFoundError(f"no model file or run folder at {path}")
    return path


def _dataset_of_run(path: Path) -> Optional[str]:
    config = path.parent / "config.yaml"
    if config.is_file():
        import yaml

        raw = yaml.safe_load(config.read_text()) or {}
        return (raw.get("data") or {}).get("dataset")
    return None


def load_model(spec, dtype: Optional[str] = None) -> LoadedModel:
    """Load MODEL (deployed file, training checkpoint or run folder) as an eager Potential in eval mode.

    A deployed file is rebuilt from its metadata with :func:`mlpot.models.build_potential` and the
    TorchScript module's weights; :func:`check_rebuild` then compares the two on real frames.
    ``dtype`` ("float32"/"float64") converts the model; default: its own.
    """
    path = resolve_model_path(spec)
    if export.sniff(path) == "torchscript":
        scripted, meta = export.load(path)
        meta = dict(meta)
        potential = export.potential_from_scripted(scripted, meta, path)
        # the archive's entries the eager model does not keep (non-persistent tables it rebuilds)
        ignored = sorted(set(scripted.state_dict()) - set(potential.state_dict()))
    else:
        potential = load_potential(path)
        scripted, ignored = None, []
        meta = {
            "kind": potential.kind, "species": list(potential.species), "cutoff": potential.cutoff,
            "dtype": name_of(potential.energy_scale.dtype), "hparams": potential.hparams,
        }
        dataset = _dataset_of_run(path)
        if dataset:
            meta["dataset"] = dataset
    if dtype is not None:
        potential.to(dtype_of(dtype))
        if scripted is not None:
            scripted.to(dtype_of(dtype))
        meta["dtype"] = dtype
    model = LoadedModel(potential.eval(), scripted, meta, str(path))
    if ignored:
        model.checked["archive_keys_not_loaded"] = ignored
    return model


def check_rebuild(model: LoadedModel, graphs: Sequence[Graph]) -> Dict[str, float]:
    """Max |ΔE| (eV) and |ΔF| (eV/Å) between the rebuilt eager model and the deployed TorchScript one;
    raises ValueError when they disagree beyond rounding (then hooks would study a different model)."""
    if model.scripted is None or not graphs:
        return {}
    batch = collate(list(graphs))
    out_eager = model.potential(batch)
    out_script = model.scripted(batch)
    de = (out_eager[keys.ENERGY] - out_script[keys.ENERGY]).abs().max().item()
    df = (out_eager[keys.FORCES] - out_script[keys.FORCES]).abs().max().item()
    scale = out_script[keys.ENERGY].abs().max().item()
    single = model.dtype == torch.float32
    tol_e = (1e-6 * scale + 1e-4) if single else (1e-10 * scale + 1e-8)
    tol_f = 1e-3 if single else 1e-7
    if not (de <= tol_e and df <= tol_f):  # also catches NaN
        raise ValueError(
            f"{model.path}: the eager model rebuilt from the metadata does not reproduce the deployed file "
            f"(max |ΔE| {de:.3g} eV > {tol_e:.3g} or max |ΔF| {df:.3g} eV/Å > {tol_f:.3g}); "
            f"the metadata's kind/hparams do not describe these weights"
        )
    model.checked.update({"max_energy_diff_eV": de, "max_forces_diff_eV_per_A": df, "frames": len(graphs)})
    return model.checked


# === data ===
def load_frames(spec: str, split: Optional[str] = "test", num_frames: Optional[int] = None, seed: int = 0,
                data_dir=None) -> Frames:
    """Frames of a molecule name (its study dataset, see mlpot.data.registry), dataset name or file;
    ``num_frames`` drawn at random (sorted, fixed by ``seed``).

    ``split`` ("train"/"test") applies to named datasets that have one; files and single-file sets are read whole.
    """
    name = study_dataset(spec)
    if Path(name).is_file():
        frames = load_dataset(name)
    elif name in datasets.known_datasets():
        split = None if name in datasets.SINGLE_FILE_DATASETS else (split or "test")
        frames = load_dataset(name, split, data_dir=data_dir)
    else:
        raise FileNotFoundError(
            f"DATA {spec!r} is neither a file nor a known dataset ({', '.join(datasets.known_datasets())})"
        )
    if num_frames is not None and num_frames < len(frames):
        frames = frames.subset(split_indices(len(frames), [num_frames], seed)[0])
    return frames


def load_model_and_data(model_spec, data: Optional[str], split: Optional[str], num_frames: Optional[int], seed: int,
                        data_dir=None) -> Tuple[LoadedModel, str, Frames, List[Graph]]:
    """The model, the data name (default: the model's training dataset), its frames and graphs, with the
    eager rebuild checked against the deployed file on the first graphs. ``model_spec`` may be loaded already."""
    model = model_spec if isinstance(model_spec, LoadedModel) else load_model(model_spec)
    data = data or model.meta.get("dataset")
    if not data:
        raise ValueError("give DATA: the model file does not name its training dataset")
    frames = load_frames(data, split, num_frames, seed, data_dir)
    graphs = graphs_of(frames, model)
    check_rebuild(model, graphs[:10])
    return model, data, frames, graphs


def graphs_of(frames: Frames, model: LoadedModel) -> List[Graph]:
    from mlpot.data.splits import frames_to_graphs

    return frames_to_graphs(frames, model.meta["cutoff"], model.dtype)


def evaluate(model, graphs: Sequence[Graph], batch_size: int = 50) -> Dict[str, float]:
    """Test errors (meV, meV/Å) of any graph -> energies/forces module on labelled graphs."""
    from mlpot.train.metrics import error_metrics, predict

    return error_metrics(predict(model, list(graphs), batch_size))


@torch.no_grad()
def pooled_features(potential: Potential, graphs: Sequence[Graph], pool: str = "mean", batch_size: int = 100) -> np.ndarray:
    """(M, F) last-layer invariant node features (``node_features``) pooled per structure (mean or sum)."""
    saved = potential.compute_forces
    potential.compute_forces = False
    rows = []
    try:
        for start in range(0, len(graphs), batch_size):
            batch = collate(list(graphs[start : start + batch_size]))
            out = potential(batch)
            feats = out[keys.NODE_FEATURES].double()
            num = batch[keys.NUM_ATOMS].shape[0]
            summed = torch.zeros(num, feats.shape[1], dtype=feats.dtype).index_add(0, batch[keys.BATCH], feats)
            if pool == "mean":
                summed = summed / batch[keys.NUM_ATOMS].unsqueeze(1).to(summed.dtype)
            rows.append(summed.numpy())
    finally:
        potential.compute_forces = saved
    return np.concatenate(rows)


# === output ===
def output_dir(path, default: str) -> Path:
    out = Path(path or default)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    return value


def write_json(path, data) -> Path:
    """A study result as JSON (numpy values converted), written atomically."""
    return files.write_json(path, _jsonable(data))


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, title: str) -> None:
    """Title ``fig``, lay it out, write it to ``path`` as PNG (atomically) and close it."""
    from mlpot import files

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    files.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    pyplot().close(fig)


def median_latency_ms(module, graph: Graph, calls: int = 100, warmup: int = 10) -> float:
    """Median wall time of one energy+forces call of ``module`` on ``graph``, ms (in the current thread count)."""
    import time

    times = []
    for i in range(warmup + calls):
        g = dict(graph)
        g[keys.POSITIONS] = graph[keys.POSITIONS].clone()
        tic = time.perf_counter()
        out = module(g)
        out[keys.FORCES].sum().item()
        if i >= warmup:
            times.append(time.perf_counter() - tic)
    return float(np.median(times) * 1000.0)
