"""Labelled structures (energies and forces in eV, eV/Å) and named reference datasets."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import ase
import ase.io
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator

from mlpot import files
from mlpot.units import KCAL_PER_MOL_TO_EV

SGDML_KEYS = ("E", "F", "R", "z")
RMD17_KEYS = ("nuclear_charges", "coords", "energies", "forces")
UNRECOGNISED = "not an MD17/rMD17 npz or an ASE-readable file with energy and forces"

# Where downloads come from; tests point these at file:// URLs.
DOWNLOAD_URLS = {
    "sgdml": "http://www.quantum-machine.org/gdml/data/npz/",
    "rmd17": "https://raw.githubusercontent.com/andersx/rmd17-npz/"
    "4f6bb0a186822c90d47cd98b7a27991fe0b3173b/rmd17-npz/",
}

SGDML_NAMES = (
    "aspirin_ccsd",
    "toluene_ccsd_t",
    "ethanol_ccsd_t",
    "malonaldehyde_ccsd_t",
    "benzene_ccsd_t",
)
# sha256 of the official sGDML zip archives; names without an entry are local-only.
SGDML_ZIP_SHA256 = {
    "ethanol_ccsd_t": "4ff89296445da20566d64a7e041d861fe87e435a59187b90b822004dac103d45",
    "toluene_ccsd_t": "71dec233f847f3eda8851d01c509a2feb5164ef3b7340b113af85c2ed12a34f6",
    "aspirin_ccsd": "743c062173ac9b90f5087302bbe822705fbaeca7f03ad56c5c1222e3a98e1ea3",
}

RMD17_MOLECULES = (
    "aspirin",
    "azobenzene",
    "benzene",
    "ethanol",
    "malonaldehyde",
    "naphthalene",
    "paracetamol",
    "salicylic",
    "toluene",
    "uracil",
)
# sha256 of the rMD17 split files (andersx/rmd17-npz @ 4f6bb0a1); others are local-only.
RMD17_SHA256 = {
    "rmd17_ethanol_train_01.npz": "096946747b8d9dcfa042b44f8debbd3da387dfe1586b659e3be789cc4927316a",
    "rmd17_ethanol_train_02.npz": "b4bd8ed96ffaa31fe50634ab8705684151011033c3dd73927d61931fc8fda863",
    "rmd17_ethanol_train_03.npz": "26a3a378a63486cb8b127f0f4a8af861996a1759d59e9457288cf11d86967cae",
    "rmd17_ethanol_train_04.npz": "14796fc0c778e089292e514aee2592b8c4395f7ce4648c8aa22e19030421d0da",
    "rmd17_ethanol_train_05.npz": "fa8b76b36482fff572fc01f62120403c7e6678f5d13f302362e4c9e1cd57a8a6",
    "rmd17_ethanol_test_01.npz": "c3594a0f93d5992e02f9eb671392fb2e5021b3fa4f902417886966d1e4f64e1e",
    "rmd17_ethanol_test_02.npz": "b3276f23d28d4588d008e19ad68e784278caf58e90c7139a11cd7e950b8d3eb4",
    "rmd17_ethanol_test_03.npz": "1ba5586225c0439d5880c4b860e5a84dde042f947b90667178bb6f819241c284",
    "rmd17_ethanol_test_04.npz": "1ec462b9333e7984ac97fefe66294ca51cceb64c8e4afd24d9d8124b81fa6fb0",
    "rmd17_ethanol_test_05.npz": "af80798e2c0b309b8ad65a5c539651089c3d7f8d0528686c4a74e2132ecc9a1f",
    "rmd17_aspirin_train_01.npz": "d460f0e43a1a9411b55cdcd9cdbeb9466ae62851ac91392516ab88e4ebc68143",
    "rmd17_aspirin_train_02.npz": "8a5699756e1a9c2bc30c22985cff03b45cb1eb36550941d742d8ce5abfac2d01",
    "rmd17_aspirin_train_03.npz": "9153827bb89e26d43e9e590d35d5572dd0b535a190a3486c320c75494aa94a7c",
    "rmd17_aspirin_train_04.npz": "c086ab96170e5bdc0363674d1e5d6ea9786a7a76fca286eb87f35850b5e21c13",
    "rmd17_aspirin_train_05.npz": "25cc9584b5cd79f63d56d051bab326e18077b3719f8f45807747fbfa6a55e7ed",
    "rmd17_aspirin_test_01.npz": "a3c3b61e782d01e6dd649a126004903f7873e8e7ee5034135abfdb8873be711d",
    "rmd17_aspirin_test_02.npz": "445e26aa2253dcf7e8d9386785c4a9cea69f1e196f54fbd69a969c53177a1a9c",
    "rmd17_aspirin_test_03.npz": "818d5bbb8c8ff17bd049ab09e2614354b0a8a21a1cd5667bc13e934247162a36",
    "rmd17_aspirin_test_04.npz": "724b808f3ed9eb542b864e14982aa2246a4c5098165b86ec8b22e893cd9271c5",
    "rmd17_aspirin_test_05.npz": "03e1e6673698867c73e3be38a37a19b062ed49a4961aee21e67702db869f3d9d",
    "rmd17_toluene_train_01.npz": "24d0642f897a1da1fdc4dbdd0a9c2a7f6082dd88e02954b12896a45a7a5fbac7",
    "rmd17_toluene_train_02.npz": "57a2f44a931d6074363ea7826e22b0cc06e52e1af1bace98daaec10ca3ce1bd6",
    "rmd17_toluene_train_03.npz": "b261bd56df9a237036a76526524d689892aadf84964cdb4357a42fb303b6aec2",
    "rmd17_toluene_train_04.npz": "82befdd811ed4e0578db83e73fc09751b43c69865a073a2b487120dbf411e203",
    "rmd17_toluene_train_05.npz": "2e374903c51d17f3444539e5e75e0bd7ebd208065c27836d6aa201af3587a48d",
    "rmd17_toluene_test_01.npz": "8a658b9bf1b7a5c1abaa03846ee6302725e02bdcd2ab720ef94da0be55625faa",
    "rmd17_toluene_test_02.npz": "8b04b4bbdba25f45478b3db153814b0332de8bcc7c3e56c1265696597c0191e2",
    "rmd17_toluene_test_03.npz": "a0729092008a3322043b902bebddc6ba8f5593dc983bb7e11a344d299cde195f",
    "rmd17_toluene_test_04.npz": "5f6a91c6d0e3cd144e4480f35a5856f2be4e2554dbc3f9fd15406cbcfaf6d936",
    "rmd17_toluene_test_05.npz": "9f3bb3ca88e2afc147a8a80eb78d2cf9689027f7661127669062a3bf582284a4",
}

XTB_NAMES = ("ethanol_gfn2xtb", "toluene_gfn2xtb", "aspirin_gfn2xtb")
# Datasets stored as one file without a train/test split (split "all").
SINGLE_FILE_DATASETS = {
    "md17_ethanol_dft": "md17_ethanol_dft_frames0-1999.npz",
    "ethanol_pbe_def2svp": "ethanol_pbe_def2svp.npz",
}


@dataclass
class Frames:
    """A set of labelled structures in eV and Å.

    Attributes:
        numbers: Atomic numbers per frame, int64 arrays of shape (n_i,).
        positions: Positions per frame in Å, float64 arrays of shape (n_i, 3).
        energy: Total energies in eV, float64 array of shape (M,).
        forces: Forces per frame in eV/Å, float64 arrays of shape (n_i, 3).
        name: Short label of the set.
        source: Path of the file the frames came from.
        cells: Cell vectors (rows) in Å, float64 (M, 3, 3); zeros for molecules (the default).
        pbc: Periodic directions, bool (M, 3); all False for molecules (the default).
        stress: Stress in eV/Å^3, float64 (M, 3, 3) (ASE's sign: positive under tension), or None; frames not
            periodic in all three directions hold zeros there (their stress is undefined and never read).
        weights: Per-frame loss weights, float64 (M,), default 1.
    """

    numbers: list[np.ndarray]
    positions: list[np.ndarray]
    energy: np.ndarray
    forces: list[np.ndarray]
    name: str = ""
    source: str = ""
    cells: np.ndarray | None = None
    pbc: np.ndarray | None = None
    stress: np.ndarray | None = None
    weights: np.ndarray | None = None

    def __post_init__(self) -> None:
        where = self.source or self.name or "<frames>"
        self.energy = np.asarray(self.energy, dtype=np.float64)
        if self.energy.ndim != 1:
            raise ValueError(f"energies must have shape (M,), got {self.energy.shape} in {where}")
        n_frames = len(self.energy)
        for label, values in (("numbers", self.numbers), ("positions", self.positions), ("forces", self.forces)):
            if len(values) != n_frames:
                raise ValueError(f"{len(values)} frames of {label} but {n_frames} energies in {where}")
        _check_finite(self.energy, "energies", None, where)
        self.numbers = [_as_atomic_numbers(z, i, where) for i, z in enumerate(self.numbers)]
        self.positions = [np.asarray(r, dtype=np.float64) for r in self.positions]
        self.forces = [np.asarray(f, dtype=np.float64) for f in self.forces]
        for i, (z, r, f) in enumerate(zip(self.numbers, self.positions, self.forces)):
            for label, values in (("positions", r), ("forces", f)):
                if values.shape != (len(z), 3):
                    raise ValueError(
                        f"{label} of frame {i} have shape {values.shape}, expected ({len(z)}, 3) in {where}"
                    )
                _check_finite(values, label, i, where)
        self.cells = _per_frame(self.cells, np.zeros((n_frames, 3, 3)), (n_frames, 3, 3), "cells (Å)", where)
        self.pbc = _per_frame(self.pbc, np.zeros((n_frames, 3), dtype=bool), (n_frames, 3), "pbc", where).astype(bool)
        self.weights = _per_frame(self.weights, np.ones(n_frames), (n_frames,), "weights", where)
        if self.stress is not None:
            self.stress = _per_frame(self.stress, None, (n_frames, 3, 3), "stress (eV/Å^3)", where)
        if (self.weights < 0).any():
            frame = int(np.flatnonzero(self.weights < 0)[0])
            raise ValueError(f"weight of frame {frame} is {self.weights[frame]:g} in {where}; weights must be >= 0")
        for i in np.flatnonzero(self.pbc.any(axis=1)):
            # a periodic direction needs a cell vector along it (a zero vector would make the graph wrong)
            lengths = np.linalg.norm(self.cells[i], axis=1)
            if np.any(self.pbc[i] & (lengths == 0)):
                raise ValueError(f"frame {i} is periodic along {self.pbc[i].tolist()} but has a zero cell vector there in {where}")

    def __len__(self) -> int:
        return len(self.energy)

    @property
    def periodic(self) -> bool:
        """Whether any frame is periodic in any direction."""
        return bool(self.pbc.any())

    @property
    def isolated(self) -> bool:
        """Whether any frame is an isolated structure (periodic in no direction)."""
        return bool((~self.pbc.any(axis=1)).any())

    def subset(self, indices: Sequence[int] | np.ndarray) -> Frames:
        """Returns the frames at the given indices, in that order (with their cells, pbc, stress, weights)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        return Frames(
            numbers=[self.numbers[i] for i in indices],
            positions=[self.positions[i] for i in indices],
            energy=self.energy[indices],
            forces=[self.forces[i] for i in indices],
            name=self.name,
            source=self.source,
            cells=self.cells[indices],
            pbc=self.pbc[indices],
            stress=None if self.stress is None else self.stress[indices],
            weights=self.weights[indices],
        )

    def to_atoms(self, i: int) -> ase.Atoms:
        """Returns frame i as ase.Atoms (cell, pbc; weight in ``info["weight"]``) with its energy,
        forces and stress in a SinglePointCalculator."""
        atoms = ase.Atoms(
            numbers=self.numbers[i], positions=self.positions[i].copy(), cell=self.cells[i].copy(), pbc=self.pbc[i].copy()
        )
        results = {"energy": float(self.energy[i]), "forces": self.forces[i].copy()}
        if self.stress is not None:
            results["stress"] = self.stress[i].copy()
        atoms.calc = SinglePointCalculator(atoms, **results)
        atoms.info["weight"] = float(self.weights[i])
        return atoms

    def compositions(self) -> list[str]:
        """Chemical formula of each frame (Hill order, e.g. ``C2H6O``)."""
        formulas: dict[bytes, str] = {}  # frames of one trajectory share their numbers: one formula each
        for z in self.numbers:
            if z.tobytes() not in formulas:
                formulas[z.tobytes()] = ase.Atoms(numbers=z).get_chemical_formula(mode="hill")
        return [formulas[z.tobytes()] for z in self.numbers]


def _per_frame(values, default, shape: tuple, label: str, where: str) -> np.ndarray:
    """values (or default when None) as a float64/bool array of the given shape, finite; else ValueError."""
    if values is None:
        return default
    array = np.asarray(values)
    array = array if array.dtype == bool else array.astype(np.float64)
    if array.shape != shape:
        raise ValueError(f"{label} have shape {array.shape}, expected {shape} in {where}")
    if array.dtype != bool:
        for i in np.flatnonzero(~np.isfinite(array.reshape(shape[0], -1)).all(axis=1))[:1]:
            _check_finite(array[i], label, int(i), where)
    return array


def _check_finite(values: np.ndarray, label: str, frame: int | None, where: str) -> None:
    """Raises ValueError naming the first frame with a NaN or infinite value."""
    bad = ~np.isfinite(values)
    if not bad.any():
        return
    if frame is None:
        frame = int(np.flatnonzero(bad)[0])
        value = values[frame]
    else:
        value = values[bad][0]
    kind = "NaN" if np.isnan(value) else "infinite value"
    raise ValueError(f"{kind} in {label} of frame {frame} in {where}")


def _as_atomic_numbers(numbers, frame: int, where: str) -> np.ndarray:
    """Returns numbers as an int64 (n,) array after checking they are atomic numbers."""
    numbers = np.asarray(numbers)
    if numbers.ndim != 1:
        raise ValueError(f"atomic numbers of frame {frame} have shape {numbers.shape}, expected (n,) in {where}")
    as_int = numbers.astype(np.int64)
    if numbers.size and (not np.array_equal(as_int, numbers) or as_int.min() < 1 or as_int.max() > 118):
        raise ValueError(f"atomic numbers of frame {frame} are not integers in 1..118 in {where}")
    return as_int


ENERGY_UNITS = {"eV": 1.0, "kcal/mol": KCAL_PER_MOL_TO_EV}
# stress units of a file -> eV/Å^3 (ASE's and mlpot's unit); GPa and kbar are what DFT codes print
STRESS_UNITS = {"eV/A^3": 1.0, "GPa": ase.units.GPa, "kbar": 1000 * ase.units.bar, "bar": ase.units.bar}
MAX_PLAUSIBLE_STRESS = 1.0  # eV/Å^3 (160 GPa): beyond it a stress is almost surely in GPa, kbar or bar


def _max_plausible_energy(numbers: np.ndarray) -> float:
    """1.5 x the Thomas-Fermi total energy 20.9 Z^(7/3) eV summed over atoms: no total energy in eV is larger."""
    return 1.5 * 20.9 * float(np.sum(np.asarray(numbers, dtype=np.float64) ** (7.0 / 3.0)))


def data_format(path: str | os.PathLike) -> str:
    """How a data file is read: ``"npz"`` (an MD17/rMD17 npz archive) or ``"ase"`` (anything for ase.io.read).

    The content decides, not the name: any zip archive is an npz. A ``.npz`` name on a file that is no
    archive raises ValueError, since ASE would only fail on it with a less helpful message.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        return "npz"
    if path.suffix == ".npz":
        raise ValueError(f"{path} is {UNRECOGNISED}: it has the .npz suffix but is not a valid npz archive")
    return "ase"


WEIGHT_KEYS = ("weight", "config_weight")  # per-frame info keys read as loss weights


class MissingLabelError(ValueError):
    """A frame lacks a label (energy or forces) under the key asked for; ``what`` says which, without
    the advice on how to name another key (the command line words that its own way)."""

    def __init__(self, message: str, what: str):
        super().__init__(message)
        self.what = what


def read_frames(
    path: str | os.PathLike,
    name: str | None = None,
    units: str | None = None,
    energy_key: str = "energy",
    forces_key: str = "forces",
    stress_key: str = "stress",
    stress_unit: str = "eV/A^3",
) -> Frames:
    """Reads labelled structures from a file and converts them to eV and Å.

    Recognised layouts: sGDML / original MD17 npz (keys E, F, R, z in kcal/mol),
    revised MD17 npz (nuclear_charges, coords, energies, forces in kcal/mol), and any
    file ase.io.read understands whose frames carry energy and forces in eV and eV/Å.

    Args:
        path: File to read.
        name: Label for the frames; defaults to the file name without suffix.
        units: energy unit of the file ("eV" or "kcal/mol", forces per Å); default: kcal/mol for
            the MD17 npz layouts, eV for ASE files.
        energy_key, forces_key, stress_key: names of the labels in an ASE file's ``info``/``arrays``
            or calculator results (MACE-style files: ``REF_energy``, ``REF_forces``, ``REF_stress``).
            Stress (or ``virial``, read as stress = -virial/V) is optional; cell, pbc and a per-frame
            ``weight``/``config_weight`` are read too.
        stress_unit: unit of the file's stresses: "eV/A^3" (ASE's, the default), "GPa", "kbar" or "bar";
            a stress beyond 1 eV/Å^3 (160 GPa) after conversion is taken for a wrong unit (ValueError).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the layout is not recognised, keys are missing, or shapes or values are wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    name = path.stem if name is None else name
    if units is not None and units not in ENERGY_UNITS:
        raise ValueError(f"unknown energy unit {units!r} for {path}; use one of {sorted(ENERGY_UNITS)}")
    if stress_unit not in STRESS_UNITS:
        raise ValueError(f"unknown stress unit {stress_unit!r} for {path}; use one of {', '.join(STRESS_UNITS)}")
    if data_format(path) == "npz":
        frames = _read_npz(path, name)
        default = "kcal/mol"
    else:
        frames = _read_with_ase(path, name, energy_key, forces_key, stress_key)
        default = "eV"
    if units is not None and units != default:
        factor = ENERGY_UNITS[units] / ENERGY_UNITS[default]
        frames.energy = frames.energy * factor
        frames.forces = [f * factor for f in frames.forces]
        if frames.stress is not None:
            frames.stress = frames.stress * factor
    if frames.stress is not None:
        frames.stress = frames.stress * STRESS_UNITS[stress_unit]
        _check_stress_unit(frames.stress, path, stress_unit)
    bounds = np.array([_max_plausible_energy(z) for z in frames.numbers])
    worst = int(np.argmax(np.abs(frames.energy) / bounds))
    if abs(frames.energy[worst]) > bounds[worst]:
        raise ValueError(
            f"{path}: frame {worst} has energy {frames.energy[worst]:.6g} eV after reading it as "
            f"{units or default}, more than any total energy of these atoms can be; "
            f"the file's energy unit is probably wrong (pass units=...)"
        )
    return frames


def _check_stress_unit(stress: np.ndarray, path: Path, unit: str) -> None:
    """ValueError (one line) when a stress is too large to be in ``unit``."""
    largest = np.abs(stress).reshape(len(stress), -1).max(axis=1)
    worst = int(np.argmax(largest))
    if largest[worst] > MAX_PLAUSIBLE_STRESS:
        others = ", ".join(u for u in STRESS_UNITS if u != unit)
        raise ValueError(
            f"{path}: frame {worst} has a stress of {largest[worst]:.4g} eV/Å^3 ({largest[worst] / ase.units.GPa:.4g} GPa) "
            f"read as {unit}, beyond any plausible stress; give the file's stress unit with data.stress_unit "
            f"(--stress-unit): one of {others}"
        )


def _read_npz(path: Path, name: str) -> Frames:
    """Reads an sGDML/MD17 or rMD17 npz file (kcal/mol) into Frames (eV)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            if set(RMD17_KEYS) <= keys:
                z, r, e, f = (data[k] for k in RMD17_KEYS)
            elif keys & set(SGDML_KEYS):
                _require_keys(path, keys, SGDML_KEYS, "sGDML/MD17")
                e, f, r, z = (data[k] for k in SGDML_KEYS)
            elif keys & set(RMD17_KEYS):
                _require_keys(path, keys, RMD17_KEYS, "revised MD17")
            else:
                raise ValueError(
                    f"{path} is {UNRECOGNISED}: expected keys {list(SGDML_KEYS)} (sGDML/MD17) or "
                    f"{list(RMD17_KEYS)} (revised MD17), found keys {sorted(keys)}"
                )
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"{path} is {UNRECOGNISED}: cannot read it as npz ({error})") from error
    return _frames_from_kcal_arrays(path, name, z, r, e, f)


def _require_keys(path: Path, keys: set[str], required: Sequence[str], layout: str) -> None:
    """Raises ValueError naming the required keys missing from an npz file."""
    missing = [k for k in required if k not in keys]
    if missing:
        raise ValueError(
            f"{path}: missing keys {missing} for the {layout} layout (needs {list(required)}, "
            f"found keys {sorted(keys)})"
        )


def _frames_from_kcal_arrays(path, name, z, r, e, f) -> Frames:
    """Checks shapes of MD17-style arrays in kcal/mol and converts them to Frames in eV."""
    z, r, e, f = np.asarray(z), np.asarray(r), np.asarray(e), np.asarray(f)
    if z.ndim != 1:
        raise ValueError(f"{path}: atomic numbers have shape {z.shape}, expected (n_atoms,)")
    n_atoms = len(z)
    if r.ndim != 3 or r.shape[1:] != (n_atoms, 3):
        raise ValueError(f"{path}: positions have shape {r.shape}, expected (n_frames, {n_atoms}, 3)")
    n_frames = r.shape[0]
    if f.shape != r.shape:
        raise ValueError(f"{path}: forces have shape {f.shape}, expected {r.shape} like the positions")
    if e.shape not in ((n_frames,), (n_frames, 1)):
        raise ValueError(f"{path}: energies have shape {e.shape}, expected ({n_frames},) or ({n_frames}, 1)")
    if n_frames == 0:
        raise ValueError(f"{path}: contains no frames")
    numbers = _as_atomic_numbers(z, 0, str(path))
    positions = np.asarray(r, dtype=np.float64)
    forces = np.asarray(f, dtype=np.float64) * KCAL_PER_MOL_TO_EV
    return Frames(
        numbers=[numbers] * n_frames,
        positions=list(positions),
        energy=np.asarray(e, dtype=np.float64).reshape(n_frames) * KCAL_PER_MOL_TO_EV,
        forces=list(forces),
        name=name,
        source=str(path),
    )


def _label(atoms: ase.Atoms, key: str):
    """The value stored under key in atoms.info, atoms.arrays or its calculator's results, else None.

    ASE's extxyz reader moves the standard names (energy, forces, stress) into a SinglePointCalculator
    and leaves other names (REF_energy...) in info/arrays, so all three places are looked in."""
    if key in atoms.info:
        return atoms.info[key]
    if key in atoms.arrays:
        return atoms.arrays[key]
    results = getattr(atoms.calc, "results", None) or {}
    return results.get(key)


def _keys_of(atoms: ase.Atoms) -> str:
    """The label names a frame has, for error messages."""
    results = sorted(getattr(atoms.calc, "results", None) or {})
    return (
        f"info keys {sorted(atoms.info)}, arrays keys {sorted(atoms.arrays)}"
        + (f", calculator results {results}" if results else "")
    )


def _stress_of(atoms: ase.Atoms, stress_key: str, path: Path, i: int):
    """Stress (3, 3) in eV/Å^3 from stress_key (6 Voigt, 9 or 3x3 values) or from a virial (eV), else None."""
    from ase.stress import voigt_6_to_full_3x3_stress

    value, sign = _label(atoms, stress_key), 1.0
    if value is None and stress_key == "stress":
        value, sign = _label(atoms, "virial"), -1.0 / atoms.get_volume() if atoms.pbc.all() else 0.0
        if value is not None and sign == 0.0:
            raise ValueError(f"{path}: frame {i} has a virial but no 3-D periodic cell to divide it by; add its Lattice")
    if value is None:
        return None
    value = np.asarray(value, dtype=np.float64)
    if value.size == 6:
        value = voigt_6_to_full_3x3_stress(value.reshape(6))
    elif value.size == 9:
        value = value.reshape(3, 3)
    else:
        raise ValueError(f"{path}: stress of frame {i} has {value.size} values, expected 6 (Voigt), 9 or 3x3")
    return sign * value


def _read_with_ase(path: Path, name: str, energy_key: str = "energy", forces_key: str = "forces",
                   stress_key: str = "stress") -> Frames:
    """Reads any ASE-readable file whose frames carry energy and forces (eV, eV/Å), with cell, pbc,
    optional stress/virial and per-frame weights."""
    try:
        images = ase.io.read(path, index=":")
    except Exception as error:  # ASE raises many different exception types on bad input
        raise ValueError(f"{path} is {UNRECOGNISED} (ase.io.read failed: {error})") from error
    if not images:
        raise ValueError(f"{path} is {UNRECOGNISED}: it contains no frames")
    energies, forces, stresses, weights = [], [], [], []
    for i, atoms in enumerate(images):
        for key, setting in ((energy_key, "energy_key"), (forces_key, "forces_key")):
            if _label(atoms, key) is None:
                raise MissingLabelError(
                    f"{path}: frame {i} has no {key!r}; it has {_keys_of(atoms)}; "
                    f"name the right one with data.{setting} (read_frames(..., {setting}=...))",
                    f"{path}: frame {i} has no {key!r}; it has {_keys_of(atoms)}",
                )
        energy = np.asarray(_label(atoms, energy_key), dtype=np.float64)
        if energy.size != 1:
            raise ValueError(f"{path}: {energy_key!r} of frame {i} has {energy.size} values, expected one energy in eV")
        energies.append(float(energy.reshape(())))
        forces.append(np.asarray(_label(atoms, forces_key), dtype=np.float64))
        stresses.append(_stress_of(atoms, stress_key, path, i))
        weight = next((atoms.info[k] for k in WEIGHT_KEYS if k in atoms.info), 1.0)
        weights.append(weight)
    with_stress = [s is not None for s in stresses]
    if any(with_stress):
        # a molecule or slab has no stress: it keeps zeros, which no loss or metric reads (metrics.stress_labels)
        missing = [i for i, (s, atoms) in enumerate(zip(stresses, images)) if s is None and atoms.pbc.all()]
        if missing:
            raise ValueError(
                f"{path}: frame {missing[0]} (periodic in all three directions) has no stress but frame "
                f"{with_stress.index(True)} has; label every bulk frame with {stress_key!r} or none"
            )
        stresses = [np.zeros((3, 3)) if s is None else s for s in stresses]
    try:
        weights = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: a per-frame weight ({'/'.join(WEIGHT_KEYS)}) is not a number ({error})") from None
    return Frames(
        numbers=[atoms.numbers for atoms in images],
        positions=[atoms.positions for atoms in images],
        energy=np.array(energies, dtype=np.float64),
        forces=forces,
        name=name,
        source=str(path),
        cells=np.array([atoms.cell.array for atoms in images]),
        pbc=np.array([atoms.pbc for atoms in images]),
        stress=np.array(stresses) if any(with_stress) else None,
        weights=weights,
    )


def known_datasets() -> list[str]:
    """Returns the names accepted by load_dataset."""
    rmd17 = [f"rmd17_{molecule}" for molecule in RMD17_MOLECULES]
    return [*SGDML_NAMES, *rmd17, *XTB_NAMES, *SINGLE_FILE_DATASETS]


def _dataset_file(name: str, split: str | None, index: int) -> tuple[str, str | None, str | None]:
    """Returns (file name, download URL or None, sha256 of the download or None) for a named dataset."""
    if name in SINGLE_FILE_DATASETS:
        if split not in (None, "all"):
            raise ValueError(f"dataset {name!r} has no {split!r} split: it is one file, use split='all' or None")
        return SINGLE_FILE_DATASETS[name], None, None
    split = "train" if split is None else split
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' for dataset {name!r}, got {split!r}")
    if name in SGDML_NAMES:
        sha256 = SGDML_ZIP_SHA256.get(name)
        return f"{name}-{split}.npz", DOWNLOAD_URLS["sgdml"] + f"{name}.zip", sha256
    if name in XTB_NAMES:
        return f"{name}-{split}.npz", None, None
    molecule = name.removeprefix("rmd17_")
    if name.startswith("rmd17_") and molecule in RMD17_MOLECULES:
        if index not in range(1, 6):
            raise ValueError(f"rMD17 split index must be 1..5, got {index!r}")
        file_name = f"rmd17_{molecule}_{split}_{index:02d}.npz"
        return file_name, DOWNLOAD_URLS["rmd17"] + file_name, RMD17_SHA256.get(file_name)
    raise ValueError(f"unknown dataset {name!r}; known names: {', '.join(known_datasets())}")


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder mlpot keeps downloads and builds in (datasets; AOTInductor builds in its ``aoti/``):
    the argument, else $MLPOT_CACHE_DIR, else ~/.cache/mlpot. The one place that picks it."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("MLPOT_CACHE_DIR") or Path.home() / ".cache" / "mlpot")


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The folder of local reference data: the argument, else $MLPOT_DATA_DIR; None when neither is set
    (an empty string counts as not set, so it never means the current folder)."""
    if data_dir is None:
        data_dir = os.environ.get("MLPOT_DATA_DIR")
    return Path(data_dir) if data_dir else None


def dataset_path(
    name: str,
    split: str | None = None,
    index: int = 1,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> Path:
    """Finds (or downloads) the file of a named dataset.

    Looks in data_dir (else $MLPOT_DATA_DIR) and its subfolders, then in the cache folder
    (cache_dir, else $MLPOT_CACHE_DIR, else ~/.cache/mlpot), then downloads into the cache
    when allowed and a sha256 checksum for the download is known.

    Args:
        name: Dataset name, see known_datasets().
        split: "train" or "test" (default "train"); "all" or None for single-file datasets.
        index: rMD17 split number 1..5.
        data_dir: Folder holding the reference data.
        cache_dir: Folder for downloaded files.
        download: Whether a missing file may be downloaded.

    Raises:
        ValueError: For an unknown name, split or index, or a checksum mismatch of a download.
        FileNotFoundError: If the file is neither found nor downloadable.
    """
    file_name, url, sha256 = _dataset_file(name, split, index)
    searched = []
    data_dir = default_data_dir(data_dir)
    if data_dir is not None:
        searched.append(f"{data_dir} (with subfolders)" if data_dir.is_dir() else f"{data_dir} (does not exist)")
        matches = sorted(data_dir.rglob(file_name), key=lambda p: (len(p.parts), str(p)))
        matches = [p for p in matches if p.is_file()]
        if matches:
            return matches[0]
    cache = default_cache_dir(cache_dir)
    searched.append(str(cache))
    if (cache / file_name).is_file():
        return cache / file_name
    if download and url is not None and sha256 is not None:
        try:
            _download(url, sha256, cache, file_name)
        except OSError as error:
            raise FileNotFoundError(
                f"dataset file {file_name!r} not found in {', '.join(searched)} and the download from "
                f"{url} failed ({error}); set MLPOT_DATA_DIR or pass data_dir to a folder that holds it"
            ) from error
        return cache / file_name
    if url is None or sha256 is None:
        why = "it is local-only (no download source with a known sha256 checksum)"
    else:
        why = "downloading is disabled (download=False)"
    raise FileNotFoundError(
        f"dataset file {file_name!r} for {name!r} not found; searched: {', '.join(searched)}; {why}. "
        f"Set MLPOT_DATA_DIR or pass data_dir to a folder that contains {file_name!r}, "
        f"or pass the path of the file itself to load_dataset"
    )


def _fetch(url: str, sha256: str, target: Path) -> None:
    """Downloads url into the file target and checks its sha256 (a mismatch raises ValueError)."""
    digest = hashlib.sha256()
    with open(target, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != sha256:
        raise ValueError(
            f"sha256 checksum mismatch for {url}: expected {sha256}, got {digest.hexdigest()}; the file was discarded"
        )


def _download(url: str, sha256: str, cache: Path, file_name: str) -> None:
    """Downloads url into cache, checks its sha256 and places file_name there atomically.

    A .zip download is checked, then every .npz member is extracted and the zip removed.
    Nothing is left behind when the checksum does not match.
    """
    if not url.endswith(".zip"):
        with files.atomic_path(cache / file_name, suffix=".part") as part:
            _fetch(url, sha256, part)
        return
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as folder:
        archive = Path(folder) / "download.zip"
        _fetch(url, sha256, archive)
        _extract_npz_members(archive, cache, file_name, url)


def _extract_npz_members(archive: Path, cache: Path, file_name: str, url: str) -> None:
    """Extracts the .npz members of a verified zip into cache, each written atomically."""
    with zipfile.ZipFile(archive) as zf:
        members = {Path(m).name: m for m in zf.namelist() if m.endswith(".npz")}
        if file_name not in members:
            raise ValueError(f"{url} does not contain {file_name!r}; members: {sorted(members)}")
        for base, member in members.items():
            with files.atomic_path(cache / base, suffix=".part") as part, open(part, "wb") as out, zf.open(member) as src:
                shutil.copyfileobj(src, out, 1 << 20)


def load_dataset(
    name: str | os.PathLike,
    split: str | None = None,
    index: int = 1,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    **keys,
) -> Frames:
    """Loads a named dataset (see dataset_path) or a file given by its path, in eV and Å.

    Args:
        name: Dataset name (see known_datasets()) or path of an existing file.
        split: "train" or "test" (default "train"); "all" or None for single-file datasets.
        index: rMD17 split number 1..5.
        data_dir: Folder holding the reference data; defaults to $MLPOT_DATA_DIR.
        cache_dir: Folder for downloads; defaults to $MLPOT_CACHE_DIR or ~/.cache/mlpot.
        download: Whether a missing file may be downloaded.
        keys: energy_key, forces_key, stress_key for ASE files (see read_frames).
    """
    if Path(name).is_file():
        return read_frames(name, **keys)
    path = dataset_path(str(name), split, index, data_dir=data_dir, cache_dir=cache_dir, download=download)
    return read_frames(path, **keys)


def split_indices(n: int, sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    """Draws disjoint random index sets of the given sizes from range(n).

    Each set is returned sorted; the same seed gives the same sets.
    """
    sizes = [int(s) for s in sizes]
    if any(s < 0 for s in sizes) or sum(sizes) > n:
        raise ValueError(f"split sizes {sizes} must be non-negative and sum to at most {n}")
    order = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([0, *sizes])
    return [np.sort(order[start:stop]) for start, stop in zip(bounds[:-1], bounds[1:])]


def block_split(n: int, sizes: Sequence[int], gap: int = 0) -> list[np.ndarray]:
    """Splits range(n) into contiguous blocks of the given sizes, for correlated trajectories.

    Args:
        n: Number of frames.
        sizes: Block sizes, taken in order from frame 0.
        gap: Frames skipped between consecutive blocks to reduce their correlation.
    """
    sizes = [int(s) for s in sizes]
    needed = sum(sizes) + gap * max(len(sizes) - 1, 0)
    if any(s < 0 for s in sizes) or gap < 0 or needed > n:
        raise ValueError(f"blocks {sizes} with gap {gap} need {needed} frames, only {n} available")
    blocks, start = [], 0
    for size in sizes:
        blocks.append(np.arange(start, start + size))
        start += size + gap
    return blocks
