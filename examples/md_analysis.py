"""Langevin MD of ethanol at 500 K compared with rMD17: stability, h(r) MAE and the VACF power spectrum.

Usage: python examples/md_analysis.py [--model deploy/ethanol.pt] [--time 2ps]
The full command (trajectory, log, figures, summary.json): mlpot md deploy/ethanol.pt --molecule ethanol --time 10ps
Needs the rMD17 ethanol file in $MLPOT_DATA_DIR. MLPOT_EXAMPLE_QUICK=1 simulates 20 fs instead of 2 ps.
"""

import argparse
import os
from pathlib import Path

import torch

from mlpot.calculators import load_calculator
from mlpot.workflows import analysis
from mlpot.workflows.md import parse_time, reference_bonds, run_md
from mlpot.workflows.relax import relax
from mlpot.workflows.vibrations import harmonic_frequencies

ROOT = Path(__file__).resolve().parents[1]
QUICK = os.environ.get("MLPOT_EXAMPLE_QUICK") == "1"  # the short run tests/test_examples.py checks in CI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "deploy" / "ethanol.pt"))
    parser.add_argument("--time", default="20fs" if QUICK else "2ps")
    parser.add_argument("--temperature", type=float, default=500.0, help="K")
    args = parser.parse_args()
    torch.set_num_threads(1)

    reference = analysis.load_ensemble("ethanol")  # rMD17 ethanol, train + test frames
    atoms = analysis.load_structure("ethanol")
    bonds, lengths = reference_bonds(reference, atoms)
    run = run_md(atoms, load_calculator(args.model, dtype=None), args.temperature, parse_time(args.time),
                 ensemble="langevin", bonds=bonds, bond_reference=lengths)
    stable = "stable" if run.collapse_step is None else f"collapsed at {run.collapse_step * run.timestep_fs:.1f} fs"
    print(f"{run.steps} steps, {stable}, {1000 * run.wall_time_s / run.steps:.2f} ms/step")

    r, h = analysis.distance_histogram(run.positions)
    h_ref = analysis.distance_histogram(reference.positions)[1]
    print(f"h(r) MAE against rMD17: {analysis.hr_mae(h, h_ref):.4f}")
    analysis.plot_hr(r, h, h_ref, "ethanol-hr.png", "ethanol, Langevin 500 K")

    calc64 = load_calculator(args.model, dtype="float64")
    minimum = relax(atoms, calc64, fmax=1e-3).atoms
    harmonic = harmonic_frequencies(minimum, calc64.get_hessian(minimum))
    wavenumbers, spectrum = analysis.power_spectrum(run.velocities, run.masses, run.sample_interval * run.timestep_fs)
    analysis.plot_power_spectrum(wavenumbers, spectrum, "ethanol-power-spectrum.png", harmonic)
    print("wrote ethanol-hr.png, ethanol-power-spectrum.png")


if __name__ == "__main__":
    main()
