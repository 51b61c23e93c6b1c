"""One benchmark worker: builds a model of mlpot's recipe size in one implementation, deploys it the way that
implementation recommends for ASE, and answers JSON-line commands on stdin (one JSON answer per line on stdout).

Run by each implementation's own venv python (see setup.sh), normally started by run.py:

    .venvs/nequip/bin/python worker.py --impl nequip
    ../../.venv/bin/python worker.py --impl mlpot --model egnn [--format torchscript|aoti]

Commands (one JSON object per line):
    {"cmd": "info"}                                      -> parameters, versions, how the model is deployed
    {"cmd": "prepare", "dtype": "float64"}               -> build and deploy (cached under .cache/); seconds taken
    {"cmd": "latency", "molecule": "ethanol", "dtype": "float64", "calls": 20, "warmup": 0}
        -> per-call seconds of atoms.get_potential_energy(); atoms.get_forces() through the ASE calculator,
           positions displaced by N(0, 0.01 Å) noise around the GFN2-xTB minimum before every call
    {"cmd": "md", "molecule": ..., "dtype": ..., "steps": 100}         -> ASE VelocityVerlet steps per second
    {"cmd": "train", "molecule": ..., "dtype": "float32", "steps": 10, "batch_size": 5, "mode": "eager"}
        -> training frames per second (energy + autograd forces, E+F loss, backward, Adam step) on rMD17 frames;
           mode "compile" (mlpot's train.compile, NequIP's compile_mode: compile) where the implementation has
           one (info's "train_modes"). The training state is kept per (molecule, dtype, mode): the first call
           also reports the first step's seconds (the compile time), later calls continue training
    {"cmd": "flops", "molecule": ..., "dtype": ...}      -> FLOPs of one eager energy+forces call (FlopCounterMode)
    {"cmd": "quit"}

Weights are untrained (NequIP's are trained for one epoch on 15 frames only because its compile tool needs a
training checkpoint); latency does not depend on the weights.
"""

import argparse
import contextlib
import importlib.metadata
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CACHE = HERE / ".cache"
SPECIES = [1, 6, 8]
SYMBOLS = ["H", "C", "O"]
CUTOFF = 5.0
MOLECULES = ("ethanol", "toluene", "aspirin")

# mlpot's training recipes (training/<molecule>-<kind>.yaml); the peers are built to the same size.
MLPOT_RECIPES = {
    "egnn": {"num_features": 32, "lmax": 2, "num_layers": 3, "parity": False},
    "schnet": {"num_features": 64, "num_layers": 3},
}
EGNN_SIZE = {"num_features": 32, "lmax": 2, "num_layers": 3, "num_bessel": 8, "cutoff_p": 6, "radial": [64, 64],
             "readout_hidden": 16}
SCHNET_SIZE = {"num_features": 64, "num_layers": 3, "num_gaussians": 32}


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def data_dir() -> Path:
    return Path(os.environ.get("MLPOT_DATA_DIR", ROOT.parent / "shared" / "data"))


def minimum(name: str):
    import numpy as np
    from ase import Atoms

    table = np.load(data_dir() / "xtb" / f"{name}_xtb_minimum.npy")
    return Atoms(numbers=table[:, 0].astype(int), positions=table[:, 1:])


def rmd17_frames(name: str, count: int, cell=None):
    """``count`` labelled frames (eV, Å) from the rMD17 training file of ``name`` (every 10th frame)."""
    import numpy as np
    from ase import Atoms, units
    from ase.calculators.singlepoint import SinglePointCalculator

    d = np.load(data_dir() / "md17" / "rmd17" / f"rmd17_{name}_train_01.npz")
    kcal = units.kcal / units.mol
    frames = []
    for i in range(0, 10 * count, 10):
        atoms = Atoms(numbers=d["nuclear_charges"], positions=d["coords"][i], cell=cell, pbc=False)
        atoms.calc = SinglePointCalculator(atoms, energy=float(d["energies"][i]) * kcal, forces=d["forces"][i] * kcal)
        frames.append(atoms)
    return frames


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


MATMUL_OPS = ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm")
# ops that write no new data (views) or only move it: left out of the "other ops" element count
NO_COMPUTE_OPS = {"aten.view", "aten._unsafe_view", "aten.permute", "aten.unsqueeze", "aten.squeeze", "aten.expand",
                  "aten.slice", "aten.select", "aten.t", "aten.transpose", "aten.alias", "aten.as_strided",
                  "aten.detach", "aten.reshape", "aten._reshape_alias", "aten.split", "aten.split_with_sizes",
                  "aten.unbind", "aten.clone", "aten.cat", "aten.stack", "aten._to_copy", "aten.copy_",
                  "aten.lift_fresh", "aten.empty", "aten.zeros", "aten.ones", "aten.new_zeros", "aten.new_empty",
                  "aten.new_empty_strided", "aten.zeros_like", "aten.ones_like", "aten.full_like", "aten.arange",
                  "aten.scalar_tensor", "aten.contiguous", "aten.index_select", "aten.index", "aten.gather",
                  "aten.embedding", "aten._local_scalar_dense", "aten.empty_like", "aten.fill_", "aten.zero_"}


def _matmul_shape(name, args):
    """(batch, m, k, n) of a matmul-like aten call."""
    if name == "aten.mm":
        a, b = args[0], args[1]
    elif name == "aten.addmm":
        a, b = args[1], args[2]
    elif name == "aten.bmm":
        a, b = args[0], args[1]
    else:  # baddbmm
        a, b = args[1], args[2]
    if a.dim() == 3:
        return (int(a.shape[0]), int(a.shape[1]), int(a.shape[2]), int(b.shape[2]))
    return (1, int(a.shape[0]), int(a.shape[1]), int(b.shape[1]))


def flops_of(fn) -> dict:
    """FLOPs of ``fn()`` by torch.utils.flop_counter's per-op formulas (mm, addmm, bmm, baddbmm, conv, attention;
    einsum and tensordot reach them as mm/bmm), counted in a plain TorchDispatchMode: FlopCounterMode itself also
    hooks every module for its per-module breakdown, which breaks autograd.grad inside a forward (SchNetPack).
    Also returns every matmul shape (batch, m, k, n) with its count, for timing the floor, and the elements written
    by the arithmetic ops the formulas do not cover (elementwise, scatter-adds, reductions; views, copies and gathers
left out), roughly one FLOP per element, a rough count of the rest."""
    from collections import Counter

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    counts = Counter()
    shapes = Counter()
    other = Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            packet = func._overloadpacket
            name = str(packet)
            if packet in flop_registry:
                counts[name] += int(flop_registry[packet](*args, **kwargs, out_val=out))
                if name in MATMUL_OPS:
                    shapes[_matmul_shape(name, args)] += 1
            elif name not in NO_COMPUTE_OPS:
                outs = out if isinstance(out, (tuple, list)) else [out]
                other[name] += sum(int(t.numel()) for t in outs if isinstance(t, torch.Tensor))
            return out

    with Count():
        fn()
    return {"flops": int(sum(counts.values())), "per_op": dict(counts),
            "matmul_shapes": [[list(k), v] for k, v in sorted(shapes.items())],
            "other_op_elements": int(sum(other.values())), "other_ops": dict(other.most_common(12))}


def optimizer_step(optimizer, e_err, f_err) -> float:
    """The one training step every implementation is timed with: loss E/atom MSE + 100 force MSE, Adam step."""
    loss = (e_err**2).mean() + 100.0 * (f_err**2).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())

class Impl:
    """Base: subclasses build, deploy and evaluate one implementation."""

    name = "?"
    model_kind = "egnn"
    compare_with = "mlpot-egnn"
    TRAIN_MODES = ("eager",)  # how the implementation's own trainer can run a training step

    def __init__(self, args):
        self.args = args
        self.calcs = {}
        self.prepared = {}
        self.trainers = {}

    # --- to implement ---
    def prepare(self, dtype: str) -> dict:
        raise NotImplementedError

    def calculator(self, dtype: str):
        raise NotImplementedError

    def info(self) -> dict:
        raise NotImplementedError

    def train_setup(self, molecule: str, dtype: str, batch_size: int, mode: str = "eager"):
        """(step function running one optimisation step on the next batch, number of frames per step)."""
        raise NotImplementedError

    def eager_energy_forces(self, molecule: str, dtype: str):
        """A zero-argument function running one eager energy+forces evaluation (for FLOP counting)."""
        raise NotImplementedError

    # --- shared ---
    def ensure(self, dtype: str):
        if dtype not in self.prepared:
            self.prepared[dtype] = self.prepare(dtype)
        return self.prepared[dtype]

    def calc_for(self, molecule: str, dtype: str):
        """One calculator per (molecule, dtype), kept for the whole run, so that neighbour-list caches and
        profiling state persist between rounds exactly as they would in one long simulation."""
        key = (molecule, dtype)
        if key not in self.calcs:
            self.ensure(dtype)
            atoms = minimum(molecule)
            calc = self.calculator(dtype)
            counter = {"n": 0}
            original = calc.calculate

            def counted(*a, **k):
                counter["n"] += 1
                return original(*a, **k)

            calc.calculate = counted
            atoms.calc = calc
            self.calcs[key] = (atoms, atoms.positions.copy(), counter)
        return self.calcs[key]

    def latency(self, molecule: str, dtype: str, calls: int, warmup: int = 0, seed: int = 0) -> dict:
        import numpy as np

        atoms, base, counter = self.calc_for(molecule, dtype)
        rng = np.random.default_rng(seed)
        for _ in range(warmup):
            atoms.positions = base + rng.normal(scale=0.01, size=base.shape)
            atoms.get_potential_energy()
            atoms.get_forces()
        times = []
        n0 = counter["n"]
        for _ in range(calls):
            atoms.positions = base + rng.normal(scale=0.01, size=base.shape)
            tic = time.perf_counter()
            atoms.get_potential_energy()
            atoms.get_forces()
            times.append(time.perf_counter() - tic)
        forces = np.asarray(atoms.get_forces())
        return {"times": times, "evals_per_call": (counter["n"] - n0) / max(calls, 1),
                "finite": bool(np.isfinite(forces).all())}

    def md(self, molecule: str, dtype: str, steps: int, warmup: int = 5, seed: int = 0) -> dict:
        import numpy as np
        from ase import units
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
        from ase.md.verlet import VelocityVerlet

        self.ensure(dtype)
        atoms = minimum(molecule)
        atoms.calc = self.calculator(dtype)
        MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(seed))
        dyn = VelocityVerlet(atoms, timestep=0.25 * units.fs)
        dyn.run(warmup)
        tic = time.perf_counter()
        dyn.run(steps)
        elapsed = time.perf_counter() - tic
        return {"steps_per_s": steps / elapsed, "steps": steps, "seconds": elapsed,
                "finite": bool(np.isfinite(atoms.positions).all())}

    def train(self, molecule: str, dtype: str, steps: int, batch_size: int = 5, warmup: int = 2,
              mode: str = "eager") -> dict:
        if mode not in self.TRAIN_MODES:
            raise ValueError(f"{self.name} has no training mode {mode!r} ({', '.join(self.TRAIN_MODES)})")
        key = (molecule, dtype, batch_size, mode)
        first_step_s = None
        if key not in self.trainers:
            step, frames_per_step = self.train_setup(molecule, dtype, batch_size, mode)
            tic = time.perf_counter()
            step()  # compiles, where the mode compiles
            first_step_s = time.perf_counter() - tic
            self.trainers[key] = step, frames_per_step
        step, frames_per_step = self.trainers[key]
        for _ in range(warmup):
            step()
        times = []
        losses = []
        for _ in range(steps):
            tic = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - tic)
        times.sort()
        median = times[len(times) // 2]
        return {"frames_per_s": frames_per_step / median, "frames_per_s_mean": frames_per_step * steps / sum(times),
                "step_times": times, "batch_size": frames_per_step, "loss_finite": all(math.isfinite(x) for x in losses),
                "first_step_s": first_step_s, "mode": mode, "status": getattr(step, "status", lambda: None)()}

    def flops(self, molecule: str, dtype: str) -> dict:
        fn = self.eager_energy_forces(molecule, dtype)
        fn()  # build lazily initialised state outside the count
        return flops_of(fn)


# ======================================================================================
# mlpot
# ======================================================================================
class MLPot(Impl):
    TRAIN_MODES = ("eager", "compile")  # mlpot-train's train.compile false / true (the recipes use true)

    def __init__(self, args):
        super().__init__(args)
        self.model_kind = args.model
        self.fmt = args.format
        self.name = f"mlpot-{args.model}" + ("" if self.fmt == "torchscript" else f"-{self.fmt}")
        self.compare_with = None
        self._build_key = None
        self.tmp = Path(tempfile.mkdtemp(prefix="mlpot-peers-"))
        import atexit
        import shutil

        atexit.register(shutil.rmtree, self.tmp, True)
        self.pots = {}

    def potential(self, dtype: str):
        import torch
        from mlpot.models import build_potential

        if dtype not in self.pots:
            torch.manual_seed(0)
            hparams = dict(MLPOT_RECIPES[self.model_kind])
            if self.model_kind == "egnn":
                hparams["avg_num_neighbors"] = avg_num_neighbors()
            self.pots[dtype] = build_potential(self.model_kind, SPECIES, CUTOFF, dtype=getattr(torch, dtype), **hparams)
        return self.pots[dtype]

    def save_kwargs(self) -> dict:
        """How the deploy format is passed to mlpot.export.save (only when save accepts a ``format`` argument)."""
        from mlpot import export

        if "format" in inspect.signature(export.save).parameters:
            return {"format": self.fmt}
        if self.fmt != "torchscript":
            raise SystemExit(f"this mlpot's export.save has no format argument; cannot deploy as {self.fmt!r}")
        return {}

    # formats whose build is slow enough to keep between runs (in .cache/, keyed by dtype and source hash);
    # TorchScript takes seconds and is rebuilt into a temporary folder every run
    CACHED_FORMATS = ("aoti",)

    def build_key(self) -> str:
        """Hash of everything the deployed file depends on: mlpot's model, layer and export sources, the torch
        version, and the build inputs of potential() (recipe, species, cutoff, avg_num_neighbors, seed)."""
        if self._build_key is None:
            self._build_key = mlpot_build_key(self.model_kind, self.fmt)
        return self._build_key

    def path(self, dtype: str) -> Path:
        suffix = {"torchscript": ".pt", "aoti": ".pt2"}.get(self.fmt, f".{self.fmt}")
        if self.fmt in self.CACHED_FORMATS:
            import torch

            return (CACHE / f"mlpot-{self.fmt}-torch{torch.__version__}"
                    / f"{self.model_kind}-{dtype}-{self.build_key()}{suffix}")
        return self.tmp / f"{self.model_kind}-{dtype}{suffix}"

    def prepare(self, dtype: str) -> dict:
        from mlpot import export

        path = self.path(dtype)
        if self.fmt in self.CACHED_FORMATS and path.is_file():
            try:
                meta = export.read_metadata(path)
                if meta.get("format") == self.fmt and meta.get("dtype") == dtype:
                    return {"seconds": 0.0, "cached": True, "file": str(path)}
            except (OSError, ValueError) as err:
                log(f"cached {path} unreadable ({err}); rebuilding")
        tic = time.perf_counter()
        export.save(self.potential(dtype), path, **self.save_kwargs())  # atomic: a killed build leaves no file
        if self.fmt in self.CACHED_FORMATS:  # builds of older sources for this model and dtype are stale
            for old in path.parent.glob(f"{self.model_kind}-{dtype}-*{path.suffix}"):
                if old != path:
                    old.unlink(missing_ok=True)
        return {"seconds": time.perf_counter() - tic, "cached": False, "file": str(path)}

    def calculator(self, dtype: str):
        from mlpot.calculators import MLPotCalculator

        return MLPotCalculator(self.path(dtype))

    def info(self) -> dict:
        import mlpot
        import torch

        pot = self.potential("float32")
        return {
            "impl": self.name, "kind": self.model_kind, "params": sum(p.numel() for p in pot.parameters()),
            "versions": {"mlpot": mlpot.__version__, "torch": torch.__version__, "e3nn": version("e3nn"),
                         "ase": version("ase")},
            "deploy": f"mlpot.export.save(..., {self.save_kwargs() or 'format default'}) -> MLPotCalculator(path)",
            "format": self.fmt,
            "build_key": self.build_key() if self.fmt in self.CACHED_FORMATS else None,
            "size": dict(MLPOT_RECIPES[self.model_kind], cutoff=CUTOFF),
            "git": git_describe(),
        }

    def train_setup(self, molecule, dtype, batch_size, mode="eager"):
        import torch
        from mlpot import keys
        from mlpot.data.graph import collate, make_graph
        from mlpot.train.compiled import CompiledTraining
        from mlpot.train.loop import make_optimizer

        torch.manual_seed(0)
        pot = self.potential(dtype)
        import copy

        pot = copy.deepcopy(pot).train()
        frames = rmd17_frames(molecule, 50)
        graphs = []
        for a in frames:
            g = make_graph(a.numbers, a.positions, CUTOFF, dtype=getattr(torch, dtype))
            g[keys.ENERGY_REF] = torch.tensor([a.get_potential_energy()], dtype=getattr(torch, dtype))
            g[keys.FORCES_REF] = torch.as_tensor(a.get_forces(), dtype=getattr(torch, dtype))
            graphs.append(g)
        # as mlpot-train builds them: its optimizer (fused Adam) and, with train.compile, its compiled step
        optimizer = make_optimizer(pot.parameters(), "adam", lr=1e-4)
        model = CompiledTraining(pot) if mode == "compile" else pot
        state = {"i": 0}
        # the per-species shift of the recipe (least squares on composition); only sets the loss scale
        mean_e = sum(a.get_potential_energy() for a in frames) / len(frames)
        with torch.no_grad():
            pot.energy_shift.fill_(mean_e / len(frames[0]))

        def step():
            i = state["i"]
            batch = collate([graphs[(i + k) % len(graphs)] for k in range(batch_size)])
            state["i"] = i + batch_size
            out = model(batch)
            e_err = (out[keys.ENERGY] - batch[keys.ENERGY_REF]) / batch[keys.NUM_ATOMS]
            f_err = out[keys.FORCES] - batch[keys.FORCES_REF]
            return optimizer_step(optimizer, e_err, f_err)

        if mode == "compile":  # reported with the timings: a compile that fell back to eager must show
            step.status = lambda: "compiled" if model.active else f"eager fallback: {model.failed}"
        return step, batch_size

    def eager_energy_forces(self, molecule, dtype):
        import torch
        from mlpot.data.graph import make_graph

        pot = self.potential(dtype).eval()
        atoms = minimum(molecule)
        graph = make_graph(atoms.numbers, atoms.positions, CUTOFF, dtype=getattr(torch, dtype))
        return lambda: pot(graph)


def avg_num_neighbors() -> float:
    """Mean neighbour count within the cutoff over rMD17 ethanol frames (mlpot sets it from the training data)."""
    import numpy as np

    frames = rmd17_frames("ethanol", 20)
    counts = []
    for a in frames:
        d = np.linalg.norm(a.positions[None] - a.positions[:, None], axis=-1)
        counts.append(((d < CUTOFF).sum() - len(a)) / len(a))
    return float(np.mean(counts))


MLPOT_SOURCES = ("mlpot/models/*.py", "mlpot/nn/*.py", "mlpot/export/*.py")


def mlpot_build_key(kind: str, fmt: str) -> str:
    """12 hex digits of sha256 over the mlpot sources a deployed model is built from (MLPOT_SOURCES, by path and
    content) and the inputs of MLPot.potential(): a change to any of them gives a new cache file name."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for pattern in MLPOT_SOURCES:
        for f in sorted(ROOT.glob(pattern)):
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    inputs = {"kind": kind, "format": fmt, "torch": torch.__version__, "recipe": MLPOT_RECIPES[kind],
              "species": SPECIES, "cutoff": CUTOFF, "seed": 0,
              "avg_num_neighbors": avg_num_neighbors() if kind == "egnn" else None}
    h.update(json.dumps(inputs, sort_keys=True).encode())
    return h.hexdigest()[:12]


def git_describe() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip()
    except Exception:  # noqa: BLE001
        return "?"


# ======================================================================================
# NequIP: nequip-train (1 epoch, for the checkpoint its tools need) -> nequip-compile --mode aotinductor
# --target ase -> NequIPCalculator.from_compiled_model (its documented ASE path; TorchScript compile is refused by
# nequip on torch >= 2.10)
# ======================================================================================
NEQUIP_CONFIG = """\
run: [train]
seed: 0
cutoff_radius: {cutoff}
chemical_symbols: [H, C, O]
model_type_names: ${{chemical_symbols}}
data:
  _target_: nequip.data.datamodule.ASEDataModule
  seed: ${{seed}}
  split_dataset:
    file_path: {data}
    train: 15
    val: 5
  transforms:
    - _target_: nequip.data.transforms.NeighborListTransform
      r_max: ${{cutoff_radius}}
    - _target_: nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper
      model_type_names: ${{model_type_names}}
      chemical_species_to_atom_type_map: ${{list_to_identity_dict:${{chemical_symbols}}}}
  train_dataloader:
    _target_: torch.utils.data.DataLoader
    batch_size: 5
  val_dataloader:
    _target_: torch.utils.data.DataLoader
    batch_size: 5
  stats_manager:
    _target_: nequip.data.CommonDataStatisticsManager
    type_names: ${{model_type_names}}
trainer:
  _target_: lightning.Trainer
  max_epochs: 1
  accelerator: cpu
  enable_progress_bar: false
  logger: false
  callbacks:
    - _target_: lightning.pytorch.callbacks.ModelCheckpoint
      dirpath: ${{hydra:runtime.output_dir}}
      save_last: true
training_module:
  _target_: nequip.train.EMALightningModule
  loss:
    _target_: nequip.train.EnergyForceLoss
    per_atom_energy: true
    coeffs:
      total_energy: 1.0
      forces: 100.0
  val_metrics:
    _target_: nequip.train.EnergyForceMetrics
    coeffs:
      total_energy_mae: 1.0
      forces_mae: 1.0
  optimizer:
    _target_: torch.optim.Adam
    lr: 0.005
  model:
    _target_: nequip.model.NequIPGNNModel
    seed: ${{seed}}
    model_dtype: {dtype}
    type_names: ${{model_type_names}}
    r_max: ${{cutoff_radius}}
    l_max: {lmax}
    parity: false
    num_layers: {num_layers}
    num_features: {num_features}
    radial_mlp_depth: {radial_depth}
    radial_mlp_width: {radial_width}
    num_bessels: {num_bessel}
    polynomial_cutoff_p: {cutoff_p}
    readout_mlp_hidden_layers_depth: 1
    readout_mlp_hidden_layers_width: {readout_hidden}
    avg_num_neighbors: ${{training_data_stats:num_neighbors_mean}}
    per_type_energy_shifts: ${{training_data_stats:per_atom_energy_mean}}
    per_type_energy_scales: ${{training_data_stats:forces_rms}}
global_options:
  allow_tf32: false
"""


class NequIP(Impl):
    TRAIN_MODES = ("eager", "compile")  # its model's compile_mode
    name = "nequip"

    def dir(self, dtype: str) -> Path:
        return CACHE / f"nequip-{version('nequip')}-torch{version('torch')}" / dtype

    def prepare(self, dtype: str) -> dict:
        d = self.dir(dtype)
        compiled = d / "model.nequip.pt2"
        ckpt = d / "train" / "last.ckpt"
        if compiled.is_file() and ckpt.is_file():
            return {"seconds": 0.0, "cached": True, "file": str(compiled)}
        d.mkdir(parents=True, exist_ok=True)
        tic = time.perf_counter()
        import ase.io

        data = d / "ethanol.extxyz"
        # a box (non-periodic) so the compile tool's stress self-check compares finite numbers
        ase.io.write(data, rmd17_frames("ethanol", 20, cell=[20.0, 20.0, 20.0]))
        s = EGNN_SIZE
        (d / "config.yaml").write_text(NEQUIP_CONFIG.format(
            cutoff=CUTOFF, data=data, dtype=dtype, lmax=s["lmax"], num_layers=s["num_layers"],
            num_features=s["num_features"], radial_depth=len(s["radial"]), radial_width=s["radial"][0],
            num_bessel=s["num_bessel"], cutoff_p=s["cutoff_p"], readout_hidden=s["readout_hidden"]))
        bindir = Path(sys.executable).parent
        env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="1")
        steps = [
            [str(bindir / "nequip-train"), "-cp", str(d), "-cn", "config", f"hydra.run.dir={d / 'train'}"],
            [str(bindir / "nequip-compile"), str(ckpt), str(compiled), "--mode", "aotinductor", "--device", "cpu",
             "--target", "ase"],
        ]
        for cmd in steps:
            with open(d / "build.log", "a") as fh:
                fh.write("$ " + " ".join(cmd) + "\n")
                fh.flush()
                rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=d).returncode
            if rc != 0:
                compiled.unlink(missing_ok=True)
                raise RuntimeError(f"{cmd[0]} failed (rc {rc}); see {d / 'build.log'}")
        return {"seconds": time.perf_counter() - tic, "cached": False, "file": str(compiled)}

    def calculator(self, dtype: str):
        from nequip.integrations.ase import NequIPCalculator

        return NequIPCalculator.from_compiled_model(str(self.dir(dtype) / "model.nequip.pt2"), device="cpu",
                                                    chemical_species_to_atom_type_map=True)

    def eager_model(self, dtype: str, mode: str = "eager"):
        """The trained model as NequIP's trainer builds it: ``eager``, or ``compile`` (its train-time
        torch.compile: make_fx of the forces, then torch.compile with dynamic shapes)."""
        from nequip.model.saved_models.load_utils import load_saved_model
        from nequip.utils.global_state import global_state_initialized, set_global_state

        self.ensure(dtype)
        if not global_state_initialized():
            set_global_state(allow_tf32=False)
        return load_saved_model(str(self.dir(dtype) / "train" / "last.ckpt"), mode)

    def info(self) -> dict:
        import torch

        model = self.eager_model("float32")
        return {
            "impl": self.name, "kind": "egnn", "params": sum(p.numel() for p in model.parameters()),
            "versions": {"nequip": version("nequip"), "torch": torch.__version__, "e3nn": version("e3nn"),
                         "ase": version("ase"), "lightning": version("lightning")},
            "deploy": "nequip-train (1 epoch, 15 frames) -> nequip-compile --mode aotinductor --device cpu "
                      "--target ase -> NequIPCalculator.from_compiled_model",
            "size": {"num_features": 32, "l_max": 2, "parity": False, "num_layers": 3, "num_bessels": 8,
                     "polynomial_cutoff_p": 6, "radial_mlp": "2x64", "readout": "1x16", "r_max": CUTOFF},
        }

    def _data(self, atoms_list, dtype):
        from nequip.data import from_ase
        from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform

        nl = NeighborListTransform(r_max=CUTOFF)
        types = ChemicalSpeciesToAtomTypeMapper(model_type_names=SYMBOLS,
                                                chemical_species_to_atom_type_map={s: s for s in SYMBOLS})
        out = []
        for a in atoms_list:
            d = types(nl(from_ase(a)))
            out.append(d)
        return out

    def train_setup(self, molecule, dtype, batch_size, mode="eager"):
        import torch
        from nequip.data import AtomicDataDict

        torch.manual_seed(0)
        model = self.eager_model(dtype, mode)
        model.train()
        frames = rmd17_frames(molecule, 50)
        data = self._data(frames, dtype)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        state = {"i": 0}
        tdtype = getattr(torch, dtype)

        def step():
            i = state["i"]
            batch = AtomicDataDict.batched_from_list([data[(i + k) % len(data)] for k in range(batch_size)])
            state["i"] = i + batch_size
            out = model(batch)
            n = batch[AtomicDataDict.NUM_NODES_KEY].to(tdtype)
            e_err = (out[AtomicDataDict.TOTAL_ENERGY_KEY].reshape(-1) - batch[AtomicDataDict.TOTAL_ENERGY_KEY].reshape(-1)) / n
            f_err = out[AtomicDataDict.FORCE_KEY] - batch[AtomicDataDict.FORCE_KEY]
            return optimizer_step(optimizer, e_err, f_err)

        return step, batch_size

    def eager_energy_forces(self, molecule, dtype):
        model = self.eager_model(dtype).eval()
        data = self._data([minimum(molecule)], dtype)[0]
        return lambda: model(dict(data))


class PickledModel(Impl):
    """A peer whose model file is the pickled module its own training writes (MACE's ``.model``,
    SchNetPack's ``best_model``): built once by ``build()``, saved at ``path()``, loaded for training."""

    def path(self) -> Path:
        raise NotImplementedError

    def build(self):
        raise NotImplementedError

    def prepare(self, dtype: str) -> dict:
        import torch

        path = self.path()
        if path.is_file():
            return {"seconds": 0.0, "cached": True, "file": str(path)}
        tic = time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.build(), path)
        return {"seconds": time.perf_counter() - tic, "cached": False, "file": str(path)}

    def loaded(self, dtype: str):
        import torch

        self.ensure(dtype)
        return torch.load(self.path(), map_location="cpu", weights_only=False).to(getattr(torch, dtype))


# ======================================================================================
# MACE: ScaleShiftMACE built in Python, torch.save'd (the .model file MACE's tools write) -> MACECalculator
# ======================================================================================
class MACE(PickledModel):
    name = "mace"

    def path(self) -> Path:
        return CACHE / f"mace-{version('mace-torch')}-torch{version('torch')}" / "model.model"

    def build(self):
        import numpy as np
        import torch
        from e3nn import o3
        from mace import modules

        torch.manual_seed(0)
        with default_dtype(torch.float64):
            s = EGNN_SIZE
            model = modules.ScaleShiftMACE(
                r_max=CUTOFF,
                num_bessel=s["num_bessel"],
                num_polynomial_cutoff=s["cutoff_p"],
                max_ell=s["lmax"],
                interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
                interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
                num_interactions=s["num_layers"],
                num_elements=len(SPECIES),
                hidden_irreps=o3.Irreps(f"{s['num_features']}x0e + {s['num_features']}x1o + {s['num_features']}x2e"),
                MLP_irreps=o3.Irreps(f"{s['readout_hidden']}x0e"),
                atomic_energies=np.zeros(len(SPECIES)),
                avg_num_neighbors=avg_num_neighbors(),
                atomic_numbers=SPECIES,
                correlation=3,
                gate=torch.nn.functional.silu,
                radial_MLP=list(s["radial"]),
                radial_type="bessel",
                atomic_inter_scale=1.0,
                atomic_inter_shift=0.0,
            )
        return model

    def calculator(self, dtype: str):
        from mace.calculators import MACECalculator

        return MACECalculator(model_paths=str(self.path()), device="cpu", default_dtype=dtype)

    def info(self) -> dict:
        import torch

        model = self.loaded("float64")
        return {
            "impl": self.name, "kind": "egnn", "params": sum(p.numel() for p in model.parameters()),
            "versions": {"mace-torch": version("mace-torch"), "torch": torch.__version__, "e3nn": version("e3nn"),
                         "ase": version("ase")},
            "deploy": "ScaleShiftMACE -> torch.save(model) -> MACECalculator(model_paths=..., default_dtype=...)",
            "size": {"hidden_irreps": "32x0e+32x1o+32x2e", "max_ell": 2, "num_interactions": 3, "correlation": 3,
                     "num_bessel": 8, "num_polynomial_cutoff": 6, "radial_MLP": [64, 64], "MLP_irreps": "16x0e",
                     "interaction": "RealAgnosticResidualInteractionBlock", "r_max": CUTOFF},
        }

    def _batch(self, atoms_list, dtype):
        import torch
        from mace import data as mdata
        from mace.tools import torch_geometric, utils

        z_table = utils.AtomicNumberTable(SPECIES)
        configs = [mdata.config_from_atoms(a, key_specification=mace_keys()) for a in atoms_list]
        with default_dtype(getattr(torch, dtype)):
            items = [mdata.AtomicData.from_config(c, z_table=z_table, cutoff=CUTOFF) for c in configs]
        return items, torch_geometric

    def train_setup(self, molecule, dtype, batch_size, mode="eager"):
        import torch

        torch.manual_seed(0)
        model = self.loaded(dtype).train()
        frames = rmd17_frames(molecule, 50)
        for a in frames:  # MACE reads labels from info/arrays under its key names
            a.info["REF_energy"] = a.get_potential_energy()
            a.arrays["REF_forces"] = a.get_forces()
        items, tg = self._batch(frames, dtype)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        state = {"i": 0}

        def step():
            i = state["i"]
            batch = tg.Batch.from_data_list([items[(i + k) % len(items)] for k in range(batch_size)])
            state["i"] = i + batch_size
            d = batch.to_dict()
            out = model(d, training=True, compute_force=True)
            n = (d["ptr"][1:] - d["ptr"][:-1]).to(out["energy"].dtype)
            e_err = (out["energy"] - d["energy"]) / n
            f_err = out["forces"] - d["forces"]
            return optimizer_step(optimizer, e_err, f_err)

        return step, batch_size

    def eager_energy_forces(self, molecule, dtype):
        model = self.loaded(dtype).eval()
        items, tg = self._batch([minimum(molecule)], dtype)
        batch = tg.Batch.from_data_list(items)

        def fn():
            return model(batch.to_dict(), training=False, compute_force=True, compute_stress=True)

        return fn


def mace_keys():
    from mace.data.utils import KeySpecification

    return KeySpecification(info_keys={"energy": "REF_energy"}, arrays_keys={"forces": "REF_forces"})


@contextlib.contextmanager
def default_dtype(dtype):
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ======================================================================================
# SchNetPack: NeuralNetworkPotential(SchNet) -> torch.save (the best_model file its training writes) ->
# SpkCalculator(model_file, neighbor_list=ASENeighborList)
# ======================================================================================
def patch_torch_for_schnetpack():
    """schnetpack 2.1.1 imports ``T_co`` from torch.utils.data.dataloader, which torch 2.13 no longer defines."""
    import typing

    import torch.utils.data.dataloader as dl

    if not hasattr(dl, "T_co"):
        dl.T_co = typing.TypeVar("T_co", covariant=True)


class SchNetPack(PickledModel):
    name = "schnetpack"
    model_kind = "schnet"
    compare_with = "mlpot-schnet"

    def __init__(self, args):
        super().__init__(args)
        patch_torch_for_schnetpack()
        self.nl_name = args.neighbor_list

    def path(self) -> Path:
        return CACHE / f"schnetpack-{version('schnetpack')}-torch{version('torch')}" / "best_model"

    def neighbor_list(self):
        import schnetpack as spk

        return {"ase": spk.transform.ASENeighborList, "matscipy": spk.transform.MatScipyNeighborList,
                "torch": spk.transform.TorchNeighborList}[self.nl_name](cutoff=CUTOFF)

    def build(self):
        import schnetpack as spk
        import torch

        torch.manual_seed(0)
        s = SCHNET_SIZE
        schnet = spk.representation.SchNet(
            n_atom_basis=s["num_features"], n_interactions=s["num_layers"],
            radial_basis=spk.nn.GaussianRBF(n_rbf=s["num_gaussians"], cutoff=CUTOFF),
            cutoff_fn=spk.nn.CosineCutoff(CUTOFF),
        )
        return spk.model.NeuralNetworkPotential(
            representation=schnet,
            input_modules=[spk.atomistic.PairwiseDistances()],
            output_modules=[spk.atomistic.Atomwise(n_in=s["num_features"], output_key="energy"),
                            spk.atomistic.Forces(energy_key="energy", force_key="forces")],
        )

    def calculator(self, dtype: str):
        import torch
        from schnetpack.interfaces import SpkCalculator

        return SpkCalculator(model_file=str(self.path()), neighbor_list=self.neighbor_list(), energy_key="energy",
                             force_key="forces", energy_unit="eV", position_unit="Angstrom", device="cpu",
                             dtype=getattr(torch, dtype))

    def info(self) -> dict:
        import torch

        model = self.loaded("float32")
        return {
            "impl": self.name, "kind": "schnet", "params": sum(p.numel() for p in model.parameters()),
            "versions": {"schnetpack": version("schnetpack"), "torch": torch.__version__, "ase": version("ase"),
                         "matscipy": version("matscipy")},
            "deploy": f"NeuralNetworkPotential(SchNet) -> torch.save -> SpkCalculator(model_file, "
                      f"neighbor_list={type(self.neighbor_list()).__name__})",
            "size": {"n_atom_basis": 64, "n_interactions": 3, "n_rbf": 32, "cutoff": CUTOFF},
            "patch": "torch.utils.data.dataloader.T_co defined before importing schnetpack (removed in torch 2.13)",
        }

    def _inputs(self, atoms_list, dtype):
        import torch
        from schnetpack.interfaces import AtomsConverter

        conv = AtomsConverter(neighbor_list=self.neighbor_list(), device="cpu", dtype=getattr(torch, dtype))
        return conv

    def train_setup(self, molecule, dtype, batch_size, mode="eager"):
        import schnetpack.properties as P
        import torch
        from schnetpack.data.loader import _atoms_collate_fn

        torch.manual_seed(0)
        tdtype = getattr(torch, dtype)
        model = self.loaded(dtype).train()
        frames = rmd17_frames(molecule, 50)
        # per-frame samples as schnetpack's dataset yields them (neighbour list and dtype cast applied once),
        # collated into a batch each step by its DataLoader's collate function, as in its training loop
        conv = self._inputs(frames, dtype)
        samples = []
        for a in frames:
            sample = {P.n_atoms: torch.tensor([len(a)]), P.Z: torch.from_numpy(a.numbers),
                      P.R: torch.from_numpy(a.positions), P.cell: torch.zeros(1, 3, 3, dtype=torch.float64),
                      P.pbc: torch.zeros(1, 3, dtype=torch.bool), P.idx: torch.tensor([len(samples)])}
            for transform in conv.transforms:
                sample = transform(sample)
            sample["energy_ref"] = torch.tensor([a.get_potential_energy()], dtype=tdtype)
            sample["forces_ref"] = torch.as_tensor(a.get_forces(), dtype=tdtype)
            samples.append(sample)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        state = {"i": 0}

        def step():
            i = state["i"]
            batch = _atoms_collate_fn([samples[(i + k) % len(samples)] for k in range(batch_size)])
            state["i"] = i + batch_size
            ref_e, ref_f = batch.pop("energy_ref"), batch.pop("forces_ref")
            n = batch[P.n_atoms].to(ref_e.dtype)
            out = model(batch)
            e_err = (out["energy"].to(ref_e.dtype) - ref_e) / n
            f_err = out["forces"].to(ref_f.dtype) - ref_f
            return optimizer_step(optimizer, e_err, f_err)

        return step, batch_size

    def eager_energy_forces(self, molecule, dtype):
        model = self.loaded(dtype).eval()
        inputs = self._inputs(None, dtype)(minimum(molecule))
        return lambda: model(dict(inputs))


IMPLS = {"mlpot": MLPot, "nequip": NequIP, "mace": MACE, "schnetpack": SchNetPack}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", required=True, choices=sorted(IMPLS))
    parser.add_argument("--model", default="egnn", choices=["egnn", "schnet"], help="mlpot model kind")
    parser.add_argument("--format", default="torchscript", choices=["torchscript", "aoti"],
                        help="mlpot deploy format (aoti builds are cached in .cache/mlpot-aoti-torch*/)")
    parser.add_argument("--neighbor-list", default="matscipy", choices=["ase", "matscipy", "torch"],
                        help="schnetpack neighbour-list transform for SpkCalculator")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    # the protocol owns the real stdout; anything the libraries print goes to stderr
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    import warnings

    warnings.filterwarnings("ignore")
    # mace-torch's MACECalculator and schnetpack's SpkCalculator torch.load pickled models without
    # weights_only=False, which torch >= 2.6 refuses; torch's documented switch restores the old default
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    impl = IMPLS[args.impl](args)
    proto.write(json.dumps({"ok": True, "ready": impl.name}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            cmd = req.pop("cmd")
            if cmd == "quit":
                break
            if cmd == "info":
                res = dict(impl.info(), train_modes=list(impl.TRAIN_MODES))
            elif cmd == "prepare":
                res = impl.ensure(req["dtype"])
            elif cmd == "latency":
                res = impl.latency(req["molecule"], req["dtype"], int(req["calls"]), int(req.get("warmup", 0)),
                                   int(req.get("seed", 0)))
            elif cmd == "md":
                res = impl.md(req["molecule"], req["dtype"], int(req["steps"]))
            elif cmd == "train":
                res = impl.train(req["molecule"], req["dtype"], int(req["steps"]), int(req.get("batch_size", 5)),
                                 mode=req.get("mode", "eager"))
            elif cmd == "flops":
                res = impl.flops(req["molecule"], req["dtype"])
            else:
                raise ValueError(f"unknown command {cmd!r}")
            proto.write(json.dumps({"ok": True, "result": res}) + "\n")
        except Exception as err:  # noqa: BLE001 -- reported to the driver, which records it
            log(traceback.format_exc())
            proto.write(json.dumps({"ok": False, "error": f"{type(err).__name__}: {err}"[:2000]}) + "\n")


if __name__ == "__main__":
    main()
