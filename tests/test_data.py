"""Tests for mlpot.units and mlpot.data.datasets (readers, named datasets, downloads, splits)."""

import hashlib
import zipfile
from pathlib import Path

import ase
import ase.io
import ase.units
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator

from mlpot.data import datasets
from mlpot.data.datasets import (
    Frames,
    block_split,
    dataset_path,
    load_dataset,
    read_frames,
    split_indices,
)
from mlpot.units import EV_TO_MEV, KCAL_PER_MOL_TO_EV

KCAL = KCAL_PER_MOL_TO_EV


@pytest.fixture(autouse=True)
def no_network_and_private_cache(tmp_path, monkeypatch):
    """Points downloads at a missing local folder and the cache at a temporary folder."""
    missing = (tmp_path / "no-such-server").as_uri() + "/"
    monkeypatch.setattr(datasets, "DOWNLOAD_URLS", {"sgdml": missing, "rmd17": missing})
    monkeypatch.setenv("MLPOT_CACHE_DIR", str(tmp_path / "default-cache"))
    monkeypatch.delenv("MLPOT_DATA_DIR", raising=False)


@pytest.fixture(scope="module")
def real_data_dir(data_dir):
    """The shared reference data folder (the ``data_dir`` fixture of conftest.py)."""
    return data_dir


def fake_md17(n_frames=4, numbers=(6, 1, 1, 8), seed=0):
    """Random MD17-like arrays in kcal/mol: (z, R, E, F)."""
    rng = np.random.default_rng(seed)
    z = np.array(numbers, dtype=np.uint8)
    r = rng.normal(size=(n_frames, len(z), 3))
    e = -1000.0 + rng.normal(size=n_frames)
    f = rng.normal(size=(n_frames, len(z), 3)) * 30.0
    return z, r, e, f


def write_sgdml(path, z, r, e, f, **extra):
    np.savez(path, E=e.reshape(-1, 1), F=f, R=r, z=z, **extra)
    return path


def write_rmd17(path, z, r, e, f):
    np.savez(path, nuclear_charges=z, coords=r, energies=e, forces=f)
    return path


def sha256_of(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- units


def test_kcal_per_mol_factor_matches_exact_si_value_and_ase():
    assert KCAL == pytest.approx(0.0433641042418, rel=1e-11)
    assert KCAL == pytest.approx(ase.units.kcal / ase.units.mol, rel=1e-7)
    assert EV_TO_MEV == 1000.0


# --------------------------------------------------------------------------- real files


def test_aspirin_ccsd_train_shapes_and_units(real_data_dir):
    frames = load_dataset("aspirin_ccsd", "train", data_dir=real_data_dir, download=False)
    assert len(frames) == 1000
    assert all(z.shape == (21,) and z.dtype == np.int64 for z in frames.numbers)
    assert all(r.shape == (21, 3) and f.shape == (21, 3) for r, f in zip(frames.positions, frames.forces))
    assert frames.energy.dtype == np.float64 and frames.energy.shape == (1000,)
    assert frames.energy[0] == pytest.approx(-405681.58781031 * KCAL, rel=1e-12)
    assert sorted(set(frames.numbers[0].tolist())) == [1, 6, 8]
    force_rms = np.sqrt(np.mean(np.concatenate(frames.forces) ** 2))
    assert 0.5 < force_rms < 3.0  # about 30 kcal/mol/Å
    assert Path(frames.source).name == "aspirin_ccsd-train.npz"


def test_toluene_ccsd_t_test_has_501_frames(real_data_dir):
    frames = load_dataset("toluene_ccsd_t", "test", data_dir=real_data_dir, download=False)
    assert len(frames) == 501
    assert frames.positions[0].shape == (15, 3)
    assert -169810 * KCAL < frames.energy.min() < frames.energy.max() < -169770 * KCAL


def test_named_datasets_from_env_var(real_data_dir, monkeypatch):
    monkeypatch.setenv("MLPOT_DATA_DIR", str(real_data_dir))
    path = dataset_path("rmd17_ethanol", "train", index=1, download=False)
    assert path.name == "rmd17_ethanol_train_01.npz"
    frames = load_dataset("rmd17_ethanol", "train", download=False)
    assert len(frames) == 1000 and frames.positions[0].shape == (9, 3)
    assert frames.energy.mean() == pytest.approx(-97076.3 * KCAL, abs=0.1 * KCAL)
    raw = np.load(path)
    np.testing.assert_allclose(frames.forces[7], raw["forces"][7] * KCAL, rtol=1e-15)
    np.testing.assert_array_equal(frames.positions[7], raw["coords"][7])


@pytest.mark.parametrize(
    "name, split, n_frames, n_atoms, max_force_sum",
    [
        ("aspirin_ccsd", "train", 1000, 21, 1e-6),
        ("toluene_ccsd_t", "test", 501, 15, 1e-5),
        ("rmd17_ethanol", "train", 1000, 9, 1e-6),
        ("ethanol_gfn2xtb", "train", 1500, 9, 1e-9),
        ("ethanol_gfn2xtb", "test", 1000, 9, 1e-9),
        ("md17_ethanol_dft", None, 2000, 9, 0.3 * KCAL),
        ("ethanol_pbe_def2svp", "all", 501, 9, 0.15 * KCAL),
    ],
)
def test_real_files_shapes_and_force_sums(real_data_dir, name, split, n_frames, n_atoms, max_force_sum):
    frames = load_dataset(name, split, data_dir=real_data_dir, download=False)
    assert len(frames) == n_frames
    assert {len(z) for z in frames.numbers} == {n_atoms}
    force_sums = np.array([np.linalg.norm(f.sum(axis=0)) for f in frames.forces])
    assert force_sums.max() < max_force_sum
    force_rms = np.sqrt(np.mean(np.concatenate(frames.forces) ** 2))
    assert 0.1 < force_rms < 5.0  # eV/Å, not kcal/mol/Å


def test_md17_dft_first_frames_match_file(real_data_dir):
    frames = load_dataset("md17_ethanol_dft", data_dir=real_data_dir, download=False)
    raw = np.load(dataset_path("md17_ethanol_dft", data_dir=real_data_dir, download=False))
    np.testing.assert_allclose(frames.energy, raw["E"][:, 0] * KCAL, rtol=1e-15)
    assert frames.numbers[0].tolist() == [6, 6, 8, 1, 1, 1, 1, 1, 1]


# --------------------------------------------------------------------------- layouts round trip


def test_sgdml_npz_round_trip(tmp_path):
    z, r, e, f = fake_md17()
    path = write_sgdml(tmp_path / "mol-train.npz", z, r, e, f, name=np.array("mol"), theory=np.array("x"))
    frames = read_frames(path)
    assert frames.name == "mol-train" and frames.source == str(path)
    np.testing.assert_allclose(frames.energy, e * KCAL, rtol=1e-15)
    for i in range(len(e)):
        np.testing.assert_array_equal(frames.numbers[i], z.astype(np.int64))
        np.testing.assert_array_equal(frames.positions[i], r[i])
        np.testing.assert_allclose(frames.forces[i], f[i] * KCAL, rtol=1e-15)


def test_sgdml_npz_with_flat_energies(tmp_path):
    z, r, e, f = fake_md17()
    path = tmp_path / "flat.npz"
    np.savez(path, E=e, F=f, R=r, z=z)
    np.testing.assert_allclose(read_frames(path, name="x").energy, e * KCAL, rtol=1e-15)


def test_rmd17_npz_round_trip(tmp_path):
    z, r, e, f = fake_md17(seed=1)
    frames = read_frames(write_rmd17(tmp_path / "r.npz", z, r, e, f), name="custom")
    assert frames.name == "custom"
    np.testing.assert_allclose(frames.energy, e * KCAL, rtol=1e-15)
    np.testing.assert_allclose(frames.forces[2], f[2] * KCAL, rtol=1e-15)
    np.testing.assert_array_equal(frames.positions[3], r[3])


def test_extxyz_round_trip_keeps_ev_units(tmp_path):
    rng = np.random.default_rng(2)
    images = []
    for n in (3, 5):  # frames of different sizes
        atoms = ase.Atoms(numbers=rng.integers(1, 9, size=n), positions=rng.normal(size=(n, 3)))
        atoms.calc = SinglePointCalculator(atoms, energy=float(rng.normal()), forces=rng.normal(size=(n, 3)))
        images.append(atoms)
    path = tmp_path / "mixed.extxyz"
    ase.io.write(path, images, format="extxyz")
    frames = read_frames(path)
    assert len(frames) == 2
    for i, atoms in enumerate(images):
        assert frames.energy[i] == pytest.approx(atoms.get_potential_energy(), abs=1e-8)
        # extxyz writes arrays as %16.8f: rounding to 8 decimals leaves at most 5e-9
        np.testing.assert_allclose(frames.forces[i], atoms.get_forces(), rtol=0, atol=6e-9)
        np.testing.assert_allclose(frames.positions[i], atoms.positions, rtol=0, atol=6e-9)
        np.testing.assert_array_equal(frames.numbers[i], atoms.numbers)


def test_to_atoms_and_subset(tmp_path):
    z, r, e, f = fake_md17()
    frames = read_frames(write_sgdml(tmp_path / "a.npz", z, r, e, f))
    atoms = frames.to_atoms(2)
    assert atoms.get_potential_energy() == pytest.approx(e[2] * KCAL, rel=1e-15)
    np.testing.assert_allclose(atoms.get_forces(), f[2] * KCAL, rtol=1e-15)
    np.testing.assert_array_equal(atoms.positions, r[2])
    part = frames.subset(np.array([3, 0]))
    assert len(part) == 2
    np.testing.assert_allclose(part.energy, frames.energy[[3, 0]])
    np.testing.assert_array_equal(part.positions[0], r[3])
    assert part.source == frames.source
    assert len(frames.subset([1])) == 1


# --------------------------------------------------------------------------- bad input


def test_missing_sgdml_key_names_missing_and_found_keys(tmp_path):
    z, r, e, f = fake_md17()
    path = tmp_path / "nof.npz"
    np.savez(path, E=e, R=r, z=z)
    with pytest.raises(ValueError, match="missing keys") as info:
        read_frames(path)
    message = str(info.value)
    assert "['F']" in message and "'R'" in message and str(path) in message


def test_missing_rmd17_key(tmp_path):
    z, r, e, f = fake_md17()
    path = tmp_path / "noforces.npz"
    np.savez(path, nuclear_charges=z, coords=r, energies=e)
    with pytest.raises(ValueError, match=r"missing keys \['forces'\]"):
        read_frames(path)


def test_npz_with_unrelated_keys(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, foo=np.zeros(3), bar=np.ones(2))
    with pytest.raises(ValueError, match="not an MD17/rMD17 npz") as info:
        read_frames(path)
    assert "bar" in str(info.value) and "foo" in str(info.value)


@pytest.mark.parametrize("label, key, frame", [("energies", "E", 2), ("forces", "F", 1), ("positions", "R", 3)])
def test_nan_label_names_kind_frame_and_file(tmp_path, label, key, frame):
    z, r, e, f = fake_md17()
    arrays = {"E": e.copy(), "F": f.copy(), "R": r.copy()}
    arrays[key][frame] = np.nan
    path = write_sgdml(tmp_path / "nan.npz", z, arrays["R"], arrays["E"], arrays["F"])
    with pytest.raises(ValueError) as info:
        read_frames(path)
    assert str(info.value) == f"NaN in {label} of frame {frame} in {path}"


def test_infinite_energy(tmp_path):
    z, r, e, f = fake_md17()
    e[1] = np.inf
    with pytest.raises(ValueError, match="infinite value in energies of frame 1"):
        read_frames(write_rmd17(tmp_path / "inf.npz", z, r, e, f))


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda z, r, e, f: (z, r, e, f[:, :, :2]), "forces have shape"),
        (lambda z, r, e, f: (z[:3], r, e, f), "positions have shape"),
        (lambda z, r, e, f: (z, r, e[:-1], f), "energies have shape"),
        (lambda z, r, e, f: (z.reshape(2, 2), r, e, f), "atomic numbers have shape"),
        (lambda z, r, e, f: (z * 0, r, e, f), "atomic numbers"),
    ],
)
def test_wrong_shapes_and_values(tmp_path, change, expected):
    z, r, e, f = change(*fake_md17())
    path = write_sgdml(tmp_path / "bad.npz", z, r, e, f)
    with pytest.raises(ValueError, match=expected) as info:
        read_frames(path)
    assert str(path) in str(info.value)


def test_garbage_files(tmp_path):
    junk = tmp_path / "junk.dat"
    junk.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="not an MD17/rMD17 npz or an ASE-readable file with energy and forces"):
        read_frames(junk)
    fake_npz = tmp_path / "fake.npz"
    fake_npz.write_text("hello")
    with pytest.raises(ValueError, match="not an MD17/rMD17 npz"):
        read_frames(fake_npz)


def test_xyz_without_labels_is_rejected(tmp_path):
    path = tmp_path / "plain.xyz"
    ase.io.write(path, ase.Atoms("H2O", positions=np.eye(3)), format="xyz")
    with pytest.raises(ValueError, match="frame 0 has no .energy.; it has info keys"):
        read_frames(path)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nothing-here.npz"):
        read_frames("nothing-here.npz")


def test_frames_validation_direct():
    z = np.array([1, 1])
    r = np.zeros((2, 3))
    with pytest.raises(ValueError, match="1 frames of forces but 2 energies in src.npz"):
        Frames([z, z], [r, r], np.zeros(2), [r], name="x", source="src.npz")
    with pytest.raises(ValueError, match="forces of frame 1 have shape"):
        Frames([z, z], [r, r], np.zeros(2), [r, np.zeros((3, 3))], source="src.npz")


# --------------------------------------------------------------------------- named datasets


def test_resolution_searches_subfolders(tmp_path):
    data = tmp_path / "data"
    (data / "a" / "b").mkdir(parents=True)
    (data / "rmd").mkdir()
    z, r, e, f = fake_md17()
    target = write_sgdml(data / "a" / "b" / "toluene_ccsd_t-test.npz", z, r, e, f)
    write_rmd17(data / "rmd" / "rmd17_uracil_test_03.npz", z, r, e + 1.0, f)
    assert dataset_path("toluene_ccsd_t", "test", data_dir=data) == target
    frames = load_dataset("toluene_ccsd_t", "test", data_dir=data)
    np.testing.assert_allclose(frames.energy, e * KCAL, rtol=1e-15)
    frames = load_dataset("rmd17_uracil", "test", index=3, data_dir=data)
    np.testing.assert_allclose(frames.energy, (e + 1.0) * KCAL, rtol=1e-15)


def test_load_dataset_accepts_a_path(tmp_path):
    z, r, e, f = fake_md17()
    path = write_rmd17(tmp_path / "anything.npz", z, r, e, f)
    assert len(load_dataset(path)) == len(e)
    assert len(load_dataset(str(path))) == len(e)


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown dataset 'water'") as info:
        load_dataset("water")
    assert "aspirin_ccsd" in str(info.value) and "rmd17_ethanol" in str(info.value)


def test_bad_split_and_index():
    with pytest.raises(ValueError, match="split"):
        dataset_path("aspirin_ccsd", "valid")
    with pytest.raises(ValueError, match="1..5"):
        dataset_path("rmd17_ethanol", "train", index=6)
    with pytest.raises(ValueError, match="one file"):
        dataset_path("md17_ethanol_dft", "test")


def test_local_only_file_not_found_message(tmp_path):
    data = tmp_path / "empty"
    data.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("aspirin_gfn2xtb", "test", data_dir=data, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "aspirin_gfn2xtb-test.npz" in message
    assert str(data) in message and str(tmp_path / "cache") in message
    assert "MLPOT_DATA_DIR" in message and "local-only" in message
    assert not (tmp_path / "cache").exists()


def test_no_checksum_means_no_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="benzene_ccsd_t-train.npz.*local-only"):
        load_dataset("benzene_ccsd_t", data_dir=tmp_path, cache_dir=tmp_path / "cache")


def test_download_disabled_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=False"):
        load_dataset("rmd17_ethanol", "test", data_dir=tmp_path, cache_dir=tmp_path / "c", download=False)


def test_failed_download_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="download from .* failed"):
        load_dataset("rmd17_ethanol", "test", cache_dir=tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []


def testdefault_cache_dir_from_env(tmp_path, monkeypatch):
    cache = tmp_path / "env-cache"
    cache.mkdir()
    z, r, e, f = fake_md17()
    write_sgdml(cache / "ethanol_gfn2xtb-train.npz", z, r, e, f)
    monkeypatch.setenv("MLPOT_CACHE_DIR", str(cache))
    assert dataset_path("ethanol_gfn2xtb") == cache / "ethanol_gfn2xtb-train.npz"


# --------------------------------------------------------------------------- downloads (file:// URLs)


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A local folder served through file:// URLs in place of the real download sites."""
    folder = tmp_path / "server"
    folder.mkdir()
    url = folder.as_uri() + "/"
    monkeypatch.setattr(datasets, "DOWNLOAD_URLS", {"sgdml": url, "rmd17": url})
    return folder


def test_rmd17_download_lands_in_cache(tmp_path, server, monkeypatch):
    z, r, e, f = fake_md17()
    source = write_rmd17(server / "rmd17_toluene_test_04.npz", z, r, e, f)
    monkeypatch.setitem(datasets.RMD17_SHA256, source.name, sha256_of(source))
    cache = tmp_path / "cache"
    frames = load_dataset("rmd17_toluene", "test", index=4, data_dir=tmp_path / "nowhere", cache_dir=cache)
    np.testing.assert_allclose(frames.energy, e * KCAL, rtol=1e-15)
    assert sorted(p.name for p in cache.iterdir()) == [source.name]
    source.unlink()  # second call must use the cache
    assert dataset_path("rmd17_toluene", "test", index=4, cache_dir=cache) == cache / source.name


def test_rmd17_download_wrong_checksum_leaves_nothing(tmp_path, server, monkeypatch):
    z, r, e, f = fake_md17()
    source = write_rmd17(server / "rmd17_ethanol_train_02.npz", z, r, e, f)
    monkeypatch.setitem(datasets.RMD17_SHA256, source.name, "0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="sha256 checksum mismatch"):
        load_dataset("rmd17_ethanol", "train", index=2, cache_dir=cache)
    assert list(cache.iterdir()) == []


def make_sgdml_zip(server, name):
    arrays = {}
    with zipfile.ZipFile(server / f"{name}.zip", "w") as archive:
        for split, seed in (("train", 3), ("test", 4)):
            z, r, e, f = fake_md17(seed=seed)
            member = write_sgdml(server / f"{name}-{split}.npz", z, r, e, f)
            archive.write(member, arcname=f"{name}/{member.name}")
            member.unlink()
            arrays[split] = e
    return server / f"{name}.zip", arrays


def test_sgdml_zip_download_extracts_members(tmp_path, server, monkeypatch):
    archive, energies = make_sgdml_zip(server, "ethanol_ccsd_t")
    monkeypatch.setitem(datasets.SGDML_ZIP_SHA256, "ethanol_ccsd_t", sha256_of(archive))
    cache = tmp_path / "cache"
    frames = load_dataset("ethanol_ccsd_t", "test", cache_dir=cache)
    np.testing.assert_allclose(frames.energy, energies["test"] * KCAL, rtol=1e-15)
    assert sorted(p.name for p in cache.iterdir()) == ["ethanol_ccsd_t-test.npz", "ethanol_ccsd_t-train.npz"]
    archive.unlink()
    train = load_dataset("ethanol_ccsd_t", "train", cache_dir=cache)
    np.testing.assert_allclose(train.energy, energies["train"] * KCAL, rtol=1e-15)


def test_sgdml_zip_wrong_checksum_leaves_nothing(tmp_path, server, monkeypatch):
    make_sgdml_zip(server, "aspirin_ccsd")
    monkeypatch.setitem(datasets.SGDML_ZIP_SHA256, "aspirin_ccsd", "f" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="expected f{64}"):
        load_dataset("aspirin_ccsd", "train", cache_dir=cache)
    assert list(cache.iterdir()) == []


# --------------------------------------------------------------------------- splits


def test_split_indices_disjoint_and_reproducible():
    sets = split_indices(100, (50, 20, 10), seed=7)
    assert [len(s) for s in sets] == [50, 20, 10]
    joined = np.concatenate(sets)
    assert len(np.unique(joined)) == 80 and joined.min() >= 0 and joined.max() < 100
    again = split_indices(100, (50, 20, 10), seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(sets, again))
    other = split_indices(100, (50, 20, 10), seed=8)
    assert not np.array_equal(sets[0], other[0])
    with pytest.raises(ValueError):
        split_indices(10, (6, 5), seed=0)


def test_block_split_contiguous():
    train, test = block_split(100, (60, 30), gap=5)
    np.testing.assert_array_equal(train, np.arange(60))
    np.testing.assert_array_equal(test, np.arange(65, 95))
    with pytest.raises(ValueError):
        block_split(100, (60, 40), gap=1)


# --------------------------------------------------------------------------- file sniffing, data and cache folders


def test_data_format_goes_by_content_not_name(tmp_path):
    z, r, e, f = fake_md17()
    archive = write_sgdml(tmp_path / "frames.npz", z, r, e, f).rename(tmp_path / "frames.dat")
    assert datasets.data_format(archive) == "npz"
    np.testing.assert_allclose(read_frames(archive).energy, e * KCAL, rtol=1e-15)
    xyz = tmp_path / "frames.xyz"
    ase.io.write(xyz, ase.Atoms("H2", positions=[[0, 0, 0], [0.74, 0, 0]]), format="extxyz")
    assert datasets.data_format(xyz) == "ase"
    not_an_archive = tmp_path / "text.npz"
    not_an_archive.write_text("hello")
    with pytest.raises(ValueError, match="has the .npz suffix but is not a valid npz archive"):
        datasets.data_format(not_an_archive)


def test_workflows_read_an_npz_by_content(tmp_path):
    from mlpot.workflows import analysis

    z, r, e, f = fake_md17()
    archive = write_rmd17(tmp_path / "frames.npz", z, r, e, f).rename(tmp_path / "frames.bin")
    atoms = analysis.load_structure(str(archive))
    np.testing.assert_array_equal(atoms.numbers, z)
    np.testing.assert_array_equal(atoms.positions, r[0])
    np.testing.assert_array_equal(analysis.load_ensemble(str(archive)).positions, r)


def test_default_data_and_cache_dirs(tmp_path, monkeypatch):
    assert datasets.default_data_dir() is None  # the autouse fixture unset $MLPOT_DATA_DIR
    monkeypatch.setenv("MLPOT_DATA_DIR", str(tmp_path / "env-data"))
    assert datasets.default_data_dir() == tmp_path / "env-data"
    assert datasets.default_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert datasets.default_data_dir("") is None  # never the current folder
    assert datasets.default_cache_dir() == tmp_path / "default-cache"  # $MLPOT_CACHE_DIR from the fixture
    assert datasets.default_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("MLPOT_CACHE_DIR")
    assert datasets.default_cache_dir() == Path.home() / ".cache" / "mlpot"


# --------------------------------------------------------------------------- molecule -> dataset registry


def test_registry_names_known_datasets_and_keeps_todays_choices():
    from mlpot.data import registry

    choices = {name: (entry.reference, entry.study) for name, entry in registry.MOLECULES.items()}
    # the datasets each caller used before the registry existed: changing one changes published numbers
    assert choices == {
        "ethanol": ("rmd17_ethanol", "rmd17_ethanol"),
        "toluene": ("toluene_ccsd_t", "rmd17_toluene"),
        "aspirin": ("aspirin_ccsd", "rmd17_aspirin"),
    }
    known = set(datasets.known_datasets())
    for name, entry in registry.MOLECULES.items():
        assert {entry.reference, entry.study} <= known
        assert entry.study == f"rmd17_{name}" and entry.reference_level
    assert registry.reference_dataset("toluene") == "toluene_ccsd_t"
    assert registry.study_dataset("toluene") == "rmd17_toluene"
    assert registry.reference_dataset("rmd17_uracil") == registry.study_dataset("rmd17_uracil") == "rmd17_uracil"


def test_workflows_and_studies_resolve_molecules_through_the_registry(tmp_path, monkeypatch):
    """An entry added to the registry alone reaches md, relax, vibrations and the studies: no other copy."""
    from mlpot.data import registry
    from mlpot.study.common import load_frames
    from mlpot.workflows import analysis, md, relax, vibrations

    data = tmp_path / "data"
    data.mkdir()
    reference_train = fake_md17(3, numbers=(8, 1, 1), seed=1)
    reference_test = fake_md17(2, numbers=(8, 1, 1), seed=2)
    study_test = fake_md17(5, numbers=(6, 1, 1, 1, 1), seed=3)
    write_sgdml(data / "ethanol_gfn2xtb-train.npz", *reference_train)
    write_sgdml(data / "ethanol_gfn2xtb-test.npz", *reference_test)
    write_sgdml(data / "toluene_gfn2xtb-test.npz", *study_test)
    entry = registry.MoleculeDatasets(reference="ethanol_gfn2xtb", reference_level="GFN2-xTB", study="toluene_gfn2xtb")
    monkeypatch.setitem(registry.MOLECULES, "testane", entry)

    atoms = analysis.load_structure("testane", data)
    np.testing.assert_array_equal(atoms.numbers, reference_train[0])
    np.testing.assert_array_equal(atoms.positions, reference_train[1][0])
    ensemble = analysis.load_ensemble("testane", data)
    np.testing.assert_array_equal(ensemble.positions, np.concatenate([reference_train[1], reference_test[1]]))
    frames = load_frames("testane", "test", data_dir=data)
    np.testing.assert_array_equal(frames.numbers[0], study_test[0])
    np.testing.assert_allclose(frames.energy, study_test[2] * KCAL, rtol=1e-15)
    assert md._molecule_label("testane") == "testane"  # a molecule name, not a file stem
    assert relax.MOLECULES is vibrations.MOLECULES is md.MOLECULES is registry.MOLECULES


def test_real_toluene_reference_and_study_sets(real_data_dir):
    """Where the two choices differ (toluene): md/relax start from CCSD(T), the studies test on rMD17."""
    from mlpot.study.common import load_frames
    from mlpot.workflows import analysis

    atoms = analysis.load_structure("toluene", real_data_dir)
    ccsd_t = load_dataset("toluene_ccsd_t", "train", data_dir=real_data_dir, download=False)
    np.testing.assert_array_equal(atoms.positions, ccsd_t.positions[0])
    frames = load_frames("toluene", "test", data_dir=real_data_dir)
    rmd17 = load_dataset("rmd17_toluene", "test", data_dir=real_data_dir, download=False)
    np.testing.assert_array_equal(frames.energy, rmd17.energy)
    assert not np.allclose(frames.energy.mean(), ccsd_t.energy.mean(), rtol=1e-4)  # the levels really differ
