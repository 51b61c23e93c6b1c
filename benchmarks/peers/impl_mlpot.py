"""mlpot's implementation: build_potential at the recipe's size -> mlpot.export.save (TorchScript or AOTInductor)
-> MLPotCalculator(path); training as mlpot-train runs it (its fused Adam; eager or train.compile)."""

import inspect
import json
import subprocess
import tempfile
import time
from pathlib import Path

from protocol import (
    CACHE, CUTOFF, MLPOT_RECIPES, ROOT, SPECIES, Impl, avg_num_neighbors, log, minimum, optimizer_step, rmd17_frames,
    version,
)


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

            where = "" if self.device == "cpu" else f"-{self.device}"  # AOTI builds are per device
            return (CACHE / f"mlpot-{self.fmt}-torch{torch.__version__}{where}"
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
        import copy

        # atomic: a killed build leaves no file; built on the device it will run on (AOTI compiles for it)
        export.save(copy.deepcopy(self.potential(dtype)).to(self.device), path, **self.save_kwargs())
        if self.fmt in self.CACHED_FORMATS:  # builds of older sources for this model and dtype are stale
            for old in path.parent.glob(f"{self.model_kind}-{dtype}-*{path.suffix}"):
                if old != path:
                    old.unlink(missing_ok=True)
        return {"seconds": time.perf_counter() - tic, "cached": False, "file": str(path)}

    def calculator(self, dtype: str):
        from mlpot.calculators import MLPotCalculator

        return MLPotCalculator(self.path(dtype), device=self.device)

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

        pot = copy.deepcopy(pot).train().to(self.device)
        frames = rmd17_frames(molecule, 50)
        graphs = []
        for a in frames:
            g = make_graph(a.numbers, a.positions, CUTOFF, dtype=getattr(torch, dtype))
            g[keys.ENERGY_REF] = torch.tensor([a.get_potential_energy()], dtype=getattr(torch, dtype))
            g[keys.FORCES_REF] = torch.as_tensor(a.get_forces(), dtype=getattr(torch, dtype))
            graphs.append({k: v.to(self.device) for k, v in g.items()})
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


# the sources whose change invalidates a cached mlpot build
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
