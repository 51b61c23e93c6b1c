"""Resident memory of one process that calls two calculators (different models and dtypes) alternately
for a long time: prints the RSS after 1k, 10k and 100k calls (each call: moved positions, energy+forces).

    OMP_NUM_THREADS=1 python benchmarks/memory_soak.py [--calls 100000] [--models A.pt B.pt]

Without --models it deploys two tiny untrained models (SchNet float64, EGNN float32) into a temporary folder.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import ase.build
import numpy as np
import torch

from mlpot import export
from mlpot.calculators import MLPotCalculator
from mlpot.models import build_potential

REPORT_AT = (1_000, 10_000, 100_000)


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20


def tiny_models(folder: Path):
    torch.manual_seed(0)
    schnet = build_potential("schnet", (1, 6, 8), 5.0, torch.float64, num_features=16, num_layers=2).eval()
    egnn = build_potential("egnn", (1, 6, 8), 5.0, torch.float32, num_features=8, lmax=1, num_layers=2,
                           radial_hidden=16).eval()
    paths = [folder / "schnet64.pt", folder / "egnn32.pt"]
    export.save(schnet, paths[0])
    export.save(egnn, paths[1])
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--models", nargs=2, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        paths = args.models or tiny_models(Path(folder))
        calcs = [MLPotCalculator(str(p)) for p in paths]
        atoms = [ase.build.molecule("CH3CH2OH") for _ in calcs]
        for a, c in zip(atoms, calcs):
            a.calc = c
        rng = np.random.default_rng(0)
        base = atoms[0].positions.copy()
        start = time.perf_counter()
        print(f"start: RSS {rss_mb():.1f} MB", flush=True)
        for call in range(1, args.calls + 1):
            a = atoms[call % 2]
            a.positions = base + rng.normal(scale=0.02, size=base.shape)
            a.get_forces()
            if call in REPORT_AT or call == args.calls:
                print(f"{call} calls: RSS {rss_mb():.1f} MB ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
