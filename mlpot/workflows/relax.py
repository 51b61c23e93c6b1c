"""Geometry optimisation with ASE optimizers (energies in eV, forces in eV/Å, lengths in Å)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS, FIRE, LBFGS

from mlpot.calculators import load_calculator
from mlpot.data.registry import MOLECULES
from mlpot.workflows.analysis import find_bonds, load_structure

OPTIMIZERS = {"bfgs": BFGS, "lbfgs": LBFGS, "fire": FIRE}


@dataclass
class RelaxResult:
    """Outcome of a relaxation.

    Attributes:
        atoms: the relaxed structure (with its calculator).
        energy_eV: final potential energy, eV.
        max_force_eV_A: largest atomic force norm, eV/Å.
        steps: optimizer steps taken.
        converged: whether ``max_force_eV_A <= fmax`` (and, relaxing the cell, the stress criterion).
        bonds: (i, j, "C-O", length in Å) for every bonded pair.
        output: file the structure was written to, if any.
        max_stress_eV_A3: largest stress component, eV/Å^3 (None unless the cell was relaxed).
    """

    atoms: Atoms
    energy_eV: float
    max_force_eV_A: float
    steps: int
    converged: bool
    bonds: list = field(default_factory=list)
    output: str | None = None
    max_stress_eV_A3: float | None = None


def max_force(atoms: Atoms) -> float:
    """Largest atomic force norm, eV/Å."""
    return float(np.linalg.norm(atoms.get_forces(), axis=1).max())


def bond_table(atoms: Atoms) -> list:
    """(i, j, "A-B", length in Å) for every bonded pair (covalent radii criterion)."""
    symbols = atoms.get_chemical_symbols()
    bonds = find_bonds(atoms.numbers, atoms.positions)
    lengths = np.linalg.norm(atoms.positions[bonds[:, 1]] - atoms.positions[bonds[:, 0]], axis=1)
    return [(int(i), int(j), f"{symbols[i]}-{symbols[j]}", float(d)) for (i, j), d in zip(bonds, lengths)]


def check_cell_relaxation(atoms: Atoms) -> None:
    """ValueError (one line) unless ``atoms`` has a cell to relax (periodic in all three directions)."""
    if not atoms.pbc.all():
        raise ValueError(
            f"relaxing the cell needs a structure periodic in all three directions (pbc={atoms.pbc.tolist()}); "
            f"drop --cell for a molecule or slab"
        )


def relax(
    atoms: Atoms,
    calc,
    fmax: float = 0.01,
    optimizer: str = "bfgs",
    max_steps: int = 2000,
    logfile=None,
    trajectory=None,
    cell: bool = False,
) -> RelaxResult:
    """Relaxes a copy of ``atoms`` to a local minimum.

    Args:
        atoms: starting structure (left unchanged).
        calc: ASE calculator (use float64 for ``fmax`` below ~1e-3 eV/Å).
        fmax: force convergence criterion, eV/Å.
        optimizer: "bfgs", "lbfgs" or "fire".
        max_steps: optimizer step limit.
        logfile: optimizer log (path, "-" for stdout, None for none).
        trajectory: optional .traj path of the optimisation.
        cell: relax the cell with the positions (``ase.filters.FrechetCellFilter``: its cell "forces"
            are -V stress / N, so convergence means |stress| <= fmax N / V as well); needs a 3D cell.
    """
    if optimizer.lower() not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
    if cell:
        check_cell_relaxation(atoms)
    atoms = atoms.copy()
    atoms.calc = calc
    target = FrechetCellFilter(atoms) if cell else atoms
    opt = OPTIMIZERS[optimizer.lower()](target, logfile=logfile, trajectory=trajectory)
    converged = bool(opt.run(fmax=fmax, steps=max_steps))
    return RelaxResult(
        atoms=atoms,
        energy_eV=float(atoms.get_potential_energy()),
        max_force_eV_A=max_force(atoms),
        steps=int(opt.nsteps),
        converged=converged,
        bonds=bond_table(atoms),
        max_stress_eV_A3=float(np.abs(atoms.get_stress()).max()) if cell else None,
    )


def write_structure(result: RelaxResult, path) -> str:
    """Writes the relaxed structure with its energy and forces (format from the suffix, e.g. .xyz = extxyz)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(path, result.atoms)
    result.output = str(path)
    return str(path)


def relax_structure(
    model, structure: str, fmax: float = 0.01, optimizer: str = "bfgs", output_dir=None, data_dir=None,
    device: str = "cpu", max_steps: int = 2000, cell: bool = False,
) -> RelaxResult:
    """``mlpot relax``: relaxes a structure with a model in float64 and writes ``relaxed.xyz`` and ``relax.log``.

    Args:
        model: deployed model file.
        structure: "ethanol", "toluene", "aspirin", a dataset name or a structure file ASE reads.
        fmax: force criterion, eV/Å.
        optimizer: "bfgs", "lbfgs" or "fire".
        output_dir: output folder (default ``mlpot-relax-<structure>``).
        data_dir: folder of the reference data (default $MLPOT_DATA_DIR).
        cell: relax the cell too (periodic structures only).
    """
    label = structure if structure in MOLECULES else Path(structure).stem
    out = Path(output_dir or f"mlpot-relax-{label}")
    atoms = load_structure(structure, data_dir)
    if cell:  # before anything is written
        check_cell_relaxation(atoms)
    out.mkdir(parents=True, exist_ok=True)
    result = relax(atoms, load_calculator(model, "float64", device), fmax, optimizer, max_steps,
                   logfile=str(out / "relax.log"), cell=cell)
    write_structure(result, out / "relaxed.xyz")
    return result


def format_relax(result: RelaxResult) -> str:
    """A human-readable summary with units."""
    status = "converged" if result.converged else "NOT converged"
    lines = [
        f"relaxation {status} in {result.steps} steps",
        f"final energy      {result.energy_eV:.6f} eV",
        f"max force         {result.max_force_eV_A:.2e} eV/Å",
    ]
    if result.max_stress_eV_A3 is not None:
        volume = result.atoms.get_volume()
        lines.append(f"max stress        {result.max_stress_eV_A3:.2e} eV/Å^3 (volume {volume:.3f} Å^3)")
    lines.append("bond lengths:")
    lines += [f"  {label:5s} {i:3d}-{j:<3d} {length:.4f} Å" for i, j, label, length in result.bonds]
    if result.output:
        lines.append(f"wrote {result.output}")
    return "\n".join(lines)
