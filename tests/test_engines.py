"""Engines beside ASE running mlpot models (mlpot/engines/): OpenMM, i-PI and TorchSim.

Each engine's numbers are checked against MLPotCalculator on the same geometry, in float64 (the engines'
unit conversions are then the only difference), and each engine's dynamics against a property it must have.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import ase.build
import numpy as np
import pytest
import torch
from ase import units
from ase.md.verlet import VelocityVerlet
from ase.stress import voigt_6_to_full_3x3_stress

from mlpot import export
from mlpot.calculators import MLPotCalculator

from conftest import make_tiny_potential, perturbed_ethanol

SHIPPED = Path(__file__).resolve().parents[1] / "deploy" / "ethanol.pt"

pytestmark = pytest.mark.skipif(not SHIPPED.is_file(), reason="the engines run the shipped deploy/ethanol.pt")


def calculator(dtype="float64"):
    return MLPotCalculator(str(SHIPPED), dtype=dtype)


# --- OpenMM ---------------------------------------------------------------------------------------------


def openmm_context(atoms, timestep_fs=0.5):
    import openmm
    from openmm import unit

    from mlpot.engines.openmm import openmm_system

    _, system, positions = openmm_system(atoms, SHIPPED, dtype="float64")
    integrator = openmm.VerletIntegrator(timestep_fs * unit.femtosecond)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    return context, integrator


def test_openmm_energy_and_forces_are_the_calculators():
    pytest.importorskip("openmmml")
    from mlpot.engines.openmm import energy_and_forces

    atoms = perturbed_ethanol(seed=3)
    context, _ = openmm_context(atoms)
    energy, forces = energy_and_forces(context)
    reference = calculator()
    assert energy == pytest.approx(reference.get_potential_energy(atoms), abs=1e-9)
    np.testing.assert_allclose(forces, reference.get_forces(atoms), atol=1e-10)
    assert np.abs(forces).max() > 0.5  # a perturbed molecule: the forces compared are not all zero


def test_openmm_verlet_conserves_energy():
    """Total energy is conserved up to Verlet's O(dt^2) fluctuation: halving the step quarters the spread."""
    pytest.importorskip("openmmml")
    from openmm import unit

    spreads = {}
    for timestep_fs, steps in ((0.5, 20), (0.25, 40)):  # the same 10 fs
        context, integrator = openmm_context(perturbed_ethanol(seed=3), timestep_fs)
        context.setVelocitiesToTemperature(300 * unit.kelvin, 7)
        total, potential = [], []
        for _ in range(steps + 1):
            state = context.getState(getEnergy=True)
            potential.append(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
            total.append(potential[-1] + state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole))
            integrator.step(1)
        spreads[timestep_fs] = np.ptp(total)
        assert np.ptp(total) < 0.05 * np.ptp(potential), (np.ptp(total), np.ptp(potential))  # energy flows, the sum stays
    assert 3.0 < spreads[0.5] / spreads[0.25] < 5.5, spreads


def test_openmm_rejects_a_periodic_structure():
    pytest.importorskip("openmmml")
    from mlpot.engines.openmm import topology_of

    atoms = ase.build.molecule("CH3CH2OH", vacuum=5.0, pbc=True)
    with pytest.raises(ValueError, match="set atoms.pbc = False"):
        topology_of(atoms)


# --- i-PI -----------------------------------------------------------------------------------------------


def test_ipi_path_integral_md(tmp_path):
    """4 beads, 10 steps through a unix socket; step 0 (all beads on the input geometry) is the calculator's energy."""
    pytest.importorskip("ipi")
    from ase.calculators.socketio import actualunixsocketname
    from ipi.utils.units import unit_to_internal

    from mlpot.engines.ipi import run_path_integral

    atoms = perturbed_ethanol(seed=4)
    props = run_path_integral(atoms, calculator(), tmp_path, beads=4, steps=10, timeout=240)
    np.testing.assert_array_equal(props["step"], np.arange(11))
    # ASE sends the energy in Hartree (its CODATA 2014 constant), i-PI writes eV with its own Hartree
    expected = calculator().get_potential_energy(atoms) / units.Hartree / unit_to_internal("energy", "electronvolt", 1.0)
    assert props["potential"][0] == pytest.approx(expected, abs=2e-5)  # i-PI prints 5 decimals here
    assert np.ptp(props["potential"]) > 1e-3 and np.isfinite(props["temperature"]).all()  # the beads moved
    assert np.ptp(props["conserved"]) < 0.05 * np.ptp(props["potential"])  # 0.014 measured
    beads = sorted(tmp_path.glob("ipi.pos_*.xyz"))
    assert len(beads) == 4
    address = (tmp_path / "input.xml").read_text().split("<address>")[1].split("</address>")[0]
    assert not Path(actualunixsocketname(address)).exists()  # the socket is cleaned up


def test_ipi_rejects_a_periodic_structure(tmp_path):
    pytest.importorskip("ipi")
    from mlpot.engines.ipi import run_path_integral

    atoms = ase.build.molecule("CH3CH2OH", vacuum=5.0, pbc=True)
    with pytest.raises(ValueError, match="set atoms.pbc = False"):
        run_path_integral(atoms, calculator(), tmp_path)
    with pytest.raises(ValueError, match="beads >= 1"):
        run_path_integral(perturbed_ethanol(), calculator(), tmp_path, beads=0)


# --- TorchSim -------------------------------------------------------------------------------------------


def ethanols(count, seed=0):
    return [perturbed_ethanol(seed=seed + k) for k in range(count)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torchsim_batch_is_the_calculator_per_system(dtype):
    ts = pytest.importorskip("torch_sim")
    from mlpot.engines.torchsim import MLPotModel

    systems = ethanols(4)
    systems[2].positions += 40.0  # far from the origin and from the others
    model = MLPotModel(SHIPPED, dtype=dtype)
    state = ts.io.atoms_to_state(systems, model.device, model.dtype)
    out = model(state)
    assert out["energy"].shape == (4,) and out["forces"].shape == (36, 3) and out["energy"].dtype == model.dtype
    # the reference sees the state's positions (float32 rounds 40 Å to 4e-6 Å)
    reference, tol = calculator(dtype), {"float32": (1e-3, 1e-5), "float64": (1e-9, 1e-10)}[dtype]  # 0, 6e-7 and 0, 1e-15 measured
    for k, atoms in enumerate(ts.io.state_to_atoms(state)):
        atoms.pbc = False
        assert float(out["energy"][k]) == pytest.approx(reference.get_potential_energy(atoms), abs=tol[0])
        np.testing.assert_allclose(out["forces"][9 * k:9 * k + 9].numpy(), reference.get_forces(atoms), atol=tol[1])


def test_torchsim_nve_follows_ase_velocity_verlet():
    """The same start and step: TorchSim's batched NVE and ASE's VelocityVerlet give the same trajectory
    (neighbour lists reused within the skin and rebuilt past it)."""
    ts = pytest.importorskip("torch_sim")
    from mlpot.engines.torchsim import MLPotModel

    systems = ethanols(3, seed=10)
    model = MLPotModel(SHIPPED, dtype="float64", skin=0.02)  # small skin: rebuilt during the run
    state = ts.io.atoms_to_state(systems, model.device, model.dtype)
    dt = torch.tensor(1e-3 * ts.units.MetalUnits.time, dtype=torch.float64)  # 1 fs
    init, update = ts.nve(model=model, dt=dt, kT=torch.tensor(500 * ts.units.MetalUnits.temperature), seed=3)
    state = init(state)
    momenta = state.momenta.numpy().copy()
    for _ in range(10):
        state = update(state)
    reference = calculator()
    for k, atoms in enumerate(systems):
        atoms = atoms.copy()
        atoms.calc = reference
        atoms.set_momenta(momenta[9 * k:9 * k + 9])
        VelocityVerlet(atoms, timestep=1.0 * units.fs).run(10)
        moved = np.abs(atoms.positions - systems[k].positions).max()
        assert moved > 0.02  # past the skin / 2: the neighbour list was rebuilt
        np.testing.assert_allclose(state.positions[9 * k:9 * k + 9].numpy(), atoms.positions, atol=1e-8)


def test_torchsim_periodic_stress_is_the_calculators(tmp_path):
    ts = pytest.importorskip("torch_sim")
    from mlpot.engines.torchsim import MLPotModel

    path = tmp_path / "cu.pt"
    export.save(make_tiny_potential("schnet", torch.float64, species=(29, 79), cutoff=3.5), path, periodic=True)
    cells = []
    for seed, shear in ((0, np.eye(3)), (1, np.array([[1.0, 0.08, -0.05], [0.03, 1.02, 0.06], [-0.07, 0.04, 0.97]]))):
        atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
        atoms.numbers[::3] = 79
        atoms.set_cell(atoms.cell.array @ shear, scale_atoms=True)
        atoms.rattle(0.1, seed=seed)
        cells.append(atoms)
    model = MLPotModel(path, compute_stress=True)
    out = model(ts.io.atoms_to_state(cells, model.device, model.dtype))
    reference = MLPotCalculator(str(path))
    for k, atoms in enumerate(cells):
        stress = voigt_6_to_full_3x3_stress(reference.get_stress(atoms))
        assert np.abs(stress).max() > 1e-4
        np.testing.assert_allclose(out["stress"][k].numpy(), stress, atol=1e-12)
        assert float(out["energy"][k]) == pytest.approx(reference.get_potential_energy(atoms), abs=1e-10)


def test_torchsim_bad_input_is_one_clear_error():
    ts = pytest.importorskip("torch_sim")
    from mlpot.engines.torchsim import MLPotModel

    model = MLPotModel(SHIPPED)
    periodic = ase.build.molecule("CH3CH2OH", vacuum=5.0, pbc=True)
    with pytest.raises(ValueError, match="trained on isolated molecules.*pbc=False"):
        model(ts.io.atoms_to_state([periodic], model.device, model.dtype))
    with pytest.raises(ValueError, match="element.* N not supported"):
        model(ts.io.atoms_to_state([ase.build.molecule("NH3")], model.device, model.dtype))


# --- the examples ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, needs", [("openmm_ethanol.py", "openmmml"), ("ipi_ethanol.py", "ipi"),
                                         ("torchsim_ethanol.py", "torch_sim")])
def test_example_runs(name, needs, tmp_path):
    """Every script in examples/engines/ runs in its short form and prints what it should."""
    pytest.importorskip(needs)
    root = Path(__file__).resolve().parents[1]
    assert {p.name for p in (root / "examples" / "engines").glob("*.py")} == {
        "openmm_ethanol.py", "ipi_ethanol.py", "torchsim_ethanol.py"}
    env = {**os.environ, "MLPOT_EXAMPLE_QUICK": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(root / "examples" / "engines" / name)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    if name == "openmm_ethanol.py":
        energy, forces = map(float, re.search(r"energy (\S+) eV, forces (\S+) eV/Å", out).groups())
        assert abs(energy) < 1e-6 and forces < 1e-6
        temperatures = [float(t) for t in re.findall(r"T\s+([\d.]+) K$", out, flags=re.M)]
        assert len(temperatures) == 11 and all(50 < t < 1000 for t in temperatures)
    elif name == "ipi_ethanol.py":
        start = float(re.search(r"ASE energy of the start: (\S+) eV", out).group(1))
        first = float(re.search(r"step    0  potential (\S+) eV", out).group(1))
        assert first == pytest.approx(start, abs=1e-3)  # float32: one rounding step of a 4210 eV energy
        assert len(list((tmp_path / "ipi-ethanol").glob("ipi.pos_*.xyz"))) == 4
    else:
        assert re.search(r"^10 replicas after 10 steps of 0.5 fs: Epot -42\d\d\.\d+ eV", out, flags=re.M), out
        assert re.search(r"ms per system-step", out), out


def test_torchsim_benchmark_runs():
    """benchmarks/torchsim.py in a tiny form: its table, and TorchSim and ASE on the same trajectories."""
    pytest.importorskip("torch_sim")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "torchsim.py"), "--systems", "3", "--steps", "2",
                           "--warmup", "1", "--dtype", "float64"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for engine in ("ASE + MLPotCalculator", "TorchSim + MLPotModel"):
        assert re.search(rf"^{re.escape(engine)}\s+[\d.]+\s+[\d.]+$", done.stdout, flags=re.M), done.stdout
    difference = float(re.search(r"largest position difference at the end: (\S+) Å", done.stdout).group(1))
    assert difference < 1e-10, done.stdout
