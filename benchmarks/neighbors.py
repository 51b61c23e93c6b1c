"""Neighbour-list speed: mlpot's vesin list against the hand-written search it replaced (numpy all
pairs up to 400 atoms, ASE's primitive_neighbor_list above and for cells). Best-of-N ms per call.

Usage: python benchmarks/neighbors.py [--cutoff 5.0] [--repeats 5]
Structures: ethanol (9 atoms), a 21-atom cluster of molecular density, 111 ethanol molecules on a grid
(999 atoms), diamond silicon cells of 8/64/512/4096 atoms.
"""

import argparse
import time

import ase.build
import numpy as np
from ase.neighborlist import primitive_neighbor_list

from mlpot.data.neighbors import neighbor_list


def previous_neighbor_list(positions, cutoff, cell=None, pbc=None):
    """The search mlpot used before vesin (kept here only to measure against)."""
    periodic = pbc is not None and bool(np.any(pbc))
    if not periodic and len(positions) <= 400:
        diff = positions[None, :, :] - positions[:, None, :]
        dist2 = np.einsum("ijk,ijk->ij", diff, diff)
        np.fill_diagonal(dist2, np.inf)
        i, j = np.nonzero(dist2 < cutoff * cutoff)
        return np.stack([i, j]).astype(np.int64), np.zeros((len(i), 3))
    if not periodic:
        cell, pbc = np.diag(positions.max(0) - positions.min(0) + 2.0 * cutoff + 1.0), np.zeros(3, dtype=bool)
    i, j, cell_shift = primitive_neighbor_list("ijS", pbc, cell, positions, float(cutoff), self_interaction=False)
    return np.stack([i, j]).astype(np.int64), cell_shift.astype(np.float64) @ cell


def structures():
    rng = np.random.default_rng(0)
    yield "ethanol", ase.build.molecule("CH3CH2OH")
    cluster = []
    while len(cluster) < 21:  # random points of molecular density, no two closer than 1 Å
        p = rng.uniform(0.0, 5.5, 3)
        if all(np.linalg.norm(p - q) > 1.0 for q in cluster):
            cluster.append(p)
    yield "21-atom cluster", ase.Atoms(f"C{len(cluster)}", positions=cluster)
    ethanol = ase.build.molecule("CH3CH2OH")
    grid = [ethanol.positions + 4.5 * np.array(idx) for idx in np.ndindex(5, 5, 5)][:111]
    yield "111 ethanols", ase.Atoms("C2OH6" * 111, positions=np.concatenate(grid))
    silicon = ase.build.bulk("Si", "diamond", a=5.43, cubic=True)
    for n in (1, 2, 4, 8):
        crystal = silicon.repeat(n)
        crystal.rattle(0.05, seed=n)
        yield f"Si crystal {n}x{n}x{n}", crystal


def best_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cutoff", type=float, default=5.0, help="cutoff, Å (default 5)")
    parser.add_argument("--repeats", type=int, default=5, help="calls per list; the fastest counts (default 5)")
    args = parser.parse_args()
    print(f"cutoff {args.cutoff} Å, best of {args.repeats} calls")
    print(f"{'structure':<20} {'atoms':>6} {'edges':>8} {'previous ms':>12} {'vesin ms':>10} {'speed-up':>9}")
    for name, atoms in structures():
        periodic = bool(atoms.pbc.any())
        call = (atoms.positions, args.cutoff, atoms.cell.array if periodic else None, atoms.pbc if periodic else None)
        edges = neighbor_list(*call)[0].shape[1]
        assert previous_neighbor_list(*call)[0].shape[1] == edges  # both find the same pairs
        old, new = best_ms(lambda: previous_neighbor_list(*call), args.repeats), best_ms(lambda: neighbor_list(*call), args.repeats)
        print(f"{name:<20} {len(atoms):>6} {edges:>8} {old:>12.3f} {new:>10.3f} {old / new:>8.1f}x")


if __name__ == "__main__":
    main()
