"""The shipped copper model against its reference, EMT, by one procedure (mlpot/workflows/crystal.py):
errors on the test frames, equation of state and bulk modulus, elastic constants, phonons.

Usage: python examples/periodic/compare.py [--model deploy/cu-emt.pt] [--out examples/periodic]
Writes results.json, eos.png and phonons.png into --out and prints the table of examples/periodic/README.md.
Each crystal is analysed at its own equilibrium lattice constant (from its own equation of state).
MLPOT_EXAMPLE_QUICK=1 uses a 4x4x4 phonon supercell and a coarser DOS grid.
"""

import argparse
import json
import os
from pathlib import Path

import ase.build
import ase.io
import numpy as np
import torch
from ase import units
from ase.calculators.emt import EMT
from ase.eos import EquationOfState

from mlpot.calculators import load_calculator
from mlpot.files import atomic_write, write_json
from mlpot.workflows.analysis import pyplot
from mlpot.workflows.crystal import cubic_elastic_constants, equation_of_state, phonon_bands

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
QUICK = os.environ.get("MLPOT_EXAMPLE_QUICK") == "1"
POINTS = ("X", "W", "K", "L")  # high-symmetry points whose frequencies are compared


def test_errors(calc, path: Path) -> dict:
    """Energy (meV/atom), force (meV/Å) and stress (meV/Å^3, GPa) MAE of ``calc`` on the frames in ``path``."""
    e_err, f_err, s_err = [], [], []
    for frame in ase.io.read(path, index=":"):
        atoms = frame.copy()
        atoms.calc = calc
        e_err.append((atoms.get_potential_energy() - frame.get_potential_energy()) / len(atoms))
        f_err.append(np.abs(atoms.get_forces() - frame.get_forces()).ravel())
        s_err.append(np.abs(atoms.get_stress() - frame.get_stress()))
    stress_mae = float(np.concatenate(s_err).mean())
    return {"frames": len(e_err), "energy_mae_meV_per_atom": 1e3 * float(np.abs(e_err).mean()),
            "forces_mae_meV_per_A": 1e3 * float(np.concatenate(f_err).mean()),
            "stress_mae_meV_per_A3": 1e3 * stress_mae, "stress_mae_GPa": stress_mae / units.GPa}


def properties(calc, supercell) -> tuple:
    """(numbers, EOS result, phonon bands) of fcc Cu with ``calc``."""
    eos = equation_of_state(ase.build.bulk("Cu", "fcc", a=3.6, cubic=True), calc)
    a0 = eos.lattice_constant
    elastic = cubic_elastic_constants(ase.build.bulk("Cu", "fcc", a=a0, cubic=True), calc)
    bands = phonon_bands(ase.build.bulk("Cu", "fcc", a=a0), calc, supercell=supercell,
                         kpts=(10, 10, 10) if QUICK else (20, 20, 20))
    numbers = {"a0_A": a0, "v0_A3_per_atom": eos.v0, "B_eos_GPa": eos.bulk_modulus_GPa, **elastic,
               "phonons_THz": {k: bands.special_THz[k].tolist() for k in POINTS}}
    return numbers, eos, bands


def plot_eos(eos_ref, eos_model, path: Path) -> None:
    """E(V) of both, each from its own minimum, with their Birch-Murnaghan fits."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for eos, label, color in ((eos_ref, "EMT", "k"), (eos_model, "model", "tab:red")):
        fit = EquationOfState(eos.volumes, eos.energies, eos="birchmurnaghan")
        fit.fit()
        grid = np.linspace(eos.volumes[0], eos.volumes[-1], 100)
        ax.plot(grid, 1e3 * (fit.func(grid, *fit.eos_parameters) - eos.e0), color=color, lw=1.0)
        ax.plot(eos.volumes, 1e3 * (eos.energies - eos.e0), "o" if label == "EMT" else "x", color=color,
                label=f"{label}: V$_0$ = {eos.v0:.3f} Å$^3$, B = {eos.bulk_modulus_GPa:.1f} GPa")
    ax.set(xlabel="volume (Å$^3$/atom)", ylabel="E - E$_0$ (meV/atom)", title="fcc Cu equation of state")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def plot_phonons(ref, model, path: Path) -> None:
    """Bands of both along the reference's path (each on its own lattice constant), and both DOS."""
    plt = pyplot()
    fig, (ax, ax_dos) = plt.subplots(1, 2, figsize=(8, 4), sharey=True, gridspec_kw={"width_ratios": [3, 1]})
    for bands, label, color, style in ((ref, "EMT", "k", "-"), (model, "model", "tab:red", "--")):
        x, special_x, labels = bands.path.get_linear_kpoint_axis()
        x, special_x = x / x[-1], special_x / x[-1]  # the two lattice constants differ slightly
        lines = ax.plot(x, bands.bands_THz, color=color, ls=style, lw=1.0)
        lines[0].set_label(label)
        ax_dos.plot(bands.dos_weights, bands.dos_THz, color=color, ls=style)
    for xs in special_x:
        ax.axvline(xs, color="0.7", lw=0.5)
    ax.set(xticks=special_x, xticklabels=[lab.replace("G", "Γ") for lab in labels], xlim=(0, 1),
           ylabel="frequency (THz)", title="fcc Cu phonons")
    ax.legend()
    ax_dos.set(xlabel="DOS (1/THz)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def table(results: dict) -> str:
    ref, model, err = results["reference"], results["model"], results["test_errors"]
    lines = [f"test frames ({err['frames']}): energy MAE {err['energy_mae_meV_per_atom']:.2f} meV/atom, "
             f"forces MAE {err['forces_mae_meV_per_A']:.1f} meV/Å, stress MAE {err['stress_mae_meV_per_A3']:.3f} "
             f"meV/Å^3 ({err['stress_mae_GPa']:.3f} GPa)",
             f"{'property':<14} {'EMT':>9} {'model':>9} {'diff':>9}"]
    for key, label in (("a0_A", "a0 (Å)"), ("B_eos_GPa", "B EOS (GPa)"), ("B", "B C_ij (GPa)"),
                       ("C11", "C11 (GPa)"), ("C12", "C12 (GPa)"), ("C44", "C44 (GPa)")):
        diff = model[key] - ref[key]
        rel = f" ({100 * diff / ref[key]:+.1f} %)" if key != "a0_A" else ""
        lines.append(f"{label:<14} {ref[key]:9.3f} {model[key]:9.3f} {diff:+9.3f}{rel}")
    for point in POINTS:
        for k, (f_ref, f_model) in enumerate(zip(ref["phonons_THz"][point], model["phonons_THz"][point])):
            lines.append(f"{point + str(k + 1) + ' (THz)':<14} {f_ref:9.3f} {f_model:9.3f} {f_model - f_ref:+9.3f}")
    lines.append(f"max |phonon diff| {results['max_phonon_diff_THz']:.3f} THz (goal 0.3); "
                 f"B EOS diff {results['B_diff_percent']:+.1f} % (goal 5)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "deploy" / "cu-emt.pt"))
    parser.add_argument("--test", default=str(HERE / "data" / "cu-emt-test.extxyz"))
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    supercell = (4, 4, 4) if QUICK else (6, 6, 6)
    model = load_calculator(args.model, dtype="float64")
    ref_numbers, ref_eos, ref_bands = properties(EMT(), supercell)
    model_numbers, model_eos, model_bands = properties(model, supercell)
    diffs = [abs(m - r) for p in POINTS for r, m in zip(ref_numbers["phonons_THz"][p], model_numbers["phonons_THz"][p])]
    results = {
        "model": model_numbers, "reference": ref_numbers, "phonon_supercell": list(supercell),
        "test_errors": test_errors(model, Path(args.test)),
        "max_phonon_diff_THz": float(max(diffs)),
        "B_diff_percent": 100 * (model_numbers["B_eos_GPa"] / ref_numbers["B_eos_GPa"] - 1),
    }
    write_json(out / "results.json", results)
    plot_eos(ref_eos, model_eos, out / "eos.png")
    plot_phonons(ref_bands, model_bands, out / "phonons.png")
    print(table(results))


if __name__ == "__main__":
    main()
