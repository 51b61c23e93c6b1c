"""CPU cost of learning-curve runs, measured on the real training path, for planning a study grid.

``python -m mlpot.study.cost --molecules ethanol --models egnn-l2,schnet [--compile] --out costs.jsonl``
builds the :class:`mlpot.train.loop.Trainer` of a learning-curve run (N = ``--size``) and measures, in CPU
seconds of this process (user + system, :func:`mlpot.study.learning_curve.cpu_seconds`, so the numbers
hold on a loaded machine where wall time does not): the set-up (data, graphs, model), the first epoch
(with ``--compile``: tracing and compiling), the mean training step of the following epochs, the
evaluation of one frame (energy and forces, batches of 50), one checkpoint write and the deployment
(TorchScript). :func:`run_cost` turns these into the CPU seconds of a whole run.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Optional

from mlpot.study import learning_curve as lc
from mlpot.study.variants import parse_model, resolve


def measure(molecule: str, model: str, compile: bool = False, size: int = 100, epochs: int = 3, data_dir=None,
            eval_frames: int = 100) -> dict:
    """CPU seconds of the pieces of one learning-curve run of ``model`` on ``molecule`` (see the module docstring)."""
    import torch

    from mlpot.train.loop import Trainer, deploy
    from mlpot.train.metrics import error_metrics, predict

    dataset = lc.study_dataset(molecule)
    recipe = resolve(parse_model(model), lc.dataset_species(dataset, data_dir))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = lc.make_config(recipe, dataset, size, 10**6, Path(tmp) / "run", data_dir=data_dir, threads=1,
                             overrides=[f"train.compile={'true' if compile else 'false'}"])
        torch.set_num_threads(1)
        cpu = lc.cpu_seconds
        c0 = cpu()
        trainer = Trainer(cfg)
        setup = cpu() - c0
        spe = math.ceil(cfg.data.train_size / cfg.train.batch_size)
        c0 = cpu()
        trainer.train_epoch(0, progress=False)
        first = cpu() - c0
        c0 = cpu()
        for epoch in range(1, epochs + 1):
            trainer.train_epoch(epoch, progress=False)
        step = (cpu() - c0) / (epochs * spe)
        graphs = trainer.test_graphs if hasattr(trainer, "test_graphs") else None
        if graphs is None:
            from mlpot.data.splits import frames_to_graphs
            from mlpot.dtypes import dtype_of

            graphs = frames_to_graphs(trainer.test_frames.subset(list(range(eval_frames))), cfg.model.cutoff,
                                      dtype_of(cfg.model.dtype))
        trainer.potential.eval()
        c0 = cpu()
        metrics = error_metrics(predict(trainer.potential, graphs[:eval_frames]))
        per_frame = (cpu() - c0) / min(eval_frames, len(graphs))
        c0 = cpu()
        val, metric = trainer.evaluate()
        trainer.end_epoch(epochs + 1, 0.0, {"loss": 0.0, "e": 0.0, "f": 0.0}, 1, val, metric, None, False)
        epoch_end = cpu() - c0  # validation + best.pt + last.pt + log.csv
        c0 = cpu()
        deploy(cfg, trainer.potential, metrics)
        deploy_s = cpu() - c0
    return {"molecule": molecule, "model": model, "compile": compile, "size": size, "num_parameters": recipe["num_parameters"],
            "setup_s": round(setup, 2), "first_epoch_s": round(first, 2), "steps_per_epoch": spe,
            "step_s": round(step, 5), "eval_per_frame_s": round(per_frame, 5), "epoch_end_s": round(epoch_end, 3),
            "val_frames": len(trainer.val_graphs), "deploy_s": round(deploy_s, 2)}


def run_cost(m: dict, size: int, steps: int, test_frames: int = 1000) -> float:
    """CPU seconds of a run of ``steps`` steps at N = ``size`` from a :func:`measure` record (the one-off
    compile cost is the first epoch's excess over its steps)."""
    train, val = lc.split_sizes(size)
    spe = math.ceil(train / lc.BATCH_SIZE)
    epochs = math.ceil(steps / spe)
    checkpoint = max(0.0, m["epoch_end_s"] - m["val_frames"] * m["eval_per_frame_s"])
    one_off = m["setup_s"] + max(0.0, m["first_epoch_s"] - m["steps_per_epoch"] * m["step_s"]) + m["deploy_s"]
    return one_off + steps * m["step_s"] + epochs * (val * m["eval_per_frame_s"] + checkpoint) + test_frames * m["eval_per_frame_s"]


def main(argv: Optional[list] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--molecules", default="ethanol")
    p.add_argument("--models", default=lc.DEFAULT_MODELS)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", default="costs.jsonl")
    args = p.parse_args(argv)
    for molecule in args.molecules.split(","):
        for model in args.models.split(","):
            record = measure(molecule, model, args.compile, args.size, args.epochs)
            print(json.dumps(record), flush=True)
            with open(args.out, "a") as fh:
                fh.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
