"""Fine-tuning the shipped ethanol model vs the same architecture from scratch, on the PBE/def2-SVP ethanol
frames of the reference data (rmd17-level/ethanol_pbe_def2svp.npz), at a few training-set sizes.

Usage: MLPOT_DATA_DIR=... OMP_NUM_THREADS=1 nice -n 10 python examples/finetune/make_table.py [--out DIR]
       [--sizes 25 100 350] [--steps 300] [--finetune-lr 1e-3] [--arms fine-tuned from scratch]

Every run gets the same budget of optimizer steps (batch 5), not of seconds: on a shared machine a wall-clock
budget would give the runs different amounts of work. Test set: the last 100 frames of the trajectory (its
frames are correlated; train and validation are drawn from the frames before them), the same for every run.
Fine-tuning starts from deploy/ethanol.pt (``--init``), keeping its E0s (the new energies come from another
code at the same level of theory: the shipped model is off by a few meV only, while refitting the E0s to the
new data's mean per-atom energy, ``model.e0s: average``, would ignore the model's own mean output and shift
the test energies by ~90 meV before any step), with a lower learning rate; from scratch uses the recipe's learning rate and
architecture (training/ethanol-egnn.yaml), E0s ``auto`` (here: average). Writes the table to
stdout and to DIR/table.md.
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

from mlpot import export
from mlpot.data.datasets import default_data_dir
from mlpot.data.splits import frames_to_graphs
from mlpot.dtypes import dtype_of
from mlpot.files import write_text
from mlpot.train.config import config_from_dict, load_config
from mlpot.train.loop import load_splits, train
from mlpot.train.metrics import error_metrics, predict

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "deploy" / "ethanol.pt"
RECIPE = ROOT / "training" / "ethanol-egnn.yaml"
DATA = "rmd17-level/ethanol_pbe_def2svp.npz"
VAL, TEST, BATCH = 20, 100, 5
LR = {"fine-tuned": 1e-3, "from scratch": 5e-3}


def config(dataset: Path, size: int, steps: int, run_dir: Path, init: bool) -> dict:
    recipe = load_config(RECIPE).to_dict()
    model = dict(recipe["model"])
    if init:
        model.update(init=str(SHIPPED), hparams={})  # the architecture and the E0s come from the file
    return {
        "data": {"dataset": str(dataset), "train_size": size, "val_size": VAL, "test_size": TEST, "split": "contiguous"},
        "model": model,
        "train": {**recipe["train"], "epochs": math.ceil(steps * BATCH / size), "max_time": None, "batch_size": BATCH,
                  "lr": LR["fine-tuned" if init else "from scratch"], "warmup_epochs": 0, "early_stopping_patience": None,
                  "compile": False, "num_threads": 1},
        "run_dir": str(run_dir),
    }


def zero_shot(dataset: Path) -> dict:
    """The shipped model on the test frames, untouched (its E0s are rmd17_ethanol's)."""
    cfg = config_from_dict(config(dataset, 25, 1, Path("unused"), init=True))
    test = load_splits(cfg)[2]
    model, meta = export.load(SHIPPED)
    return error_metrics(predict(model, frames_to_graphs(test, meta["cutoff"], dtype_of(meta["dtype"]))))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/finetune", help="folder for the runs and table.md")
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 100, 350])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--finetune-lr", type=float, default=LR["fine-tuned"], help="learning rate of fine-tuning")
    parser.add_argument("--arms", nargs="+", default=list(LR), choices=list(LR))
    args = parser.parse_args(argv)
    LR["fine-tuned"] = args.finetune_lr
    dataset = Path(os.environ.get("MLPOT_DATA_DIR") or default_data_dir()) / DATA
    out = Path(args.out)
    rows = []
    base = zero_shot(dataset)
    rows.append(f"| 0 (shipped model as is) | - | - | {base['forces_mae_meV_per_A']:.1f} | {base['energy_mae_meV']:.1f} |")
    for size in args.sizes:
        for arm in args.arms:
            run_dir = out / f"{'finetune' if arm == 'fine-tuned' else 'scratch'}-{size}"
            if not (run_dir / "metrics.json").is_file():
                tic = time.perf_counter()
                train(config_from_dict(config(dataset, size, args.steps, run_dir, arm == "fine-tuned")), progress=False)
                print(f"{run_dir}: {time.perf_counter() - tic:.0f} s")
            metrics = json.loads((run_dir / "metrics.json").read_text())
            test = metrics["test"]
            rows.append(f"| {size} | {arm} (lr {LR[arm]:g}) | {metrics['epochs_run']} epochs, {metrics['train_time_s']:.0f} s | "
                        f"{test['forces_mae_meV_per_A']:.1f} | {test['energy_mae_meV']:.1f} |")
    table = "\n".join([
        f"Test: the last {TEST} frames of `{DATA}`; {args.steps} optimizer steps (batch {BATCH}) per run, "
        f"eager, one thread.",
        "",
        "| training frames | start | budget used | test force MAE (meV/Å) | test energy MAE (meV) |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ])
    print(table)
    write_text(out / "table.md", table)


if __name__ == "__main__":
    main()
