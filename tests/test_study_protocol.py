"""``mlpot study protocol`` (issue 17, item 5): per-epoch curves of energy-only and force-trained runs, ethanol
histograms from a short MD of each, on tiny learning-curve runs (seconds each)."""

import csv
import json
import shutil

import numpy as np
import pytest

from mlpot.commands import main, run
from mlpot.study import protocol

from conftest import write_sgdml_npz

TINY = ["--set", "model.hparams.num_features=4", "--set", "model.hparams.num_layers=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """learning_curve.csv of gcn and its energy-only twin at N = 10, two seeds each, a few steps."""
    root = tmp_path_factory.mktemp("protocol")
    data = write_sgdml_npz(root / "ethanol_emt.npz", 30, seed=3)
    run(["study", "learning-curve", "--dataset", str(data), "--models", "gcn,gcn+energy", "--sizes", "10", "--seeds", "0,1",
         "--steps", "6", "--test-size", "5", "--output", str(root / "lc"), "--runs-dir", str(root / "runs"), *TINY])
    return root / "lc" / "learning_curve.csv"


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_curves_csv_has_every_epoch_and_pairs_the_twins(tmp_path, runs):
    result = run(["study", "protocol", str(runs), "--no-md", "--output", str(tmp_path)])
    rows = _rows(tmp_path / "protocol_curves.csv")
    expected = sum(len(_rows(f"{r['run_dir']}/log.csv")) for r in _rows(runs))
    assert len(rows) == expected and expected == sum(int(r["epochs_run"]) for r in _rows(runs))
    assert {(r["model"], r["seed"]) for r in rows} == {(m, s) for m in ("gcn", "gcn+energy") for s in "01"}
    assert {(r["model"], r["energy_only"], r["twin"]) for r in rows} == {("gcn", "0", ""), ("gcn+energy", "1", "gcn")}
    assert all(float(r["val_energy_mae_meV_per_atom"]) == pytest.approx(float(r["val_energy_mae_meV"]) / 9) for r in rows)
    assert protocol.families(["gcn+energy", "schnet", "gcn"]) == {"gcn": ["gcn", "gcn+energy"], "schnet": ["schnet"]}
    series = {s["series"]: s for s in result["curves"]["series"]}
    assert series["gcn+energy"]["twin"] == "gcn" and series["gcn"]["runs"] == 2 and series["gcn"]["missing"] == 0
    assert result["md"] is None and result["missing_runs"] == []
    assert (tmp_path / "protocol_curves_n10.png").stat().st_size > 0
    saved = json.loads((tmp_path / "protocol.json").read_text())
    assert saved["curves"]["series"][0]["last_val_forces_mae_meV_per_A"] > 0
    assert "| gcn+energy | 10 | 2 | 0 |" in (tmp_path / "protocol.md").read_text()


def test_band_averages_the_runs_that_reached_each_epoch():
    runs = [[{"epoch": 1, "x": 4.0}, {"epoch": 2, "x": 2.0}], [{"epoch": 1, "x": 2.0}]]
    b = protocol.band(runs, "x")
    assert b["epoch"].tolist() == [1, 2] and b["mean"].tolist() == [3.0, 2.0]
    assert b["min"].tolist() == [2.0, 2.0] and b["max"].tolist() == [4.0, 2.0] and b["n"].tolist() == [2, 1]


def test_missing_run_folder_warns_and_all_missing_is_an_error(tmp_path, runs, capsys):
    rows = _rows(runs)
    rows[0]["run_dir"] = str(tmp_path / "gone")
    path = tmp_path / "learning_curve.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result = run(["study", "protocol", str(path), "--no-md", "--output", str(tmp_path / "out")])
    assert "warning: gcn N=10 seed 0 split 1:" in capsys.readouterr().out
    assert [m["run_dir"] for m in result["missing_runs"]] == [str(tmp_path / "gone")]
    assert len(_rows(tmp_path / "out" / "protocol_curves.csv")) == sum(int(r["epochs_run"]) for r in rows[1:])
    for r in rows:
        r["run_dir"] = str(tmp_path / "gone")
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ValueError, match="none of the 4 runs has its run folder"):
        run(["study", "protocol", str(path), "--no-md", "--output", str(tmp_path / "out")])


def test_histogram_distances_are_zero_for_equal_samples_and_grow_with_a_shift():
    rng = np.random.default_rng(0)
    x = rng.normal(1.5, 0.05, size=5000)
    same = protocol.histogram_distances(x, x.copy())
    assert same["js"] == pytest.approx(0.0, abs=1e-12) and same["w1"] == pytest.approx(0.0, abs=1e-12)
    near, far = (protocol.histogram_distances(x + shift, x) for shift in (0.02, 0.2))
    assert 0 < near["js"] < far["js"] <= 1.0 and far["js"] > 0.9  # 4 standard deviations apart: little overlap
    assert near["w1"] == pytest.approx(0.02) and far["w1"] == pytest.approx(0.2)
    assert protocol.histogram_distances([], x) == {"js": None, "w1": None}


def test_md_histograms_of_each_model(tmp_path, runs):
    args = ["study", "protocol", str(runs), "--md-steps", "20", "--output", str(tmp_path)]
    result = run(args)
    md = result["md"]
    assert [(r["model"], r["seed"]) for r in md["runs"]] == [("gcn", 0), ("gcn+energy", 0)]  # one run per model and size
    for r in md["runs"]:
        assert r["steps"] == 20 and (r["collapsed"] or r["steps_done"] == 20)
        assert set(r["internals"]) == {"C-C", "C-O", "C-C-O"}
        assert r["collapsed"] or all(x["w1"] > 0 and 0 <= x["js"] <= 1 for x in r["internals"].values())
    ref = md["reference"]
    assert ref["frames"] == 30 and 1.4 < ref["internals"]["C-C"]["mean"] < 1.6
    assert (tmp_path / "protocol_histograms_n10.png").stat().st_size > 0
    saved = json.loads((tmp_path / "protocol.json").read_text())
    assert saved["md"]["runs"][0]["internals"]["C-O"]["w1"] == pytest.approx(md["runs"][0]["internals"]["C-O"]["w1"])
    assert len(list((tmp_path / "md").glob("*.npz"))) == 2
    again = run(args)  # the MD of the first call is reused
    assert again["md"]["runs"] == md["runs"]


def test_bad_inputs_give_one_line(tmp_path, runs, capsys):
    def error(args):
        assert main(["study", "protocol", *args, "--output", str(tmp_path / "out")]) == 2
        message = capsys.readouterr().err.strip()
        assert "\n" not in message and message.startswith("mlpot study protocol: error:")
        return message

    assert "CSV" in error([])
    assert "no learning-curve CSV at" in error([str(tmp_path / "none.csv"), "--no-md"])
    assert "--models: no runs of schnet" in error([str(runs), "--models", "gcn,schnet", "--no-md"])
    assert "--sizes: no runs of 50" in error([str(runs), "--sizes", "50", "--no-md"])
    # a molecule other than ethanol: the histograms are refused, the curves work
    water = tmp_path / "water.npz"
    np.savez(water, E=np.zeros((3, 1)), F=np.zeros((3, 3, 3)), z=np.array([8, 1, 1]),
             R=np.array([[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]] * 3, dtype=float))
    rows = _rows(runs)
    for r in rows:
        r["dataset"] = str(water)
    path = tmp_path / "water" / "learning_curve.csv"
    path.parent.mkdir()
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert "is not ethanol (give --no-md" in error([str(path)])
    assert not (tmp_path / "out").exists()  # refused before anything was written
    assert main(["study", "protocol", str(path), "--no-md", "--output", str(tmp_path / "out")]) == 0
    shutil.rmtree(tmp_path / "out")


def test_curves_read_the_logs_kept_beside_the_csv_when_run_folders_are_gone(tmp_path, runs):
    kept = sorted((runs.parent / "logs").glob("*/*.csv.gz"))
    assert len(kept) == 4  # learning-curve keeps every run's log.csv beside its CSV
    folder = tmp_path / "committed"
    shutil.copytree(runs.parent, folder)  # the CSV and its logs/, as committed; the run folders stay behind
    rows = _rows(folder / "learning_curve.csv")
    for r in rows:
        r["run_dir"] = str(tmp_path / "elsewhere" / r["model"] / r["run_dir"].rsplit("/", 1)[-1])
    with open(folder / "learning_curve.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result = run(["study", "protocol", str(folder / "learning_curve.csv"), "--no-md", "--output", str(tmp_path / "out")])
    assert result["missing_runs"] == []
    assert len(_rows(tmp_path / "out" / "protocol_curves.csv")) == sum(int(r["epochs_run"]) for r in rows)
