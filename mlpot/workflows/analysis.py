"""Reference ensembles and the measures that compare simulations with them (Å, eV, fs, cm^-1)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms, units
from ase.data import covalent_radii

from mlpot.data.datasets import SINGLE_FILE_DATASETS, data_format, load_dataset
from mlpot.data.registry import reference_dataset
from mlpot.files import atomic_write

BOND_SCALE = 1.2  # a bond: closer than this times the sum of the covalent radii
COLLAPSE_THRESHOLD = 0.5  # Å, Fu et al. 2023 ("Forces are not enough")
HR_MAX = 10.0  # Å
HR_BINS = 500
_PER_FS_TO_INVCM = 1e15 / (100.0 * units._c)  # a frequency in 1/fs as a wavenumber in cm^-1


@dataclass
class Ensemble:
    """Configurations of one molecule.

    Attributes:
        numbers: (N,) atomic numbers.
        positions: (F, N, 3) positions, Å.
        name: where the frames came from.
    """

    numbers: np.ndarray
    positions: np.ndarray
    name: str = ""


def load_ensemble(spec: str, data_dir=None) -> Ensemble:
    """Reference configurations: a molecule name (its reference dataset, see mlpot.data.registry), a dataset
    name (train + test frames) or a file."""
    path = Path(spec)
    if path.is_file() and data_format(path) == "ase":
        images = ase.io.read(path, index=":")
        return Ensemble(images[0].numbers.copy(), np.stack([a.positions for a in images]), str(path))
    if path.is_file():
        frame_sets = [load_dataset(path)]
    else:
        dataset = reference_dataset(spec)
        if dataset in SINGLE_FILE_DATASETS:
            frame_sets = [load_dataset(dataset, None, data_dir=data_dir)]
        else:
            frame_sets = [load_dataset(dataset, split, data_dir=data_dir) for split in ("train", "test")]
    numbers = frame_sets[0].numbers[0]
    positions = np.stack([r for frames in frame_sets for r in frames.positions])
    return Ensemble(numbers, positions, spec)


def load_structure(spec: str, data_dir=None) -> Atoms:
    """A structure: a molecule name (its reference dataset, see mlpot.data.registry) or a dataset name (the
    first training frame), or a file ASE reads (its last frame)."""
    path = Path(spec)
    if path.is_file() and data_format(path) == "ase":
        atoms = ase.io.read(path)
    else:
        dataset = reference_dataset(spec)
        split = None if dataset in SINGLE_FILE_DATASETS or path.is_file() else "train"
        frames = load_dataset(dataset, split, data_dir=data_dir)
        atoms = Atoms(numbers=frames.numbers[0], positions=frames.positions[0].copy())
    atoms.calc = None
    return atoms


def find_bonds(numbers, positions, scale: float = BOND_SCALE) -> np.ndarray:
    """(B, 2) index pairs i < j closer than ``scale`` times the sum of their covalent radii."""
    radii = covalent_radii[np.asarray(numbers)]
    i, j = np.triu_indices(len(radii), k=1)
    dist = np.linalg.norm(positions[j] - positions[i], axis=-1)
    bonded = dist < scale * (radii[i] + radii[j])
    return np.stack([i[bonded], j[bonded]], axis=1)


def bond_lengths(positions, bonds) -> np.ndarray:
    """Lengths of ``bonds`` in Å: (B,) for one (N, 3) structure, (F, B) for (F, N, 3) frames."""
    return np.linalg.norm(positions[..., bonds[:, 1], :] - positions[..., bonds[:, 0], :], axis=-1)


def max_bond_deviation(positions, bonds, reference_lengths) -> float:
    """Largest |bond length - reference length| of one (N, 3) structure, Å."""
    if len(bonds) == 0:
        return 0.0
    return float(np.abs(bond_lengths(positions, bonds) - reference_lengths).max())


def first_collapse(positions, bonds, reference_lengths, threshold: float = COLLAPSE_THRESHOLD):
    """Index of the first (F, N, 3) frame with a bond more than ``threshold`` Å off its reference, or None."""
    deviation = np.abs(bond_lengths(positions, bonds) - reference_lengths).max(axis=-1)
    broken = np.flatnonzero(~(deviation <= threshold))  # NaN positions count as broken
    return int(broken[0]) if len(broken) else None


def pair_distances(positions) -> np.ndarray:
    """(F, N(N-1)/2) distances of all atom pairs of (F, N, 3) frames, Å."""
    i, j = np.triu_indices(positions.shape[-2], k=1)
    return np.linalg.norm(positions[..., j, :] - positions[..., i, :], axis=-1)


def distance_histogram(positions, r_max: float = HR_MAX, bins: int = HR_BINS):
    """h(r): the distribution of all interatomic distances, normalised to integrate to 1 (1/Å).

    Returns:
        (bins,) bin centres in Å and (bins,) h(r) in 1/Å.
    """
    dist = pair_distances(np.asarray(positions))
    counts, edges = np.histogram(dist.ravel(), bins=bins, range=(0.0, r_max))
    width = edges[1] - edges[0]
    return 0.5 * (edges[1:] + edges[:-1]), counts / (dist.size * width)


def hr_mae(h, h_ref, r_max: float = HR_MAX) -> float:
    """Integrated absolute difference of two h(r) on the same grid, ∫|h - h_ref| dr (0 = equal, 2 = disjoint)."""
    return float(np.abs(np.asarray(h) - np.asarray(h_ref)).sum() * r_max / len(h))


def _angle_deg(positions, i, j, k) -> np.ndarray:
    """Angle i-j-k in degrees of (F, N, 3) frames."""
    a = positions[:, i] - positions[:, j]
    b = positions[:, k] - positions[:, j]
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def is_ethanol(numbers) -> bool:
    """Whether the atoms are C2H6O (ethanol's formula)."""
    counts = np.bincount(np.asarray(numbers), minlength=9)
    return len(numbers) == 9 and (counts[1], counts[6], counts[8]) == (6, 2, 1)


def ethanol_internals(numbers, positions) -> dict:
    """C-C and C-O bond lengths (Å) and the C-C-O angle (degrees) of (F, N, 3) ethanol frames."""
    numbers = np.asarray(numbers)
    positions = np.asarray(positions)
    oxygen = int(np.flatnonzero(numbers == 8)[0])
    bonds = find_bonds(numbers, positions[0])
    partners = {int(a if b == oxygen else b) for a, b in bonds if oxygen in (a, b)}
    c_alpha = next(a for a in partners if numbers[a] == 6)
    c_beta = next(int(j) for j in np.flatnonzero(numbers == 6) if j != c_alpha)
    return {
        "C-C": np.linalg.norm(positions[:, c_beta] - positions[:, c_alpha], axis=-1),
        "C-O": np.linalg.norm(positions[:, oxygen] - positions[:, c_alpha], axis=-1),
        "C-C-O": _angle_deg(positions, c_beta, c_alpha, oxygen),
    }


def distribution_mae(values, reference, bins: int = 100) -> float:
    """∫|p - p_ref| dx of two samples' histograms on a shared grid (0 = equal, 2 = disjoint)."""
    lo = min(np.min(values), np.min(reference))
    hi = max(np.max(values), np.max(reference))
    p, edges = np.histogram(values, bins=bins, range=(lo, hi), density=True)
    q, _ = np.histogram(reference, bins=bins, range=(lo, hi), density=True)
    return float(np.abs(p - q).sum() * (edges[1] - edges[0]))


def power_spectrum(velocities, masses, dt_fs: float, segment_fs: float = 2000.0):
    """Vibrational density of states from the mass-weighted velocity autocorrelation.

    By Wiener-Khinchin, the Fourier transform of the autocorrelation is the power of each velocity
    component's Fourier transform. Runs longer than ``segment_fs`` are cut into half-overlapping
    Hann-windowed segments whose spectra are averaged (Welch), trading resolution for less noise.

    Args:
        velocities: (F, N, 3) velocities sampled every ``dt_fs``.
        masses: (N,) masses, amu.
        dt_fs: sampling interval, fs.
        segment_fs: segment length, fs.

    Returns:
        wavenumbers in cm^-1 and the spectrum normalised to a maximum of 1.
    """
    velocities = np.asarray(velocities)
    length = min(len(velocities), max(8, int(round(segment_fs / dt_fs))))
    window = np.hanning(length)[:, None, None]
    weights = np.asarray(masses)[None, :, None]
    power = np.zeros(length // 2 + 1)
    for start in range(0, len(velocities) - length + 1, max(1, length // 2)):
        chunk = velocities[start : start + length]
        amplitude = np.fft.rfft((chunk - chunk.mean(axis=0)) * window, axis=0)
        power += (np.abs(amplitude) ** 2 * weights).sum(axis=(1, 2))
    wavenumbers = np.fft.rfftfreq(length, d=dt_fs) * _PER_FS_TO_INVCM
    return wavenumbers, power / max(power.max(), 1e-300)


def energy_drift(times_ps, energies_eV, num_atoms: int) -> float:
    """Slope of a linear fit of the total energy against time, meV/atom/ps."""
    slope = np.polyfit(np.asarray(times_ps), np.asarray(energies_eV), 1)[0]
    return float(slope * 1000.0 / num_atoms)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> None:
    """Writes ``fig`` to ``path`` atomically (a kill or a full disk never leaves half a figure) and closes it."""
    path = Path(path)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png"))
    finally:
        pyplot().close(fig)


def plot_hr(r, h, h_ref, path, title: str = "") -> None:
    """Draws h(r) of a simulation against the reference ensemble's."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if h_ref is not None:
        ax.plot(r, h_ref, color="black", lw=1.5, label="reference")
    ax.plot(r, h, color="tab:red", lw=1.0, label="MD (model)")
    ax.set(xlabel="r (Å)", ylabel="h(r) (1/Å)", title=title, xlim=(0, r[-1] + r[0]))
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


_INTERNAL_UNITS = {"C-C": "Å", "C-O": "Å", "C-C-O": "degrees"}


def plot_internals(internals: dict, reference: dict, path, title: str = "") -> None:
    """Draws histograms of internal coordinates (e.g. ethanol's C-C, C-O, C-C-O) against the reference."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(internals), figsize=(4 * len(internals), 3.2))
    for ax, (name, values) in zip(np.atleast_1d(axes), internals.items()):
        ax.hist(reference[name], bins=60, density=True, histtype="stepfilled", color="0.7", label="reference")
        ax.hist(values, bins=60, density=True, histtype="step", color="tab:red", lw=1.5, label="MD (model)")
        ax.set(xlabel=f"{name} ({_INTERNAL_UNITS.get(name, '')})", ylabel="density")
    np.atleast_1d(axes)[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def plot_power_spectrum(wavenumbers, spectrum, path, harmonic_cm=None, title: str = "") -> None:
    """Draws the VACF power spectrum with harmonic frequencies as vertical lines.

    The spectrum is scaled to its maximum above 100 cm^-1: below, free rotation and drift of the
    molecule make a peak at zero that says nothing about its vibrations.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    keep = wavenumbers <= 4000.0
    scale = max(spectrum[keep & (wavenumbers >= 100.0)].max(initial=0.0), 1e-300)
    ax.plot(wavenumbers[keep], spectrum[keep] / scale, color="tab:blue", lw=1.0, label="VACF power spectrum (MD)")
    if harmonic_cm is not None and len(harmonic_cm):
        ax.vlines(harmonic_cm, 0, 1.05, color="tab:red", lw=0.8, alpha=0.7, label="harmonic (Hessian)")
    ax.set(xlabel="wavenumber (cm$^{-1}$)", ylabel="intensity (normalised)", xlim=(0, 4000), ylim=(0, 1.1),
           title=title)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def _broadened(frequencies_cm, grid, width: float = 10.0) -> np.ndarray:
    """Sum of unit Lorentzians (FWHM ``width`` cm^-1) at the given frequencies."""
    half = 0.5 * width
    return (half**2 / ((grid[:, None] - np.asarray(frequencies_cm)[None, :]) ** 2 + half**2)).sum(axis=1)


def plot_spectrum(fd_cm, hessian_cm, path, reference_cm=None, reference_label: str = "", title: str = "") -> None:
    """Broadened harmonic spectra (FD up, Hessian mirrored down, reference dashed) and per-mode differences."""
    plt = pyplot()
    top = max(4000.0, float(np.max(hessian_cm, initial=0.0)) + 200.0)
    grid = np.linspace(0.0, top, 4000)
    fig, (ax, ax_diff) = plt.subplots(2, 1, figsize=(7, 5.5), gridspec_kw={"height_ratios": [2, 1]})
    ax.plot(grid, _broadened(fd_cm, grid), color="tab:blue", label="finite differences")
    ax.plot(grid, -_broadened(hessian_cm, grid), color="tab:red", label="Hessian (double backward)")
    if reference_cm is not None:
        ax.plot(grid, _broadened(reference_cm, grid), "k--", lw=0.8, label=reference_label or "reference")
    ax.axhline(0, color="0.5", lw=0.5)
    ax.set(xlabel="wavenumber (cm$^{-1}$)", ylabel="modes (broadened)", xlim=(0, top), title=title)
    ax.legend(fontsize=8, loc="upper center")
    ax_diff.bar(np.arange(1, len(fd_cm) + 1), np.asarray(fd_cm) - np.asarray(hessian_cm), color="tab:purple")
    ax_diff.set(xlabel="mode", ylabel="FD - Hessian (cm$^{-1}$)")
    fig.tight_layout()
    save_figure(fig, path)


def plot_phonons(path, bands_cm, dos_cm, dos_weights, figure) -> None:
    """Phonon band structure (cm^-1) along a BandPath beside the density of states."""
    plt = pyplot()
    x, special_x, labels = path.get_linear_kpoint_axis()
    fig, (ax, ax_dos) = plt.subplots(1, 2, figsize=(8, 4), sharey=True, gridspec_kw={"width_ratios": [3, 1]})
    ax.plot(x, bands_cm, color="tab:blue", lw=1.0)
    for xs in special_x:
        ax.axvline(xs, color="0.7", lw=0.5)
    ax.set(xticks=special_x, xticklabels=[lab.replace("G", "Γ") for lab in labels], xlim=(x[0], x[-1]),
           ylabel="frequency (cm$^{-1}$)")
    ax_dos.plot(dos_weights, dos_cm, color="tab:blue")
    ax_dos.set(xlabel="DOS")
    fig.tight_layout()
    save_figure(fig, figure)
