"""Deployed model files across dtypes and devices, their version metadata, the close-contact warning,
committees of models and ``mlpot-train --committee``."""

import json
import warnings
import zipfile

import ase.build
import numpy as np
import pytest
import torch
import yaml

import mlpot
from mlpot import export
from mlpot.calculators import CommitteeCalculator, MLPotCalculator
from mlpot.cli import train as train_cli

from robustness_helpers import make_config, perturbed_ethanol, tiny_potential, write_sgdml_npz, write_yaml

KINDS = ("gcn", "schnet", "egnn")
# float32 vs float64 on tiny models of ethanol (|E| ~ 4000 eV, |F| ~ 1 eV/Å)
RTOL_ENERGY_32, ATOL_FORCES_32 = 1e-6, 1e-4


def molecules():
    water = ase.build.molecule("H2O")
    water.positions += [0.02, -0.01, 0.03]
    return [perturbed_ethanol(), water]


def results(path, **kwargs):
    calc = MLPotCalculator(path, **kwargs)
    out = []
    for atoms in molecules():
        atoms.calc = calc
        out.append((atoms.get_potential_energy(), atoms.get_forces()))
    return calc, out


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """``deployed(kind, dtype)``: a tiny model of ``kind`` (same weights for both dtypes) written in ``dtype``."""
    folder = tmp_path_factory.mktemp("deployed")
    cache = {}

    def get(kind, dtype="float64"):
        if (kind, dtype) not in cache:
            path = folder / f"{kind}-{dtype}.pt"
            export.save(tiny_potential(kind).to(getattr(torch, dtype)), path)
            cache[kind, dtype] = path
        return cache[kind, dtype]

    return get


# === dtypes ===
@pytest.mark.parametrize("kind", KINDS)
def test_files_run_in_both_dtypes(kind, deployed):
    """float64 files run in float32 and float64, float32 files in float64 (and their own), all agreeing."""
    runs = {}
    for file_dtype, run_dtype in [("float64", None), ("float64", "float32"), ("float32", "float64"), ("float32", None)]:
        calc, runs[file_dtype, run_dtype] = results(deployed(kind, file_dtype), dtype=run_dtype)
        want_dtype = getattr(torch, run_dtype or file_dtype)
        assert calc.metadata["dtype"] == file_dtype
        assert {t.dtype for t in calc.model.parameters()} | {calc.model.energy_scale.dtype} == {want_dtype}, (file_dtype, run_dtype)
    reference = runs["float64", None]
    for (file_dtype, run_dtype), got in runs.items():
        for (e, f), (e_ref, f_ref) in zip(got, reference):
            assert isinstance(e, float) and f.dtype == np.float64
            assert np.isfinite(e) and np.isfinite(f).all()
            assert e == pytest.approx(e_ref, rel=RTOL_ENERGY_32), (file_dtype, run_dtype)
            np.testing.assert_allclose(f, f_ref, rtol=0, atol=ATOL_FORCES_32, err_msg=f"{file_dtype} run in {run_dtype}")
    # float32 really rounds (the file's float64 weights were converted, not kept)
    assert [e for e, _ in runs["float64", "float32"]] != [e for e, _ in reference]


def test_metadata_records_versions(deployed):
    path = deployed("schnet")
    meta = export.read_metadata(path)
    assert meta["mlpot_version"] == mlpot.__version__
    assert meta["format_version"] == export.FORMAT_VERSION and isinstance(meta["format_version"], int)
    assert meta["torch_version"] == torch.__version__
    assert (meta["kind"], meta["species"], meta["dtype"], meta["periodic"]) == ("schnet", [1, 6, 8], "float64", False)
    with zipfile.ZipFile(path) as archive:  # stored as plain JSON, readable without mlpot
        (name,) = [n for n in archive.namelist() if n.endswith("/extra/mlpot.json")]
        assert json.loads(archive.read(name)) == meta


# === devices ===
def as_if_saved_on_cuda(source, path):
    """A copy of a deployed file whose tensors are recorded as living on cuda:0, as a file written from a
    model on a GPU is (the storage location string in the pickles, 'cpu' -> 'cuda:0')."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        changed = 0
        for info in src.infolist():
            blob = src.read(info.filename)
            if info.filename.endswith(".pkl"):
                changed += blob.count(b"X\x03\x00\x00\x00cpu")
                blob = blob.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            out.writestr(info.filename, blob)
    assert changed >= 1
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="the simulated GPU file would simply load on the GPU")
def test_file_from_another_device_loads_on_cpu(deployed, tmp_path):
    path = as_if_saved_on_cuda(deployed("schnet"), tmp_path / "from-gpu.pt")
    with pytest.raises(Exception, match="CUDA"):  # the simulation is real: without map_location it cannot load
        torch.jit.load(str(path))
    module, _ = export.load(path, device="cpu")
    assert {p.device.type for p in module.parameters()} == {"cpu"}
    _, got = results(path)
    _, want = results(deployed("schnet"))
    for (e, f), (e_ref, f_ref) in zip(got, want):
        assert e == e_ref
        np.testing.assert_array_equal(f, f_ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_round_trip(tmp_path):
    gpu_file = tmp_path / "gpu.pt"
    export.save(tiny_potential("schnet").to("cuda"), gpu_file)
    cpu_file = tmp_path / "cpu.pt"
    export.save(tiny_potential("schnet"), cpu_file)
    _, reference = results(cpu_file)
    for path, device in [(gpu_file, "cpu"), (gpu_file, "cuda"), (cpu_file, "cuda")]:
        calc, got = results(path, device=device)
        assert {p.device.type for p in calc.model.parameters()} == {device}
        for (e, f), (e_ref, f_ref) in zip(got, reference):
            assert e == pytest.approx(e_ref, rel=1e-10)
            np.testing.assert_allclose(f, f_ref, rtol=0, atol=1e-8)


# === close contacts ===
TRAINING_MINIMA = {"1-1": 1.7, "1-6": 1.05, "1-8": 0.95, "6-6": 1.45, "6-8": 1.35}


@pytest.fixture(scope="module")
def with_minima(tmp_path_factory):
    path = tmp_path_factory.mktemp("minima") / "schnet.pt"
    export.save(tiny_potential("schnet"), path, min_pair_distances=TRAINING_MINIMA)
    return path


def hydroxyl_at(atoms, distance):
    """Ethanol (O is atom 2, its H atom 3) with the O-H bond set to ``distance`` Å."""
    bond = atoms.positions[3] - atoms.positions[2]
    atoms.positions[3] = atoms.positions[2] + bond / np.linalg.norm(bond) * distance
    return atoms


def runtime_warnings(atoms):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # count every warning the calculator gives, not Python's once-per-place
        atoms.get_potential_energy()
        atoms.get_forces()
    return [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_close_contact_warns_exactly_once(with_minima):
    atoms = ase.build.molecule("CH3CH2OH")  # every pair at or above the training minima
    atoms.calc = MLPotCalculator(with_minima)
    assert atoms.calc.metadata["min_pair_distances"] == TRAINING_MINIMA
    assert runtime_warnings(atoms) == []
    hydroxyl_at(atoms, 0.85)
    with pytest.warns(RuntimeWarning) as record:
        atoms.get_potential_energy()
    messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "atoms 2 and 3 are 0.850 Å apart, closer than any O-H pair in the training data (0.950 Å)" in messages[0]
    assert "extrapolating" in messages[0]
    # closer still, and a C-H pair too: no second warning from this calculator
    hydroxyl_at(atoms, 0.75)
    atoms.positions[4] = atoms.positions[0] + (atoms.positions[4] - atoms.positions[0]) * 0.85
    assert runtime_warnings(atoms) == []
    assert np.isfinite(atoms.get_potential_energy())


def test_close_contact_warning_can_be_switched_off(with_minima):
    atoms = hydroxyl_at(ase.build.molecule("CH3CH2OH"), 0.8)
    atoms.calc = MLPotCalculator(with_minima, warn_close_contacts=False)
    assert runtime_warnings(atoms) == []
    # the same structure does warn with the default
    atoms.calc = MLPotCalculator(with_minima)
    assert len(runtime_warnings(atoms)) == 1


# === committees ===
@pytest.fixture(scope="module")
def members(tmp_path_factory):
    folder = tmp_path_factory.mktemp("committee")
    paths = []
    for seed in range(3):
        paths.append(folder / f"member-{seed}.pt")
        export.save(tiny_potential("schnet", seed=seed), paths[-1])
    other = folder / "with-nitrogen.pt"
    export.save(tiny_potential("schnet", species=(1, 6, 7, 8)), other)
    return paths, other


def test_committee_mean_and_spread(members):
    paths, _ = members
    atoms = perturbed_ethanol()
    energies, forces = [], []
    for path in paths:
        atoms.calc = MLPotCalculator(path)
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces())
    energies, forces = np.array(energies), np.array(forces)
    assert np.ptp(energies) > 1e-3, "the members should differ"

    atoms.calc = CommitteeCalculator(paths)
    assert atoms.get_potential_energy() == pytest.approx(energies.mean(), rel=0, abs=1e-9)
    np.testing.assert_allclose(atoms.get_forces(), forces.mean(axis=0), rtol=0, atol=1e-12)
    assert atoms.calc.get_property("energy_std", atoms) == pytest.approx(energies.std(), rel=1e-9)
    np.testing.assert_allclose(atoms.calc.get_property("forces_std", atoms), forces.std(axis=0), rtol=1e-9, atol=1e-12)
    assert atoms.calc.results["forces_std"].shape == (len(atoms), 3)
    assert atoms.calc.results["energy_std"] > 0

    # identical members: the member's own numbers and no spread at all
    atoms.calc = CommitteeCalculator([paths[0], paths[0]])
    assert atoms.get_potential_energy() == pytest.approx(energies[0], rel=0, abs=1e-9)
    assert atoms.calc.results["energy_std"] == 0.0
    assert not atoms.calc.results["forces_std"].any()

    # keyword arguments reach every member
    committee = CommitteeCalculator(paths, dtype="float32")
    assert {m.model.energy_scale.dtype for m in committee.members} == {torch.float32}


def test_committee_errors(members):
    paths, other = members
    for models, count in [([], 0), (paths[:1], 1)]:
        with pytest.raises(ValueError, match=rf"a committee needs at least two models, got {count}"):
            CommitteeCalculator(models)
    with pytest.raises(ValueError, match=r"committee members know different elements: \[\(1, 6, 7, 8\), \(1, 6, 8\)\]"):
        CommitteeCalculator([paths[0], other])


def test_train_committee_cli(tmp_path):
    train_file, test_file = write_sgdml_npz(tmp_path / "train.npz", 14, 0), write_sgdml_npz(tmp_path / "test.npz", 4, 1)
    base = tmp_path / "committee"
    config = write_yaml(tmp_path / "config.yaml", make_config(train_file, test_file, base, epochs=2))
    threads = torch.get_num_threads()
    try:
        with pytest.raises(ValueError, match=r"--committee needs K >= 2"):
            train_cli([str(config), "--quiet", "--committee", "1"])
        assert not base.exists()
        train_cli([str(config), "--quiet", "--committee", "2"])

        runs = [base / f"member-{k}" for k in range(2)]
        assert sorted(p.name for p in base.iterdir()) == ["member-0", "member-1"]
        weights = []
        for seed, run in enumerate(runs):
            assert {"config.yaml", "last.pt", "best.pt", "metrics.json", "model.pt"} <= {p.name for p in run.iterdir()}
            saved = yaml.safe_load((run / "config.yaml").read_text())
            assert saved["train"]["seed"] == seed and saved["run_dir"] == str(run)
            assert saved["data"]["seed"] == 0  # the same data split for every member
            weights.append(torch.load(run / "last.pt", weights_only=False)["potential"]["state_dict"])
            assert export.read_metadata(run / "model.pt")["min_pair_distances"]["1-8"] > 0.8
        assert weights[0].keys() == weights[1].keys()
        differ = [k for k in weights[0] if weights[0][k].is_floating_point() and not torch.equal(weights[0][k], weights[1][k])]
        assert differ, "members trained with seeds 0 and 1 ended with the same weights"

        atoms = perturbed_ethanol()
        atoms.calc = CommitteeCalculator([run / "model.pt" for run in runs])
        atoms.get_potential_energy()
        assert atoms.calc.results["energy_std"] > 0

        # a member killed between metrics.json and model.pt is finished by the next call; done members are skipped
        (runs[1] / "model.pt").unlink()
        stamp = (runs[0] / "model.pt").stat().st_mtime_ns
        train_cli([str(config), "--quiet", "--committee", "2"])
        assert (runs[1] / "model.pt").is_file(), "the unfinished member was taken for done"
        assert (runs[0] / "model.pt").stat().st_mtime_ns == stamp
        assert torch.equal(
            torch.load(runs[1] / "last.pt", weights_only=False)["potential"]["state_dict"][next(iter(differ))],
            weights[1][next(iter(differ))],
        )
    finally:
        torch.set_num_threads(threads)
