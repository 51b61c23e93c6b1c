"""Test one trained model through its own package's ASE calculator: energy and force errors on labelled frames.

Run by that implementation's venv python (accuracy.py starts it, pinned to one core, one thread):

    .venvs/mace/bin/python accuracy_eval.py --impl mace --model MACE.model --frames test.extxyz --out test.json
    ../../.venv/bin/python accuracy_eval.py --impl mlpot --model model.pt --frames test.extxyz --out test.json

The frames are an extxyz file whose energies (eV) and forces (eV/Å) are read back by ASE as a SinglePointCalculator
(written by accuracy.py); every frame is given to the calculator as fresh positions (a copy of the Atoms without
its labels), and ``atoms.get_potential_energy(); atoms.get_forces()`` are compared with the labels. Standard
library at the top, like the impl_* modules: every venv imports it.
"""

import argparse
import json
import os
import sys
import time


def calculator(impl: str, model: str, dtype: str):
    if impl == "mlpot":
        from mlpot.calculators import MLPotCalculator

        return MLPotCalculator(model)
    if impl.startswith("nequip"):
        from nequip.integrations.ase import NequIPCalculator

        return NequIPCalculator.from_compiled_model(model, device="cpu", chemical_species_to_atom_type_map=True)
    if impl == "mace":
        from mace.calculators import MACECalculator

        return MACECalculator(model_paths=model, device="cpu", default_dtype=dtype)
    raise SystemExit(f"unknown implementation {impl!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--frames", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="float32", help="MACECalculator default_dtype (the trained model's)")
    args = parser.parse_args()

    # mace-torch's MACECalculator torch.loads its pickled model without weights_only=False, which torch >= 2.6
    # refuses; torch's documented switch restores the old default (as worker.py does)
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    import warnings

    warnings.filterwarnings("ignore")
    import ase.io
    import numpy as np
    import torch
    from ase import Atoms

    torch.set_num_threads(1)
    frames = ase.io.read(args.frames, index=":")
    calc = calculator(args.impl, args.model, args.dtype)
    e_err, f_err, n_atoms = [], [], []
    tic = time.perf_counter()
    for ref in frames:
        atoms = Atoms(numbers=ref.numbers, positions=ref.positions, cell=ref.cell, pbc=ref.pbc)
        atoms.calc = calc
        e_err.append(float(atoms.get_potential_energy()) - float(ref.get_potential_energy()))
        f_err.append(np.asarray(atoms.get_forces()) - ref.get_forces())
        n_atoms.append(len(atoms))
    seconds = time.perf_counter() - tic
    e_err = np.asarray(e_err)
    f_all = np.concatenate([f.reshape(-1) for f in f_err])
    result = {
        "frames": len(frames),
        "energy_mae_meV": float(np.abs(e_err).mean() * 1000),
        "energy_rmse_meV": float(np.sqrt((e_err**2).mean()) * 1000),
        "energy_per_atom_mae_meV": float(np.abs(e_err / np.asarray(n_atoms)).mean() * 1000),
        "forces_mae_meV_per_A": float(np.abs(f_all).mean() * 1000),
        "forces_rmse_meV_per_A": float(np.sqrt((f_all**2).mean()) * 1000),
        "calculator": f"{type(calc).__module__}.{type(calc).__name__}",
        "seconds": round(seconds, 2),
        "python": sys.executable,
    }
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
