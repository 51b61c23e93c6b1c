"""Labelled frames of fcc copper from ASE's EMT: rattled and strained cells, Langevin MD at 300 K and
900 K, and unrattled cells on the equation of state and under shear; energy (eV), forces (eV/Å) and
stress (eV/Å^3, ASE sign and Voigt order) in extended XYZ.

Usage: python examples/periodic/generate.py [--out examples/periodic/data]
Writes cu-emt-train.extxyz and cu-emt-test.extxyz (other seeds); seeded, so a rerun gives the same file.
Every frame is a 2x2x2 conventional cell (32 atoms); ``info["config_type"]`` says how it was made.
"""

import argparse
import time
from pathlib import Path

import ase.build
import ase.io
import numpy as np
from ase import units
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta

from mlpot.files import atomic_write
from mlpot.workflows.crystal import strained

HERE = Path(__file__).resolve().parent
A_EMT = 3.5898  # Å, EMT's own fcc lattice constant (its equation of state; see reference.py)


def cell(a: float = A_EMT) -> ase.Atoms:
    """The 32-atom 2x2x2 conventional fcc Cu cell."""
    return ase.build.bulk("Cu", "fcc", a=a, cubic=True).repeat(2)


def labelled(atoms: ase.Atoms, config_type: str) -> ase.Atoms:
    """A copy of ``atoms`` with EMT's energy, forces and stress attached (a single-point calculator)."""
    atoms = atoms.copy()
    atoms.calc = EMT()
    results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(), "stress": atoms.get_stress()}
    atoms.calc = SinglePointCalculator(atoms, **results)
    atoms.info["config_type"] = config_type
    return atoms


def random_strain(rng, size: float) -> np.ndarray:
    """A symmetric strain tensor whose six components are drawn uniformly from ±``size``."""
    strain = rng.uniform(-size, size, (3, 3))
    return (strain + strain.T) / 2


def rattled(rng, count: int) -> list:
    """Randomly strained (±2 %) cells with every atom displaced (Gaussian, 0.01-0.1 Å)."""
    frames = []
    for _ in range(count):
        atoms = strained(cell(), random_strain(rng, 0.02))
        atoms.positions += rng.normal(0.0, rng.uniform(0.01, 0.1), atoms.positions.shape)
        frames.append(labelled(atoms, "rattled"))
    return frames


def md(rng, temperature_K: float, count: int, every: int = 20, equilibrate: int = 200) -> list:
    """Snapshots every ``every`` steps (5 fs) of Langevin MD with EMT at ``temperature_K``."""
    atoms = cell()
    atoms.calc = EMT()
    thermalize_momenta(atoms, temperature_K, rng=rng)
    dyn = Langevin(atoms, 5 * units.fs, temperature_K=temperature_K, friction=0.02, rng=rng)
    dyn.run(equilibrate)
    frames = []
    for _ in range(count):
        dyn.run(every)
        frames.append(labelled(atoms, f"md{temperature_K:.0f}K"))
    return frames


def equation_of_state(volume_strains) -> list:
    """Unrattled cells scaled isotropically to (1 + each strain) times the equilibrium volume."""
    return [labelled(strained(cell(), np.eye(3) * ((1 + s) ** (1 / 3) - 1)), "eos") for s in volume_strains]


def sheared(rng, count: int) -> list:
    """Unrattled cells under random strains up to ±3 % (uniaxial, shear and mixed)."""
    return [labelled(strained(cell(), random_strain(rng, 0.03)), "strained") for _ in range(count)]


def frames(seed: int, scale: int = 1) -> list:
    """All kinds of frames from one seed; ``scale`` divides every count (for a small test set)."""
    rng = np.random.default_rng(seed)
    return (rattled(rng, 120 // scale) + md(rng, 300.0, 80 // scale) + md(rng, 900.0, 80 // scale)
            + equation_of_state(np.linspace(-0.08, 0.08, 17 // scale)) + sheared(rng, 40 // scale))


def write(path: Path, atoms_list: list) -> None:
    atomic_write(path, lambda tmp: ase.io.write(tmp, atoms_list, format="extxyz"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "data"))
    args = parser.parse_args()
    out = Path(args.out)
    tic = time.process_time()
    for name, seed, scale in (("cu-emt-train.extxyz", 0, 1), ("cu-emt-test.extxyz", 1, 4)):
        labelled_frames = frames(seed, scale)
        write(out / name, labelled_frames)
        print(f"{out / name}: {len(labelled_frames)} frames")
    print(f"CPU time {time.process_time() - tic:.1f} s")


if __name__ == "__main__":
    main()
