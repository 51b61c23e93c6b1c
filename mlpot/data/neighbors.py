"""Neighbour lists: integer pairs and periodic shifts within a cutoff (no gradients), through vesin."""

from typing import Optional, Tuple

import numpy as np
import vesin


def neighbor_list(
    positions: np.ndarray,
    cutoff: float,
    cell: Optional[np.ndarray] = None,
    pbc: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """All ordered pairs (i, j), i != j (or periodic images), closer than ``cutoff``.

    Any cell works: smaller than twice the cutoff (several images of one atom), triclinic, or
    periodic in some directions only (a slab); the cell vectors of non-periodic directions are ignored.
    Edges are sorted by (i, j, cell shift), so one structure always gives the same graph.

    Args:
        positions: (N, 3) positions, Å.
        cutoff: radial cutoff, Å.
        cell: (3, 3) cell vectors as rows, Å; ignored when no direction is periodic.
        pbc: (3,) periodic flags; None means a molecule.

    Returns:
        edge_index (2, E) int64 with [centre i, neighbour j] and shift (E, 3) float64 in Å such that
        the edge vector is ``positions[j] - positions[i] + shift``.
    """
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    pbc = np.zeros(3, dtype=bool) if pbc is None else np.asarray(pbc, dtype=bool).reshape(3)
    if pbc.any():
        cell = np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=np.float64).reshape(3, 3)
        periodic_vectors = cell[pbc]
        if np.linalg.matrix_rank(periodic_vectors, tol=1e-6) < len(periodic_vectors):
            raise ValueError(
                "periodic boundary conditions need a cell with non-zero volume: the cell vectors of the "
                f"periodic directions {pbc.tolist()} are zero or parallel; set atoms.cell, or atoms.pbc = False"
            )
    else:
        cell = np.zeros((3, 3))  # vesin's free-space mode: no box, no images
    calculator = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    i, j, cell_shift = calculator.compute(positions, np.ascontiguousarray(cell), pbc, "ijS")
    # vesin's order depends on its cell binning; sorting makes the graph a function of the structure alone
    order = np.lexsort((cell_shift[:, 2], cell_shift[:, 1], cell_shift[:, 0], j, i))
    edge_index = np.stack([i[order], j[order]]).astype(np.int64)
    return edge_index, cell_shift[order].astype(np.float64) @ cell


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
