"""ASE calculators on real molecules: results, derivatives, neighbour reuse, kind checks and error messages."""

import contextlib
import json
import warnings

import ase
import numpy as np
import pytest
import torch

from mlpot import export, keys
from mlpot.calculators import CommitteeCalculator, EGNNCalculator, GNNCalculator, MLPotCalculator, load_calculator
from mlpot.data import MOLECULES, load_dataset, make_graph

from conftest import KINDS, five_point_derivative, make_tiny_potential

DATASETS = {name: entry.reference for name, entry in MOLECULES.items()}


@pytest.fixture(scope="module")
def molecules(data_dir):
    """First frame of each reference dataset as ase.Atoms (no calculator attached)."""
    out = {}
    for name, dataset in DATASETS.items():
        frames = load_dataset(dataset, data_dir=data_dir, download=False)
        out[name] = ase.Atoms(numbers=frames.numbers[0], positions=frames.positions[0])
    return out


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """``deployed(kind, dtype=float64, cutoff=5.0)``: path of a tiny deployed model (written once per module)."""
    folder = tmp_path_factory.mktemp("models")
    cache = {}

    def get(kind, dtype=torch.float64, cutoff=5.0):
        key = (kind, dtype, cutoff)
        if key not in cache:
            path = folder / f"{kind}-{str(dtype)[6:]}-{cutoff}.pt"
            export.save(make_tiny_potential(kind, dtype, cutoff=cutoff), path)
            cache[key] = path
        return cache[key]

    return get


@contextlib.contextmanager
def quiet_torchscript():
    """Silence torch's TorchScript deprecation warnings (TorchScript is the deployed format)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.(script|save|load)` is deprecated", DeprecationWarning)
        yield


def attach(atoms, calc):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms


def moved(atoms, flat_positions):
    """A copy of ``atoms`` on the same calculator with positions from a flat (3N,) vector, Å."""
    probe = attach(atoms, atoms.calc)
    probe.positions = flat_positions.reshape(-1, 3)
    return probe


@pytest.mark.parametrize("name", list(DATASETS))
def test_results_on_real_molecules(kind, name, molecules, deployed):
    atoms = attach(molecules[name], MLPotCalculator(deployed(kind)))
    n = len(atoms)
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    energies = atoms.get_potential_energies()
    assert isinstance(energy, float)
    assert forces.shape == (n, 3) and forces.dtype == np.float64
    assert energies.shape == (n,) and energies.dtype == np.float64
    assert atoms.get_potential_energy(force_consistent=True) == energy  # free_energy
    assert atoms.calc.get_property("free_energy", atoms) == energy
    assert energies.sum() == pytest.approx(energy, rel=1e-12, abs=1e-12)
    assert np.linalg.norm(forces) > 1e-4

    numerical = -five_point_derivative(lambda x: moved(atoms, x).get_potential_energy(),
                                       atoms.positions.reshape(-1), h=1e-3).reshape(-1, 3)
    np.testing.assert_allclose(forces, numerical, rtol=0, atol=1e-8 * np.abs(forces).max())

    # the calculator gives the eager model's numbers
    potential = make_tiny_potential(kind, torch.float64)
    out = potential(make_graph(atoms.numbers, atoms.positions, 5.0, dtype=torch.float64))
    assert energy == pytest.approx(float(out[keys.ENERGY].detach()), rel=1e-10)
    np.testing.assert_allclose(forces, out[keys.FORCES].detach().numpy(), rtol=0, atol=1e-10)


def test_float32_model_gives_float64_results(kind, molecules, deployed):
    atoms = molecules["ethanol"]
    reference = attach(atoms, MLPotCalculator(deployed(kind, torch.float64)))
    single = attach(atoms, MLPotCalculator(deployed(kind, torch.float32)))
    assert single.calc.dtype == torch.float32
    forces = single.get_forces()
    assert forces.dtype == np.float64 and single.get_potential_energies().dtype == np.float64
    assert single.get_potential_energy() == pytest.approx(reference.get_potential_energy(), rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(forces, reference.get_forces(), rtol=0, atol=1e-5 * np.abs(forces).max())
    # the dtype can also be chosen when loading
    upcast = attach(atoms, MLPotCalculator(deployed(kind, torch.float32), dtype="float64"))
    assert upcast.calc.dtype == torch.float64
    np.testing.assert_allclose(upcast.get_forces(), forces, rtol=0, atol=1e-5 * np.abs(forces).max())


def test_results_are_cached(molecules, deployed):
    atoms = attach(molecules["ethanol"], MLPotCalculator(deployed("schnet")))
    calls = []
    model = atoms.calc.model
    atoms.calc.model = lambda graph: calls.append(1) or model(graph)
    atoms.get_potential_energy()
    atoms.get_forces()
    atoms.get_potential_energies()
    assert len(calls) == 1
    atoms.positions[0, 0] += 0.01
    atoms.get_forces()
    assert len(calls) == 2


def test_skin_reuses_neighbours_exactly(kind, molecules, deployed, monkeypatch):
    import mlpot.calculators as calculators

    builds = []
    original = calculators.make_graph

    def counting_make_graph(*args, **kwargs):
        builds.append(args[2])  # the cutoff used for the list
        return original(*args, **kwargs)

    monkeypatch.setattr(calculators, "make_graph", counting_make_graph)
    # a short cutoff so that aspirin has pairs between the cutoff and cutoff + skin
    path = deployed(kind, torch.float64, cutoff=3.0)
    aspirin = molecules["aspirin"]
    distances = aspirin.get_all_distances()
    assert np.sum((distances > 3.0) & (distances < 3.5)) > 0

    rebuilt = MLPotCalculator(path, skin=0.0)
    reused = MLPotCalculator(path, skin=0.5)
    rng = np.random.default_rng(11)
    positions = aspirin.positions.copy()
    steps = [rng.uniform(-0.03, 0.03, positions.shape) for _ in range(5)]
    steps.append(np.zeros_like(positions))
    steps[-1][4] = [0.3, 0.0, 0.0]  # one atom moves more than skin / 2: the list must be rebuilt
    for step in steps:
        positions = positions + step
        results = []
        for calc in (rebuilt, reused):
            atoms = attach(aspirin, calc)
            atoms.positions = positions
            results.append((atoms.get_potential_energy(), atoms.get_forces(), atoms.get_potential_energies()))
        (e0, f0, n0), (e1, f1, n1) = results
        assert np.linalg.norm(f0) > 1e-4
        assert e1 == pytest.approx(e0, rel=1e-12, abs=1e-13)
        np.testing.assert_allclose(f1, f0, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(n1, n0, rtol=1e-10, atol=1e-13)
    assert builds.count(3.0) == len(steps)  # skin 0: a new list every call
    assert builds.count(3.5) == 2  # skin 0.5: the first list, then one rebuild after the big move


def test_hessian_matches_force_differences(kind, molecules, deployed):
    atoms = attach(molecules["ethanol"], MLPotCalculator(deployed(kind)))
    hessian = atoms.calc.get_hessian(atoms)
    n = 3 * len(atoms)
    assert hessian.shape == (n, n) and hessian.dtype == np.float64
    assert np.abs(hessian).max() > 1e-4
    np.testing.assert_allclose(hessian, hessian.T, rtol=0, atol=1e-10 * np.abs(hessian).max())
    numerical = -five_point_derivative(lambda x: moved(atoms, x).get_forces().reshape(-1),
                                       atoms.positions.reshape(-1), h=1e-3)
    np.testing.assert_allclose(hessian, numerical, rtol=0, atol=1e-8 * np.abs(hessian).max())


def test_periodic_cell_energy_is_extensive(kind, deployed):
    # ethanol in a 6 Å box: with a 5 Å cutoff it interacts with its own images
    import ase.build

    cell = ase.build.molecule("CH3CH2OH")
    cell.positions += np.random.default_rng(2).uniform(-0.05, 0.05, cell.positions.shape)
    cell.set_cell([6.0, 6.5, 7.0])
    cell.center()
    cell.set_pbc(True)
    calc_path = deployed(kind)
    energy = attach(cell, MLPotCalculator(calc_path, check_pbc=False)).get_potential_energy()
    isolated = attach(cell, MLPotCalculator(calc_path))
    isolated.set_pbc(False)
    assert abs(energy - isolated.get_potential_energy()) > 1e-6  # the images matter
    supercell = attach(cell.repeat((2, 1, 1)), MLPotCalculator(calc_path, check_pbc=False))
    assert supercell.get_potential_energy() == pytest.approx(2 * energy, rel=1e-10)
    forces = attach(cell, MLPotCalculator(calc_path, check_pbc=False)).get_forces()
    np.testing.assert_allclose(supercell.get_forces(), np.concatenate([forces, forces]), rtol=0, atol=1e-10)


def test_kind_specific_calculators(deployed):
    assert EGNNCalculator(deployed("egnn")).metadata["kind"] == "egnn"
    assert GNNCalculator(deployed("schnet")).metadata["kind"] == "schnet"
    assert GNNCalculator(deployed("gcn")).metadata["kind"] == "gcn"
    with pytest.raises(ValueError, match=r"EGNNCalculator needs a model of kind egnn.*'schnet' model"):
        EGNNCalculator(deployed("schnet"))
    with pytest.raises(ValueError, match=r"GNNCalculator needs a model of kind gcn or schnet.*'egnn' model"):
        GNNCalculator(deployed("egnn"))
    for kind in KINDS:
        assert MLPotCalculator(deployed(kind)).metadata["kind"] == kind


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_element_is_named(kind, molecules, deployed):
    atoms = molecules["ethanol"].copy()
    atoms.numbers[2] = 16  # the oxygen becomes a sulfur
    atoms.calc = MLPotCalculator(deployed(kind))
    with pytest.raises(ValueError, match=r"element\(s\) S not supported by this model; it knows H, C, O"):
        atoms.get_potential_energy()
    with pytest.raises(ValueError, match=r"element\(s\) S not supported"):
        atoms.calc.get_hessian(atoms)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_positions(bad, molecules, deployed):
    atoms = attach(molecules["ethanol"], MLPotCalculator(deployed("schnet")))
    atoms.positions[3, 1] = bad
    with pytest.raises(ValueError, match=r"positions contain NaN or inf \(atoms \[3\]\)"):
        atoms.get_forces()


def test_atoms_too_close(molecules, deployed):
    atoms = attach(molecules["ethanol"], MLPotCalculator(deployed("schnet")))
    atoms.positions[5] = atoms.positions[1] + [0.3, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"atoms 1 and 5 are 0.300 Å apart, closer than 0.5 Å"):
        atoms.get_potential_energy()
    # the threshold is a parameter: C-H bonds (~1.1 Å) are too short for 1.2 Å
    strict = attach(molecules["ethanol"], MLPotCalculator(deployed("schnet"), min_distance=1.2))
    with pytest.raises(ValueError, match="closer than 1.2 Å"):
        strict.get_potential_energy()


def test_random_bytes_are_not_a_model(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="is not an mlpot model file"):
        MLPotCalculator(path)


def test_plain_torchscript_is_not_a_model(tmp_path):
    path = tmp_path / "linear.pt"
    with quiet_torchscript():
        torch.jit.save(torch.jit.script(torch.nn.Linear(3, 1)), str(path))
    with pytest.raises(ValueError, match=r"TorchScript file but not an mlpot model \(no mlpot.json metadata\)"):
        MLPotCalculator(path)


def test_future_format_version_is_refused(tmp_path):
    potential = make_tiny_potential("schnet", torch.float64)
    meta = export.metadata_of(potential)
    meta["format_version"] = 99
    path = tmp_path / "future.pt"
    with quiet_torchscript():
        torch.jit.save(export.compile_potential(potential), str(path), _extra_files={"mlpot.json": json.dumps(meta)})
    with pytest.raises(ValueError, match=r"model format version 99, newer than this mlpot.*upgrade mlpot"):
        MLPotCalculator(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model file"):
        MLPotCalculator(tmp_path / "missing.pt")


def test_bad_dtype_argument(deployed):
    with pytest.raises(ValueError, match="dtype must be one of"):
        MLPotCalculator(deployed("schnet"), dtype="float16")


def test_load_calculator_one_file_or_a_committee(molecules, deployed):
    single = load_calculator(deployed("schnet"), dtype="float32")
    assert type(single) is MLPotCalculator and single.dtype == torch.float32
    own = load_calculator([deployed("gcn", torch.float32)], dtype=None)  # a one-file list is that file
    assert type(own) is MLPotCalculator and own.dtype == torch.float32
    committee = load_calculator([deployed("schnet"), deployed("gcn")])
    assert type(committee) is CommitteeCalculator and committee.dtype == torch.float64
    atoms = attach(molecules["ethanol"], committee)
    members = [attach(molecules["ethanol"], MLPotCalculator(deployed(k))).get_potential_energy() for k in ("schnet", "gcn")]
    assert atoms.get_potential_energy() == pytest.approx(np.mean(members), rel=1e-12)
