"""``mlpot study vibrations`` (issue 17, item 9): harmonic frequencies of tiny learning-curve models against a
reference, cached beside the CSV (seconds each)."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from ase import units

from mlpot.commands import main, run
from mlpot.study import vibrations

from conftest import write_sgdml_npz

SHIPPED = Path(__file__).resolve().parents[1] / "deploy"
TINY = ["--set", "model.hparams.num_features=4", "--set", "model.hparams.num_layers=1"]
FMAX = "1e-3"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """learning_curve.csv of a tiny SchNet at N = 10 and 15, two seeds each, and a 21-mode reference file.

    A tiny model trained for seconds has no minimum near ethanol (its relaxation pulls atoms together), so each
    run's model.pt is then replaced by a shipped SchNet: the rMD17 ethanol one, except at N = 10 seed 0 the aspirin
    one, which breaks ethanol's bonds (a bad model at the smallest size)."""
    root = tmp_path_factory.mktemp("vibrations")
    data = write_sgdml_npz(root / "ethanol_emt.npz", 30, seed=3)
    run(["study", "learning-curve", "--dataset", str(data), "--models", "schnet", "--sizes", "10,15", "--seeds", "0,1",
         "--steps", "4", "--test-size", "5", "--output", str(root / "lc"), "--runs-dir", str(root / "runs"), *TINY])
    for model in (root / "runs").glob("schnet/*/model.pt"):
        shutil.copy(SHIPPED / ("aspirin-schnet.pt" if model.parent.name.startswith("n10-split1-seed0") else
                               "ethanol-schnet.pt"), model)
    reference = root / "reference" / "vibrations.json"
    reference.parent.mkdir()
    reference.write_text(json.dumps({"reference_cm": list(np.linspace(200.0, 3700.0, 21)), "reference_method": "test"}))
    return root / "lc" / "learning_curve.csv", reference


@pytest.fixture(scope="module")
def first(runs, tmp_path_factory):
    """The first call: every run relaxed and cached."""
    csv_path, reference = runs
    out = tmp_path_factory.mktemp("first")
    return run(["study", "vibrations", str(csv_path), "--reference", str(reference), "--fmax", FMAX, "--output", str(out)]), out


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _write_rows(path, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_compare_against_hand_values():
    result = vibrations.compare([300.0, 100.0, -50.0], [100.0, 150.0, 250.0], reference_zpe_eV=None)
    assert result["diff_cm"].tolist() == [-150.0, -50.0, 50.0]  # both sorted: -50, 100, 300 against 100, 150, 250
    assert result["mae_cm"] == pytest.approx(250.0 / 3) and result["max_abs_cm"] == 150.0
    assert result["imaginary"] == 1 and result["lowest_cm"] == -50.0
    # ZPE: half the sum of the real modes, 400 against 500 cm^-1
    assert result["zpe_diff_meV"] == pytest.approx(1000 * 0.5 * (400.0 - 500.0) * units.invcm)
    assert vibrations.compare([1.0, 2.0], [1.0, 2.0], reference_zpe_eV=0.0)["zpe_diff_meV"] == pytest.approx(
        1000 * 1.5 * units.invcm)
    with pytest.raises(ValueError, match="the model has 2 modes and the reference 3"):
        vibrations.compare([1.0, 2.0], [1.0, 2.0, 3.0])


def test_default_reference_is_the_committed_ethanol_one():
    path = vibrations.reference_path("rmd17_ethanol")
    ref = vibrations.load_reference(path)
    assert len(ref["reference_cm"]) == 21 and ref["method"] == "PBE/def2-SVP (PySCF)" and 2.0 < ref["zpe_eV"] < 2.2
    atoms, label = vibrations.start_geometry("rmd17_ethanol", path)  # relaxed.xyz beside it: no data needed
    assert label.endswith("relaxed.xyz") and len(atoms) == 9


def test_spectra_cached_beside_the_csv_and_reused(runs, first, monkeypatch, tmp_path):
    csv_path, reference = runs
    result, out = first
    caches = sorted((csv_path.parent / "vibrations" / "schnet").glob("*.json"))
    assert [c.stem for c in caches] == sorted(r["run_dir"].rsplit("/", 1)[-1] for r in _rows(csv_path))
    ref_cm = np.linspace(200.0, 3700.0, 21)
    for report in result["runs"]:
        cached = json.loads(Path(report["cache"]).read_text())
        assert Path(report["cache"]).parent == csv_path.parent / "vibrations" / "schnet"
        assert not cached["failed"] and cached["fmax"] == 1e-3 and len(cached["frequencies_cm"]) == 21
        assert report["mae_cm"] == pytest.approx(np.abs(np.sort(cached["frequencies_cm"]) - ref_cm).mean())
    summary = {s["size"]: s for s in result["summary"]}
    assert summary[10]["runs"] == 2 and summary[15]["missing"] == 0 and summary[10]["mae_cm"]["n"] == 2
    assert summary[10]["broken_bond_runs"] == 1 and summary[15]["broken_bond_runs"] == 0  # the aspirin model
    assert summary[10]["mae_cm"]["std"] > 0 and summary[15]["mae_cm"]["std"] < 1e-6  # one model twice at N = 15
    forces = [float(r["forces_mae_meV_per_A"]) for r in _rows(csv_path) if r["size"] == "10"]
    assert summary[10]["test_forces_mae_meV_per_A"]["mean"] == pytest.approx(np.mean(forces))
    assert set(result["slopes"]["frequency_mae_cm"]) == {"schnet"}
    for name in ("vibrations.md", "vibrations.json", "vibrations_mae.png", "vibrations_spectra.png"):
        assert (out / name).stat().st_size > 0
    assert "| schnet | 10 | 2 | 0 | 0 |" in (out / "vibrations.md").read_text()

    def no_relaxation(*args, **kwargs):
        raise AssertionError("relaxed again")

    monkeypatch.setattr("mlpot.workflows.vibrations.relax_to_minimum", no_relaxation)
    again = run(["study", "vibrations", str(csv_path), "--reference", str(reference), "--fmax", FMAX,
                 "--output", str(tmp_path)])
    assert [r["mae_cm"] for r in again["runs"]] == [r["mae_cm"] for r in result["runs"]]


def test_gone_run_folders_use_the_cache_and_runs_with_neither_warn(runs, first, tmp_path, capsys):
    csv_path, reference = runs
    folder = tmp_path / "committed"
    shutil.copytree(csv_path.parent, folder)  # the CSV and its vibrations/, as committed; no run folders
    rows = _rows(folder / "learning_curve.csv")
    for r in rows:
        r["run_dir"] = str(tmp_path / "gone" / r["run_dir"].rsplit("/", 1)[-1])
    _write_rows(folder / "learning_curve.csv", rows)
    lost = folder / "vibrations" / "schnet" / f"{rows[0]['run_dir'].rsplit('/', 1)[-1]}.json"
    lost.unlink()
    args = ["study", "vibrations", str(folder / "learning_curve.csv"), "--reference", str(reference), "--fmax", FMAX,
            "--output", str(tmp_path / "out")]
    result = run(args)
    assert "warning: schnet N=10 seed 0 split 1: no " in capsys.readouterr().out
    assert [m["cache"] for m in result["missing_runs"]] == [str(lost)]
    assert len(result["runs"]) == 3 and {s["size"]: s["missing"] for s in result["summary"]} == {10: 1, 15: 0}
    assert [r["mae_cm"] for r in result["runs"]] == [r["mae_cm"] for r in first[0]["runs"][1:]]
    shutil.rmtree(folder / "vibrations")
    assert main(args) == 2
    assert "none of the 4 runs has its model.pt or a cached spectrum" in capsys.readouterr().err


def test_a_failed_relaxation_is_cached_and_counted(runs, tmp_path, monkeypatch):
    csv_path, reference = runs
    folder = tmp_path / "lc"
    folder.mkdir()
    shutil.copy(csv_path, folder)  # the run folders, not the caches

    def collapse(*args, **kwargs):
        raise ValueError("atoms 1 and 2 are 0.3 Å apart")

    monkeypatch.setattr("mlpot.workflows.vibrations.relax_to_minimum", collapse)
    result = run(["study", "vibrations", str(folder / "learning_curve.csv"), "--reference", str(reference),
                  "--sizes", "10", "--output", str(tmp_path / "out")])
    assert [s["failed"] for s in result["summary"]] == [2] and result["summary"][0]["mae_cm"] is None
    cached = sorted((folder / "vibrations" / "schnet").glob("*.json"))
    assert len(cached) == 2 and json.loads(cached[0].read_text())["failed"] == "atoms 1 and 2 are 0.3 Å apart"
    assert "failed runs: schnet N=10" in (tmp_path / "out" / "vibrations.md").read_text()


def test_bad_inputs_give_one_line(runs, tmp_path, capsys):
    csv_path, reference = runs

    def error(args):
        assert main(["study", "vibrations", *args, "--output", str(tmp_path / "out")]) == 2
        message = capsys.readouterr().err.strip()
        assert "\n" not in message and message.startswith("mlpot study vibrations: error:")
        return message

    ok = [str(csv_path), "--reference", str(reference)]
    assert "CSV" in error([])
    assert "no learning-curve CSV at" in error([str(tmp_path / "none.csv"), "--reference", str(reference)])
    assert "--models: no runs of gcn" in error([*ok, "--models", "gcn"])
    assert "no default reference frequencies for dataset" in error([str(csv_path)])
    assert "no reference file at" in error([str(csv_path), "--reference", str(tmp_path / "none.json")])
    no_cm = tmp_path / "no_cm.json"
    no_cm.write_text(json.dumps({"hessian_cm": [1.0] * 21}))
    assert "has no reference_cm" in error([str(csv_path), "--reference", str(no_cm)])
    twenty = tmp_path / "twenty.json"
    twenty.write_text(json.dumps({"reference_cm": list(range(1, 21))}))
    assert "has 20 frequencies, but the molecule (9 atoms" in error([str(csv_path), "--reference", str(twenty)])
    assert "--fmax" in error([*ok, "--fmax", "0"])
    assert not (tmp_path / "out").exists()  # refused before anything was written
