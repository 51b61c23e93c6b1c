"""The ``mlpot`` command: ``mlpot md|relax|vibrations MODEL.pt ...`` and ``mlpot study ...``, thin layers over mlpot.workflows and mlpot.study."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, Optional, Sequence

import torch

from mlpot.workflows import md, relax, vibrations

MOLECULE_HELP = "ethanol, toluene, aspirin (first reference frame), a dataset name, or a file ASE reads"


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="deployed model file (.pt)")
    parser.add_argument("--output", default=None, help="output folder (default mlpot-<command>-<molecule>)")
    parser.add_argument("--data-dir", default=None, help="reference data folder (default $MLPOT_DATA_DIR)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: fastest for small molecules, and on a busy machine)")


def _md_parser(sub) -> None:
    p = sub.add_parser("md", help="MD from a reference geometry; stability, h(r), spectra against MD17")
    _add_common(p)
    p.add_argument("--molecule", default="ethanol", help=MOLECULE_HELP)
    p.add_argument("--temperature", type=float, default=500.0, help="temperature, K (default 500)")
    p.add_argument("--time", default="10ps", help="simulated time, e.g. 10ps, 500fs (default 10ps)")
    p.add_argument("--timestep", default="0.5fs", help="time step (default 0.5fs)")
    p.add_argument("--ensemble", choices=md.ENSEMBLES, default="langevin")
    p.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs (default 0.01)")
    p.add_argument("--dtype", choices=["float32", "float64"], default=None,
                   help="model precision (default: the file's own)")
    p.add_argument("--format", choices=["traj", "extxyz"], default="traj", help="trajectory format")
    p.add_argument("--reference-data", default=None, help="dataset name or file of the reference ensemble")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-harmonic", action="store_true", help="skip the Hessian frequencies on the power spectrum")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--committee", nargs="+", metavar="MODEL", default=[],
                   help="more deployed models: run with the committee mean and log the force uncertainty")


def _relax_parser(sub) -> None:
    p = sub.add_parser("relax", help="relax a structure in float64; energy, max force, bond lengths")
    _add_common(p)
    p.add_argument("structure", help=MOLECULE_HELP)
    p.add_argument("--fmax", type=float, default=0.01, help="force criterion, eV/Å (default 0.01)")
    p.add_argument("--optimizer", choices=sorted(relax.OPTIMIZERS), default="bfgs")
    p.add_argument("--steps", type=int, default=2000, help="maximum optimizer steps")


def _vibrations_parser(sub) -> None:
    p = sub.add_parser("vibrations", help="finite-difference vs Hessian frequencies (phonons if periodic)")
    _add_common(p)
    p.add_argument("structure", help=MOLECULE_HELP)
    p.add_argument("--delta", type=float, default=0.005, help="displacement, Å (default 0.005)")
    p.add_argument("--nfree", type=int, choices=[2, 4], default=2, help="displacements per coordinate")
    p.add_argument("--fmax", type=float, default=1e-4, help="relaxation criterion, eV/Å (default 1e-4)")
    p.add_argument("--reference", nargs="?", const="auto", choices=["auto", "pyscf", "xtb"], default=None,
                   help="also compute ab initio reference frequencies (auto: the training data's level)")
    p.add_argument("--supercell", type=int, nargs=3, default=[3, 3, 3], help="phonon supercell (periodic only)")


def run_md(args) -> md.MDReport:
    report = md.simulate(
        [args.model, *args.committee] if args.committee else args.model, args.molecule, args.temperature, args.time, args.timestep, args.ensemble,
        output_dir=args.output, dtype=args.dtype, device=args.device, data_dir=args.data_dir,
        reference_data=args.reference_data, traj_format=args.format, friction_per_fs=args.friction,
        seed=args.seed, harmonic=not args.no_harmonic, progress=not args.quiet,
    )
    print(md.format_md(report))
    return report


def run_relax(args) -> relax.RelaxResult:
    result = relax.relax_structure(args.model, args.structure, args.fmax, args.optimizer, args.output,
                                   args.data_dir, args.device, args.steps)
    print(relax.format_relax(result))
    return result


def run_vibrations(args):
    result = vibrations.run_vibrations(
        args.model, args.structure, args.delta, args.nfree, args.fmax, args.reference, args.output,
        args.data_dir, args.device, tuple(args.supercell),
    )
    if isinstance(result, vibrations.PhononResult):
        print(vibrations.format_phonons(result))
    else:
        print(vibrations.format_vibrations(result))
    for path in result.files.values():
        print(f"wrote {path}")
    return result


def _study_parser(sub) -> None:
    from mlpot.study import cli

    cli.add_parser(sub)


def run_study(args):
    from mlpot.study import cli

    return cli.run(args)


# subcommand -> (parser builder, runner); a new subcommand is one more entry.
COMMANDS: Dict[str, tuple] = {
    "md": (_md_parser, run_md),
    "relax": (_relax_parser, run_relax),
    "vibrations": (_vibrations_parser, run_vibrations),
    "study": (_study_parser, run_study),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlpot", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add_parser, _ in COMMANDS.values():
        add_parser(sub)
    return parser


def run(argv: Optional[Sequence[str]] = None):
    """Runs one subcommand and returns its result (a dataclass of numbers) for in-process callers."""
    args = build_parser().parse_args(argv)
    runner: Callable = COMMANDS[args.command][1]
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return runner(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"mlpot {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        torch.set_num_threads(threads)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``mlpot`` console script; exit status 0 on success."""
    run(argv)
    return 0
