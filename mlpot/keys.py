"""Names of the tensors in a Graph, the dict that flows between data, models and calculators.

A Graph is a ``Dict[str, Tensor]`` describing B structures with N atoms and E directed edges in total.
Edge convention (checked by tests/test_graph.py): ``edge_index[0]`` is the centre atom i,
``edge_index[1]`` its neighbour j, and the edge vector is ``pos[j] - pos[i] + shift``.
"""

from typing import Final

# (N, 3) float | Å | atomic positions; the tensor forces are differentiated against
POSITIONS: Final[str] = "pos"
# (N,) int64 | atomic numbers Z; models map Z to their own species index
ATOMIC_NUMBERS: Final[str] = "atomic_numbers"
# (2, E) int64 | [centre i, neighbour j] for every ordered pair within the cutoff
EDGE_INDEX: Final[str] = "edge_index"
# (E, 3) float | Å | Cartesian periodic-image shift added to pos[j] - pos[i]; zeros for molecules
SHIFT: Final[str] = "shift"
# (N,) int64 | index of the structure each atom belongs to
BATCH: Final[str] = "batch"
# (B,) int64 | number of atoms in each structure
NUM_ATOMS: Final[str] = "num_atoms"
# (P,) int64 | one edge of every unordered pair {i->j, j->i} (optional): functions of |r_ij| alone are
# computed once per pair; make_graph and collate fill it
PAIR_EDGE: Final[str] = "pair_edge"
# (E,) int64 | the pair of each edge, an index into PAIR_EDGE (optional, with PAIR_EDGE)
EDGE_PAIR: Final[str] = "edge_pair"
# (B, 3, 3) float | Å | cell vectors as rows; zeros for molecules
CELL: Final[str] = "cell"
# (B, 3) bool | periodic directions
PBC: Final[str] = "pbc"

# --- outputs written by Potential ---
# (N,) float | eV | per-atom energies; they sum to ENERGY
NODE_ENERGY: Final[str] = "node_energy"
# (B,) float | eV | total potential energy of each structure
ENERGY: Final[str] = "energy"
# (N, 3) float | eV/Å | forces, -dE/dpos
FORCES: Final[str] = "forces"
# (B, 3, 3) float | eV | virial -dE/d(strain), only when asked for (Potential.energy_and_forces); stress = -virial / volume
VIRIAL: Final[str] = "virial"
# (N, F) float | last-layer invariant node features (latent-space studies)
NODE_FEATURES: Final[str] = "node_features"

# --- labels, present only in training data ---
# (B,) float | eV | reference energies
ENERGY_REF: Final[str] = "energy_ref"
# (N, 3) float | eV/Å | reference forces
FORCES_REF: Final[str] = "forces_ref"
