"""What run.py and a worker say to each other, and what every implementation measures the same way.

A worker (worker.py, run by its implementation's own venv python) answers JSON-line commands on stdin, one JSON
answer per line on stdout: ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``; the first line
it writes is ``{"ok": true, "ready": "<implementation>"}``.

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

Every implementation module (impl_*.py) subclasses ``Impl`` and fills in how its package builds, deploys and
trains a model; the measuring (latency, MD, training step timing, FLOP count) and the training loss are here, once.
This module and the impl_* modules import only the standard library at the top, because every venv imports them;
each implementation imports its own package inside its methods.
"""

import importlib.metadata
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# benchmarks/timing.py, the latency timer benchmarks/latency.py uses too; imported by path because the peers'
# venvs have no mlpot (and no benchmarks package)
sys.path.insert(0, str(HERE.parent))

from timing import time_energy_forces  # noqa: E402

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
        self.device = getattr(args, "device", "cpu")  # where models run: "cpu" (the default), "cuda"
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
        n0 = counter["n"]
        times = time_energy_forces(atoms, calls, warmup=warmup, seed=seed, base=base)
        forces = np.asarray(atoms.get_forces())
        # warm-up and timed calls are the same calls (displace, energy, forces), so they count alike
        return {"times": times, "evals_per_call": (counter["n"] - n0) / max(calls + warmup, 1),
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


def avg_num_neighbors() -> float:
    """Mean neighbour count within the cutoff over rMD17 ethanol frames (mlpot sets it from the training data)."""
    import numpy as np

    frames = rmd17_frames("ethanol", 20)
    counts = []
    for a in frames:
        d = np.linalg.norm(a.positions[None] - a.positions[:, None], axis=-1)
        counts.append(((d < CUTOFF).sum() - len(a)) / len(a))
    return float(np.mean(counts))


def serve(impl: Impl, proto) -> None:
    """Answer the commands on stdin with ``impl``, one JSON line each on ``proto``, until ``quit`` or EOF."""
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
