"""Predictions for structures with or without labels: batched energies, forces, per-atom energies,
stress (cells periodic in all three directions) and, for a committee, their spreads.

``mlpot eval MODEL FILE --predict OUT.extxyz`` writes them into a copy of the structures, under keys
that start with ``mlpot_`` (``info``: ``mlpot_energy``, ``mlpot_stress``, ``mlpot_energy_std``,
``mlpot_stress_std``; ``arrays``: ``mlpot_forces``, ``mlpot_energies``, ``mlpot_forces_std``), so that
reference labels already in the file stay as they are.
"""

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import ase.data
import ase.io
import numpy as np
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress
from tqdm.auto import tqdm

from mlpot import export, files, keys
from mlpot.data import datasets
from mlpot.data.graph import atoms_to_graph, collate
from mlpot.dtypes import dtype_of

PREFIX = "mlpot_"


def read_structures(data: str, split: Optional[str] = None, index: int = 1) -> List[Atoms]:
    """Structures of an ASE-readable file (labels not needed), or of an MD17-style npz file or dataset name."""
    path = Path(data)
    if path.is_file() and datasets.data_format(path) != "npz":
        try:
            images = ase.io.read(path, index=":")
        except Exception as error:  # ASE raises many different exception types on bad input
            raise ValueError(f"{path} is not a structure file ASE can read ({' '.join(str(error).split())})") from None
        if not images:
            raise ValueError(f"{path} contains no structures")
        return images
    frames = datasets.load_dataset(data, split=split, index=index)
    return [
        Atoms(numbers=z, positions=r, cell=frames.cells[i], pbc=frames.pbc[i])
        for i, (z, r) in enumerate(zip(frames.numbers, frames.positions))
    ]


def _check(structures: Sequence[Atoms], meta: dict, model: str) -> None:
    """One-line errors for elements the model does not know and for periodicity it was not trained on."""
    known = set(int(z) for z in meta["species"])
    for i, atoms in enumerate(structures):
        unknown = sorted(set(atoms.numbers.tolist()) - known)
        if unknown:
            symbols = ", ".join(ase.data.chemical_symbols[z] for z in unknown)
            raise ValueError(f"structure {i} holds {symbols}, which {model} was not trained on")
        if not export.takes_pbc(meta, bool(atoms.pbc.any())):
            raise ValueError(
                f"structure {i} has pbc={atoms.pbc.tolist()} but {model} was trained on {export.trained_on(meta)}; "
                f"set the file's pbc (extxyz: pbc=\"T T T\" or \"F F F\") to match"
            )


def _predict_one(model, meta: dict, structures: Sequence[Atoms], dtype, device, batch_size: int, bar) -> Dict[str, list]:
    """Per-structure energy (eV), forces (eV/Å), per-atom energies (eV) and stress (eV/Å^3 Voigt, or None)."""
    cutoff = float(meta["cutoff"])
    dtype = dtype or dtype_of(meta["dtype"])
    with_virial = getattr(model, "energy_and_forces", None)
    out: Dict[str, list] = {"energy": [], "forces": [], "energies": [], "stress": []}
    for start in range(0, len(structures), batch_size):
        chunk = structures[start : start + batch_size]
        batch = collate([atoms_to_graph(a, cutoff, dtype, device) for a in chunk])
        full_pbc = [bool(a.pbc.all()) for a in chunk]
        if any(full_pbc) and with_virial is not None:
            result = with_virial(batch, True, False, True)
        else:
            result = model(batch)
        counts = batch[keys.NUM_ATOMS].tolist()
        energy = result[keys.ENERGY].detach().double().cpu().numpy()
        forces = np.split(result[keys.FORCES].detach().double().cpu().numpy(), np.cumsum(counts)[:-1])
        energies = np.split(result[keys.NODE_ENERGY].detach().double().cpu().numpy(), np.cumsum(counts)[:-1])
        virial = result[keys.VIRIAL].detach().double().cpu().numpy() if keys.VIRIAL in result else None
        for k, atoms in enumerate(chunk):
            out["energy"].append(float(energy[k]))
            out["forces"].append(forces[k])
            out["energies"].append(energies[k])
            stress = None
            if full_pbc[k] and virial is not None:
                stress = full_3x3_to_voigt_6_stress(-virial[k] / atoms.get_volume())
            out["stress"].append(stress)
        if bar is not None:
            bar.update(len(chunk))
    return out


def predict_structures(
    models: Sequence[str],
    structures: Sequence[Atoms],
    dtype: Optional[torch.dtype] = None,
    device: str = "cpu",
    batch_size: int = 32,
    progress: bool = True,
) -> List[Atoms]:
    """Copies of ``structures`` with the predictions of one deployed model, or the mean and spread
    (standard deviation) of a committee of several, under ``mlpot_`` keys (see the module docstring)."""
    loaded = [(path, *export.load(str(path), device=device, dtype=dtype)) for path in models]
    species = {tuple(meta["species"]) for _, _, meta in loaded}
    if len(species) > 1:
        raise ValueError(f"the committee's models know different elements: {sorted(species)}")
    for path, _, meta in loaded:
        _check(structures, meta, str(path))
    total = len(structures) * len(loaded)
    bar = tqdm(total=total, desc="predict", unit="structure", disable=not progress, leave=False)
    per_model = [_predict_one(m, meta, structures, dtype, device, batch_size, bar) for _, m, meta in loaded]
    bar.close()
    results = []
    for i, atoms in enumerate(structures):
        copy = atoms.copy()  # keeps the structure's own info and arrays
        if atoms.calc is not None and getattr(atoms.calc, "results", None):  # labels ASE read into a calculator
            copy.calc = SinglePointCalculator(copy, **atoms.calc.results)
        energy = np.array([p["energy"][i] for p in per_model])
        forces = np.stack([p["forces"][i] for p in per_model])
        energies = np.stack([p["energies"][i] for p in per_model])
        copy.info[PREFIX + "energy"] = float(energy.mean())
        copy.arrays[PREFIX + "forces"] = forces.mean(axis=0)
        copy.arrays[PREFIX + "energies"] = energies.mean(axis=0)
        stresses = [p["stress"][i] for p in per_model]
        if stresses[0] is not None:
            copy.info[PREFIX + "stress"] = np.mean(stresses, axis=0)
        if len(per_model) > 1:
            copy.info[PREFIX + "energy_std"] = float(energy.std())
            copy.arrays[PREFIX + "forces_std"] = forces.std(axis=0)
            if stresses[0] is not None:
                copy.info[PREFIX + "stress_std"] = np.std(stresses, axis=0)
        results.append(copy)
    return results


def check_output(path) -> Path:
    """``path`` as a Path if it names an extended XYZ file, else a one-line ValueError."""
    path = Path(path)
    if path.suffix.lower() not in (".xyz", ".extxyz"):
        raise ValueError(f"--predict writes extended XYZ: give a file name ending in .extxyz or .xyz, not {path.name}")
    return path


def write_predictions(path, structures: Sequence[Atoms]) -> Path:
    """Write predicted structures to an extended XYZ file, atomically."""
    path = check_output(path)
    return files.atomic_write(path, lambda tmp: ase.io.write(tmp, list(structures), format="extxyz"))
