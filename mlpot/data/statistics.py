"""Statistics of a training set that a potential is built from: energy shift (E0s), force scale,
neighbour count, shortest pair distances, and the ranges the calculators warn outside of."""

from collections import Counter
from typing import Dict, List, Sequence, Tuple

import numpy as np
from ase.data import chemical_symbols
from ase.formula import Formula
from ase.geometry import get_distances

from mlpot import keys
from mlpot.data.datasets import Frames
from mlpot.data.graph import make_graph

# frames whose neighbours are counted for avg_num_neighbors (an even sample of the set)
NEIGHBOR_SAMPLE = 50


# E0 modes of energy_shift besides an explicit mapping element -> eV
E0_MODES = ("auto", "average", "least_squares")
# auto fits E0s by least squares only when the composition matrix (frames x species, each column scaled to unit
# length) has full column rank and a condition number below this: above it the split of the energy among the
# elements is set by noise (e.g. one molecule's trajectory, where any split fits: rank 1)
E0_MAX_CONDITION = 100.0


def composition_matrix(frames: Frames, species: Sequence[int]) -> np.ndarray:
    """(M, S) number of atoms of each species in each frame."""
    return np.array([[np.sum(z == s) for s in species] for z in frames.numbers], dtype=np.float64)


def least_squares_determined(counts: np.ndarray) -> bool:
    """Whether the compositions determine per-element energies well (see E0_MAX_CONDITION)."""
    scaled = counts / np.linalg.norm(counts, axis=0)
    return np.linalg.matrix_rank(scaled) == counts.shape[1] and np.linalg.cond(scaled) < E0_MAX_CONDITION


def energy_shift(frames: Frames, species: Sequence[int], e0s="auto") -> Tuple[np.ndarray, str]:
    """Per-species energies E0 (len(species),) eV and the mode that gave them.

    ``e0s``: ``least_squares`` (the frames' energies fitted as sums of per-element energies), ``average``
    (every element the mean per-atom energy of the frames), ``auto`` (least squares where the compositions
    determine it, see :func:`least_squares_determined`, else average), or a mapping atomic number -> eV
    (isolated-atom energies) covering every species (mode ``given``).
    """
    if isinstance(e0s, dict):
        missing = [int(z) for z in species if int(z) not in e0s]
        if missing:
            raise ValueError(f"the E0 mapping lacks the training element(s) {missing}")
        return np.array([float(e0s[int(z)]) for z in species]), "given"
    if e0s not in E0_MODES:
        raise ValueError(f"E0 mode {e0s!r} is not one of {list(E0_MODES)} or a mapping element -> eV")
    counts = composition_matrix(frames, species)
    if e0s == "auto":
        e0s = "least_squares" if least_squares_determined(counts) else "average"
    if e0s == "average":
        per_atom = frames.energy / counts.sum(axis=1)
        return np.full(len(species), per_atom.mean()), "average"
    shift, *_ = np.linalg.lstsq(counts, frames.energy, rcond=None)
    return shift, "least_squares"


def e0_record(species: Sequence[int], shift, mode: str) -> Dict[str, object]:
    """``{"mode": mode, "eV": {symbol: E0}}``: the E0s as training statistics and deployed files record them."""
    return {"mode": mode, "eV": {chemical_symbols[int(z)]: float(e) for z, e in zip(species, shift)}}


def force_scale(frames: Frames) -> float:
    """RMS of all force components, eV/Å (1.0 for a set without forces)."""
    forces = np.concatenate(frames.forces)
    return float(np.sqrt((forces**2).mean())) or 1.0


def avg_num_neighbors(frames: Frames, cutoff: float) -> float:
    """Mean number of neighbours within ``cutoff`` Å per atom, over an even sample of the frames."""
    sample = range(0, len(frames), max(1, len(frames) // NEIGHBOR_SAMPLE))
    counts = []
    for i in sample:
        cell, pbc = (frames.cells[i], frames.pbc[i]) if frames.pbc[i].any() else (None, None)
        graph = make_graph(frames.numbers[i], frames.positions[i], cutoff, cell, pbc)
        counts.append(graph[keys.EDGE_INDEX].shape[1] / len(frames.numbers[i]))
    return float(np.mean(counts))


def _distance_matrix(positions, cell, pbc) -> np.ndarray:
    """(N, N) distances, Å (periodic: minimum image)."""
    if pbc.any():
        return get_distances(positions, cell=cell, pbc=pbc)[1]
    diff = positions[None] - positions[:, None]
    return np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))


def min_pair_distances(frames: Frames) -> Dict[str, float]:
    """Shortest distance seen for each element pair, Å, keyed ``"Z1-Z2"`` with Z1 <= Z2 (periodic frames:
    minimum-image distances between distinct atoms)."""
    shortest: Dict[Tuple[int, int], float] = {}
    for numbers, positions, cell, pbc in zip(frames.numbers, frames.positions, frames.cells, frames.pbc):
        dist = _distance_matrix(positions, cell, pbc)
        i, j = np.triu_indices(len(numbers), k=1)
        pairs = np.sort(np.stack([numbers[i], numbers[j]], axis=1), axis=1)
        for pair in np.unique(pairs, axis=0):
            mask = (pairs[:, 0] == pair[0]) & (pairs[:, 1] == pair[1])
            key = (int(pair[0]), int(pair[1]))
            shortest[key] = min(shortest.get(key, np.inf), float(dist[i[mask], j[mask]].min()))
    return {f"{a}-{b}": round(d, 4) for (a, b), d in sorted(shortest.items())}


def composition(numbers, periodic: bool) -> str:
    """A structure's composition as the training ranges record it: the Hill formula of a molecule
    (``"C2H6O"``), the element set of a periodic structure (``"O,Si"``: its size is arbitrary)."""
    if periodic:
        return ",".join(sorted({chemical_symbols[int(z)] for z in numbers}))
    return Formula.from_list([chemical_symbols[int(z)] for z in numbers]).format("hill")


def training_ranges(frames: Frames) -> Dict[str, object]:
    """What the calculators warn outside of (see mlpot.calculators), a pure function of the frames:

    - ``max_nearest_distances``: for each element (keyed ``"Z"``), the longest distance, Å, from one of
      its atoms to that atom's nearest neighbour (a stretched bond, or positions in bohr, go beyond it);
    - ``training_compositions``: the sorted distinct compositions (:func:`composition`).

    Element pairs never seen are those missing from :func:`min_pair_distances`.
    """
    farthest: Counter = Counter()
    compositions = set()
    for numbers, positions, cell, pbc in zip(frames.numbers, frames.positions, frames.cells, frames.pbc):
        compositions.add(composition(numbers, bool(pbc.any())))
        if len(numbers) < 2:
            continue
        dist = _distance_matrix(positions, cell, pbc)
        np.fill_diagonal(dist, np.inf)
        nearest = dist.min(axis=1)
        for z in np.unique(numbers):
            farthest[int(z)] = max(farthest.get(int(z), 0.0), float(nearest[numbers == z].max()))
    return {
        "max_nearest_distances": {str(z): round(d, 4) for z, d in sorted(farthest.items())},
        "training_compositions": sorted(compositions),
    }


def fit_statistics(frames: Frames, species: List[int], cutoff: float, e0s="auto") -> Dict[str, object]:
    """All of the above as plain data (stored in training checkpoints): ``energy_shift`` (list, eV),
    ``e0s`` (``{"mode": ..., "eV": {symbol: E0}}``, see :func:`energy_shift`), ``energy_scale`` (eV/Å),
    ``avg_num_neighbors``, ``min_pair_distances`` (Å), ``periodic`` (any periodic frame), ``isolated`` (any frame without a periodic direction)."""
    shift, mode = energy_shift(frames, species, e0s)
    return {
        "energy_shift": shift.tolist(),
        "e0s": e0_record(species, shift, mode),
        "energy_scale": force_scale(frames),
        "avg_num_neighbors": avg_num_neighbors(frames, cutoff),
        "min_pair_distances": min_pair_distances(frames),
        "periodic": frames.periodic,
        "isolated": frames.isolated,
        **training_ranges(frames),
    }
