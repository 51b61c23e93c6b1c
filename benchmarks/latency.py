"""Calculator latency: median ms per energy+forces call for ethanol, toluene and aspirin, every model, f32 and f64.

Usage: python benchmarks/latency.py [--calls 200] [--threads N] [--models gcn,schnet,egnn] [--formats torchscript,aoti]
(aoti applies to egnn and schnet; each aoti build takes a minute. benchmarks/peers/ compares with NequIP, MACE, SchNetPack.)
Models are untrained but have the sizes of the training recipes (latency does not depend on weights).
Geometries: the GFN2-xTB minima in $MLPOT_DATA_DIR/xtb (default ../shared/data).
"""

import argparse
import itertools
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml
from ase import Atoms

from mlpot import export
from mlpot.calculators import MLPotCalculator
from mlpot.models import build_potential

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # timing.py, the timer the peers' workers use too (imported by path)

from timing import median_ms, time_energy_forces  # noqa: E402


def molecule(name: str) -> Atoms:
    data_dir = Path(os.environ.get("MLPOT_DATA_DIR", ROOT.parent / "shared" / "data"))
    table = np.load(data_dir / "xtb" / f"{name}_xtb_minimum.npy")
    return Atoms(numbers=table[:, 0].astype(int), positions=table[:, 1:])


def recipe_hparams(kind: str) -> dict:
    cfg = yaml.safe_load((ROOT / "training" / f"ethanol-{kind}.yaml").read_text())
    return cfg["model"]["hparams"], cfg["model"]["cutoff"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--models", default="gcn,schnet,egnn")
    parser.add_argument("--formats", default="torchscript", help="deploy formats, e.g. torchscript,aoti")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.calls} calls, median ms per energy+forces call")
    print("| model | format | dtype | params | ethanol (9) | toluene (15) | aspirin (21) |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models.split(","):
            hparams, cutoff = recipe_hparams(kind)
            for fmt, dtype in itertools.product(args.formats.split(","), ("float32", "float64")):
                if fmt == "aoti" and kind not in export.AOTI_KINDS:
                    continue
                torch.manual_seed(0)
                pot = build_potential(kind, [1, 6, 8], cutoff, dtype=getattr(torch, dtype), **hparams)
                path = Path(tmp) / f"{kind}-{dtype}.{'pt2' if fmt == 'aoti' else 'pt'}"
                export.save(pot, path, format=fmt)
                row = []
                for name in ("ethanol", "toluene", "aspirin"):
                    atoms = molecule(name)
                    atoms.calc = MLPotCalculator(path)
                    # 10 untimed calls first: TorchScript's profiling runs
                    row.append(f"{median_ms(time_energy_forces(atoms, args.calls, warmup=10)):.2f}")
                params = sum(p.numel() for p in pot.parameters())
                print(f"| {kind} | {fmt} | {dtype} | {params} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
