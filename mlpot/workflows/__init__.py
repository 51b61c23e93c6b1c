"""Simulations with deployed models, compared with MD17 references: MD, relaxations, vibrations, phonons.

The submodules md, relax, vibrations and analysis hold the functions; names here are the main entry points.
"""

from mlpot.calculators import load_calculator
from mlpot.workflows.md import MDReport, MDRun, parse_time, run_md, simulate
from mlpot.workflows.relax import RelaxResult, relax_structure
from mlpot.workflows.vibrations import (
    PhononResult,
    VibrationResult,
    analyse,
    harmonic_frequencies,
    phonons,
    run_vibrations,
)

__all__ = [
    "MDReport",
    "MDRun",
    "PhononResult",
    "RelaxResult",
    "VibrationResult",
    "analyse",
    "harmonic_frequencies",
    "load_calculator",
    "parse_time",
    "phonons",
    "relax_structure",
    "run_md",
    "run_vibrations",
    "simulate",
]
