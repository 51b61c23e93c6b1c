"""The training loop: E+F loss, EMA, LR schedule, atomic checkpoints, exact resume, test report, deploy."""

import csv
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from mlpot import export, keys
from mlpot.checkpoint import describe, potential_from_description
from mlpot.files import torch_save as atomic_torch_save
from mlpot.data import datasets
from mlpot.data.datasets import Frames, block_split, load_dataset, split_indices
from mlpot.data.graph import Graph, collate, make_graph
from mlpot.models import DTYPES as _DTYPES
from mlpot.models import build_potential
from mlpot.train.compiled import CompiledTraining
from mlpot.train.config import Config, ConfigError
from mlpot.train.metrics import error_metrics, format_metrics, predict



# === data ===
def _load(name_or_path: str, split: Optional[str], cfg: Config, key: str = "data.dataset") -> Frames:
    if not Path(name_or_path).is_file() and name_or_path not in datasets.known_datasets():
        raise ConfigError(
            f"{key}: no such file {name_or_path!r}, and it is not a known dataset name "
            f"({', '.join(datasets.known_datasets())})"
        )
    try:
        return load_dataset(name_or_path, split=split, index=cfg.data.index, data_dir=cfg.data.data_dir)
    except FileNotFoundError as err:
        raise ConfigError(f"{key}: {err}") from None


def split_frames(cfg: Config) -> Tuple[Frames, Frames, Frames]:
    """(train, val, test) frames. Named sets with a test split (sGDML, rMD17, xTB) draw train and val
    from the training file and test from the test file; single files are split into contiguous blocks
    (their frames are a correlated trajectory), train and val drawn at random from the first block."""
    d = cfg.data
    is_file = Path(d.dataset).is_file()
    has_test_file = not is_file and d.dataset not in datasets.SINGLE_FILE_DATASETS
    pool = _load(d.dataset, "train" if has_test_file else None, cfg)
    n_fit = d.train_size + d.val_size
    if d.test_dataset or has_test_file:
        test = _load(d.test_dataset, None, cfg, "data.test_dataset") if d.test_dataset else _load(d.dataset, "test", cfg)
        if d.test_size is not None:
            test = test.subset(split_indices(len(test), [d.test_size], d.seed)[0])
        fit_idx = np.arange(len(pool))
    else:
        n_test = d.test_size if d.test_size is not None else len(pool) - n_fit
        if n_test < 1:
            raise ConfigError(f"data: {len(pool)} frames leave none for testing after {n_fit} for train+val")
        fit_idx, test_idx = block_split(len(pool), [len(pool) - n_test, n_test])
        test = pool.subset(test_idx)
    if n_fit > len(fit_idx):
        raise ConfigError(f"data: train_size + val_size = {n_fit} but only {len(fit_idx)} frames are available")
    train_idx, val_idx = split_indices(len(fit_idx), [d.train_size, d.val_size], d.seed)
    return pool.subset(fit_idx[train_idx]), pool.subset(fit_idx[val_idx]), test


def frames_to_graphs(frames: Frames, cutoff: float, dtype: torch.dtype, device="cpu") -> List[Graph]:
    """Labelled graphs (``energy_ref``, ``forces_ref``) of every frame."""
    graphs = []
    for i in range(len(frames)):
        g = make_graph(frames.numbers[i], frames.positions[i], cutoff, dtype=dtype, device=device)
        g[keys.ENERGY_REF] = torch.tensor([frames.energy[i]], dtype=dtype, device=device)
        g[keys.FORCES_REF] = torch.as_tensor(frames.forces[i], dtype=dtype, device=device)
        graphs.append(g)
    return graphs


def fit_statistics(frames: Frames, species: List[int], cutoff: float) -> Dict[str, object]:
    """Per-species energy shift (least squares on composition), force RMS scale, mean neighbour count."""
    counts = np.array([[np.sum(z == s) for s in species] for z in frames.numbers], dtype=np.float64)
    shift, *_ = np.linalg.lstsq(counts, frames.energy, rcond=None)
    forces = np.concatenate(frames.forces)
    scale = float(np.sqrt((forces**2).mean())) or 1.0
    sample = range(0, len(frames), max(1, len(frames) // 50))
    neighbors = [make_graph(frames.numbers[i], frames.positions[i], cutoff)[keys.EDGE_INDEX].shape[1] / len(frames.numbers[i]) for i in sample]
    return {
        "energy_shift": shift.tolist(),
        "energy_scale": scale,
        "avg_num_neighbors": float(np.mean(neighbors)),
        "min_pair_distances": min_pair_distances(frames),
    }


def min_pair_distances(frames: Frames) -> Dict[str, float]:
    """Shortest distance seen for each element pair, Å, keyed ``"Z1-Z2"`` with Z1 <= Z2."""
    shortest: Dict[Tuple[int, int], float] = {}
    for numbers, positions in zip(frames.numbers, frames.positions):
        diff = positions[None] - positions[:, None]
        dist = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
        i, j = np.triu_indices(len(numbers), k=1)
        pairs = np.sort(np.stack([numbers[i], numbers[j]], axis=1), axis=1)
        for pair in np.unique(pairs, axis=0):
            mask = (pairs[:, 0] == pair[0]) & (pairs[:, 1] == pair[1])
            key = (int(pair[0]), int(pair[1]))
            shortest[key] = min(shortest.get(key, np.inf), float(dist[i[mask], j[mask]].min()))
    return {f"{a}-{b}": round(d, 4) for (a, b), d in sorted(shortest.items())}


# === optimisation pieces ===
class EMA:
    """Exponential moving average of the trainable parameters: shadow <- d * shadow + (1 - d) * p."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].mul_(self.decay).add_(p.detach(), alpha=1.0 - self.decay)

    @torch.no_grad()
    def swap(self, model: torch.nn.Module) -> None:
        """Exchange the model's weights with the averaged ones (call twice to undo)."""
        for n, p in model.named_parameters():
            if n in self.shadow:
                tmp = p.detach().clone()
                p.copy_(self.shadow[n])
                self.shadow[n].copy_(tmp)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        for n, v in state["shadow"].items():
            self.shadow[n].copy_(v)


def make_optimizer(params, name: str = "adam", lr: float = 1e-3, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam or AdamW; the fused implementation (one kernel for all weights) where torch has it for the
    weights' device, which on a CPU saves ~0.5 ms per step over the per-tensor loop."""
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return cls(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def _loss_fn(kind: str, delta: float):
    if kind == "mse":
        return lambda x: (x**2).mean()
    if kind == "mae":
        return lambda x: x.abs().mean()
    return lambda x: torch.nn.functional.huber_loss(x, torch.zeros_like(x), delta=delta)


def _make_scheduler(optimizer, cfg: Config):
    """ReduceLROnPlateau for ``plateau``; None for ``cosine`` (set per epoch by :func:`cosine_lr`) and ``none``."""
    t = cfg.train
    if t.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=t.lr_factor, patience=t.lr_patience, min_lr=t.min_lr
        )
    return None


def cosine_lr(cfg: Config, epoch: int, elapsed: float) -> float:
    """Linear warm-up, then cosine decay from ``lr`` to ``min_lr`` over the run's budget.

    Progress is the larger of the epoch fraction and, with ``max_time``, the time fraction, so a
    time-limited run still ends its schedule at ``min_lr``.
    """
    t = cfg.train
    if epoch < t.warmup_epochs:
        return t.lr * (epoch + 1) / (t.warmup_epochs + 1)
    progress = (epoch - t.warmup_epochs) / max(1, t.epochs - t.warmup_epochs)
    if t.max_time:
        progress = max(progress, elapsed / t.max_time)
    return t.min_lr + (t.lr - t.min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# === distributed ===
def _distributed() -> Tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _sync_epoch(sums: Dict[str, float], elapsed: float, world: int, device) -> Tuple[Dict[str, float], float]:
    """Average the ranks' training sums (each saw only its shards), and give every rank rank 0's
    clock so that all make the same ``max_time`` decision (differing ones deadlock the all-reduce)."""
    import torch.distributed as dist

    names = sorted(sums)
    values = torch.tensor([sums[n] for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    clock = torch.tensor([elapsed], dtype=torch.float64, device=device)
    dist.broadcast(clock, 0)
    return dict(zip(names, (values / world).tolist())), float(clock.item())


def _average_gradients(model: torch.nn.Module, world: int) -> None:
    import torch.distributed as dist

    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


# === the run ===
def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and torch.cuda.is_available():
        # one GPU per process under torchrun
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but torch sees no CUDA device")
    return torch.device(name)


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            name = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} torch thread(s)"


def train(cfg: Config, resume: bool = False, progress: bool = True) -> Dict[str, object]:
    """Fit a potential as ``cfg`` says; writes checkpoints, logs, metrics, plots and model.pt to ``cfg.run_dir``.

    With ``resume=True`` the run continues from ``run_dir/last.pt`` exactly where it stopped
    (weights, optimizer, scheduler, EMA, epoch; batches are shuffled with a per-epoch seed).
    Returns the test metrics.
    """
    rank, world = _distributed()
    main = rank == 0
    t = cfg.train
    run_dir = Path(cfg.run_dir)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    device = _device(t.device)
    if world > 1 and t.batch_size % world:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be a multiple of the {world} processes")
    dtype = _DTYPES[cfg.model.dtype]
    if resume and main:  # temporary files of writes that a kill interrupted
        for pattern in ("last.pt*.tmp", "best.pt*.tmp", "model.pt*.tmp", "log.csv.tmp", "config.yaml.tmp", "metrics.json.tmp"):
            for stale in run_dir.glob(pattern):
                stale.unlink(missing_ok=True)
    if resume and not last_path.is_file():
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"cannot resume: {last_path} does not exist")
        resume = False  # stopped before its first checkpoint: nothing to continue, so the run starts over
    if not resume and last_path.exists():
        raise ConfigError(f"run_dir {run_dir} already holds a run; use --resume or another run_dir")

    train_frames, val_frames, test_frames = split_frames(cfg)
    species = sorted({int(z) for zs in train_frames.numbers for z in zs})
    torch.manual_seed(t.seed)
    if resume:
        state = torch.load(last_path, map_location=device, weights_only=False)
        potential = potential_from_description(state["potential"]).to(device)
        stats = state["statistics"]
    else:
        state = None
        stats = fit_statistics(train_frames, species, cfg.model.cutoff)
        hparams = dict(cfg.model.hparams)
        if cfg.model.kind == "egnn":
            hparams.setdefault("avg_num_neighbors", stats["avg_num_neighbors"])
        potential = build_potential(
            cfg.model.kind, species, cfg.model.cutoff, dtype=dtype,
            energy_shift=torch.tensor(stats["energy_shift"]), energy_scale=stats["energy_scale"], **hparams,
        ).to(device)
    train_graphs = frames_to_graphs(train_frames, cfg.model.cutoff, dtype, device)
    val_graphs = frames_to_graphs(val_frames, cfg.model.cutoff, dtype, device)

    params = [p for p in potential.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, t.optimizer, t.lr, t.weight_decay)
    step_model = CompiledTraining(potential) if t.compile else potential
    scheduler = _make_scheduler(optimizer, cfg)
    ema = EMA(potential, t.ema_decay) if t.ema_decay else None
    loss_of = _loss_fn(t.loss, t.huber_delta)
    history: List[dict] = []
    start_epoch, best_metric, best_epoch, elapsed = 0, float("inf"), -1, 0.0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])  # a resume may switch schedules: then start afresh
        if ema is not None:
            ema.load_state_dict(state["ema"])
        history = state["history"]
        start_epoch, best_metric, best_epoch, elapsed = state["epoch"] + 1, state["best_metric"], state["best_epoch"], state["elapsed"]

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    writer = _tensorboard(run_dir) if main else None
    if t.compile and main and progress:
        tqdm.write("train.compile: the first training step traces and compiles the model (10-90 s on a CPU)")
    stopped = "epochs"
    for epoch in range(start_epoch, t.epochs):
        if t.max_time is not None and elapsed >= t.max_time:
            stopped = "max_time"
            break
        if t.early_stopping_patience is not None and epoch - best_epoch > t.early_stopping_patience and best_epoch >= 0:
            stopped = "early_stopping"
            break
        tic = time.perf_counter()
        if t.scheduler == "cosine":
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(cfg, epoch, elapsed)
        potential.train()
        order = torch.randperm(len(train_graphs), generator=torch.Generator().manual_seed(t.seed * 100003 + epoch))
        batches = [order[i : i + t.batch_size] for i in range(0, len(order), t.batch_size)]
        if world > 1 and len(batches[-1]) % world:
            batches.pop()  # every process needs an equal share of each batch
        sums = {"loss": 0.0, "e": 0.0, "f": 0.0}
        skipped = 0
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{t.epochs}", disable=not (progress and main), leave=False)
        for step, idx in enumerate(bar):
            shard = idx[rank::world]
            batch = collate([train_graphs[i] for i in shard.tolist()])
            out = step_model(batch)
            e_err = (out[keys.ENERGY] - batch[keys.ENERGY_REF]) / batch[keys.NUM_ATOMS]
            f_err = out[keys.FORCES] - batch[keys.FORCES_REF]
            loss = t.energy_weight * loss_of(e_err) + t.forces_weight * loss_of(f_err)
            bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0])
            if world > 1:
                import torch.distributed as dist

                dist.all_reduce(bad)  # every process skips or stops together
            if bad.item() > 0:
                message = (
                    f"non-finite loss at epoch {epoch + 1}, batch {step} (training frames {idx.tolist()})"
                )
                skipped += 1
                if t.on_nonfinite == "stop" or skipped > t.max_skipped_batches:
                    where = (
                        f"the last good state is {last_path}: lower train.lr or check the data, then resume with "
                        f"--resume {run_dir}" if last_path.is_file() else "no epoch finished: lower train.lr or check the data"
                    )
                    raise FloatingPointError(f"{message}; stopped ({skipped} bad batch(es) this epoch); {where}")
                if main:
                    tqdm.write(f"warning: {message}: batch skipped, weights unchanged")
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                _average_gradients(potential, world)
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update(potential)
            sums["loss"] += loss.item()
            sums["e"] += e_err.abs().mean().item() * 1000
            sums["f"] += f_err.abs().mean().item() * 1000
            n = step + 1 - skipped
            bar.set_postfix(E_meV_atom=f"{sums['e'] / n:.2f}", F_meV_A=f"{sums['f'] / n:.1f}")
        bar.close()

        steps = max(1, len(batches) - skipped)
        potential.eval()
        if ema is not None:
            ema.swap(potential)
        val = error_metrics(predict(potential, val_graphs))
        if ema is not None:
            ema.swap(potential)
        # the per-atom energy and force terms of the loss, on the validation set
        val_metric = t.energy_weight * (val["energy_per_atom_mae_meV"] / 1000) ** 2 + t.forces_weight * (val["forces_mae_meV_per_A"] / 1000) ** 2
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val_metric)
        elapsed += time.perf_counter() - tic
        if world > 1:
            sums, elapsed = _sync_epoch(sums, elapsed, world, device)
        improved = val_metric < best_metric
        if improved:
            best_metric, best_epoch = val_metric, epoch
        row = {
            "epoch": epoch + 1, "time_s": round(elapsed, 2), "lr": optimizer.param_groups[0]["lr"],
            "train_loss": sums["loss"] / steps, "train_energy_mae_meV_per_atom": sums["e"] / steps,
            "train_forces_mae_meV_per_A": sums["f"] / steps,
            "val_energy_mae_meV": val["energy_mae_meV"], "val_forces_mae_meV_per_A": val["forces_mae_meV_per_A"],
        }
        history.append(row)
        if main:
            if improved:
                if ema is not None:
                    ema.swap(potential)
                atomic_torch_save({"potential": describe(potential), "epoch": epoch, "val": val}, best_path)
                if ema is not None:
                    ema.swap(potential)
            atomic_torch_save(
                {
                    "potential": describe(potential), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "ema": ema.state_dict() if ema is not None else None, "epoch": epoch,
                    "best_metric": best_metric, "best_epoch": best_epoch, "elapsed": elapsed,
                    "history": history, "statistics": stats, "config": cfg.to_dict(),
                },
                last_path,
            )
            _write_log(run_dir / "log.csv", history)
            if writer is not None:
                for name, value in row.items():
                    if name != "epoch":
                        writer.add_scalar(name, value, epoch + 1)
                writer.flush()
            if progress:
                tqdm.write(
                    f"epoch {epoch + 1}: val E MAE {val['energy_mae_meV']:.2f} meV, F MAE {val['forces_mae_meV_per_A']:.2f} meV/Å, "
                    f"lr {row['lr']:.2e}, {elapsed:.0f} s"
                )

    if writer is not None:
        writer.close()
    if not main:
        return {}
    return finish(cfg, test_frames, history, stopped, elapsed, device, progress)


def _tensorboard(run_dir: Path):
    """A TensorBoard writer in ``run_dir/tensorboard`` when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _write_text_atomic(path: Path, text: str) -> None:
    """Write to ``path.tmp``, then rename: a kill never leaves a half-written config or metrics file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_log(path: Path, history: List[dict]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


def finish(cfg: Config, test_frames: Frames, history, stopped: str, elapsed: float, device, progress: bool) -> dict:
    """Test the best weights, write metrics.json, plots and the deployed model.pt."""
    run_dir = Path(cfg.run_dir)
    best = torch.load(run_dir / "best.pt", map_location=device, weights_only=False)
    potential = potential_from_description(best["potential"]).to(device).eval()
    dtype = _DTYPES[cfg.model.dtype]
    test_pred = predict(potential, frames_to_graphs(test_frames, cfg.model.cutoff, dtype, device))
    test = error_metrics(test_pred)
    metrics = {
        "test": test,
        "val": best["val"],
        "dataset": cfg.data.dataset,
        "test_source": test_frames.source,
        "train_size": cfg.data.train_size,
        "val_size": cfg.data.val_size,
        "best_epoch": best["epoch"] + 1,
        "epochs_run": len(history),
        "stopped_by": stopped,
        "train_time_s": round(elapsed, 1),
        "hardware": _hardware(device),
        "num_parameters": sum(p.numel() for p in potential.parameters()),
        "model": {"kind": cfg.model.kind, "cutoff": cfg.model.cutoff, "dtype": cfg.model.dtype, "hparams": potential.hparams},
    }
    if history:  # a run resumed after its last epoch was killed before it wrote the log
        _write_log(run_dir / "log.csv", history)
    _write_text_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    stats = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)["statistics"]
    export.save(
        potential, run_dir / "model.pt", dataset=cfg.data.dataset, metrics=test,
        min_pair_distances=stats.get("min_pair_distances", {}),
    )
    _plots(run_dir, test_pred, history)
    if progress:
        print(f"test ({len(test_frames)} frames of {test_frames.source}):\n{format_metrics(test)}")
        print(f"wrote {run_dir / 'model.pt'}, metrics.json, parity.png, learning_curve.png")
    return metrics


def _plots(run_dir: Path, pred: dict, history: List[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_e, ax_f) = plt.subplots(1, 2, figsize=(9, 4))
    ax_e.scatter(pred["energy_ref"], pred["energy"], s=4)
    ax_e.set(xlabel="reference energy (eV)", ylabel="predicted energy (eV)", title="energy")
    ax_f.scatter(pred["forces_ref"].ravel(), pred["forces"].ravel(), s=1, alpha=0.3)
    ax_f.set(xlabel="reference force (eV/Å)", ylabel="predicted force (eV/Å)", title="force components")
    for ax in (ax_e, ax_f):
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    fig.tight_layout()
    fig.savefig(run_dir / "parity.png", dpi=120)
    plt.close(fig)

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.semilogy(epochs, [h["train_forces_mae_meV_per_A"] for h in history], label="train force MAE")
    ax.semilogy(epochs, [h["val_forces_mae_meV_per_A"] for h in history], label="val force MAE")
    ax.set(xlabel="epoch", ylabel="meV/Å", title="learning curve")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "learning_curve.png", dpi=120)
    plt.close(fig)
