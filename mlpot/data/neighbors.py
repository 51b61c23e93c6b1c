"""Neighbour lists: integer pairs and periodic shifts within a cutoff (no gradients)."""

from typing import Optional, Tuple

import numpy as np
from ase.neighborlist import primitive_neighbor_list

# Below this many atoms an all-pairs distance matrix is faster than cell binning.
_BRUTE_FORCE_MAX_ATOMS = 400


def neighbor_list(
    positions: np.ndarray,
    cutoff: float,
    cell: Optional[np.ndarray] = None,
    pbc: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """All ordered pairs (i, j), i != j (or periodic images), closer than ``cutoff``.

    Args:
        positions: (N, 3) positions, Å.
        cutoff: radial cutoff, Å.
        cell: (3, 3) cell vectors as rows, Å; ignored when no direction is periodic.
        pbc: (3,) periodic flags; None means a molecule.

    Returns:
        edge_index (2, E) int64 with [centre i, neighbour j] and shift (E, 3) float64 in Å such that
        the edge vector is ``positions[j] - positions[i] + shift``.
    """
    positions = np.asarray(positions, dtype=np.float64)
    periodic = pbc is not None and bool(np.any(pbc))
    if not periodic and len(positions) <= _BRUTE_FORCE_MAX_ATOMS:
        diff = positions[None, :, :] - positions[:, None, :]
        dist2 = np.einsum("ijk,ijk->ij", diff, diff)
        np.fill_diagonal(dist2, np.inf)
        i, j = np.nonzero(dist2 < cutoff * cutoff)
        edge_index = np.stack([i, j]).astype(np.int64)
        return edge_index, np.zeros((edge_index.shape[1], 3))
    if periodic:
        cell = np.asarray(cell, dtype=np.float64)
        pbc = np.asarray(pbc, dtype=bool)
        if abs(np.linalg.det(cell)) < 1e-9:
            raise ValueError("periodic boundary conditions need a cell with non-zero volume")
    else:
        # Molecule: a box large enough that no periodic image is in range.
        span = positions.max(0) - positions.min(0) + 2.0 * cutoff + 1.0
        cell, pbc = np.diag(span), np.zeros(3, dtype=bool)
    i, j, cell_shift = primitive_neighbor_list(
        "ijS", pbc, cell, positions, float(cutoff), self_interaction=False
    )
    edge_index = np.stack([i, j]).astype(np.int64)
    return edge_index, cell_shift.astype(np.float64) @ cell


def edge_pairs(edge_index: np.ndarray, shift: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Pair up each edge i->j (shift S) with its reverse j->i (shift -S): both have the same length.

    Returns ``pair_edge`` (P,), one edge of each pair, and ``edge_pair`` (E,), the pair of each edge.
    Raises ValueError when an edge has no reverse (every neighbour list of a cutoff has one).
    """
    i, j = edge_index
    s = np.round(np.asarray(shift, dtype=np.float64) * 1e6).astype(np.int64)  # images differ by whole cells
    # canonical orientation: i < j; for an image of the same atom, the shift whose first non-zero component is positive
    flip = i > j
    same = np.nonzero(i == j)[0]
    if len(same):
        first = np.argmax(s[same] != 0, axis=1)
        flip[same] = s[same, first] < 0
    lo, hi = np.where(flip, j, i), np.where(flip, i, j)
    canon = np.where(flip[:, None], -s, s)
    keys = np.concatenate([lo[:, None], hi[:, None], canon], axis=1)
    _, pair_edge, edge_pair, counts = np.unique(keys, axis=0, return_index=True, return_inverse=True, return_counts=True)
    if edge_index.shape[1] and not (counts == 2).all():
        raise ValueError("the neighbour list is not symmetric: some edge i->j has no j->i")
    return pair_edge.astype(np.int64), edge_pair.reshape(-1).astype(np.int64)
