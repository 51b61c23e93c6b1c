"""Training frames per second on this machine's cores: one thread, two threads, two DDP processes.

    python benchmarks/training_cores.py [--recipe training/ethanol-egnn.yaml] [--epochs 8] [--json out.json]

Each layout trains the recipe (compiled steps, as the recipes do) for a few epochs with the same global
batch, so the updates are the same in every layout (DDP splits each batch between the processes and
averages the gradients) and accuracy per epoch is equal: frames per second decide. The first two
epochs (compile, warm-up) are left out of the rate. Run it on an otherwise idle machine.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYOUTS = {
    "1 process x 1 thread": (1, 1),
    "1 process x 2 threads": (1, 2),
    "2 DDP processes x 1 thread": (2, 1),
}


def train_command(recipe: str, run_dir: Path, epochs: int, batch: int, processes: int, threads: int):
    settings = [f"run_dir={run_dir}", f"train.epochs={epochs}", f"train.batch_size={batch}",
                f"train.num_threads={threads}", "train.max_time=100000", "train.early_stopping_patience=1000"]
    mlpot = [a for s in settings for a in ("--set", s)]
    if processes == 1:
        return [sys.executable, "-m", "mlpot", "train", recipe, "--quiet", *mlpot]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "mlpot", "train", recipe, "--quiet", *mlpot]


def frames_per_second(log_csv: Path, train_frames: int, skip: int = 2) -> float:
    """Training frames per second over the epochs after the first ``skip`` (compile and warm-up)."""
    rows = list(csv.DictReader(log_csv.open()))
    times = [float(r["time_s"]) for r in rows]
    if len(times) <= skip:
        raise SystemExit(f"{log_csv}: only {len(times)} epochs; use --epochs > {skip}")
    return train_frames * (len(times) - skip) / (times[-1] - times[skip - 1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="training/ethanol-egnn.yaml")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=6, help="global batch (even, to split between 2 processes)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    import yaml

    train_frames = yaml.safe_load(open(args.recipe))["data"]["train_size"]
    train_frames -= train_frames % args.batch  # whole batches only (what DDP steps on)
    results = {}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (processes, threads) in LAYOUTS.items():
            run_dir = Path(tmp) / name.replace(" ", "_")
            cmd = train_command(args.recipe, run_dir, args.epochs, args.batch, processes, threads)
            subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
            results[name] = frames_per_second(run_dir / "log.csv", train_frames)
            print(f"{name:28s} {results[name]:7.1f} frames/s  ({results[name] / results[next(iter(LAYOUTS))]:.2f}x)",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"recipe": args.recipe, "batch": args.batch,
                                               "frames_per_s": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
