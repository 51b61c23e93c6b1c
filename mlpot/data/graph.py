"""Building Graph dicts from structures, validating them, and batching them."""

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from ase.geometry import complete_cell
from torch import Tensor

from mlpot import keys
from mlpot.data.neighbors import edge_pairs, neighbor_list

Graph = Dict[str, Tensor]


def check_structure(
    numbers: np.ndarray,
    positions: np.ndarray,
    species: Optional[Sequence[int]] = None,
    min_distance: float = 0.5,
) -> None:
    """Raise ValueError for input no model can give a meaningful number for.

    Checks: at least one atom, finite positions, known elements (when ``species`` is given) and no
    two atoms closer than ``min_distance`` Å (molecules only; periodic images are not checked here).
    """
    from ase.data import chemical_symbols

    numbers = np.asarray(numbers)
    positions = np.asarray(positions)
    if numbers.ndim != 1 or len(numbers) == 0:
        raise ValueError("the structure has no atoms")
    if positions.shape != (len(numbers), 3):
        raise ValueError(f"positions must have shape ({len(numbers)}, 3), got {positions.shape}")
    bad = ~np.isfinite(positions).all(axis=1)
    if bad.any():
        raise ValueError(f"positions contain NaN or inf (atoms {np.nonzero(bad)[0].tolist()})")
    if species is not None:
        unknown = sorted(set(numbers.tolist()) - set(int(z) for z in species))
        if unknown:
            names = ", ".join(chemical_symbols[z] if 0 < z < len(chemical_symbols) else str(z) for z in unknown)
            known = ", ".join(chemical_symbols[int(z)] for z in species)
            raise ValueError(f"element(s) {names} not supported by this model; it knows {known}")
    if len(numbers) > 1 and min_distance > 0:
        diff = positions[None] - positions[:, None]
        dist = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
        np.fill_diagonal(dist, np.inf)
        i, j = np.unravel_index(np.argmin(dist), dist.shape)
        if dist[i, j] < min_distance:
            raise ValueError(
                f"atoms {min(i, j)} and {max(i, j)} are {dist[i, j]:.3f} Å apart, closer than "
                f"{min_distance} Å: the structure is unphysical"
            )


def local_positions(positions: np.ndarray, cell: Optional[np.ndarray] = None, pbc: Optional[np.ndarray] = None) -> np.ndarray:
    """(N, 3) float64 positions, Å, that give the same edge vectors but are small numbers.

    Each atom is first moved by whole cell vectors into the cell along its periodic directions, then
    all atoms by the centroid rounded to whole Å. A float32 model differences these, not coordinates
    of 1e4 Å that have lost their last digits, so it stays translation invariant far from the origin;
    a structure near the origin keeps its coordinates exactly (apart from atoms wrapped into the cell).
    Both moves are done in float64 and only change which image of an atom the neighbour list pairs.
    """
    positions = np.array(positions, dtype=np.float64)
    if pbc is not None and np.any(pbc):
        pbc = np.asarray(pbc, dtype=bool)
        # a slab's open direction may have a zero cell vector: any vector there does, nothing moves along it
        basis = complete_cell(np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=np.float64))
        fractional = np.linalg.solve(basis.T, positions.T).T
        positions -= np.where(pbc, np.floor(fractional), 0.0) @ basis
    return positions - np.round(positions.mean(axis=0))


def make_graph(
    numbers: np.ndarray,
    positions: np.ndarray,
    cutoff: float,
    cell: Optional[np.ndarray] = None,
    pbc: Optional[np.ndarray] = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Graph:
    """Graph of one structure: neighbours within ``cutoff`` Å, positions as :func:`local_positions`.

    The graph's positions differ from ``positions`` by a constant vector per atom (whole cell vectors
    and the rounded centroid), so energies and forces are those of ``positions``.
    """
    positions = local_positions(positions, cell, pbc)
    edge_index, shift = neighbor_list(positions, cutoff, cell, pbc)
    pair_edge, edge_pair = edge_pairs(edge_index, shift)
    n = len(numbers)
    cell_t = np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=np.float64)
    pbc_t = np.zeros(3, dtype=bool) if pbc is None else np.asarray(pbc, dtype=bool)

    def floats(a: np.ndarray) -> Tensor:
        return torch.as_tensor(a, dtype=dtype, device=device)

    return {
        keys.POSITIONS: floats(positions),
        keys.ATOMIC_NUMBERS: torch.as_tensor(np.asarray(numbers, dtype=np.int64), device=device),
        keys.EDGE_INDEX: torch.as_tensor(edge_index, device=device),
        keys.SHIFT: floats(shift),
        keys.PAIR_EDGE: torch.as_tensor(pair_edge, device=device),
        keys.EDGE_PAIR: torch.as_tensor(edge_pair, device=device),
        keys.BATCH: torch.zeros(n, dtype=torch.long, device=device),
        keys.NUM_ATOMS: torch.tensor([n], dtype=torch.long, device=device),
        keys.CELL: floats(cell_t[None]),
        keys.PBC: torch.as_tensor(pbc_t[None], device=device),
    }


def atoms_to_graph(atoms, cutoff: float, dtype: torch.dtype = torch.float32, device="cpu") -> Graph:
    """Graph of an ``ase.Atoms``; the cell is used only in periodic directions."""
    pbc = atoms.get_pbc()
    periodic = bool(pbc.any())
    return make_graph(
        atoms.get_atomic_numbers(),
        atoms.get_positions(),
        cutoff,
        cell=atoms.get_cell().array if periodic else None,
        pbc=pbc if periodic else None,
        dtype=dtype,
        device=device,
    )


def collate(graphs: List[Graph]) -> Graph:
    """Join graphs into one batch: atoms are concatenated and edge indices offset."""
    if len(graphs) == 1:
        return dict(graphs[0])
    counts = torch.cat([g[keys.NUM_ATOMS] for g in graphs])
    offsets = torch.cumsum(counts, 0) - counts
    out: Graph = {}
    per_atom = [keys.POSITIONS, keys.ATOMIC_NUMBERS, keys.FORCES_REF]
    per_graph = [keys.NUM_ATOMS, keys.CELL, keys.PBC, keys.ENERGY_REF]
    for key in per_atom + per_graph + [keys.SHIFT]:
        if key in graphs[0]:
            out[key] = torch.cat([g[key] for g in graphs])
    out[keys.EDGE_INDEX] = torch.cat([g[keys.EDGE_INDEX] + off for g, off in zip(graphs, offsets)], dim=1)
    if all(keys.PAIR_EDGE in g for g in graphs):
        edges = torch.tensor([g[keys.EDGE_INDEX].shape[1] for g in graphs])
        pairs = torch.tensor([g[keys.PAIR_EDGE].shape[0] for g in graphs])
        edge_offsets, pair_offsets = torch.cumsum(edges, 0) - edges, torch.cumsum(pairs, 0) - pairs
        out[keys.PAIR_EDGE] = torch.cat([g[keys.PAIR_EDGE] + off for g, off in zip(graphs, edge_offsets.tolist())])
        out[keys.EDGE_PAIR] = torch.cat([g[keys.EDGE_PAIR] + off for g, off in zip(graphs, pair_offsets.tolist())])
    out[keys.BATCH] = torch.repeat_interleave(torch.arange(len(graphs), device=counts.device), counts)
    return out
