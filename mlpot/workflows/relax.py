"""Geometry optimisation with ASE optimizers (energies in eV, forces in eV/Å, lengths in Å)."""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from ase.filters import FrechetCellFilter
from ase.io.formats import filetype
from ase.optimize import BFGS, FIRE, LBFGS

from mlpot.calculators import load_calculator
from mlpot.data.registry import MOLECULES
from mlpot.files import atomic_write, write_bytes
from mlpot.workflows.analysis import find_bonds, load_structure
from mlpot.workflows.outputs import output_folder

OPTIMIZERS = {"bfgs": BFGS, "lbfgs": LBFGS, "fire": FIRE}
_FIRE_STATE = ("vel", "dt", "a", "Nsteps")  # FIRE's whole state (ASE's restart data holds only vel and dt)
STATE_FILE = "relax-state.pkl"


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
    checkpoint=None,
    resume: bool = False,
) -> RelaxResult:
    """Relaxes a copy of ``atoms`` to a local minimum.

    With ``checkpoint`` (a path), the step count, positions, cell (and the cell filter's reference cell),
    optimizer state (BFGS's and LBFGS's restart data; FIRE's velocities, step size, mixing and step
    count) and log size are rewritten atomically after every step; ``resume=True`` continues from them
    bit for bit (give ``calc`` a skin of 0, so that no number depends on the history of its neighbour list).

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
    state = None
    if resume:
        with open(checkpoint, "rb") as fh:
            state = pickle.load(fh)
        if state.get("cell") is not None:
            atoms.set_cell(state["cell"], scale_atoms=False)
        atoms.set_positions(state["positions"], apply_constraint=False)
        if logfile not in (None, "-"):
            with open(logfile, "ab") as fh:
                fh.truncate(state["log_bytes"])  # lines logged after the checkpoint are logged again
    elif logfile not in (None, "-") and Path(logfile).exists():
        Path(logfile).unlink()
    # the filter's coordinates are strains from its reference cell: a resumed run keeps the first run's
    target = FrechetCellFilter(atoms) if cell else atoms
    if cell and state is not None:
        target.orig_cell = state["orig_cell"]
    opt = OPTIMIZERS[optimizer.lower()](target, logfile=logfile, trajectory=trajectory)
    if checkpoint:
        _checkpoint_every_step(opt, atoms, target, checkpoint, logfile, state)
    converged = bool(opt.run(fmax=fmax, steps=max_steps - opt.nsteps)) if not (state and state["done"]) else True
    if state and state["done"]:
        converged = state["converged"]
    elif checkpoint:
        opt.save_state(done=True, converged=converged)
    return RelaxResult(
        atoms=atoms,
        energy_eV=float(atoms.get_potential_energy()),
        max_force_eV_A=max_force(atoms),
        steps=int(opt.nsteps),
        converged=converged,
        bonds=bond_table(atoms),
        max_stress_eV_A3=float(np.abs(atoms.get_stress()).max()) if cell else None,
    )


def _checkpoint_every_step(opt, atoms, target, checkpoint, logfile, state) -> None:
    """Saves the run after every step (see :func:`relax`); restores ``state`` when given."""
    saved = {}
    opt.dump = lambda data: saved.update(optimizer=data)  # ASE's restart data, kept for the checkpoint
    fire = isinstance(opt, FIRE)
    if state is not None:
        if fire:
            for name in _FIRE_STATE:
                setattr(opt, name, state["optimizer"][name])
        else:
            opt.load = lambda: state["optimizer"]
            opt.read()
        opt.nsteps = state["step"]
        saved["optimizer"] = state["optimizer"]

    def save_state(done=False, converged=False):
        size = Path(logfile).stat().st_size if logfile not in (None, "-") and Path(logfile).exists() else 0
        optimizer_state = {name: copy.deepcopy(getattr(opt, name)) for name in _FIRE_STATE} if fire else saved.get("optimizer")
        data = {"step": opt.nsteps, "positions": atoms.positions.copy(), "cell": atoms.cell.array.copy(),
                "orig_cell": np.array(target.orig_cell, dtype=float) if target is not atoms else None,
                "optimizer": optimizer_state, "log_bytes": size, "done": done, "converged": converged}
        write_bytes(checkpoint, pickle.dumps(data))

    opt.save_state = save_state
    opt.attach(save_state, interval=1)


def write_structure(result: RelaxResult, path) -> str:
    """Writes the relaxed structure with its energy and forces (format from the suffix, e.g. .xyz = extxyz),
    atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: ase.io.write(tmp, result.atoms, format=filetype(str(path), read=False)))
    result.output = str(path)
    return str(path)


def relax_structure(
    model, structure: str, fmax: float = 0.01, optimizer: str = "bfgs", output_dir=None, data_dir=None,
    device: str = "cpu", max_steps: int = 2000, cell: bool = False, resume: bool = False, overwrite: bool = False,
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
        resume: continue the stopped or killed relaxation in ``output_dir``, bit for bit.
        overwrite: replace the results already in ``output_dir`` (kept until the new run has finished).
    """
    label = structure if structure in MOLECULES else Path(structure).stem
    out = Path(output_dir or f"mlpot-relax-{label}")
    atoms = load_structure(structure, data_dir)
    if cell:  # before anything is written
        check_cell_relaxation(atoms)
    calc = load_calculator(model, "float64", device, skin=0.0)  # no neighbour-list history: resumable bit for bit
    options = {"model": str(model), "structure": structure, "fmax": fmax, "optimizer": optimizer, "steps": max_steps,
               "cell": cell}
    with output_folder(out, STATE_FILE, resume, overwrite, options) as work:
        result = relax(atoms, calc, fmax, optimizer, max_steps, logfile=str(work / "relax.log"), cell=cell,
                       checkpoint=work / STATE_FILE, resume=resume)
        write_structure(result, work / "relaxed.xyz")
    result.output = str(out / "relaxed.xyz")
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
