"""The ``mlpot`` program: one argparse parser with a subcommand per task, and the one error policy.

``run(argv)`` parses and runs one subcommand in-process and returns its result (errors propagate);
``main(argv)`` is the console script: it turns user errors into one line and an exit status.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

import mlpot
from mlpot import files
from mlpot.dtypes import DTYPE_NAMES, dtype_of
from mlpot.threads import torch_threads
from mlpot.workflows import md, relax, vibrations

STRUCTURE_HELP = ("molecule (ethanol, toluene, aspirin: the first reference frame), dataset name "
                  "(its first training frame) or structure file ASE reads (its last frame)")
# exit statuses: a user error (argparse uses 2 too), a run that failed for a numerical reason, Ctrl-C
EXIT_USER_ERROR, EXIT_RUN_FAILED, EXIT_INTERRUPTED = 2, 1, 130
# errors of a write the user can fix: no space, a file-size limit (ulimit -f), no permission, a read-only disk
PERMISSION_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS}
WRITE_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, *PERMISSION_ERRORS}


class UsageError(ValueError):
    """The command line itself is wrong (argparse errors, missing or conflicting arguments)."""

    def __init__(self, message: str, prog: Optional[str] = None):
        super().__init__(message)
        self.prog = prog


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of descriptions and adds "(default: X)" to options whose help gives none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        # identity checks: a default of 0 is worth showing, and 0 == False
        if (not action.option_strings or "default" in text or default is None or default is False
                or default is argparse.SUPPRESS or (isinstance(default, list) and not default)):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"  # argparse %-formats help strings


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are raised (as UsageError), so that ``main`` reports them in one line."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        # subparsers are built by this class too, so every level gets the same formatter
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str):
        raise UsageError(message, self.prog)


def _warn(args, message: str) -> None:
    print(f"{_prog(args)}: warning: {message}", file=sys.stderr)


# === train, eval, deploy ===
def _train_parser(sub) -> Parser:
    p = sub.add_parser(
        "train", help="fit a potential to a dataset from a YAML recipe",
        description="Fit a potential from a YAML recipe (see training/*.yaml). Writes config.yaml, log.csv,\n"
                    "last.pt, best.pt, metrics.json, figures and the deployed model.pt into the run folder.",
    )
    p.add_argument("config", nargs="?", metavar="CONFIG", help="YAML config; optional with --resume")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly (uses its saved config)")
    p.add_argument("--init", metavar="MODEL", help="fine-tune: start from the weights of this deployed TorchScript file "
                                                   "(same kind; its elements must be in the data; sets model.init)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument("--committee", type=int, metavar="K",
                   help="train K >= 2 members with train.seed = 0..K-1 into RUN_DIR/member-k (same data split), "
                        "for mlpot.calculators.CommitteeCalculator")
    return p


def run_train(args) -> None:
    from mlpot.train import load_config
    from mlpot.train import train as fit

    if args.init and args.resume:
        raise UsageError("--init starts a new run; --resume continues one (its config.yaml records the init)")
    if args.resume:
        config = load_config(Path(args.resume) / "config.yaml", args.set)
        config.run_dir = args.resume
    elif args.config:
        config = load_config(args.config, args.set)
    else:
        raise UsageError("give a CONFIG.yaml or --resume RUN_DIR")
    if args.init:
        config.model.init = str(Path(args.init).resolve())
    if args.committee is not None and args.committee < 2:
        raise UsageError("--committee needs K >= 2")
    with torch_threads(config.train.num_threads):
        if not args.committee:
            fit(config, resume=bool(args.resume), progress=not args.quiet)
            return
        base = Path(config.run_dir)
        for seed in range(args.committee):
            config.train.seed = seed
            config.run_dir = str(base / f"member-{seed}")
            resume = (Path(config.run_dir) / "last.pt").is_file()
            if resume and (Path(config.run_dir) / "model.pt").is_file():
                continue  # this member is done (model.pt is written last, after metrics.json)
            fit(config, resume=resume, progress=not args.quiet)


def _eval_parser(sub) -> Parser:
    p = sub.add_parser("eval", help="energy and force errors of a deployed model on a dataset",
                       description="Energy and force errors (MAE, RMSE) of a deployed model on a dataset.")
    p.add_argument("model", metavar="MODEL", help="deployed model file (.pt or .pt2)")
    p.add_argument("data", metavar="DATA", help="dataset name (e.g. rmd17_ethanol) or file (npz, extxyz)")
    p.add_argument("--split", default=None,
                   help="train or test, for named datasets (default: test where the dataset has one)")
    p.add_argument("--index", type=int, default=1, help="rMD17 split, 1 to 5")
    p.add_argument("--limit", type=int, help="evaluate only the first N frames (default: all)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="run the model in this precision (default: the file's own)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--energy-key", default="energy", help="name of the energy label in an ASE file (MACE-style: REF_energy)")
    p.add_argument("--forces-key", default="forces", help="name of the forces label in an ASE file")
    p.add_argument("--stress-key", default="stress", help="name of the stress label in an ASE file")
    p.add_argument("--stress-unit", default="eV/A^3", help="unit of the file's stresses: eV/A^3, GPa, kbar or bar")
    p.add_argument("--predict", metavar="OUT.extxyz",
                   help="write predictions (energy, forces, per-atom energies, stress of periodic cells; "
                        "committee spreads) for every structure, labelled or not, to this extended XYZ file")
    p.add_argument("--committee", nargs="+", metavar="MODEL", default=[],
                   help="with --predict: more deployed models; write the committee mean and spread")
    p.add_argument("--batch-size", type=int, default=32, help="structures per batch with --predict")
    p.add_argument("--overwrite", action="store_true",
                   help="with --predict: replace an existing OUT (kept until the new predictions are written)")
    p.add_argument("--device", default="cpu", help="torch device to run the model on, e.g. cpu or cuda")
    return p


def run_predict(args) -> list:
    from mlpot.workflows import predict

    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    predict.check_output(args.predict)
    if Path(args.predict).exists() and not args.overwrite:
        raise ValueError(f"{args.predict} exists; pass --overwrite to replace it, or choose another --predict file")
    structures = predict.read_structures(args.data, split=args.split, index=args.index)
    if args.limit:
        structures = structures[: args.limit]
    dtype = dtype_of(args.dtype) if args.dtype else None
    results = predict.predict_structures([args.model, *args.committee], structures, dtype=dtype,
                                         device=str(checked_device(args.device)),
                                         batch_size=args.batch_size, progress=not args.json)
    predict.write_predictions(args.predict, results)
    print(f"wrote predictions for {len(results)} structure(s) to {args.predict}")
    return results


def checked_device(name: str) -> torch.device:
    """``name`` as a torch device that exists here; a one-line ValueError otherwise."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device; use e.g. cpu, cuda or cuda:1") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: mlpot runs on cpu or cuda")
    return device


def run_eval(args) -> dict:
    from mlpot import export
    from mlpot.data import datasets
    from mlpot.data.splits import frames_to_graphs
    from mlpot.train.metrics import error_metrics, format_metrics, predict, stress_labels

    if args.split is None and not Path(args.data).is_file() and args.data not in datasets.SINGLE_FILE_DATASETS:
        args.split = "test"
    if args.predict:
        return run_predict(args)
    if args.committee:
        raise UsageError("--committee needs --predict (errors are reported one model at a time)")
    dtype = dtype_of(args.dtype) if args.dtype else None
    device = checked_device(args.device)
    model, meta = export.load(args.model, device=str(device), dtype=dtype)
    try:
        frames = datasets.load_dataset(args.data, split=args.split, index=args.index, energy_key=args.energy_key,
                                       forces_key=args.forces_key, stress_key=args.stress_key,
                                       stress_unit=args.stress_unit)
    except datasets.MissingLabelError as error:
        raise ValueError(
            f"{error.what}: name the label with --energy-key/--forces-key, or write predictions for "
            f"structures without labels with --predict OUT.extxyz"
        ) from None
    if args.limit:
        frames = frames.subset(range(min(args.limit, len(frames))))
    unknown = sorted({int(z) for zs in frames.numbers for z in zs} - set(meta["species"]))
    if unknown:
        raise ValueError(f"the data holds elements {unknown} that the model does not know ({meta['species']})")
    graphs = frames_to_graphs(frames, meta["cutoff"], dtype or dtype_of(meta["dtype"]), device)
    metrics = error_metrics(predict(model, graphs, stress_ref=stress_labels(frames)))
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{args.model} ({meta['kind']}) on {frames.source}:\n{format_metrics(metrics)}")
    return metrics


def _deploy_parser(sub) -> Parser:
    p = sub.add_parser("deploy", help="compile a checkpoint into one self-describing model file",
                       description="Compile a training checkpoint (or re-deploy a deployed file) into one model file\n"
                                   "with its metadata (kind, species, cutoff, dtype) inside.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="checkpoint written by mlpot (training or save_potential), or a deployed TorchScript file")
    p.add_argument("-o", "--output", required=True, metavar="MODEL",
                   help="file to write, e.g. ethanol.pt (ethanol.pt2 for aoti)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="convert the model to this precision (default: as trained)")
    p.add_argument("--dataset", help="training data name recorded in the metadata (default: the checkpoint's)")
    p.add_argument("--format", choices=["torchscript", "aoti"], default="torchscript",
                   help="torchscript: portable, has Hessians; aoti: torch.export + AOTInductor, native code for this "
                        "machine's CPU, faster, energy and forces only, compiling takes a minute or two")
    p.add_argument("--device", default="cpu",
                   help="device to compile for (aoti: native code for it; torchscript files load on any device)")
    p.add_argument("--overwrite", action="store_true", help="replace MODEL if it exists")
    return p


def run_deploy(args) -> dict:
    from mlpot import export
    from mlpot.checkpoint import load_potential

    device = checked_device(args.device)
    potential = load_potential(args.checkpoint)
    if Path(args.output).exists() and not args.overwrite:
        raise ValueError(f"{args.output} exists; pass --overwrite to replace it, or choose another -o")
    if args.dtype:
        potential = potential.to(dtype_of(args.dtype))
    potential = potential.to(device)
    extra = {"dataset": args.dataset} if args.dataset else {}
    try:  # a deployed source file: carry what its metadata recorded (dataset, metrics, periodic...)
        source = export.read_metadata(args.checkpoint)
    except ValueError:  # a checkpoint
        source = {}
    for key, value in export.carried_metadata(source, potential).items():
        extra.setdefault(key, value)
    meta = export.save(potential, args.output, format=args.format, **extra)
    print(f"wrote {args.output}: {json.dumps({k: meta[k] for k in ('kind', 'species', 'cutoff', 'dtype', 'format')})}")
    return meta


# === md, relax, vibrations: MODEL STRUCTURE ===
def _add_model_and_structure(sub, name: str, help: str, description: str, structure_nargs=None) -> Parser:
    p = sub.add_parser(name, help=help, description=description, usage="%(prog)s MODEL STRUCTURE [options]")
    p.add_argument("model", metavar="MODEL", help="deployed model file (.pt)")
    p.add_argument("structure", metavar="STRUCTURE", nargs=structure_nargs, help=STRUCTURE_HELP)
    p.add_argument("--output", default=None, help=f"output folder (default: mlpot-{name}-<structure>)")
    p.add_argument("--data-dir", default=None, help="reference data folder (default: $MLPOT_DATA_DIR)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 is fastest for small molecules and on a busy machine")
    return p


def _md_parser(sub) -> Parser:
    p = _add_model_and_structure(
        sub, "md", "molecular dynamics: stability, h(r) and spectra against the reference data",
        "Molecular dynamics from STRUCTURE with ASE, watched for collapse (a bond more than 0.5 Å off\n"
        "its reference mean), compared with the reference ensemble (h(r), internal coordinates) and\n"
        "with the Hessian frequencies.",
        structure_nargs="?",  # it may come from the deprecated --molecule instead; run_md checks for one of them
    )
    p.add_argument("--molecule", default=None, help=argparse.SUPPRESS)
    p.add_argument("--temperature", type=float, default=500.0, help="temperature, K")
    p.add_argument("--time", default="10ps", help="simulated time, e.g. 10ps or 500fs")
    p.add_argument("--timestep", default="0.5fs", help="time step, e.g. 0.5fs")
    p.add_argument("--ensemble", choices=md.ENSEMBLES, default="langevin", help="integrator and thermostat")
    p.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs")
    p.add_argument("--pressure", type=float, default=1.0, metavar="BAR",
                   help="pressure of --ensemble npt (ASE's isotropic MTK barostat), bar")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="model precision (default: the file's own)")
    p.add_argument("--format", choices=["traj", "extxyz"], default="traj", help="trajectory file format")
    p.add_argument("--reference-data", default=None,
                   help="dataset name or file of the reference ensemble (default: the structure's dataset)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial velocities and the thermostat noise")
    p.add_argument("--no-harmonic", action="store_true", help="skip the Hessian frequencies on the power spectrum")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--committee", nargs="+", metavar="MODEL", default=[],
                   help="more deployed models: run with the committee mean and log the force uncertainty")
    p.add_argument("--checkpoint-interval", type=int, default=200, metavar="STEPS",
                   help="steps between checkpoints (trajectory frames written, state saved for --resume)")
    p.add_argument("--compile", action="store_true",
                   help="run the dynamics on an AOTInductor build of the TorchScript MODEL (about 3x faster; compiled "
                        "on first use, a minute, and cached); the Hessian frequencies still use the TorchScript file")
    _add_resume_and_overwrite(p)
    return p


def _add_resume_and_overwrite(p: Parser) -> None:
    p.add_argument("--resume", action="store_true",
                   help="continue the stopped or killed run in the output folder (same options), as if never stopped")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results already in the output folder (they stay until the new run has finished)")


def run_md(args) -> md.MDReport:
    structure = args.structure
    if args.molecule is not None:
        if structure is not None:
            raise UsageError("give the structure once, as STRUCTURE (--molecule is its deprecated spelling)")
        _warn(args, f"--molecule is deprecated; give the structure after the model: mlpot md MODEL {args.molecule}")
        structure = args.molecule
    if structure is None:
        raise UsageError("the following arguments are required: STRUCTURE")
    report = md.simulate(
        [args.model, *args.committee] if args.committee else args.model, structure, args.temperature, args.time,
        args.timestep, args.ensemble, output_dir=args.output, dtype=args.dtype, device=args.device,
        data_dir=args.data_dir, reference_data=args.reference_data, traj_format=args.format,
        friction_per_fs=args.friction, seed=args.seed, harmonic=not args.no_harmonic, progress=not args.quiet,
        pressure_bar=args.pressure, resume=args.resume, overwrite=args.overwrite,
        checkpoint_interval=args.checkpoint_interval, compile=args.compile,
    )
    print(md.format_md(report))
    return report


def _relax_parser(sub) -> Parser:
    p = _add_model_and_structure(sub, "relax", "relax a structure in float64: energy, largest force, bond lengths",
                                 "Relax STRUCTURE in float64 with an ASE optimizer; writes relaxed.xyz.")
    p.add_argument("--fmax", type=float, default=0.01, help="force criterion, eV/Å")
    p.add_argument("--optimizer", choices=sorted(relax.OPTIMIZERS), default="bfgs", help="ASE optimizer")
    p.add_argument("--steps", type=int, default=2000, help="maximum optimizer steps")
    p.add_argument("--cell", action="store_true",
                   help="relax the cell as well (ase.filters.FrechetCellFilter; periodic structures only)")
    _add_resume_and_overwrite(p)
    return p


def run_relax(args) -> relax.RelaxResult:
    result = relax.relax_structure(args.model, args.structure, args.fmax, args.optimizer, args.output,
                                   args.data_dir, args.device, args.steps, cell=args.cell, resume=args.resume,
                                   overwrite=args.overwrite)
    print(relax.format_relax(result))
    return result


def _vibrations_parser(sub) -> Parser:
    p = _add_model_and_structure(
        sub, "vibrations", "finite-difference against Hessian frequencies (phonons if periodic)",
        "Relax STRUCTURE, then compare finite-difference and autograd-Hessian frequencies (cm^-1);\n"
        "a periodic structure gives phonons of a supercell instead.",
    )
    p.add_argument("--delta", type=float, default=0.005, help="finite-difference displacement, Å")
    p.add_argument("--nfree", type=int, choices=[2, 4], default=2, help="displacements per coordinate")
    p.add_argument("--fmax", type=float, default=1e-4, help="relaxation criterion, eV/Å")
    p.add_argument("--reference", nargs="?", const="auto", choices=["auto", "pyscf", "xtb"], default=None,
                   help="also compute ab initio reference frequencies (auto, the flag alone: the training data's level)")
    p.add_argument("--supercell", type=int, nargs=3, default=[3, 3, 3], metavar="N",
                   help="phonon supercell, periodic structures only")
    _add_resume_and_overwrite(p)
    return p


def run_vibrations(args):
    result = vibrations.run_vibrations(
        args.model, args.structure, args.delta, args.nfree, args.fmax, args.reference, args.output,
        args.data_dir, args.device, tuple(args.supercell), resume=args.resume, overwrite=args.overwrite,
    )
    if isinstance(result, vibrations.PhononResult):
        print(vibrations.format_phonons(result))
    else:
        print(vibrations.format_vibrations(result))
    for path in result.files.values():
        print(f"wrote {path}")
    return result


# === study ===
def _study_parser(sub) -> Parser:
    from mlpot.study import cli

    return cli.add_parser(sub)


def run_study(args):
    from mlpot.study import cli

    return cli.run(args)


# subcommand -> (parser builder, runner), in the order ``mlpot --help`` lists them
COMMANDS: Dict[str, tuple] = {
    "train": (_train_parser, run_train),
    "eval": (_eval_parser, run_eval),
    "deploy": (_deploy_parser, run_deploy),
    "md": (_md_parser, run_md),
    "relax": (_relax_parser, run_relax),
    "vibrations": (_vibrations_parser, run_vibrations),
    "study": (_study_parser, run_study),
}


def build_parser() -> Parser:
    parser = Parser(prog="mlpot", description="Machine-learned interatomic potentials: train, evaluate, deploy "
                                              "and use them with ASE.\nRun mlpot COMMAND --help for a command's options.")
    parser.add_argument("--version", action="version",
                        version=f"mlpot {mlpot.__version__} (torch {torch.__version__})",
                        help="print the versions of mlpot and torch, and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for name, (add_parser, runner) in COMMANDS.items():
        add_parser(sub).set_defaults(runner=runner)
    return parser


def _prog(args) -> str:
    """``mlpot md``, ``mlpot study latent``: the command named in messages."""
    return " ".join(["mlpot", args.command] + ([args.study_command] if getattr(args, "study_command", None) else []))


def _execute(args):
    with torch_threads(getattr(args, "threads", None)):
        return args.runner(args)


def run(argv: Optional[Sequence[str]] = None):
    """Runs ``mlpot ARGV`` in-process and returns the subcommand's result; errors are raised, not reported."""
    return _execute(build_parser().parse_args(argv))


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename and error.strerror:  # open() and friends: "[Errno 2] ..."
        return f"{files.target_of(error.filename)}: {error.strerror}"
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``mlpot`` console script; returns the exit status.

    A user error (bad command line, config, value or missing file) prints one line
    ``mlpot <command>: error: <message>`` and gives 2; a run stopped by a non-finite loss gives 1;
    Ctrl-C gives 130. Anything else is a bug and keeps its traceback.
    """
    prog = "mlpot"
    try:
        args = build_parser().parse_args(argv)
        prog = _prog(args)
        _execute(args)
    except UsageError as error:
        prog = error.prog or prog
        print(f"{prog}: error: {_one_line(error)} (see {prog} --help)", file=sys.stderr)
        return EXIT_USER_ERROR
    except (ValueError, FileNotFoundError) as error:  # ConfigError is a ValueError
        print(f"{prog}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as error:  # a full disk, a file-size limit, a read-only folder: the user's to fix
        if error.errno not in WRITE_ERRORS:
            raise
        fix = ("make the folder writable or write elsewhere" if error.errno in PERMISSION_ERRORS
               else "free some space, raise the file-size limit or write elsewhere")
        print(f"{prog}: error: {_one_line(error)} (nothing already written was changed; {fix})", file=sys.stderr)
        return EXIT_USER_ERROR
    except FloatingPointError as error:
        print(f"{prog}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


# the mlpot-train, mlpot-eval and mlpot-deploy console scripts: aliases of the subcommands
def mlpot_train() -> int:
    """``mlpot-train ARGS``, exactly ``mlpot train ARGS``."""
    return main(["train", *sys.argv[1:]])


def mlpot_eval() -> int:
    """``mlpot-eval ARGS``, exactly ``mlpot eval ARGS``."""
    return main(["eval", *sys.argv[1:]])


def mlpot_deploy() -> int:
    """``mlpot-deploy ARGS``, exactly ``mlpot deploy ARGS``."""
    return main(["deploy", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
