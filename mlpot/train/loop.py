"""The training loop: E+F loss, EMA, LR schedule, atomic checkpoints, exact resume, test report, deploy.

:func:`train` runs the stages: set-up (:class:`Trainer`: run dir, resume state, data, model, optimizer,
schedule, EMA, data parallelism), epochs (:meth:`Trainer.train_epoch`), evaluation
(:meth:`Trainer.evaluate`), checkpoints and log (:meth:`Trainer.end_epoch`), then the test report
(:func:`report`) and the deployed model (:func:`deploy`).
"""

import contextlib
import csv
import io
import math
import os
import platform
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from mlpot import export, files, keys
from mlpot.checkpoint import describe, potential_from_description
from mlpot.data import datasets
from mlpot.data.datasets import Frames, load_dataset
from mlpot.data.graph import collate
from mlpot.data.splits import frames_to_graphs, split_frames
from mlpot.data.statistics import fit_statistics
from mlpot.dtypes import dtype_of
from mlpot.models import build_potential
from mlpot.threads import torch_threads
from mlpot.train.compiled import CompiledTraining
from mlpot.train.config import Config, ConfigError, parse_e0s
from mlpot.train.finetune import initial_potential
from mlpot.train.metrics import error_metrics, format_metrics, predict, stress_labels

# the files of a run directory, each written atomically (files.atomic_path: ``<name>.<random>.tmp``)
RUN_FILES = ("config.yaml", "last.pt", "best.pt", "log.csv", "metrics.json", "model.pt")


# === data: the config glue around mlpot.data.splits ===
def _load(name_or_path: str, split: Optional[str], cfg: Config, key: str = "data.dataset") -> Frames:
    if not Path(name_or_path).is_file() and name_or_path not in datasets.known_datasets():
        raise ConfigError(
            f"{key}: no such file {name_or_path!r}, and it is not a known dataset name "
            f"({', '.join(datasets.known_datasets())})"
        )
    try:
        return load_dataset(name_or_path, split=split, index=cfg.data.index, data_dir=cfg.data.data_dir,
                            energy_key=cfg.data.energy_key, forces_key=cfg.data.forces_key,
                            stress_key=cfg.data.stress_key, stress_unit=cfg.data.stress_unit)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{key}: {err}") from None


def load_splits(cfg: Config) -> Tuple[Frames, Frames, Frames]:
    """(train, val, test) frames of ``cfg.data``. Named sets with a test split (sGDML, rMD17, xTB) draw
    train and val from the training file and test from the test file; a single file is split as
    ``data.split`` says (see :func:`mlpot.data.splits.split_frames`)."""
    d = cfg.data
    has_test_file = not Path(d.dataset).is_file() and d.dataset not in datasets.SINGLE_FILE_DATASETS
    pool = _load(d.dataset, "train" if has_test_file else None, cfg)
    test = None
    if d.test_dataset:
        test = _load(d.test_dataset, None, cfg, "data.test_dataset")
    elif has_test_file:
        test = _load(d.dataset, "test", cfg)
    try:
        return split_frames(pool, d.train_size, d.val_size, d.seed, test=test, test_size=d.test_size, split=d.split)
    except ValueError as err:
        raise ConfigError(f"data: {err}") from None


# === optimisation pieces ===
def make_ema(weights: torch.nn.ParameterList, decay: float) -> AveragedModel:
    """Exponential moving average of ``weights`` (average <- decay * average + (1 - decay) * w after
    each ``ema.update_parameters(weights)``), starting from their current values.

    It averages a ParameterList of the potential's weights rather than a copy of the whole potential:
    AveragedModel deep-copies its module, and a deep copy of e3nn's generated modules gains a buffer
    the original lacks (so ``update_parameters``, which also copies the buffers, would fail).
    :func:`averaged_weights` puts the averages into the potential for evaluation and best.pt.
    """
    ema = AveragedModel(weights, multi_avg_fn=get_ema_multi_avg_fn(decay))
    ema.update_parameters(weights)  # the first update copies
    return ema


@contextlib.contextmanager
def averaged_weights(params: List[torch.nn.Parameter], ema: Optional[AveragedModel]) -> Iterator[None]:
    """Inside the block ``params`` hold the EMA's averages (when there is an EMA), after it their own values."""
    if ema is None:
        yield
        return
    own = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, average in zip(params, ema.module.parameters(), strict=True):
            p.copy_(average)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(params, own, strict=True):
                p.copy_(value)


def make_optimizer(params, name: str = "adam", lr: float = 1e-3, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam or AdamW; the fused implementation (one kernel for all weights) where torch has it for the
    weights' device, which on a CPU saves ~0.5 ms per step over the per-tensor loop."""
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return cls(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def _loss_fn(kind: str, delta: float):
    """loss(x, w): the mean over x's elements of the per-element loss times the weights w (broadcast to
    x's shape; w = 1 gives the plain mean exactly)."""
    if kind == "mse":
        return lambda x, w: (x**2 * w).mean()
    if kind == "mae":
        return lambda x, w: (x.abs() * w).mean()
    return lambda x, w: (torch.nn.functional.huber_loss(x, torch.zeros_like(x), delta=delta, reduction="none") * w).mean()


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


# === data parallelism (torchrun) ===
def _distributed() -> Tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


class _VirialStep(torch.nn.Module):
    """A training step that also gives the virial (for a stress loss), as a module's forward (for DDP)."""

    def __init__(self, potential):
        super().__init__()
        self.potential = potential

    def forward(self, batch):
        return self.potential.energy_and_forces(batch, True, True)


class _CompiledStep(torch.nn.Module):
    """The compiled training step behind a module's forward, for DistributedDataParallel.

    CompiledTraining calls a compiled function of the weights, not the potential's forward. DDP
    all-reduces only the gradients of a backward that follows its own forward (that is where it arms
    its gradient hooks), so the compiled step has to be called through DDP like a module's forward.
    Its backward then reaches the weights' gradient accumulators as the eager one does (checked: two
    gloo processes with ``train.compile`` give one eager process's weights to 1e-10).
    """

    def __init__(self, compiled: CompiledTraining):
        super().__init__()
        self.potential = compiled.potential  # registered, so that DDP finds the weights
        self.compiled = compiled

    def forward(self, batch):
        return self.compiled(batch)


def _training_step(potential, compile: bool, world: int, device: torch.device, virial: bool = False):
    """What a training batch is passed through: the potential or its compiled step (with ``virial``:
    steps that also give the virial), under DistributedDataParallel (gradients averaged over the
    processes in backward) when ``world > 1``. DDP expects a gradient for every trainable weight in each
    backward (every model kind gives one)."""
    if compile:
        step = CompiledTraining(potential, virial=virial)
    else:
        step = _VirialStep(potential) if virial else potential
    if world == 1:
        return step
    module = _CompiledStep(step) if compile else step
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def epoch_batches(num_frames: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> List[List[int]]:
    """Frame indices of this process's share of each training batch of ``epoch``.

    Each epoch has one permutation of the frames, seeded by (seed, epoch); batch k of it is split among
    the ``world`` processes (strided, by DistributedSampler), so that together they step on exactly
    the batches one process would.
    """
    sampler = DistributedSampler(range(num_frames), num_replicas=world, rank=rank, shuffle=True,
                                 seed=seed * 100003, drop_last=True)  # drop_last: as many frames for each
    sampler.set_epoch(epoch)
    order = list(sampler)
    size = batch_size // world
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    if world > 1 and num_frames % world:
        # the last batch cannot be shared equally (the sampler dropped a few of its frames): leave it out
        batches = [b for b in batches if len(b) == size]
    return batches


def _sync_epoch(sums: Dict[str, float], elapsed: float, world: int, device) -> Tuple[Dict[str, float], float]:
    """Average the ranks' training sums (each saw only its shards), and give every rank rank 0's
    clock so that all make the same ``max_time`` decision (differing ones deadlock the all-reduce)."""
    names = sorted(sums)
    values = torch.tensor([sums[n] for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    clock = torch.tensor([elapsed], dtype=torch.float64, device=device)
    dist.broadcast(clock, 0)
    return dict(zip(names, (values / world).tolist())), float(clock.item())


# === set-up ===
def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and torch.cuda.is_available():
        # one GPU per process under torchrun
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but torch sees no CUDA device")
    return torch.device(name)


def _check_run_dir(run_dir: Path, resume: bool, main: bool) -> bool:
    """Whether there is a run to resume; tidies what kills left behind, refuses to overwrite a run."""
    last = run_dir / "last.pt"
    if resume and main:  # temporary files of writes that a kill interrupted
        for name in RUN_FILES:
            for stale in run_dir.glob(f"{name}*{files.TMP_SUFFIX}*"):
                stale.unlink(missing_ok=True)
    if resume and not last.is_file():
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"cannot resume: {last} does not exist")
        resume = False  # stopped before its first checkpoint: nothing to continue, so the run starts over
    if not resume and last.exists():
        raise ConfigError(f"run_dir {run_dir} already holds a run; use --resume or another run_dir")
    return resume


def _build_potential(cfg: Config, train_frames: Frames, state: Optional[dict], device):
    """(potential, training-set statistics): rebuilt from a checkpoint's ``state``, or from the deployed file
    ``model.init`` (:mod:`mlpot.train.finetune`), or new, its energy shift and scale (and an egnn's
    neighbour count) fitted to the training frames."""
    if state is not None:
        return potential_from_description(state["potential"]).to(device), state["statistics"]
    species = sorted({int(z) for zs in train_frames.numbers for z in zs})
    if cfg.model.init:
        return initial_potential(cfg, train_frames, species, device)
    try:
        stats = fit_statistics(train_frames, species, cfg.model.cutoff, parse_e0s(cfg.model.e0s))
    except ValueError as err:  # a mapping that lacks a training element
        raise ConfigError(f"model.e0s: {err}") from None
    hparams = dict(cfg.model.hparams)
    if cfg.model.kind == "egnn":
        hparams.setdefault("avg_num_neighbors", stats["avg_num_neighbors"])
    potential = build_potential(
        cfg.model.kind, species, cfg.model.cutoff, dtype=dtype_of(cfg.model.dtype),
        energy_shift=torch.tensor(stats["energy_shift"]), energy_scale=stats["energy_scale"], **hparams,
    )
    return potential.to(device), stats


class Trainer:
    """One training run of ``cfg`` in this process (rank ``rank`` of ``world`` under torchrun).

    Building it does the set-up: run dir checks, resume state, data, model, optimizer, schedule, EMA.
    :meth:`fit` then runs the epochs, writing checkpoints and the log as it goes.
    """

    def __init__(self, cfg: Config, resume: bool = False, rank: int = 0, world: int = 1):
        t = cfg.train
        self.cfg, self.rank, self.world, self.main = cfg, rank, world, rank == 0
        self.run_dir = Path(cfg.run_dir)
        self.last_path, self.best_path = self.run_dir / "last.pt", self.run_dir / "best.pt"
        self.device = _device(t.device)
        if world > 1 and t.batch_size % world:
            raise ConfigError(f"train.batch_size ({t.batch_size}) must be a multiple of the {world} processes")
        resume = _check_run_dir(self.run_dir, resume, self.main)

        train_frames, val_frames, self.test_frames = load_splits(cfg)
        torch.manual_seed(t.seed)  # the weights' initialisation
        state = torch.load(self.last_path, map_location=self.device, weights_only=False) if resume else None
        self.potential, self.stats = _build_potential(cfg, train_frames, state, self.device)
        dtype = dtype_of(cfg.model.dtype)
        self.train_graphs = frames_to_graphs(train_frames, cfg.model.cutoff, dtype, self.device)
        # per-frame loss weights, indexed by training frame
        self.train_weights = torch.as_tensor(train_frames.weights, dtype=dtype, device=self.device)
        self.val_graphs = frames_to_graphs(val_frames, cfg.model.cutoff, dtype, self.device)
        self._set_stress_labels(train_frames, val_frames, dtype)

        self.params = [p for p in self.potential.parameters() if p.requires_grad]
        self.weights = torch.nn.ParameterList(self.params)  # the same tensors, for the EMA's updates
        self.optimizer = make_optimizer(self.params, t.optimizer, t.lr, t.weight_decay)
        self.step_model = _training_step(self.potential, t.compile, world, self.device, virial=self.stress_loss)
        self.scheduler = _make_scheduler(self.optimizer, cfg)
        self.ema = make_ema(self.weights, t.ema_decay) if t.ema_decay else None
        self.loss_of = _loss_fn(t.loss, t.huber_delta)
        self.history: List[dict] = []
        self.start_epoch, self.best_metric, self.best_epoch, self.elapsed = 0, float("inf"), -1, 0.0
        if state is not None:
            self._restore(state)

    def _set_stress_labels(self, train_frames: Frames, val_frames: Frames, dtype) -> None:
        """The training frames' reference stresses and volumes for the stress loss (frames without a stress
        or a full periodic cell are left out of it), and the validation frames' stresses for the metrics."""
        t = self.cfg.train
        self.stress_loss = t.stress_weight > 0
        self.val_stress = stress_labels(val_frames)
        if not self.stress_loss:
            return
        stress = stress_labels(train_frames)
        if stress is None:
            raise ConfigError(
                "train.stress_weight > 0 but no training frame has a stress (and a cell periodic in all three "
                "directions); set train.stress_weight: 0 or name the stress label with data.stress_key"
            )
        usable = np.isfinite(stress).all(axis=(1, 2))
        self.train_has_stress = torch.as_tensor(usable, device=self.device)
        self.train_stress = torch.as_tensor(np.nan_to_num(stress), dtype=dtype, device=self.device)
        volume = np.where(usable, np.abs(np.linalg.det(train_frames.cells)), 1.0)
        self.train_volume = torch.as_tensor(volume, dtype=dtype, device=self.device)

    def _stress_error(self, out, idx: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(predicted - reference stress (K, 3, 3) eV/Å^3, their frames' loss weights (K, 1, 1)) of the K
        frames of the batch that have a reference stress; sigma = -virial / volume."""
        has = self.train_has_stress[idx]
        stress = -out[keys.VIRIAL] / self.train_volume[idx][:, None, None]
        return (stress - self.train_stress[idx])[has], self.train_weights[idx][has][:, None, None]

    def _restore(self, state: dict) -> None:
        """Continue from a ``last.pt`` exactly: optimizer, schedule, EMA, history, clock."""
        if isinstance(state.get("ema"), dict) and "shadow" in state["ema"]:
            raise ConfigError(f"{self.last_path} was written by an older mlpot and cannot be resumed; start a new run_dir")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])  # a resume may switch schedules: then start afresh
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.history = state["history"]
        self.start_epoch, self.best_metric = state["epoch"] + 1, state["best_metric"]
        self.best_epoch, self.elapsed = state["best_epoch"], state["elapsed"]

    # === epochs ===
    def fit(self, progress: bool = True) -> str:
        """Train until ``train.epochs``, ``max_time`` or early stopping; returns which of them stopped it."""
        t = self.cfg.train
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            files.write_text(self.run_dir / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        writer = _tensorboard(self.run_dir) if self.main else None
        if self.main and progress and "e0s" in self.stats:
            tqdm.write(describe_e0s(self.stats["e0s"]))
        if t.compile and self.main and progress:
            tqdm.write("train.compile: the first training step traces and compiles the model (10-90 s on a CPU)")
        try:
            for epoch in range(self.start_epoch, t.epochs):
                stopped = self._stop_reason(epoch)
                if stopped:
                    return stopped
                tic = time.perf_counter()
                sums, steps = self.train_epoch(epoch, progress)
                val, val_metric = self.evaluate()
                self.end_epoch(epoch, tic, sums, steps, val, val_metric, writer, progress)
            return "epochs"
        finally:
            if writer is not None:
                writer.close()

    def _stop_reason(self, epoch: int) -> Optional[str]:
        t = self.cfg.train
        if t.max_time is not None and self.elapsed >= t.max_time:
            return "max_time"
        patience = t.early_stopping_patience
        if patience is not None and self.best_epoch >= 0 and epoch - self.best_epoch > patience:
            return "early_stopping"
        return None

    def train_epoch(self, epoch: int, progress: bool = True) -> Tuple[Dict[str, float], int]:
        """One pass over the training frames. Returns the sums over batches of the loss and of the
        energy (meV/atom), force (meV/Å) and, with a stress loss, stress (meV/Å^3) MAEs, and the number of
        batches stepped on."""
        t = self.cfg.train
        if t.scheduler == "cosine":
            for group in self.optimizer.param_groups:
                group["lr"] = cosine_lr(self.cfg, epoch, self.elapsed)
        self.potential.train()
        batches = epoch_batches(len(self.train_graphs), t.batch_size, t.seed, epoch, self.rank, self.world)
        sums = {"loss": 0.0, "e": 0.0, "f": 0.0, **({"s": 0.0} if self.stress_loss else {})}
        skipped = 0
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{t.epochs}", disable=not (progress and self.main), leave=False)
        for step, idx in enumerate(bar):
            loss, errors = self.batch_loss(idx)
            e_err, f_err, s_err = errors["e"], errors["f"], errors.get("s")
            if self._nonfinite_anywhere(loss):
                skipped += 1
                self._skip_or_stop(f"non-finite loss at epoch {epoch + 1}, batch {step} (training frames {idx})", skipped)
                continue
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # under DDP the gradients come out averaged over the processes
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update_parameters(self.weights)
            sums["loss"] += loss.item()
            sums["e"] += e_err.abs().mean().item() * 1000
            sums["f"] += f_err.abs().mean().item() * 1000
            if s_err is not None and len(s_err):
                sums["s"] += s_err.abs().mean().item() * 1000
            n = step + 1 - skipped
            bar.set_postfix(E_meV_atom=f"{sums['e'] / n:.2f}", F_meV_A=f"{sums['f'] / n:.1f}")
        bar.close()
        return sums, max(1, len(batches) - skipped)

    def batch_loss(self, idx: List[int]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(loss, errors) of the training frames ``idx`` through the training step: per-atom energy errors
        ``e`` (B,) eV, force errors ``f`` (N, 3) eV/Å and, with a stress loss, stress errors ``s`` (K, 3, 3)
        eV/Å^3 of the K frames with a reference stress; each frame's terms weighted by its loss weight."""
        t = self.cfg.train
        batch = collate([self.train_graphs[i] for i in idx])
        out = self.step_model(batch)
        errors = {
            "e": (out[keys.ENERGY] - batch[keys.ENERGY_REF]) / batch[keys.NUM_ATOMS],
            "f": out[keys.FORCES] - batch[keys.FORCES_REF],
        }
        w = self.train_weights[idx]  # (B,): each frame's energy error and its atoms' force errors
        w_atoms = w.repeat_interleave(batch[keys.NUM_ATOMS])[:, None]
        loss = t.energy_weight * self.loss_of(errors["e"], w) + t.forces_weight * self.loss_of(errors["f"], w_atoms)
        if self.stress_loss:
            errors["s"], w_stress = self._stress_error(out, idx)
            if len(errors["s"]):  # a batch without stress labels has no stress term
                loss = loss + t.stress_weight * self.loss_of(errors["s"], w_stress)
        return loss, errors

    def _nonfinite_anywhere(self, loss: torch.Tensor) -> bool:
        bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=self.device)
        if self.world > 1:
            dist.all_reduce(bad)  # every process skips or stops together
        return bad.item() > 0

    def _skip_or_stop(self, message: str, skipped: int) -> None:
        t = self.cfg.train
        if t.on_nonfinite == "stop" or skipped > t.max_skipped_batches:
            where = (
                f"the last good state is {self.last_path}: lower train.lr or check the data, then resume with "
                f"--resume {self.run_dir}" if self.last_path.is_file() else "no epoch finished: lower train.lr or check the data"
            )
            raise FloatingPointError(f"{message}; stopped ({skipped} bad batch(es) this epoch); {where}")
        if self.main:
            tqdm.write(f"warning: {message}: batch skipped, weights unchanged")

    def evaluate(self) -> Tuple[Dict[str, float], float]:
        """Validation errors of the (EMA-averaged) weights, and the metric that picks the best epoch and
        drives the plateau schedule: the per-atom energy, force and stress terms of the loss (eV²,
        (eV/Å)², (eV/Å^3)²)."""
        t = self.cfg.train
        self.potential.eval()
        with averaged_weights(self.params, self.ema):
            val = error_metrics(predict(self.potential, self.val_graphs, stress_ref=self.val_stress))
        metric = t.energy_weight * (val["energy_per_atom_mae_meV"] / 1000) ** 2 + t.forces_weight * (val["forces_mae_meV_per_A"] / 1000) ** 2
        if self.stress_loss and "stress_mae_meV_per_A3" in val:
            metric += t.stress_weight * (val["stress_mae_meV_per_A3"] / 1000) ** 2
        return val, metric

    def end_epoch(self, epoch, tic, sums, steps, val, val_metric, writer, progress) -> None:
        """Step the plateau schedule, log the epoch and (on rank 0) write best.pt, last.pt and log.csv."""
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(val_metric)
        self.elapsed += time.perf_counter() - tic
        if self.world > 1:
            sums, self.elapsed = _sync_epoch(sums, self.elapsed, self.world, self.device)
        improved = val_metric < self.best_metric
        if improved:
            self.best_metric, self.best_epoch = val_metric, epoch
        row = {
            "epoch": epoch + 1, "time_s": round(self.elapsed, 2), "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": sums["loss"] / steps, "train_energy_mae_meV_per_atom": sums["e"] / steps,
            "train_forces_mae_meV_per_A": sums["f"] / steps,
            "val_energy_mae_meV": val["energy_mae_meV"], "val_forces_mae_meV_per_A": val["forces_mae_meV_per_A"],
        }
        if self.stress_loss:
            row["train_stress_mae_meV_per_A3"] = sums["s"] / steps
            row["val_stress_mae_meV_per_A3"] = val.get("stress_mae_meV_per_A3", float("nan"))
        self.history.append(row)
        if not self.main:
            return
        if improved:
            with averaged_weights(self.params, self.ema):
                files.torch_save({"potential": describe(self.potential), "epoch": epoch, "val": val}, self.best_path)
        files.torch_save(
            {
                "potential": describe(self.potential), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "ema": self.ema.state_dict() if self.ema is not None else None, "epoch": epoch,
                "best_metric": self.best_metric, "best_epoch": self.best_epoch, "elapsed": self.elapsed,
                "history": self.history, "statistics": self.stats, "config": self.cfg.to_dict(),
            },
            self.last_path,
        )
        _write_log(self.run_dir / "log.csv", self.history)
        if writer is not None:
            for name, value in row.items():
                if name != "epoch":
                    writer.add_scalar(name, value, epoch + 1)
            writer.flush()
        if progress:
            tqdm.write(
                f"epoch {epoch + 1}: val E MAE {val['energy_mae_meV']:.2f} meV, F MAE {val['forces_mae_meV_per_A']:.2f} meV/Å, "
                f"lr {row['lr']:.2e}, {self.elapsed:.0f} s"
            )


def train(cfg: Config, resume: bool = False, progress: bool = True) -> Dict[str, object]:
    """Fit a potential as ``cfg`` says; writes checkpoints, logs, metrics, plots and model.pt to ``cfg.run_dir``.

    With ``resume=True`` the run continues from ``run_dir/last.pt`` exactly where it stopped
    (weights, optimizer, scheduler, EMA, epoch; batches are shuffled with a per-epoch seed).
    ``train.num_threads`` holds for the run only: torch's thread count is restored on return.
    Returns the test metrics (an empty dict on ranks other than 0).
    """
    rank, world = _distributed()
    with torch_threads(cfg.train.num_threads):
        trainer = Trainer(cfg, resume, rank, world)
        stopped = trainer.fit(progress)
        if rank != 0:
            return {}
        return finish(cfg, trainer.test_frames, trainer.history, stopped, trainer.elapsed, trainer.device, progress)


# === report and deploy ===
def describe_e0s(e0s: dict) -> str:
    """One line: which reference energies the per-species shift holds."""
    values = ", ".join(f"{symbol} {energy:.4f}" for symbol, energy in e0s["eV"].items())
    return f"E0s ({e0s['mode']}): {values} eV"


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


def _tensorboard(run_dir: Path):
    """A TensorBoard writer in ``run_dir/tensorboard`` when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _write_log(path: Path, history: List[dict]) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    files.write_text(path, text.getvalue())


def finish(cfg: Config, test_frames: Frames, history, stopped: str, elapsed: float, device, progress: bool) -> dict:
    """Test the best weights and write metrics.json (:func:`report`), the deployed model.pt
    (:func:`deploy`) and the plots; returns the metrics."""
    run_dir = Path(cfg.run_dir)
    best = torch.load(run_dir / "best.pt", map_location=device, weights_only=False)
    potential = potential_from_description(best["potential"]).to(device).eval()
    metrics, test_pred = report(cfg, potential, best, test_frames, history, stopped, elapsed, device)
    deploy(cfg, potential, metrics["test"])
    _plots(run_dir, test_pred, history)
    if progress:
        print(f"test ({len(test_frames)} frames of {test_frames.source}):\n{format_metrics(metrics['test'])}")
        print(f"wrote {run_dir / 'model.pt'}, metrics.json, parity.png, learning_curve.png")
    return metrics


def report(cfg: Config, potential, best: dict, test_frames: Frames, history, stopped: str, elapsed: float, device):
    """(metrics, test predictions) of the best weights; writes metrics.json (and log.csv again)."""
    run_dir = Path(cfg.run_dir)
    test_graphs = frames_to_graphs(test_frames, cfg.model.cutoff, dtype_of(cfg.model.dtype), device)
    test_pred = predict(potential, test_graphs, stress_ref=stress_labels(test_frames))
    metrics = {
        "test": error_metrics(test_pred),
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
    files.write_json(run_dir / "metrics.json", metrics)
    return metrics, test_pred


def deploy(cfg: Config, potential, test_metrics: Dict[str, float]) -> Path:
    """Write ``run_dir/model.pt``: the deployed ``potential`` with the test metrics, the training
    set's ranges (shortest pair distances, longest nearest-neighbour distances, compositions: the
    calculators warn outside them), its E0s (``e0s``: mode and eV per
    element) and ``periodic: true`` when the training data was periodic (the calculators then take
    periodic cells), with ``isolated: true`` as well when it also held isolated structures (the calculators
    then take both)."""
    run_dir = Path(cfg.run_dir)
    stats = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)["statistics"]
    path = run_dir / "model.pt"
    extra = {"periodic": True} if stats.get("periodic") else {}
    if stats.get("periodic") and stats.get("isolated"):
        extra["isolated"] = True
    for key in ("e0s", "init", "max_nearest_distances", "training_compositions"):  # the reference energies; the file fine-tuning started from
        if key in stats:
            extra[key] = stats[key]
    export.save(potential, path, dataset=cfg.data.dataset, metrics=test_metrics,
                min_pair_distances=stats.get("min_pair_distances", {}), **extra)
    return path


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
