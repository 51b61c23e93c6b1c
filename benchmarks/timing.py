"""The one latency timer: seconds per ASE energy+forces call, used by benchmarks/latency.py and the peers' workers.

Standard library only at import (numpy, which every ASE install has, is imported where the positions are
displaced): the peers' venvs (benchmarks/peers/setup.sh) have no mlpot, so both callers import this file by path.
"""

import statistics
import time

DISPLACEMENT_A = 0.01  # standard deviation of the noise added to every position before each call, Å


def time_energy_forces(atoms, calls: int, warmup: int = 0, seed: int = 0, base=None) -> list:
    """Seconds of each of ``calls`` timed ``atoms.get_potential_energy(); atoms.get_forces()`` through the calculator
    attached to ``atoms``, after ``warmup`` untimed calls of the same kind.

    Before every call (warm-up and timed) each position is set to ``base`` + N(0, DISPLACEMENT_A) noise drawn from
    one ``numpy.random.default_rng(seed)`` stream, so no call hits the calculator's result cache and every caller
    with the same seed sees the same geometries.

    Args:
        atoms: ase.Atoms with a calculator; its positions are left displaced.
        base: (N, 3) positions to displace around, Å (default: the positions of ``atoms`` now).
    """
    import numpy as np

    base = np.array(atoms.positions if base is None else base, dtype=float)
    rng = np.random.default_rng(seed)
    for _ in range(warmup):
        atoms.positions = base + rng.normal(scale=DISPLACEMENT_A, size=base.shape)
        atoms.get_potential_energy()
        atoms.get_forces()
    times = []
    for _ in range(calls):
        atoms.positions = base + rng.normal(scale=DISPLACEMENT_A, size=base.shape)
        tic = time.perf_counter()
        atoms.get_potential_energy()
        atoms.get_forces()
        times.append(time.perf_counter() - tic)
    return times


def quartiles(times) -> tuple:
    """(first quartile, median, third quartile) of ``times``; (min, median, max) for fewer than four values."""
    xs = sorted(times)
    if len(xs) < 4:
        return xs[0], statistics.median(xs), xs[-1]
    q = statistics.quantiles(xs, n=4)
    return q[0], q[1], q[2]


def median_ms(times) -> float:
    """Median of ``times`` (seconds), in milliseconds."""
    return 1000 * statistics.median(times)
