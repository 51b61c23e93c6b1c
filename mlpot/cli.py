"""Command-line entry points; each parses arguments and calls library functions."""

import argparse
import json
from typing import Optional, Sequence


def deploy(argv: Optional[Sequence[str]] = None) -> None:
    """``mlpot-deploy CHECKPOINT -o MODEL.pt [--format aoti]``: compile a checkpoint into one deployed file."""
    parser = argparse.ArgumentParser(prog="mlpot-deploy", description=deploy.__doc__)
    parser.add_argument("checkpoint", help="checkpoint written by mlpot (training or save_potential), or a deployed TorchScript file")
    parser.add_argument("-o", "--output", required=True, help="deployed file to write, e.g. ethanol.pt (ethanol.pt2 for aoti)")
    parser.add_argument("--dtype", choices=["float32", "float64"], help="convert the model to this dtype")
    parser.add_argument("--dataset", help="training data name recorded in the metadata")
    parser.add_argument(
        "--format", choices=["torchscript", "aoti"], default="torchscript",
        help="torchscript (portable, has Hessians) or aoti (torch.export + AOTInductor: native code for this "
        "machine's CPU, faster, energy and forces only; compiling takes a minute or two)",
    )
    args = parser.parse_args(argv)

    import torch

    from mlpot import export
    from mlpot.checkpoint import load_potential

    potential = load_potential(args.checkpoint)
    if args.dtype:
        potential = potential.to(getattr(torch, args.dtype))
    extra = {"dataset": args.dataset} if args.dataset else {}
    try:  # a deployed source file: carry what its metadata recorded (dataset, metrics, periodic...)
        source = export.read_metadata(args.checkpoint)
    except ValueError:  # a checkpoint
        source = {}
    for key, value in export.carried_metadata(source, potential).items():
        extra.setdefault(key, value)
    meta = export.save(potential, args.output, format=args.format, **extra)
    print(f"wrote {args.output}: {json.dumps({k: meta[k] for k in ('kind', 'species', 'cutoff', 'dtype', 'format')})}")


def train(argv: Optional[Sequence[str]] = None) -> None:
    """``mlpot-train CONFIG.yaml [--set section.key=value ...] [--resume RUN_DIR]``: fit a potential."""
    parser = argparse.ArgumentParser(prog="mlpot-train", description=train.__doc__)
    parser.add_argument("config", nargs="?", help="YAML config (see training/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=1e-3")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR (uses its saved config)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    parser.add_argument(
        "--committee", type=int, metavar="K",
        help="train K members with train.seed = 0..K-1 into RUN_DIR/member-k (same data split); "
        "use their model.pt files with mlpot.calculators.CommitteeCalculator",
    )
    args = parser.parse_args(argv)

    from pathlib import Path

    from mlpot.train import ConfigError, load_config
    from mlpot.train import train as run_training

    try:
        if args.resume:
            config = load_config(Path(args.resume) / "config.yaml", args.set)
            config.run_dir = args.resume
        elif args.config:
            config = load_config(args.config, args.set)
        else:
            parser.error("give a CONFIG.yaml or --resume RUN_DIR")
        if args.committee:
            if args.committee < 2:
                parser.error("--committee needs K >= 2")
            base = Path(config.run_dir)
            for seed in range(args.committee):
                config.train.seed = seed
                config.run_dir = str(base / f"member-{seed}")
                resume = (Path(config.run_dir) / "last.pt").is_file()
                if resume and (Path(config.run_dir) / "model.pt").is_file():
                    continue  # this member is done (model.pt is written last, after metrics.json)
                run_training(config, resume=resume, progress=not args.quiet)
        else:
            run_training(config, resume=bool(args.resume), progress=not args.quiet)
    except ConfigError as err:
        raise SystemExit(f"mlpot-train: config error: {err}") from None
    except FloatingPointError as err:
        raise SystemExit(f"mlpot-train: {err}") from None


def evaluate(argv: Optional[Sequence[str]] = None) -> None:
    """``mlpot-eval MODEL.pt DATA``: energy and force errors of a deployed model on a dataset."""
    parser = argparse.ArgumentParser(prog="mlpot-eval", description=evaluate.__doc__)
    parser.add_argument("model", help="deployed .pt file")
    parser.add_argument("data", help="dataset name (e.g. rmd17_ethanol) or file (npz, extxyz)")
    parser.add_argument("--split", default=None, help="train/test for named datasets (default: test when it exists)")
    parser.add_argument("--index", type=int, default=1, help="rMD17 split 1..5")
    parser.add_argument("--limit", type=int, help="only the first N frames")
    parser.add_argument("--dtype", choices=["float32", "float64"], help="run the model in this dtype")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    args = parser.parse_args(argv)

    from pathlib import Path

    import torch

    from mlpot import export
    from mlpot.data import datasets
    from mlpot.data.splits import frames_to_graphs
    from mlpot.train.metrics import error_metrics, format_metrics, predict

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, meta = export.load(args.model, dtype=dtype)
    split = args.split
    if split is None and not Path(args.data).is_file() and args.data not in datasets.SINGLE_FILE_DATASETS:
        split = "test"
    frames = datasets.load_dataset(args.data, split=split, index=args.index)
    if args.limit:
        frames = frames.subset(range(min(args.limit, len(frames))))
    unknown = sorted({int(z) for zs in frames.numbers for z in zs} - set(meta["species"]))
    if unknown:
        raise SystemExit(f"mlpot-eval: the data holds elements {unknown} that the model does not know ({meta['species']})")
    graphs = frames_to_graphs(frames, meta["cutoff"], dtype or getattr(torch, meta["dtype"]))
    metrics = error_metrics(predict(model, graphs))
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{args.model} ({meta['kind']}) on {frames.source}:\n{format_metrics(metrics)}")
