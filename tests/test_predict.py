"""``mlpot eval MODEL FILE --predict OUT.extxyz``: predictions for structures with or without labels,
equal to the calculator's; stress for periodic cells; committee means and spreads; one-line errors."""

import ase.build
import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator

from mlpot import export
from mlpot.calculators import MLPotCalculator
from mlpot.commands import main

from conftest import make_tiny_potential


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two tiny molecular models and one periodic Cu/Au model (float64), and the structures for them."""
    folder = tmp_path_factory.mktemp("predict")
    paths = {}
    for seed in (0, 1):
        paths[f"mol{seed}"] = folder / f"mol{seed}.pt"
        export.save(make_tiny_potential("egnn", torch.float64, seed=seed), paths[f"mol{seed}"])
    paths["cu"] = folder / "cu.pt"
    export.save(make_tiny_potential("schnet", torch.float64, species=(29, 79), cutoff=3.5), paths["cu"], periodic=True)
    molecules = []
    for i, name in enumerate(["CH3CH2OH", "H2O", "CH4", "CH3OH", "CO2"]):  # several compositions and sizes
        atoms = ase.build.molecule(name)
        atoms.rattle(0.05, seed=i)
        molecules.append(atoms)
    molecules[1].calc = SinglePointCalculator(molecules[1], energy=-1.5)  # a labelled structure among others
    paths["molecules"] = folder / "molecules.extxyz"
    ase.io.write(paths["molecules"], molecules)
    crystals = []
    for seed in range(3):
        atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
        atoms.numbers[::3] = 79
        atoms.rattle(0.1, seed=seed)
        crystals.append(atoms)
    paths["crystals"] = folder / "crystals.extxyz"
    ase.io.write(paths["crystals"], crystals)
    return paths


def run(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def test_predictions_equal_the_calculators_for_unlabelled_molecules(files, tmp_path, capsys):
    out = tmp_path / "pred.extxyz"
    code, err = run(["eval", str(files["mol0"]), str(files["molecules"]), "--predict", str(out), "--batch-size", "2"], capsys)
    assert code == 0, err
    predicted = ase.io.read(out, ":")
    given = ase.io.read(files["molecules"], ":")
    assert len(predicted) == len(given)
    calc = MLPotCalculator(str(files["mol0"]))
    for atoms, pred in zip(given, predicted):
        np.testing.assert_array_equal(pred.numbers, atoms.numbers)
        atoms.calc = calc
        np.testing.assert_allclose(pred.info["mlpot_energy"], atoms.get_potential_energy(), rtol=1e-12)
        np.testing.assert_allclose(pred.arrays["mlpot_forces"], atoms.get_forces(), rtol=1e-9, atol=2e-8)  # extxyz keeps 8 decimals
        np.testing.assert_allclose(pred.arrays["mlpot_energies"], atoms.get_potential_energies(), rtol=1e-9, atol=2e-8)  # extxyz keeps 8 decimals
        assert "mlpot_stress" not in pred.info and "mlpot_energy_std" not in pred.info
    assert predicted[1].get_potential_energy() == -1.5  # the file's own label is kept beside the prediction


def test_periodic_predictions_carry_the_calculators_stress(files, tmp_path, capsys):
    out = tmp_path / "cu.extxyz"
    code, err = run(["eval", str(files["cu"]), str(files["crystals"]), "--predict", str(out)], capsys)
    assert code == 0, err
    calc = MLPotCalculator(str(files["cu"]))
    for atoms, pred in zip(ase.io.read(files["crystals"], ":"), ase.io.read(out, ":")):
        atoms.calc = calc
        np.testing.assert_allclose(pred.info["mlpot_stress"], atoms.get_stress(), rtol=1e-9, atol=2e-8)
        np.testing.assert_allclose(pred.arrays["mlpot_forces"], atoms.get_forces(), rtol=1e-9, atol=2e-8)  # extxyz keeps 8 decimals


def test_committee_predictions_are_the_mean_and_spread_of_the_members(files, tmp_path, capsys):
    out = tmp_path / "committee.extxyz"
    code, err = run(["eval", str(files["mol0"]), str(files["molecules"]), "--predict", str(out),
                     "--committee", str(files["mol1"])], capsys)
    assert code == 0, err
    energies = []
    for model in ("mol0", "mol1"):
        calc = MLPotCalculator(str(files[model]))
        energies.append([calc.get_potential_energy(a) for a in ase.io.read(files["molecules"], ":")])
    energies = np.array(energies)
    predicted = ase.io.read(out, ":")
    np.testing.assert_allclose([p.info["mlpot_energy"] for p in predicted], energies.mean(0), rtol=1e-12)
    np.testing.assert_allclose([p.info["mlpot_energy_std"] for p in predicted], energies.std(0), rtol=1e-6, atol=1e-12)
    assert all(p.info["mlpot_energy_std"] > 0 for p in predicted)  # two different models disagree
    assert all(p.arrays["mlpot_forces_std"].shape == (len(p), 3) for p in predicted)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("suffix", "ending in .extxyz or .xyz"),
        ("element", "holds Cu"),
        ("pbc", "trained on isolated molecules"),
        ("unreadable", "not a structure file ASE can read"),
        ("committee-without-predict", "--committee needs --predict"),
    ],
)
def test_bad_prediction_requests_are_one_line_errors(files, tmp_path, capsys, case, expected):
    model, data, out = str(files["mol0"]), str(files["molecules"]), str(tmp_path / "out.extxyz")
    extra = []
    if case == "suffix":
        out = str(tmp_path / "out.txt")
    elif case == "element":
        ase.io.write(tmp_path / "cu.xyz", ase.build.bulk("Cu", "fcc", a=3.6).repeat(2), format="xyz")
        data = str(tmp_path / "cu.xyz")
    elif case == "pbc":
        atoms = ase.build.molecule("H2O", vacuum=4.0)
        atoms.pbc = True
        ase.io.write(tmp_path / "water.extxyz", atoms)
        data = str(tmp_path / "water.extxyz")
    elif case == "unreadable":
        (tmp_path / "bad.xyz").write_text("this is not\na structure\n")
        data = str(tmp_path / "bad.xyz")
    args = ["eval", model, data, "--predict", out, *extra]
    if case == "committee-without-predict":
        args = ["eval", model, data, "--committee", str(files["mol1"])]
    code, err = run(args, capsys)
    assert code == 2
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out.extxyz").exists()


def test_eval_of_an_unlabelled_file_points_to_predict_and_renamed_keys_work(files, tmp_path, capsys):
    code, err = run(["eval", str(files["mol0"]), str(files["molecules"])], capsys)
    assert code == 2 and "--predict OUT.extxyz" in err and len(err.strip().splitlines()) == 1, err
    # a MACE-style file: labels under REF_ keys
    frames = []
    for i, atoms in enumerate(ase.io.read(files["molecules"], ":")):
        atoms.calc = None
        atoms.info["REF_energy"] = -float(i)
        atoms.arrays["REF_forces"] = np.zeros((len(atoms), 3))
        frames.append(atoms)
    ase.io.write(tmp_path / "ref.extxyz", frames)
    code, err = run(["eval", str(files["mol0"]), str(tmp_path / "ref.extxyz"), "--energy-key", "REF_energy",
                     "--forces-key", "REF_forces", "--json"], capsys)
    assert code == 0, err


def test_an_existing_prediction_file_is_replaced_only_with_overwrite(files, tmp_path, capsys):
    out = tmp_path / "out.extxyz"
    out.write_text("earlier results\n")
    args = ["eval", str(files["mol0"]), str(files["molecules"]), "--predict", str(out)]
    code, err = run(args, capsys)
    assert code == 2 and "out.extxyz exists; pass --overwrite" in err and len(err.strip().splitlines()) == 1, err
    assert out.read_text() == "earlier results\n"
    code, err = run([*args, "--overwrite"], capsys)
    assert code == 0, err
    assert len(ase.io.read(out, index=":")) == len(ase.io.read(files["molecules"], index=":"))
