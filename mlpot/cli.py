"""In-process calls of ``mlpot train``, ``mlpot eval`` and ``mlpot deploy`` (the parsers live in mlpot.commands).

Each takes the subcommand's arguments (default ``sys.argv[1:]``), runs it and raises the library's
errors (ConfigError, ValueError, FileNotFoundError, UsageError) instead of printing them. They return
None, as console scripts installed before the aliases moved (``sys.exit(mlpot.cli.train())``) expect;
``mlpot.commands.run`` returns the results. The console scripts ``mlpot-train``, ``mlpot-eval`` and
``mlpot-deploy`` are ``mlpot.commands.mlpot_train`` etc.
"""

import sys
from typing import Optional, Sequence

from mlpot.commands import run


def _args(argv: Optional[Sequence[str]]) -> list:
    return list(sys.argv[1:] if argv is None else argv)


def train(argv: Optional[Sequence[str]] = None) -> None:
    """``mlpot train ARGV``: fit a potential from a YAML config (or ``--resume RUN_DIR``)."""
    run(["train", *_args(argv)])


def evaluate(argv: Optional[Sequence[str]] = None) -> None:
    """``mlpot eval ARGV``: energy and force errors of a deployed model on a dataset."""
    run(["eval", *_args(argv)])


def deploy(argv: Optional[Sequence[str]] = None) -> None:
    """``mlpot deploy ARGV``: compile a checkpoint into one deployed file."""
    run(["deploy", *_args(argv)])
