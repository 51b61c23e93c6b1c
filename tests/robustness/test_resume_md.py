"""``mlpot md`` killed (SIGKILL and SIGTERM, at seeded moments just after seeded checkpoints) and continued
with ``--resume`` ends bit for bit where an uninterrupted run ends: the trajectory (positions, momenta,
energies, forces), the log and the summary (all but its wall times); no kill leaves a file half written.
"""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.build
import ase.io
import numpy as np
import pytest

from mlpot import commands
from mlpot.workflows.md import STATE_FILE

from robustness_helpers import perturbed_ethanol, tmp_files

MODEL = Path(__file__).resolve().parents[2] / "deploy" / "ethanol-schnet.pt"  # a trained model: stable MD
SEED = 20261202
TIMINGS = ("wall_time_s", "ms_per_step")

pytestmark = pytest.mark.skipif(not MODEL.is_file(), reason=f"needs the shipped {MODEL.name}")


def md_args(structure, out, *extra):
    return ["md", str(MODEL), str(structure), "--time", "80fs", "--timestep", "0.5fs", "--temperature", "300",
            "--dtype", "float64", "--seed", "7", "--checkpoint-interval", "20", "--no-harmonic", "--quiet",
            "--output", str(out), *extra]


def frames(out: Path):
    return ase.io.read(out / "md.traj", index=":")


def summary(out: Path) -> dict:
    data = json.loads((out / "summary.json").read_text())
    return {k: v for k, v in data.items() if k not in TIMINGS}


def state_id(out: Path, name: str = STATE_FILE):
    path = out / name
    return path.stat().st_ino if path.exists() else None


def state_step(out: Path, name: str) -> int:
    try:
        with open(out / name, "rb") as fh:
            return pickle.load(fh)["step"]
    except (FileNotFoundError, EOFError):
        return -1


def launch_and_kill(args, out: Path, sig, delay: float, state: str = STATE_FILE, at_step: int = 0) -> str:
    """Start ``mlpot md`` (or relax) in a subprocess; ``delay`` s after its next checkpoint (and once the
    checkpoint has reached ``at_step``), send ``sig``."""
    before = state_id(out, state)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mlpot", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while ((state_id(out, state) == before or state_step(out, state) < at_step) and proc.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return f"{sig.name} after {delay:.2f} s: exit {proc.returncode} {err.decode()[-300:]}"


def check_after_kill(out: Path):
    """A kill may leave only whole files: a loadable state, a readable trajectory, no summary or a whole one."""
    if (out / STATE_FILE).exists():
        with open(out / STATE_FILE, "rb") as fh:
            state = pickle.load(fh)
        assert len(frames(out)) >= state["frames"], "the trajectory lost frames the checkpoint counted"
    if (out / "summary.json").exists():
        json.loads((out / "summary.json").read_text())
    assert json.loads((out / "run.json").read_text())["seed"] == 7


def test_killed_md_resumes_bit_identical(tmp_path):
    structure = tmp_path / "ethanol.xyz"
    ase.io.write(structure, perturbed_ethanol(seed=3))
    reference = tmp_path / "reference"
    commands.run(md_args(structure, reference))

    rng = np.random.default_rng(SEED)
    out = tmp_path / "run"
    # Each kill waits for a checkpoint at or past a seeded step (20..100 of 160), then a seeded 0-50 ms: the
    # kill lands mid-run however fast or slow the machine is (a wall-clock-only delay could outlast the run).
    at_steps = sorted(int(s) for s in rng.choice(np.arange(20, 101, 20), size=3, replace=False))
    kills = []
    for number, (sig, at_step) in enumerate(zip((signal.SIGKILL, signal.SIGTERM, signal.SIGKILL), at_steps)):
        args = md_args(structure, out, *(["--resume"] if number else []))
        kills.append(launch_and_kill(args, out, sig, float(rng.uniform(0.0, 0.05)), at_step=at_step))
        check_after_kill(out)
    print("kills:", *kills, sep="\n  ")
    with open(out / STATE_FILE, "rb") as fh:
        assert not pickle.load(fh)["finished"], f"a kill was meant to land before the end: {kills}"

    report = commands.run(md_args(structure, out, "--resume"))
    assert report.steps == 160 and report.stable
    assert tmp_files(out) == []
    got, want = frames(out), frames(reference)
    assert len(got) == len(want) == 17
    for a, b in zip(got, want):
        assert np.array_equal(a.positions, b.positions) and np.array_equal(a.get_momenta(), b.get_momenta())
        assert a.get_potential_energy() == b.get_potential_energy()
        assert np.array_equal(a.get_forces(), b.get_forces())
    assert (out / "md.log").read_text() == (reference / "md.log").read_text()
    assert summary(out) | {"files": None} == summary(reference) | {"files": None}
    assert summary(out)["mean_temperature_K"] == summary(reference)["mean_temperature_K"]


def test_existing_output_needs_overwrite_and_keeps_results_until_done(tmp_path, monkeypatch):
    structure = tmp_path / "ethanol.xyz"
    ase.io.write(structure, perturbed_ethanol(seed=3))
    out = tmp_path / "run"
    args = md_args(structure, out)
    args[args.index("80fs")] = "10fs"
    commands.run(args)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match="already holds results; pass --overwrite"):
        commands.run(args)
    with pytest.raises(ValueError, match="give one of them"):
        commands.run([*args, "--overwrite", "--resume"])
    resumed = [*args, "--resume"]
    resumed[resumed.index("300")] = "310"
    with pytest.raises(ValueError, match="started with temperature_K 300.0 \\(now 310.0\\)"):
        commands.run(resumed)

    import mlpot.workflows.md as md

    def full_disk(*a, **k):
        raise OSError(27, "File too large", str(out / "md.traj"))

    monkeypatch.setattr(md, "_append_frames", full_disk)
    with pytest.raises(OSError):
        commands.run([*args, "--overwrite", "--seed", "8"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "a failed --overwrite touched the old results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ethanol.xyz", "run"]
    monkeypatch.undo()
    commands.run([*args, "--overwrite", "--seed", "8"])
    assert json.loads((out / "run.json").read_text())["seed"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ethanol.xyz", "run"]


def relax_args(structure, out, *extra):
    return ["relax", str(MODEL), str(structure), "--fmax", "1e-4", "--output", str(out), *extra]


def log_without_clock(out: Path):
    """The optimizer log without its wall-clock column."""
    return [line.split()[:1] + line.split()[3:] for line in (out / "relax.log").read_text().splitlines()]


def test_killed_relax_resumes_bit_identical(tmp_path):
    structure = tmp_path / "ethanol.xyz"
    ase.io.write(structure, perturbed_ethanol(seed=4, amplitude=0.1))
    reference = commands.run(relax_args(structure, tmp_path / "reference"))
    assert reference.converged and reference.steps > 10
    out = tmp_path / "run"
    rng = np.random.default_rng(SEED + 1)
    at_step = int(rng.integers(3, reference.steps // 2))
    kills = [launch_and_kill(relax_args(structure, out), out, signal.SIGKILL, 0.0, "relax-state.pkl", at_step)]
    with open(out / "relax-state.pkl", "rb") as fh:
        assert not pickle.load(fh)["done"], f"the kill was meant to land before the end: {kills}"
    resumed = commands.run(relax_args(structure, out, "--resume"))
    assert resumed.steps == reference.steps and resumed.energy_eV == reference.energy_eV
    assert np.array_equal(resumed.atoms.positions, reference.atoms.positions)
    assert (out / "relaxed.xyz").read_text() == (tmp_path / "reference" / "relaxed.xyz").read_text()
    assert log_without_clock(out) == log_without_clock(tmp_path / "reference")


CU_MODEL = MODEL.parent / "cu-emt.pt"


def rattled_copper(seed, amplitude=0.05, strain=1.0):
    """A rattled, strained 32-atom fcc Cu cell (the shipped Cu model's kind of structure)."""
    atoms = ase.build.bulk("Cu", "fcc", a=3.61 * strain, cubic=True).repeat(2)
    atoms.positions += np.random.default_rng(seed).uniform(-amplitude, amplitude, atoms.positions.shape)
    return atoms


def same_relaxation(out: Path, reference: Path, resumed, want):
    assert resumed.steps == want.steps and resumed.energy_eV == want.energy_eV
    assert np.array_equal(resumed.atoms.positions, want.atoms.positions)
    assert np.array_equal(resumed.atoms.cell.array, want.atoms.cell.array)
    assert (out / "relaxed.xyz").read_text() == (reference / "relaxed.xyz").read_text()
    assert log_without_clock(out) == log_without_clock(reference)


@pytest.mark.skipif(not CU_MODEL.is_file(), reason=f"needs the shipped {CU_MODEL.name}")
@pytest.mark.parametrize("optimizer, cell", [("fire", False), ("bfgs", True), ("fire", True)])
def test_killed_fire_and_cell_relaxations_resume_bit_identical(tmp_path, optimizer, cell):
    structure = tmp_path / "cu.xyz"
    ase.io.write(structure, rattled_copper(seed=6, strain=1.01 if cell else 1.0))

    def args(out, *extra):
        return ["relax", str(CU_MODEL), str(structure), "--fmax", "1e-3", "--optimizer", optimizer,
                "--output", str(out), *(["--cell"] if cell else []), *extra]

    reference = commands.run(args(tmp_path / "reference"))
    assert reference.converged and reference.steps > 10
    if cell:
        assert not np.allclose(reference.atoms.cell.array, rattled_copper(6, strain=1.01).cell.array, atol=1e-3)
    out = tmp_path / "run"
    at_step = int(np.random.default_rng(SEED + 2).integers(3, reference.steps // 2))
    kills = [launch_and_kill(args(out), out, signal.SIGKILL, 0.0, "relax-state.pkl", at_step)]
    with open(out / "relax-state.pkl", "rb") as fh:
        assert not pickle.load(fh)["done"], f"the kill was meant to land before the end: {kills}"
    same_relaxation(out, tmp_path / "reference", commands.run(args(out, "--resume")), reference)


@pytest.mark.skipif(not CU_MODEL.is_file(), reason=f"needs the shipped {CU_MODEL.name}")
def test_killed_npt_resumes_bit_identical(tmp_path):
    structure = tmp_path / "cu.xyz"
    ase.io.write(structure, rattled_copper(seed=7, strain=1.02))

    def args(out, *extra):
        return ["md", str(CU_MODEL), str(structure), "--ensemble", "npt", "--pressure", "1000", "--time", "60fs",
                "--timestep", "2fs", "--temperature", "300", "--dtype", "float64", "--seed", "7",
                "--checkpoint-interval", "5", "--no-harmonic", "--quiet", "--output", str(out), *extra]

    commands.run(args(tmp_path / "reference"))
    out = tmp_path / "run"
    kills = [launch_and_kill(args(out), out, signal.SIGKILL, 0.0, at_step=10)]
    check_after_kill(out)
    with open(out / STATE_FILE, "rb") as fh:
        assert not pickle.load(fh)["finished"], f"the kill was meant to land before the end: {kills}"
    commands.run(args(out, "--resume"))
    got, want = frames(out), frames(tmp_path / "reference")
    assert len(got) == len(want) == 4
    assert not np.allclose(want[-1].cell.array, want[0].cell.array, rtol=0, atol=1e-6), "the barostat did nothing"
    for a, b in zip(got, want):
        assert np.array_equal(a.cell.array, b.cell.array) and np.array_equal(a.positions, b.positions)
        assert np.array_equal(a.get_momenta(), b.get_momenta()) and np.array_equal(a.get_forces(), b.get_forces())
    assert (out / "md.log").read_text() == (tmp_path / "reference" / "md.log").read_text()
    assert summary(out) | {"files": None} == summary(tmp_path / "reference") | {"files": None}


def test_vibrations_resume_reuses_finished_displacements(tmp_path, monkeypatch):
    from mlpot.calculators import MLPotCalculator

    structure = tmp_path / "ethanol.xyz"
    ase.io.write(structure, perturbed_ethanol(seed=5, amplitude=0.02))
    args = ["vibrations", str(MODEL), str(structure), "--fmax", "1e-3", "--output", str(tmp_path / "vib")]
    first = commands.run(args)
    displacements = sorted((tmp_path / "vib" / "displacements").glob("vib-*/cache.*.json"))
    assert len(displacements) == 1 + 2 * 3 * 9  # the equilibrium and +-delta along every coordinate
    # a killed run: the last displacements never written, one left half written
    for path in displacements[-5:]:
        path.unlink()
    displacements[0].write_text(displacements[0].read_text()[:20])
    (tmp_path / "vib" / "vibrations.json").unlink()
    calculate = MLPotCalculator.calculate

    def resumed():
        """A resumed run and the number of force calls it made."""
        calls = []
        with monkeypatch.context() as patch:
            patch.setattr(MLPotCalculator, "calculate", lambda self, *a, **k: (calls.append(1), calculate(self, *a, **k)))
            return commands.run([*args, "--resume"]), len(calls)

    second, redone = resumed()
    assert np.array_equal(second.fd_cm, first.fd_cm) and np.array_equal(second.hessian_cm, first.hessian_cm)
    _, nothing_left = resumed()  # the relaxation again, no displacement
    assert redone - nothing_left == 6, "the resumed run did not redo exactly the 6 missing displacements"
    with pytest.raises(ValueError, match="already holds results"):
        commands.run(args)
