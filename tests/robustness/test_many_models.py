"""Two calculators of different models and dtypes in one process: alternately and from two threads they
give the same bits as each alone, and many calls keep the resident memory flat."""

import threading

import ase.build
import numpy as np
import pytest
import torch

from mlpot import export
from mlpot.calculators import MLPotCalculator

from robustness_helpers import tiny_potential

CALLS = 40


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    paths = [folder / "schnet64.pt", folder / "egnn32.pt"]
    export.save(tiny_potential("schnet", torch.float64), paths[0])
    export.save(tiny_potential("egnn", torch.float32, seed=1), paths[1])
    return paths


def trajectory(seed):
    base = ase.build.molecule("CH3CH2OH")
    rng = np.random.default_rng(seed)
    return [base.positions + rng.normal(scale=0.05, size=base.positions.shape) for _ in range(CALLS)]


def run(calc, positions, start=None):
    if start is not None:
        start.wait()
    atoms = ase.build.molecule("CH3CH2OH")
    atoms.calc = calc
    out = []
    for p in positions:
        atoms.positions = p
        out.append((atoms.get_potential_energy(), atoms.get_forces().copy()))
    return out


def assert_same(got, want):
    assert len(got) == len(want)
    for (e, f), (e_ref, f_ref) in zip(got, want):
        assert e == e_ref and np.array_equal(f, f_ref)


def test_alternating_and_threaded_calculators_match_each_alone(models):
    paths = [trajectory(0), trajectory(1)]
    alone = [run(MLPotCalculator(m), p) for m, p in zip(models, paths)]
    assert MLPotCalculator(models[1]).dtype == torch.float32 and MLPotCalculator(models[0]).dtype == torch.float64

    calcs = [MLPotCalculator(m) for m in models]
    atoms = [ase.build.molecule("CH3CH2OH") for _ in calcs]
    alternating = [[], []]
    for step in range(CALLS):
        for k in (0, 1):
            atoms[k].calc = calcs[k]
            atoms[k].positions = paths[k][step]
            alternating[k].append((atoms[k].get_potential_energy(), atoms[k].get_forces().copy()))
    for k in (0, 1):
        assert_same(alternating[k], alone[k])

    results, start = [None, None], threading.Barrier(2)

    def work(k):
        results[k] = run(MLPotCalculator(models[k]), paths[k], start)

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for k in (0, 1):
        assert_same(results[k], alone[k])


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20


def test_many_calls_keep_memory_flat(models):
    calcs = [MLPotCalculator(m) for m in models]
    atoms = ase.build.molecule("CH3CH2OH")
    base = atoms.positions.copy()
    rng = np.random.default_rng(0)

    def calls(n):
        for i in range(n):
            atoms.calc = calcs[i % 2]
            atoms.positions = base + rng.normal(scale=0.02, size=base.shape)
            atoms.get_forces()

    calls(150)  # warm: allocator pools, TorchScript's optimised graphs
    before = rss_mb()
    calls(1500)
    grown = rss_mb() - before
    assert grown < 10.0, f"1500 calls grew the resident memory by {grown:.1f} MB"
