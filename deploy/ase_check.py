"""Test-set errors of the shipped models measured the way users run them: through ``MLPotCalculator`` in ASE.

Usage: python deploy/ase_check.py [deploy/ethanol.pt ...]   (default: every shipped MD17 model)

For each model, every frame of the test split its card names (the full split) goes through the calculator
in the file's own precision; prints energy MAE (meV per molecule) and force MAE (meV/Å per component), and
writes them to ``deploy/ase_check.json``.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np

from mlpot import export
from mlpot.calculators import MLPotCalculator
from mlpot.data.datasets import load_dataset
from mlpot.files import write_json
from mlpot.units import KCAL_PER_MOL_TO_EV

HERE = Path(__file__).resolve().parent
MODELS = [f"{m}{k}.pt" for m in ("ethanol", "toluene", "aspirin") for k in ("", "-schnet")]


def check(path: Path) -> dict:
    meta = export.read_metadata(path)
    dataset = meta["dataset"]
    frames = load_dataset(dataset, split="test")
    calc = MLPotCalculator(str(path))
    energy_errors, force_errors = [], []
    start = time.perf_counter()
    for i in range(len(frames)):
        atoms = frames.to_atoms(i)
        reference_e, reference_f = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = calc
        energy_errors.append(atoms.get_potential_energy() - reference_e)
        force_errors.append((atoms.get_forces() - reference_f).ravel())
    seconds = time.perf_counter() - start
    energy_errors, force_errors = np.asarray(energy_errors), np.concatenate(force_errors)
    return {"model": path.name, "dataset": dataset, "test_frames": len(energy_errors), "dtype": meta["dtype"],
            "energy_mae_meV": 1000 * float(np.abs(energy_errors).mean()),
            "energy_mae_kcal_mol": float(np.abs(energy_errors).mean()) / KCAL_PER_MOL_TO_EV,
            "forces_mae_meV_per_A": 1000 * float(np.abs(force_errors).mean()),
            "forces_mae_kcal_mol_per_A": float(np.abs(force_errors).mean()) / KCAL_PER_MOL_TO_EV,
            "ms_per_frame": 1000 * seconds / len(energy_errors)}


def main(paths) -> None:
    paths = [Path(p) for p in paths] or [HERE / name for name in MODELS]
    out = HERE / "ase_check.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    for path in paths:
        row = check(path)
        results[path.name] = row
        print(f"{row['model']:20s} {row['dataset']:16s} {row['test_frames']:5d} frames  energy {row['energy_mae_meV']:6.2f} meV "
              f"({row['energy_mae_kcal_mol']:.3f} kcal/mol)  forces {row['forces_mae_meV_per_A']:6.2f} meV/Å "
              f"({row['forces_mae_kcal_mol_per_A']:.3f} kcal/mol/Å)", flush=True)
        write_json(out, results)


if __name__ == "__main__":
    main(sys.argv[1:])
