"""Labelled frames of diamond silicon from GFN1-xTB (tblite, Γ point only): rattled and strained cells,
Langevin MD at 300 K and 900 K, and unrattled cells on the equation of state; energy (eV), forces (eV/Å),
stress (eV/Å^3) in extended XYZ, as generate.py does for copper.

Usage: python examples/periodic/generate_si.py [--out examples/periodic/data] [--scale 1]
Writes si-gfn1-train.extxyz; ``--scale N`` divides every count by N. Needs ``pip install tblite==0.8.0``.
Every frame is a 2x2x2 conventional cell (64 atoms, 10.9 Å: xTB here has no k-points, so the cell must be
large). Measured on the shared 2-core machine: 9.4 s CPU per 64-atom energy + forces + stress (0.3 s for the
8-atom cell), so the default 141 frames and 700 MD steps take about 2 h of CPU; not yet run in full, and no
model is trained on them.
"""

import argparse
import time
from pathlib import Path

import ase.build
import ase.io
import numpy as np
from ase import units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta

from mlpot.files import atomic_write
from mlpot.workflows.crystal import strained

HERE = Path(__file__).resolve().parent
A_SI = 5.43  # Å, experiment; GFN1-xTB (Γ only) gives -12 GPa stress here: find its own a0 before a full run


def xtb():
    from tblite.ase import TBLite

    return TBLite(method="GFN1-xTB", verbosity=0)


def cell(a: float = A_SI) -> ase.Atoms:
    """The 64-atom 2x2x2 conventional diamond Si cell."""
    return ase.build.bulk("Si", "diamond", a=a, cubic=True).repeat(2)


def labelled(atoms: ase.Atoms, config_type: str) -> ase.Atoms:
    """A copy of ``atoms`` with GFN1-xTB's energy, forces and stress attached (a single-point calculator)."""
    atoms = atoms.copy()
    atoms.calc = xtb()
    results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(), "stress": atoms.get_stress()}
    atoms.calc = SinglePointCalculator(atoms, **results)
    atoms.info["config_type"] = config_type
    return atoms


def random_strain(rng, size: float) -> np.ndarray:
    strain = rng.uniform(-size, size, (3, 3))
    return (strain + strain.T) / 2


def frames(seed: int, scale: int = 1) -> list:
    """Rattled (±2 % strain, 0.01-0.1 Å), MD (300 K, 900 K; 2 fs steps, one frame every 20 fs after 100 fs)
    and equation-of-state frames (-10 % to +10 % volume); ``scale`` divides every count (at least 1)."""

    def count(n):
        return max(1, n // scale)

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count(60)):
        atoms = strained(cell(), random_strain(rng, 0.02))
        atoms.positions += rng.normal(0.0, rng.uniform(0.01, 0.1), atoms.positions.shape)
        out.append(labelled(atoms, "rattled"))
    for temperature_K in (300.0, 900.0):
        atoms = cell()
        atoms.calc = xtb()
        thermalize_momenta(atoms, temperature_K, rng=rng)
        dyn = Langevin(atoms, 2 * units.fs, temperature_K=temperature_K, friction=0.02, rng=rng)
        dyn.run(count(50))
        for _ in range(count(30)):
            dyn.run(count(10))
            out.append(labelled(atoms, f"md{temperature_K:.0f}K"))
    for s in np.linspace(-0.10, 0.10, count(21)):
        out.append(labelled(strained(cell(), np.eye(3) * ((1 + s) ** (1 / 3) - 1)), "eos"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "data"))
    parser.add_argument("--scale", type=int, default=1, help="divide every count by this (a quick look)")
    args = parser.parse_args()
    tic = time.process_time()
    labelled_frames = frames(0, args.scale)
    path = Path(args.out) / "si-gfn1-train.extxyz"
    atomic_write(path, lambda tmp: ase.io.write(tmp, labelled_frames, format="extxyz"))
    cpu = time.process_time() - tic
    print(f"{path}: {len(labelled_frames)} frames; CPU time {cpu:.1f} s ({cpu / len(labelled_frames):.1f} s per frame)")


if __name__ == "__main__":
    main()
