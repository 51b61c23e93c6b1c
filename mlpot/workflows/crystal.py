"""Bulk properties of a cubic crystal from any ASE calculator: equation of state and bulk modulus,
elastic constants by finite strain, and phonons (ase.phonons) at the high-symmetry points.

The same functions run on a reference calculator (EMT, xTB) and on a deployed model, so that the two
numbers come from one procedure. Units: eV, Å; moduli in GPa; frequencies in THz.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.eos import EquationOfState

THz = 1e12 * units._hplanck / units._e  # 1 THz as an energy in eV (h * 1e12 Hz)


@dataclass
class EOSResult:
    """Energy per atom against volume per atom, and its Birch-Murnaghan fit."""

    volumes: np.ndarray  # Å^3/atom
    energies: np.ndarray  # eV/atom
    v0: float  # Å^3/atom
    e0: float  # eV/atom
    bulk_modulus_GPa: float

    @property
    def lattice_constant(self) -> float:
        """Cubic lattice constant (Å) of a four-atom fcc cell of volume 4 v0."""
        return float((4 * self.v0) ** (1 / 3))


def equation_of_state(atoms: Atoms, calc, strain: float = 0.04, num: int = 9) -> EOSResult:
    """E(V) over volumes ``1 ± strain`` times that of ``atoms`` (scaled cell, fractional positions kept),
    fitted with the Birch-Murnaghan equation; per atom."""
    volumes, energies = [], []
    for scale in np.linspace(1 - strain, 1 + strain, num) ** (1 / 3):
        scaled = atoms.copy()
        scaled.set_cell(atoms.cell.array * scale, scale_atoms=True)
        scaled.calc = calc
        volumes.append(scaled.get_volume() / len(scaled))
        energies.append(scaled.get_potential_energy() / len(scaled))
    eos = EquationOfState(volumes, energies, eos="birchmurnaghan")
    v0, e0, b = eos.fit()
    return EOSResult(np.array(volumes), np.array(energies), float(v0), float(e0), float(b / units.GPa))


def scaled_to(atoms: Atoms, volume_per_atom: float) -> Atoms:
    """A copy of ``atoms`` with its cell scaled isotropically to ``volume_per_atom`` Å^3."""
    scaled = atoms.copy()
    factor = (volume_per_atom * len(atoms) / atoms.get_volume()) ** (1 / 3)
    scaled.set_cell(atoms.cell.array * factor, scale_atoms=True)
    return scaled


def strained(atoms: Atoms, strain) -> Atoms:
    """A copy of ``atoms`` deformed by the symmetric strain tensor ``strain`` (3x3): cell -> cell (1 + strain)."""
    deformed = atoms.copy()
    deformed.set_cell(atoms.cell.array @ (np.eye(3) + np.asarray(strain)), scale_atoms=True)
    return deformed


def cubic_elastic_constants(atoms: Atoms, calc, delta: float = 0.005) -> dict:
    """C11, C12, C44 (GPa) of a cubic cell from central differences of the stress under strains ± ``delta``.

    Uniaxial strain e_xx gives C11 = dσ_xx/de_xx and C12 = dσ_yy/de_xx; the shear e_yz = e_zy = γ/2 gives
    C44 = dσ_yz/dγ. Atoms stay at their scaled positions: right for a crystal whose every atom is a
    centre of inversion (fcc, bcc); a crystal with internal strain (diamond) would need relaxed ones.
    """

    def stress(strain):
        deformed = strained(atoms, strain)
        deformed.calc = calc
        return deformed.get_stress(voigt=False)

    uniaxial, shear = np.zeros((3, 3)), np.zeros((3, 3))
    uniaxial[0, 0] = delta
    shear[1, 2] = shear[2, 1] = delta / 2
    d_uniaxial = (stress(uniaxial) - stress(-uniaxial)) / (2 * delta)
    d_shear = (stress(shear) - stress(-shear)) / (2 * delta)
    c11, c12, c44 = d_uniaxial[0, 0], (d_uniaxial[1, 1] + d_uniaxial[2, 2]) / 2, d_shear[1, 2]
    result = {"C11": c11, "C12": c12, "C44": c44}
    result = {k: float(v / units.GPa) for k, v in result.items()}
    result["B"] = (result["C11"] + 2 * result["C12"]) / 3
    return result


@dataclass
class PhononBands:
    """Phonon frequencies (THz) along a band path, at its special points, and their density of states."""

    path: object  # ase BandPath
    bands_THz: np.ndarray  # (points on the path, branches)
    special_THz: dict  # special-point label -> sorted frequencies
    dos_THz: np.ndarray
    dos_weights: np.ndarray


def phonon_bands(atoms: Atoms, calc, supercell=(6, 6, 6), delta: float = 0.01, path: str = "GXWKGL",
                 npoints: int = 200, kpts=(20, 20, 20)) -> PhononBands:
    """ase.phonons on ``atoms`` repeated ``supercell`` times: band structure along ``path``, the frequencies
    at its special points and the DOS on a ``kpts`` grid (0.05 THz Gaussian)."""
    from ase.phonons import Phonons

    atoms = atoms.copy()
    with tempfile.TemporaryDirectory(prefix="mlpot-phonon-") as tmp:
        ph = Phonons(atoms, calc, supercell=tuple(supercell), delta=delta, name=str(Path(tmp) / "phonon"))
        ph.run()
        ph.read(acoustic=True)
        bandpath = atoms.cell.bandpath(path, npoints=npoints)
        bands = ph.get_band_structure(bandpath, verbose=False).energies[0] / THz
        special = bandpath.special_points
        labels = [label for label in dict.fromkeys(path) if label in special]
        at_points = ph.band_structure([special[label] for label in labels], verbose=False) / THz
        dos = ph.get_dos(kpts=kpts, verbose=False).sample_grid(npts=500, width=0.05 * THz)
    return PhononBands(bandpath, bands, {label: np.sort(f) for label, f in zip(labels, at_points)},
                       dos.get_energies() / THz, dos.get_weights() * THz)
