"""Warnings when a structure leaves the training data's range: a stretched bond, positions in bohr, a
molecule the model never saw, a committee that disagrees; once per calculator, naming the atoms; silent
in range and for files deployed before the ranges were recorded."""

import warnings
from types import SimpleNamespace

import ase.build
import numpy as np
import pytest
import torch
from ase import units

from mlpot import export
from mlpot.calculators import CommitteeCalculator, MLPotCalculator
from mlpot.data.datasets import read_frames
from mlpot.data.statistics import composition, fit_statistics, min_pair_distances, training_ranges
from mlpot.train import loop

from robustness_helpers import tiny_potential, write_sgdml_npz


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    return read_frames(write_sgdml_npz(tmp_path_factory.mktemp("data") / "train.npz", 20, 0))


@pytest.fixture(scope="module")
def models(frames, tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    ranges = {"min_pair_distances": min_pair_distances(frames), **training_ranges(frames)}
    files = SimpleNamespace(old=folder / "old.pt", new=folder / "new.pt", other=folder / "other.pt")
    export.save(tiny_potential("schnet"), files.old, min_pair_distances=ranges["min_pair_distances"])
    export.save(tiny_potential("schnet"), files.new, **ranges)
    export.save(tiny_potential("schnet", seed=1), files.other, **ranges)
    return files


H = 6  # the first H bonded to the C 0 in ASE's ethanol


def out_of_range_warnings(calc, *structures):
    """The RuntimeWarnings of energy calls on ``structures``, in order."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for atoms in structures:
            atoms.calc = calc
            atoms.get_potential_energy()
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def ethanol(stretch=0.0, scale=1.0):
    """Ethanol with the bond of its first H to atom 0 (a C) ``stretch`` Å longer, positions times ``scale``."""
    atoms = ase.build.molecule("CH3CH2OH")
    c = 0
    h = next(i for i, a in enumerate(atoms) if a.symbol == "H" and atoms.get_distance(i, c) < 1.2)
    assert (h, atoms[c].symbol) == (H, "C")
    atoms.positions[h] += stretch * (atoms.positions[h] - atoms.positions[c]) / atoms.get_distance(h, c)
    atoms.positions *= scale
    return atoms


def test_training_ranges_are_a_function_of_the_frames(frames):
    ranges = training_ranges(frames)
    assert ranges["training_compositions"] == ["C2H6O"]
    assert set(ranges["max_nearest_distances"]) == {"1", "6", "8"}
    # an H's nearest neighbour is its C or O: about 1 Å in displaced ethanol (0.05 Å noise)
    assert 1.0 < ranges["max_nearest_distances"]["1"] < 1.4
    assert training_ranges(frames.subset(range(5)))["max_nearest_distances"]["1"] <= ranges["max_nearest_distances"]["1"]
    assert ranges.items() <= fit_statistics(frames, [1, 6, 8], 5.0).items()
    assert composition([14, 8, 8], periodic=True) == "O,Si" and composition([8, 1, 1], periodic=False) == "H2O"


def test_in_range_is_silent_and_old_files_never_warn(models):
    assert out_of_range_warnings(MLPotCalculator(models.new), ethanol(), ethanol(stretch=0.02)) == []
    old = out_of_range_warnings(MLPotCalculator(models.old), ethanol(stretch=0.6), ethanol(scale=1 / units.Bohr),
                                ase.build.molecule("H2O2"))
    assert old == []


def test_a_stretched_bond_warns_once_naming_the_atom(models):
    calc = MLPotCalculator(models.new)
    got = out_of_range_warnings(calc, ethanol(), ethanol(stretch=0.6), ethanol(stretch=0.8))
    assert len(got) == 1, got
    assert got[0].startswith("atom 6 (H) is 1.69") and "farther than any H atom in the training data" in got[0]
    assert got[0].endswith("the model is extrapolating (warned once)")
    assert out_of_range_warnings(MLPotCalculator(models.new, warn_out_of_range=False), ethanol(stretch=0.6)) == []


def test_positions_in_bohr_warn(models):
    got = out_of_range_warnings(MLPotCalculator(models.new), ethanol(scale=1 / units.Bohr))
    assert len(got) == 1 and "positions not in Å?" in got[0], got


def test_a_molecule_never_seen_warns_for_its_composition_and_its_pairs(models):
    got = out_of_range_warnings(MLPotCalculator(models.new), ase.build.molecule("H2O2"))
    assert any(m.startswith("the structure (H2O2, atoms 0-3) has a composition the training data never had (C2H6O)")
               for m in got), got
    assert any(m.startswith("atoms 0 and 1 are a O-O pair within the cutoff, an element pair the training data never had")
               for m in got), got
    methanol = out_of_range_warnings(MLPotCalculator(models.new), ase.build.molecule("CH3OH"))
    assert [m.split(" has")[0] for m in methanol] == ["the structure (CH4O, atoms 0-5)"]


def test_committee_spread_above_threshold_warns_once(models):
    calc = CommitteeCalculator([models.new, models.other], max_force_std=1e-9, warn_out_of_range=False)
    got = out_of_range_warnings(calc, ethanol(), ethanol(stretch=0.1))
    assert len(got) == 1 and got[0].startswith("the committee's force spread on atom ") and "above max_force_std" in got[0]
    assert out_of_range_warnings(CommitteeCalculator([models.new, models.other], max_force_std=1e6), ethanol()) == []


def test_deploy_records_the_ranges(frames, tmp_path):
    torch.save({"statistics": fit_statistics(frames, [1, 6, 8], 5.0)}, tmp_path / "last.pt")
    cfg = SimpleNamespace(run_dir=str(tmp_path), data=SimpleNamespace(dataset="train.npz"))
    meta = export.read_metadata(loop.deploy(cfg, tiny_potential("gcn"), {}))
    assert meta["training_compositions"] == ["C2H6O"]
    assert meta["max_nearest_distances"] == training_ranges(frames)["max_nearest_distances"]
