"""Per-call cost of the calculator's out-of-range checks (``warn_out_of_range``), shipped ethanol model.

The shipped file predates the recorded ranges, so a copy gets them from the rMD17 ethanol training set
(``MLPOT_DATA_DIR``). Prints µs per energy+forces call with the checks on and off, float32 and float64,
for in-range MD-like frames (the checks run on every call until a warning is given).

    OMP_NUM_THREADS=1 python benchmarks/out_of_range_cost.py [--calls 300]
"""

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from mlpot import export
from mlpot.calculators import MLPotCalculator
from mlpot.data.datasets import load_dataset
from mlpot.data.statistics import training_ranges

MODEL = Path(__file__).resolve().parents[1] / "deploy" / "ethanol.pt"


def with_ranges(source: Path, path: Path) -> Path:
    frames = load_dataset("rmd17_ethanol", split="train")
    meta = {**export.read_metadata(source), **training_ranges(frames)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.(script|save|load)` is deprecated", DeprecationWarning)
        torch.jit.save(torch.jit.load(str(source)), str(path), _extra_files={"mlpot.json": json.dumps(meta)})
    return path


def per_call_us(model, dtype, check, frames, repeats):
    calc = MLPotCalculator(str(model), dtype=dtype, warn_out_of_range=check)
    atoms = frames[0].copy()
    atoms.calc = calc
    atoms.get_forces()  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for positions in frames:
            atoms.positions = positions.positions
            atoms.get_forces()
        times.append((time.perf_counter() - start) / len(frames) * 1e6)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    test = load_dataset("rmd17_ethanol", split="test")
    frames = [test.to_atoms(i) for i in range(args.calls)]
    with tempfile.TemporaryDirectory() as folder:
        model = with_ranges(MODEL, Path(folder) / "ethanol-ranges.pt")
        for dtype in ("float32", "float64"):
            on, off = (per_call_us(model, dtype, check, frames, args.repeats) for check in (True, False))
            print(f"{dtype}: {on:.0f} µs/call with the checks, {off:.0f} µs without: +{on - off:.0f} µs "
                  f"({100 * (on - off) / off:+.1f}%)")


if __name__ == "__main__":
    main()
