"""Workflows and the ``mlpot`` command: MD stability and h(r), relaxation, vibrations, phonons."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import units
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes

from mlpot import export
from mlpot.commands import run
from mlpot.workflows import analysis, md, vibrations

from conftest import make_tiny_potential

SHIPPED = Path(__file__).resolve().parents[1] / "deploy" / "ethanol.pt"
# An untrained stand-in has no minimum near the reference geometry: take only a few optimizer steps.
RELAX_STEPS = "300" if SHIPPED.is_file() else "3"
VIB_FMAX = "1e-3" if SHIPPED.is_file() else "100"


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    """The shipped ethanol model when present, else a tiny untrained float64 SchNet (plumbing only)."""
    if SHIPPED.is_file():
        return str(SHIPPED)
    path = tmp_path_factory.mktemp("model") / "tiny-schnet.pt"
    export.save(make_tiny_potential("schnet", torch.float64), path, dataset="rmd17_ethanol")
    return str(path)


@pytest.fixture(scope="session")
def ethanol_reference(data_dir):
    return analysis.load_ensemble("ethanol", data_dir)


def test_parse_time():
    assert md.parse_time("10ps") == 10000.0
    assert md.parse_time("500fs") == 500.0
    assert md.parse_time("0.5 fs") == 0.5
    assert md.parse_time(2) == 2.0
    with pytest.raises(ValueError, match="as a time"):
        md.parse_time("ten ps")


def test_bonds_of_ethanol_reference(ethanol_reference):
    bonds = analysis.find_bonds(ethanol_reference.numbers, ethanol_reference.positions[0])
    assert len(bonds) == 8  # C-C, C-O, O-H, 5 C-H
    assert analysis.first_collapse(ethanol_reference.positions, bonds, analysis.bond_lengths(
        ethanol_reference.positions, bonds).mean(axis=0)) is None


def _chains(*gaps):
    """(F, len(gaps) + 1, 3) atoms on the x axis, frame f's consecutive atoms ``gaps[k][f]`` Å apart."""
    x = np.cumsum(np.column_stack([np.zeros(len(gaps[0])), *gaps]), axis=1)
    return np.stack([x, np.zeros_like(x), np.zeros_like(x)], axis=-1)


def test_hr_of_known_distributions():
    """h(r) and ∫|h - h_ref| dr against values worked out by hand (distances inside bins, not on edges)."""
    width = analysis.HR_MAX / analysis.HR_BINS  # 0.02 Å
    r, h_chain = analysis.distance_histogram(_chains([1.005], [2.007]))  # pairs 1.005, 2.007 and 3.012 Å
    assert len(r) == analysis.HR_BINS and r[0] == pytest.approx(width / 2) and r[-1] == pytest.approx(10 - width / 2)
    assert np.flatnonzero(h_chain).tolist() == [50, 100, 150]
    np.testing.assert_allclose(h_chain[[50, 100, 150]], 1 / (3 * width), rtol=1e-12)  # a third of the mass each
    h_dimer = analysis.distance_histogram(_chains([1.005]))[1]
    assert analysis.hr_mae(h_chain, h_dimer) == pytest.approx(2 / 3 + 1 / 3 + 1 / 3, rel=1e-12)
    assert analysis.hr_mae(h_dimer, analysis.distance_histogram(_chains([5.005]))[1]) == pytest.approx(2, rel=1e-12)
    # half the frames moved from 1.005 to 5.005 Å: half the mass changes bins
    half_moved = analysis.distance_histogram(_chains([1.005, 1.005, 5.005, 5.005]))[1]
    assert analysis.hr_mae(half_moved, h_dimer) == pytest.approx(1, rel=1e-12)
    # uniform on [2, 4) Å against uniform on [3, 5) Å: they share half their mass
    centres = 2 + width * (np.arange(100) + 0.5)
    h_a, h_b = (analysis.distance_histogram(_chains(c))[1] for c in (centres, centres + 1))
    assert analysis.hr_mae(h_a, h_b) == pytest.approx(1, rel=1e-9)


def test_hr_halves_of_the_reference_differ_only_by_noise(ethanol_reference):
    positions = ethanol_reference.positions
    r, h = analysis.distance_histogram(positions)
    assert np.sum(h) * (r[1] - r[0]) == pytest.approx(1.0)
    half = len(positions) // 2  # two halves of the same ensemble: only sampling noise
    h_a, h_b = (analysis.distance_histogram(p)[1] for p in (positions[:half], positions[half:]))
    assert 0.0 < analysis.hr_mae(h_a, h_b) < 0.15


def test_stability_detector_flags_broken_trajectory(ethanol_reference):
    frames = ethanol_reference.positions[:20].copy()
    bonds = analysis.find_bonds(ethanol_reference.numbers, frames[0])
    lengths = analysis.bond_lengths(ethanol_reference.positions, bonds).mean(axis=0)
    oxygen = int(np.flatnonzero(ethanol_reference.numbers == 8)[0])
    frames[12:, oxygen] += np.array([1.0, 0.0, 0.0])  # the C-O and O-H bonds break at frame 12
    assert analysis.first_collapse(frames, bonds, lengths) == 12
    frames[5, 0] = np.nan
    assert analysis.first_collapse(frames, bonds, lengths) == 5


class _PullApart(Calculator):
    """A broken potential: a constant 20 eV/Å force pulls atom 2 away."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        forces = np.zeros((len(self.atoms), 3))
        forces[2, 0] = 20.0
        self.results = {"energy": -20.0 * self.atoms.positions[2, 0], "forces": forces}


def test_run_md_stops_when_it_collapses(data_dir):
    atoms = analysis.load_structure("ethanol", data_dir)
    run_ = md.run_md(atoms, _PullApart(), time_fs=200, ensemble="nve", progress=False)
    assert run_.collapse_step is not None and run_.steps < 400
    assert "0.5 Å" in run_.collapse_reason


def test_power_spectrum_peak_of_harmonic_motion():
    wavenumber = 1000.0  # cm^-1
    dt_fs = 1.0
    t = np.arange(4000) * dt_fs
    frequency_per_fs = wavenumber * 100.0 * units._c * 1e-15
    velocities = np.cos(2 * np.pi * frequency_per_fs * t)[:, None, None] * np.ones((1, 2, 3))
    grid, spectrum = analysis.power_spectrum(velocities, np.ones(2), dt_fs)
    assert grid[np.argmax(spectrum)] == pytest.approx(wavenumber, abs=20.0)


def test_energy_drift_units():
    times_ps = np.linspace(0.0, 2.0, 50)
    assert analysis.energy_drift(times_ps, 0.009 * times_ps, num_atoms=9) == pytest.approx(1.0)


def test_md_command_langevin(model_path, tmp_path, data_dir):
    out = tmp_path / "md"
    report = run(["md", model_path, "ethanol", "--time", "50fs", "--output", str(out), "--quiet",
                  "--data-dir", str(data_dir), "--no-harmonic"])
    assert report.steps <= 100 and report.ms_per_step > 0
    # the run is compared with the rMD17 ensemble, not with itself (0) nor with another molecule (near 2)
    assert report.reference == "ethanol" and 0.0 < report.hr_mae_reference_halves < report.hr_mae
    if SHIPPED.is_file():
        assert report.stable and report.steps == 100
        assert report.hr_mae < 0.6  # 50 fs from one start: 0.37 measured, against 0.07 between the reference's halves
    for name in ("md.traj", "md.log", "summary.json"):
        assert (out / name).is_file()
    assert json.loads((out / "summary.json").read_text())["ensemble"] == "langevin"


def test_md_command_nve_drift(model_path, tmp_path, data_dir):
    report = run(["md", model_path, "ethanol", "--time", "25fs", "--ensemble", "nve",
                  "--dtype", "float64", "--temperature", "300", "--output", str(tmp_path), "--quiet",
                  "--format", "extxyz", "--data-dir", str(data_dir)])
    assert (tmp_path / "md.xyz").is_file()
    if report.stable:
        assert report.energy_drift_meV_atom_ps is not None and np.isfinite(report.energy_drift_meV_atom_ps)
    if SHIPPED.is_file():
        assert abs(report.energy_drift_meV_atom_ps) < 5.0


def test_relax_command(model_path, tmp_path, data_dir):
    result = run(["relax", model_path, "ethanol", "--fmax", "0.05", "--output", str(tmp_path),
                  "--data-dir", str(data_dir), "--steps", RELAX_STEPS])
    assert (tmp_path / "relaxed.xyz").is_file() and result.steps <= int(RELAX_STEPS)
    assert result.converged == (result.max_force_eV_A <= 0.05)
    if SHIPPED.is_file():
        start = analysis.load_structure("ethanol", data_dir)
        start.calc = result.atoms.calc
        assert result.converged and result.energy_eV < start.get_potential_energy()
        assert sorted(label for _, _, label, _ in result.bonds) == ["C-C", "C-H", "C-H", "C-H", "C-H", "C-H",
                                                                    "C-O", "O-H"]


def test_vibrations_command_fd_matches_hessian(model_path, tmp_path, data_dir):
    result = run(["vibrations", model_path, "ethanol", "--fmax", VIB_FMAX, "--output", str(tmp_path),
                  "--data-dir", str(data_dir), "--reference", "pyscf"])
    assert len(result.fd_cm) == len(result.hessian_cm) == 3 * 9 - 6
    assert result.max_abs_diff_cm < 1.0
    assert (tmp_path / "spectrum.png").is_file() and (tmp_path / "vibrations.json").is_file()
    try:
        import pyscf  # noqa: F401
    except ImportError:
        assert any("pip install pyscf" in note for note in result.notes)


def test_reference_choice():
    assert vibrations.reference_method("rmd17_ethanol") == "pyscf"
    assert vibrations.reference_method("ethanol_gfn2xtb") == "xtb"
    with pytest.raises(vibrations.ReferenceUnavailable, match="no affordable"):
        vibrations.resolve_reference("auto", "aspirin_ccsd")


def test_harmonic_frequencies_drop_rigid_motions(data_dir):
    atoms = analysis.load_structure("ethanol", data_dir)
    hessian = np.eye(3 * len(atoms))  # 1 eV/Å^2 springs on every coordinate
    assert len(vibrations.harmonic_frequencies(atoms, hessian)) == 3 * len(atoms) - 6


def test_phonons_of_periodic_structure(tmp_path):
    model = tmp_path / "periodic-schnet.pt"  # untrained, declared periodic: plumbing only
    export.save(make_tiny_potential("schnet", torch.float64), model, periodic=True)
    path = tmp_path / "diamond.xyz"
    bulk("C", "diamond", a=3.57).write(path)
    result = run(["vibrations", str(model), str(path), "--supercell", "2", "2", "2", "--output", str(tmp_path)])
    assert len(result.gamma_fd_cm) == len(result.gamma_hessian_cm) == 3
    assert result.max_abs_diff_cm < 1.0
    assert Path(result.figure).is_file() and (tmp_path / "relaxed.xyz").is_file()


def test_reference_bonds_need_the_same_atom_order(ethanol_reference, data_dir):
    atoms = analysis.load_structure("ethanol", data_dir)
    bonds, lengths = md.reference_bonds(ethanol_reference, atoms)
    assert len(bonds) == len(lengths) == 8
    with pytest.raises(ValueError, match="same atom order"):
        md.reference_bonds(ethanol_reference, atoms[[0, 1, 2, 8, 4, 5, 6, 7, 3]])


def test_md_with_a_committee_logs_the_force_uncertainty(tmp_path, data_dir):
    """Two different models as a committee: the run reports a positive force spread along the trajectory."""
    import torch

    from mlpot import export
    from mlpot.workflows import md

    paths = []
    for seed in (0, 1):
        path = tmp_path / f"member{seed}.pt"
        export.save(make_tiny_potential("schnet", torch.float64, seed=seed), path)
        paths.append(path)
    report = md.simulate(paths, "ethanol", 300.0, "20fs", "0.5fs", "nve", output_dir=tmp_path / "md",
                         data_dir=data_dir, harmonic=False, progress=False)
    assert report.forces_std_max_eV_per_A is not None and report.forces_std_max_eV_per_A > 0
    assert report.forces_std_mean_eV_per_A <= report.forces_std_max_eV_per_A
    assert "committee force uncertainty" in md.format_md(report)
