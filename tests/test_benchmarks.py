"""The benchmarks' shared pieces: the latency timer (benchmarks/timing.py) and the peers' worker protocol."""

import io
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import ase.build
import numpy as np
import pytest
from ase.calculators.lj import LennardJones

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH / "peers"))
sys.path.insert(0, str(BENCH))

import protocol  # noqa: E402
import timing  # noqa: E402


class CountingLJ(LennardJones):
    """Lennard-Jones (energy and forces in one evaluation) that counts its evaluations."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.evaluations = 0

    def calculate(self, *args, **kwargs):
        self.evaluations += 1
        super().calculate(*args, **kwargs)


def ethanol():
    atoms = ase.build.molecule("CH3CH2OH")
    atoms.calc = CountingLJ(sigma=1.0, epsilon=0.01, rc=5.0)
    return atoms


def test_timer_times_each_call_once_on_the_seeded_displacements():
    atoms = ethanol()
    base = atoms.positions.copy()
    times = timing.time_energy_forces(atoms, calls=5, warmup=3, seed=7)
    assert len(times) == 5 and all(t > 0 for t in times)
    assert atoms.calc.evaluations == 8  # one evaluation per warm-up and timed call: none served from the cache
    # the geometry of the last call: base + the 8th draw of the seeded N(0, 0.01 Å) stream (as before the move)
    rng = np.random.default_rng(7)
    for _ in range(8):
        expected = base + rng.normal(scale=0.01, size=base.shape)
    np.testing.assert_array_equal(atoms.positions, expected)


def test_timer_displaces_around_the_given_base():
    atoms = ethanol()
    base = atoms.positions.copy()
    atoms.positions = base + 1.0  # where a previous run left them
    timing.time_energy_forces(atoms, calls=1, seed=0, base=base)
    assert np.abs(atoms.positions - base).max() < 0.1


def test_quartiles_and_median():
    assert timing.quartiles([5.0, 1.0, 4.0, 2.0, 3.0]) == (1.5, 3.0, 4.5)  # statistics.quantiles, exclusive
    assert timing.quartiles([3.0, 1.0, 2.0]) == (1.0, 2.0, 3.0)  # too few for quartiles: min, median, max
    assert timing.median_ms([0.001, 0.003, 0.002]) == pytest.approx(2.0)


class LJImpl(protocol.Impl):
    """A stand-in implementation: Lennard-Jones, nothing to build."""

    name = "lj"

    def prepare(self, dtype):
        return {"seconds": 0.0, "cached": True}

    def calculator(self, dtype):
        return CountingLJ(sigma=1.0, epsilon=0.01, rc=5.0)

    def info(self):
        return {"impl": self.name}


def test_protocol_round_trip(monkeypatch):
    monkeypatch.setattr(protocol, "minimum", lambda name: ase.build.molecule("CH3CH2OH"))
    requests = [{"cmd": "info"}, {"cmd": "latency", "molecule": "ethanol", "dtype": "float64", "calls": 4,
                                  "warmup": 2, "seed": 3}, {"cmd": "nonsense"}, {"cmd": "quit"}, {"cmd": "info"}]
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(json.dumps(r) + "\n" for r in requests)))
    out = io.StringIO()
    protocol.serve(LJImpl(SimpleNamespace()), out)
    answers = [json.loads(line) for line in out.getvalue().splitlines()]
    assert answers[0] == {"ok": True, "ready": "lj"}
    assert answers[1] == {"ok": True, "result": {"impl": "lj", "train_modes": ["eager"]}}
    latency = answers[2]["result"]
    assert len(latency["times"]) == 4 and latency["evals_per_call"] == 1.0 and latency["finite"] is True
    assert answers[3] == {"ok": False, "error": "ValueError: unknown command 'nonsense'"}
    assert len(answers) == 4  # nothing answered after quit


def test_worker_imports_every_implementation_without_its_package():
    """Every venv imports worker.py and so all four impl modules: none may import its package at the top."""
    import worker

    assert {name: cls.__module__ for name, cls in worker.IMPLS.items()} == {
        "mlpot": "impl_mlpot", "nequip": "impl_nequip", "mace": "impl_mace", "schnetpack": "impl_schnetpack"}
    for package in ("nequip", "mace", "schnetpack"):
        assert package not in sys.modules
