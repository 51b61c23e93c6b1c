"""The periodic example (examples/periodic): EMT's labels are derivatives of its energy, the committed
frames are what the script makes, the crystal analysis recovers EMT's moduli and X-point phonons by
independent routes, and the shipped copper model loads, gives a stress and meets its stated errors."""

import importlib.util
import json
from pathlib import Path

import ase.build
import ase.io
import numpy as np
import pytest
from ase import units
from ase.calculators.emt import EMT

from mlpot.workflows.crystal import THz, cubic_elastic_constants, equation_of_state, phonon_bands, strained

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "periodic"
SHIPPED = ROOT / "deploy" / "cu-emt.pt"
A0 = 3.5898  # EMT's fcc Cu lattice constant, Å


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"periodic_{name}", EXAMPLE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = load_script("generate")


def emt_energy(atoms):
    atoms = atoms.copy()
    atoms.calc = EMT()
    return atoms.get_potential_energy()


def test_labelled_forces_are_minus_the_energy_gradient():
    frame = generate.rattled(np.random.default_rng(5), 1)[0]
    h = 1e-4
    for atom, axis in ((0, 0), (7, 1), (20, 2)):
        energies = []
        for sign in (1, -1):
            displaced = frame.copy()
            displaced.positions[atom, axis] += sign * h
            energies.append(emt_energy(displaced))
        numerical = -(energies[0] - energies[1]) / (2 * h)
        assert abs(frame.get_forces()[atom, axis]) > 1e-2  # a rattled frame: forces are not zero
        assert frame.get_forces()[atom, axis] == pytest.approx(numerical, abs=1e-6)


def test_labelled_stress_is_the_strain_derivative_of_the_energy():
    frame = generate.rattled(np.random.default_rng(6), 1)[0]
    stress = frame.get_stress(voigt=False)
    h = 1e-5
    for i, j in ((0, 0), (1, 1), (0, 1), (1, 2)):
        e = np.zeros((3, 3))
        e[i, j] = e[j, i] = h / 2 if i != j else h
        derivative = (emt_energy(strained(frame, e)) - emt_energy(strained(frame, -e))) / (2 * h)
        # a shear strain e_ij = e_ji = h/2 changes the energy by V (s_ij + s_ji) h / 2 = V s_ij h
        assert stress[i, j] == pytest.approx(derivative / frame.get_volume(), abs=1e-7)


def test_committed_frames_are_what_the_script_makes():
    committed = ase.io.read(EXAMPLE / "data" / "cu-emt-test.extxyz", index=":3")
    made = generate.rattled(np.random.default_rng(1), 3)  # the test file's first frames: seed 1
    for old, new in zip(committed, made):
        np.testing.assert_allclose(old.positions, new.positions, atol=1e-7)
        np.testing.assert_allclose(old.get_forces(), new.get_forces(), atol=1e-7)
        assert old.get_potential_energy() == pytest.approx(new.get_potential_energy(), abs=1e-7)
        np.testing.assert_allclose(old.get_stress(), new.get_stress(), atol=1e-9)
    counts = {}
    for frame in ase.io.read(EXAMPLE / "data" / "cu-emt-train.extxyz", index=":"):
        counts[frame.info["config_type"]] = counts.get(frame.info["config_type"], 0) + 1
    assert counts == {"rattled": 120, "md300K": 80, "md900K": 80, "eos": 17, "strained": 40}


def test_bulk_modulus_from_energies_equals_that_from_stresses():
    eos = equation_of_state(ase.build.bulk("Cu", "fcc", a=3.6, cubic=True), EMT())
    assert eos.lattice_constant == pytest.approx(A0, abs=2e-4)
    elastic = cubic_elastic_constants(ase.build.bulk("Cu", "fcc", a=eos.lattice_constant, cubic=True), EMT())
    assert eos.bulk_modulus_GPa == pytest.approx(elastic["B"], rel=2e-3)  # E(V) fit against stress slopes
    assert 100 < eos.bulk_modulus_GPa < 200


def test_elastic_constants_equal_energy_second_derivatives():
    atoms = ase.build.bulk("Cu", "fcc", a=A0, cubic=True)
    elastic = cubic_elastic_constants(atoms, EMT())
    h = 2e-3
    volume = atoms.get_volume()

    def curvature(strain):  # d2E/dh2 / V along strain direction ``strain`` (per unit h), in GPa
        e = [emt_energy(strained(atoms, s * h * np.asarray(strain))) for s in (1, 0, -1)]
        return (e[0] - 2 * e[1] + e[2]) / h**2 / volume / units.GPa

    assert curvature(np.diag([1, 0, 0])) == pytest.approx(elastic["C11"], rel=2e-3)
    # e_xx = e_yy = h: E'' / V = 2 C11 + 2 C12
    assert curvature(np.diag([1, 1, 0])) == pytest.approx(2 * elastic["C11"] + 2 * elastic["C12"], rel=2e-3)
    shear = np.zeros((3, 3))
    shear[1, 2] = shear[2, 1] = 0.5  # engineering shear γ = h: E'' / V = C44
    assert curvature(shear) == pytest.approx(elastic["C44"], rel=2e-3)


def test_x_point_phonons_equal_a_frozen_phonon_in_the_cubic_cell():
    # At X = 2π/a (1, 0, 0) the four atoms of the cubic cell move with phases +1 (x = 0) or -1 (x = a/2):
    # the longitudinal mode displaces them along x, a transverse one along y; ω² = k / m.
    cubic = ase.build.bulk("Cu", "fcc", a=A0, cubic=True)
    phase = np.where(np.isclose(cubic.get_scaled_positions()[:, 0], 0.0), 1.0, -1.0)
    u = 1e-3
    expected = []
    for axis in (1, 0):  # transverse, longitudinal
        displaced = cubic.copy()
        displaced.positions[:, axis] += u * phase
        displaced.calc = EMT()
        k = -(displaced.get_forces()[:, axis] * phase).mean() / u  # eV/Å^2
        expected.append(np.sqrt(k / (cubic.get_masses()[0] * units._amu) * units._e * 1e20) / (2 * np.pi) / 1e12)
    bands = phonon_bands(ase.build.bulk("Cu", "fcc", a=A0), EMT(), supercell=(4, 4, 4), npoints=20, kpts=(4, 4, 4))
    np.testing.assert_allclose(bands.special_THz["X"], [expected[0], expected[0], expected[1]], rtol=2e-3)
    np.testing.assert_allclose(bands.special_THz["G"], 0.0, atol=1e-3)
    assert 7 < expected[1] < 9  # THz: copper's longitudinal X mode
    assert THz == pytest.approx(4.135667696e-3)  # eV


needs_model = pytest.mark.skipif(not SHIPPED.is_file(), reason="deploy/cu-emt.pt is not shipped")


@needs_model
def test_shipped_model_gives_stress_and_its_stated_errors():
    from mlpot.calculators import load_calculator

    calc = load_calculator(str(SHIPPED), dtype="float64")
    stated = json.loads((EXAMPLE / "results.json").read_text())["test_errors"]
    frames = ase.io.read(EXAMPLE / "data" / "cu-emt-test.extxyz", index=":")
    kinds = {}
    for frame in frames:  # one frame of each kind: rattled, MD at 300 and 900 K, strained
        kinds.setdefault(frame.info["config_type"], frame)
    e_err, f_err, s_err = [], [], []
    for frame in (kinds["rattled"], kinds["md900K"], kinds["strained"]):
        atoms = frame.copy()
        atoms.calc = calc
        e_err.append(abs(atoms.get_potential_energy() - frame.get_potential_energy()) / len(atoms))
        f_err.append(np.abs(atoms.get_forces() - frame.get_forces()).mean())
        stress = atoms.get_stress()
        assert stress.shape == (6,) and np.isfinite(stress).all()
        s_err.append(np.abs(stress - frame.get_stress()).mean())
    assert 1e3 * np.mean(e_err) < 4 * stated["energy_mae_meV_per_atom"]
    assert 1e3 * np.mean(f_err) < 3 * stated["forces_mae_meV_per_A"]
    assert 1e3 * np.mean(s_err) < 4 * stated["stress_mae_meV_per_A3"]
