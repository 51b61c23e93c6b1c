"""The full-strength learning-curve study (issue 17): statistics on synthetic rows, budgets, model variants,
learning rates, and one tiny converged run over seeds and splits that a rerun resumes."""

import csv
import re
import json

import numpy as np
import pytest

from mlpot.commands import run
from mlpot.study import learning_curve as lc
from mlpot.study import lr_search, stats, variants

from conftest import write_sgdml_npz

TINY = ["--set", "model.hparams.num_features=4", "--set", "model.hparams.num_layers=1"]
SIZES = [50, 100, 250, 500, 1000]


def synthetic_rows(models, sizes=SIZES, seeds=(0, 1, 2), splits=(1,), noise=0.05, rng_seed=0):
    """Rows of power-law learning curves: MAE = a * N^slope * 10^(noise * normal) per (model, N, seed, split)."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for n in sizes:
        for seed in seeds:
            for split in splits:
                shared = rng.normal()  # what one replicate (data, initialisation) does to every model alike
                for name, (a, slope, own) in models.items():
                    value = a * n**slope * 10 ** (noise * (shared + own * rng.normal()))
                    rows.append({"model": name, "dataset": "synthetic", "budget": "conv", "size": str(n),
                                 "seed": str(seed), "split": str(split), "lr": "0.001",
                                 "energy_mae_meV": f"{value / 3:.6g}", "forces_mae_meV_per_A": f"{value:.6g}"})
    return rows


def test_aggregate_against_hand_values():
    rows = [{"model": "m", "size": "10", "seed": str(s), "split": "1", "forces_mae_meV_per_A": str(v)}
            for s, v in enumerate([1.0, 2.0, 4.0])]
    agg = stats.aggregate(rows, "forces_mae_meV_per_A")["m"][10]
    assert agg["mean"] == pytest.approx(7 / 3) and agg["n"] == 3
    assert agg["std"] == pytest.approx(np.std([1, 2, 4], ddof=1)) and (agg["min"], agg["max"]) == (1.0, 4.0)


def test_slope_ci_contains_the_true_slope_and_narrows_with_runs():
    rows = synthetic_rows({"m": (1000.0, -0.4, 1.0)}, seeds=range(5))
    fit = stats.slopes(rows, "forces_mae_meV_per_A", n_boot=2000, seed=1)["m"]
    lo, hi = fit["ci"]
    assert lo < fit["slope"] < hi and hi - lo < 0.15  # one synthetic study: its CI may miss -0.4 (5 % of them do)
    assert fit["slope"] == pytest.approx(-0.4, abs=0.08)
    assert stats.slopes(rows, "forces_mae_meV_per_A", n_boot=2000, seed=1)["m"]["ci"] == [lo, hi]  # seeded
    single = stats.slope_ci({50: [3.0], 1000: [1.0]})
    assert single["ci"] is None and single["slope"] == pytest.approx(np.log10(1 / 3) / np.log10(20))
    # the bootstrap CI covers the true slope in about 95 % of repeated synthetic studies
    covered = [lo < -0.4 < hi for lo, hi in (stats.slopes(synthetic_rows({"m": (1000.0, -0.4, 1.0)}, rng_seed=k),
                                                          "forces_mae_meV_per_A", 500, k)["m"]["ci"] for k in range(40))]
    assert sum(covered) >= 30  # 3 runs per size: the percentile interval is somewhat too narrow, not far off


def test_paired_test_detects_a_clear_difference_and_not_a_null_one():
    # b is 20 % better than a on every replicate, up to noise; c differs from a by noise only
    rows = synthetic_rows({"a": (1000.0, -0.3, 0.2), "b": (800.0, -0.3, 0.2), "c": (1000.0, -0.3, 0.2)}, rng_seed=3)
    clear = stats.paired_test(rows, "forces_mae_meV_per_A", "a", "b")
    pooled = clear["pooled"]
    assert pooled["n"] == 15 and pooled["ratio_b_over_a"] == pytest.approx(0.8, rel=0.05)
    assert pooled["wilcoxon_p"] < 1e-3 and pooled["t_p"] < 1e-3 and pooled["b_better"] == 15
    assert all(s["n"] == 3 and s["t_p"] < 0.05 for s in clear["per_size"].values())
    assert all(s["wilcoxon_p"] == pytest.approx(0.25) for s in clear["per_size"].values())  # n = 3: the floor
    null = stats.paired_test(rows, "forces_mae_meV_per_A", "a", "c")["pooled"]
    assert null["n"] == 15 and null["wilcoxon_p"] > 0.05 and null["t_p"] > 0.05
    with pytest.raises(ValueError, match="no rows of model"):
        stats.paired_test(rows, "forces_mae_meV_per_A", "a", "zzz")


def test_pairs_are_matched_on_seed_and_split():
    rows = synthetic_rows({"a": (10.0, -0.5, 1.0), "b": (10.0, -0.5, 1.0)}, sizes=[50], seeds=(0, 1), splits=(1, 2))
    rows = [r for r in rows if not (r["model"] == "b" and r["seed"] == "1" and r["split"] == "2")]
    test = stats.paired_test(rows, "forces_mae_meV_per_A", "a", "b")
    assert test["per_size"][50]["replicates"] == [[0, 1], [0, 2], [1, 1]]


def test_stats_command_writes_json_and_markdown(tmp_path):
    rows = synthetic_rows({"egnn-l2": (500.0, -0.35, 0.3), "schnet": (900.0, -0.25, 0.3)})
    path = tmp_path / "learning_curve.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result = run(["study", "stats", str(path), "--compare", "schnet,egnn-l2", "--n-boot", "300"])
    group = result["groups"][0]
    assert group["slopes"]["forces_mae_meV_per_A"]["egnn-l2"]["ci"][0] < -0.35 < group["slopes"]["forces_mae_meV_per_A"]["egnn-l2"]["ci"][1]
    assert {t["metric"] for t in group["paired"]} == set(stats.METRICS)
    saved = json.loads((tmp_path / "stats.json").read_text())
    assert saved["groups"][0]["paired"][0]["pooled"]["n"] == 15
    text = (tmp_path / "stats.md").read_text()
    assert "| force MAE | schnet | egnn-l2 | all | 15 |" in text and "±" in text
    assert (tmp_path / "stats.png").stat().st_size > 10000  # the figure of the one (dataset, budget) group
    with pytest.raises(ValueError, match="no rows of model"):
        run(["study", "stats", str(path), "--compare", "schnet,gcn"])


def test_model_variants_and_learning_rates():
    r = variants.parse_model("egnn-l0@150k")
    assert (r["hparams"]["lmax"], r["target_params"], r["energy_only"]) == (0, 150000, False)
    assert variants.parse_model("gcn+energy")["energy_only"] and variants.parse_model("schnet@1.5M")["target_params"] == 1500000
    for bad in ("gcn-l1", "egnn-l9", "mace", "egnn@", "schnet@lots"):
        with pytest.raises(ValueError):
            variants.parse_model(bad)
    width, count = variants.match_width("schnet", variants.RECIPES["schnet"]["hparams"], 150000, [1, 6, 8])
    assert abs(count - 150000) < 0.01 * 150000
    for w in (width - 1, width + 1):  # the closest width
        other = variants.count_parameters("schnet", {**variants.RECIPES["schnet"]["hparams"], "num_features": w}, [1, 6, 8])
        assert abs(other - 150000) >= abs(count - 150000)
    assert variants.resolve(variants.parse_model("schnet"), [1, 6, 8])["num_parameters"] == 58369  # the README's count
    names = ["egnn-l1", "egnn-l0@150k", "schnet"]
    assert variants.parse_lrs(None, names) == {n: None for n in names}
    assert variants.parse_lrs("2e-3", names) == {n: 2e-3 for n in names}
    assert variants.parse_lrs("egnn=3e-3,egnn-l1=1e-2", names) == {"egnn-l1": 1e-2, "egnn-l0@150k": 3e-3, "schnet": None}


def test_pruned_egnn_variant():
    """egnn-l2-no1: l = 0, 2 features (issue 17 item 7), with @PARAMS and +energy; egnn-l3-no12: l = 0, 3."""
    r = variants.parse_model("egnn-l2-no1@150k+energy")
    assert (r["hparams"]["lmax"], r["hparams"]["hidden_ls"], r["target_params"], r["energy_only"]) == (2, [0, 2], 150000, True)
    assert variants.parse_model("egnn-l3-no12")["hparams"]["hidden_ls"] == [0, 3]
    assert "hidden_ls" not in variants.parse_model("egnn-l2")["hparams"]
    for bad in ("egnn-l2-no0", "egnn-l2-no3", "egnn-l2-no11", "egnn-no1", "egnn-l2-no"):
        with pytest.raises(ValueError, match="egnn-l2-no1"):
            variants.parse_model(bad)
    resolved = variants.resolve(r, [1, 6, 8])  # ethanol: width 46, 149 901 parameters (egnn-l2: 153 769)
    assert resolved["hparams"]["num_features"] > 32 and abs(resolved["num_parameters"] - 150000) < 0.01 * 150000
    assert variants.parse_lrs("egnn=3e-3", ["egnn-l2-no1@150k+energy"]) == {"egnn-l2-no1@150k+energy": 3e-3}
    # the nearest listed parent's rate: the unpruned egnn-l2 before the bare kind
    assert variants.parse_lrs("egnn=3e-3,egnn-l2=1e-2", ["egnn-l2-no1@150k+energy"]) == {"egnn-l2-no1@150k+energy": 1e-2}
    cfg = lc.make_config(r, "rmd17_ethanol", 50, 4000, "runs/x")
    assert cfg.model.hparams["hidden_ls"] == [0, 2] and cfg.train.forces_weight == 0.0


def test_budget_rules():
    conv = lc.Budget("converged", steps_per_frame=40, min_steps=10000, max_steps=40000)
    assert [conv.step_cap(n) for n in SIZES] == [10000, 10000, 10000, 20000, 40000]
    s50, s1000 = conv.train_settings(50, 45), conv.train_settings(1000, 950)
    assert s50["epochs"] == 1112 and s1000["epochs"] == 211  # ceil(cap / ceil(train / 5))
    assert s50["early_stopping_patience"] == 112 and s1000["early_stopping_patience"] == 22
    assert s1000["scheduler"] == "plateau" and s1000["lr_patience"] == 5
    assert conv.label == "conv40x10000-40000" and lc.Budget("steps").label == "steps4000"
    timed = lc.Budget("time", max_time=600)
    assert timed.label == "time600s" and timed.train_settings(50, 45)["max_time"] == 600
    with pytest.raises(ValueError, match="--max-time"):
        lc.Budget("time")
    cfg = lc.make_config(variants.parse_model("gcn+energy"), "rmd17_ethanol", 250, 0, "runs/x", seed=2, budget=conv,
                         split=3, data_seed=2, lr=3e-3)
    assert (cfg.data.index, cfg.data.seed, cfg.train.seed, cfg.train.lr, cfg.train.forces_weight) == (3, 2, 2, 3e-3, 0.0)
    assert lc.replicates([0, 1, 2], [1, 2, 3], "zip") == [(0, 1), (1, 2), (2, 3)]
    assert len(lc.replicates([0, 1], [1, 2, 3])) == 6


def test_old_csv_is_upgraded_in_place(tmp_path):
    path = tmp_path / "learning_curve.csv"
    old = ["molecule", "dataset", "model", "size", "seed", "steps", "energy_mae_meV", "forces_mae_meV_per_A"]
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([old, ["ethanol", "rmd17_ethanol", "gcn", "50", "1", "4000", "70", "260"]])
    lc._append_row(path, {"model": "gcn", "size": 100, "seed": 0, "split": 2, "budget": "steps4000", "lr": "0.001"})
    rows = list(csv.DictReader(open(path)))
    assert list(rows[0]) == lc.CSV_FIELDS
    assert (rows[0]["split"], rows[0]["data_seed"], rows[0]["budget"], rows[0]["forces_mae_meV_per_A"]) == ("1", "1", "steps4000", "260")
    assert lc.row_key(rows[1]) == ("gcn", 100, 0, 2, "steps4000", "0.001")


def test_converged_runs_over_seeds_and_splits_resume(tmp_path):
    data = write_sgdml_npz(tmp_path / "ethanol_emt.npz", 30, seed=3)
    out = tmp_path / "out"
    args = ["study", "learning-curve", "--dataset", str(data), "--models", "gcn", "--sizes", "10,15", "--seeds", "0,1",
            "--splits", "1,2", "--pairing", "zip", "--budget", "converged", "--steps-per-frame", "0.5", "--min-steps", "4",
            "--max-steps", "6", "--patience", "1", "--test-size", "5", "--lr", "gcn=2e-3", "--output", str(out),
            "--runs-dir", str(tmp_path / "runs"), *TINY]
    result = run(args)
    path = out / "learning_curve.csv"
    rows = list(csv.DictReader(open(path)))
    assert sorted((int(r["size"]), int(r["seed"]), int(r["split"])) for r in rows) == [(10, 0, 1), (10, 1, 2), (15, 0, 1), (15, 1, 2)]
    assert {r["budget"] for r in rows} == {"conv0.5x4-6-p1"} and {r["lr"] for r in rows} == {"0.002"}
    assert {r["stopped_by"] for r in rows} <= {"epochs", "early_stopping"} and all(int(r["patience"]) == 1 for r in rows)
    assert all(int(r["num_parameters"]) > 0 and float(r["cpu_s"]) > 0 and r["val_forces_mae_meV_per_A"] for r in rows)
    assert {r["data_seed"] for r in rows} == {"0", "1"}  # split k draws its frames with data seed k - 1
    assert result["aggregate"]["forces_mae_meV_per_A"]["gcn"][10]["n"] == 2
    assert (out / "learning_curve.png").stat().st_size > 0 and "±" in (out / "learning_curve.md").read_text()
    # a rerun trains nothing; a finished run whose row was lost is read back from its folder
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=lc.CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows[:-1])
    run(args)
    again = list(csv.DictReader(open(path)))
    assert len(again) == 4 and again[-1]["note"] == "finished before"
    assert again[-1]["forces_mae_meV_per_A"] == rows[-1]["forces_mae_meV_per_A"]
    run(args)
    assert len(list(csv.DictReader(open(path)))) == 4


def test_lr_search_picks_by_validation(tmp_path):
    rows = [{"model": "m", "lr": lr, "energy_only": "0", "val_forces_mae_meV_per_A": v, "val_energy_mae_meV": "1"}
            for lr, v in (("0.001", "30"), ("0.003", "20"), ("0.003", "24"), ("0.01", "21"))]
    rows += [{"model": "e", "lr": "0.001", "energy_only": "1", "val_forces_mae_meV_per_A": "1", "val_energy_mae_meV": "9"},
             {"model": "e", "lr": "0.01", "energy_only": "1", "val_forces_mae_meV_per_A": "99", "val_energy_mae_meV": "5"}]
    chosen = lr_search.choose(rows)
    assert chosen["best"] == {"m": 0.01, "e": 0.01} and chosen["validation_error"]["m"]["0.003"] == 22.0
    path = tmp_path / "lr_search.json"
    path.write_text(json.dumps({"best": {"m": 0.01}}))
    assert variants.parse_lrs(str(path), ["m", "n"]) == {"m": 0.01, "n": None}


@pytest.mark.parametrize("option, value, message", [
    ("--splits", "1,x", "--splits '1,x': give a comma list of integers"),
    ("--seeds", "a", "--seeds 'a': give a comma list of integers"),
    ("--sizes", "50;100", "--sizes '50;100': give a comma list of integers"),
    ("--splits", "6", "rMD17 splits are 1..5, got 6"),
    ("--lr", "fast", "--lr 'fast': 'fast' is not a learning rate"),
    ("--lr", "egnn=x", "'x' is not a learning rate"),
])
def test_bad_study_options_name_the_option(tmp_path, option, value, message):
    """Bad values of the learning-curve options stop before any training with a message naming the option."""
    from mlpot.study.learning_curve import run_learning_curve

    kwargs = {"seeds": "0", "splits": "1", "sizes": "50", "lr": None, option.lstrip("-"): value}
    with pytest.raises(ValueError, match=re.escape(message)):
        run_learning_curve(molecule="ethanol", models="schnet", output=tmp_path / "out",
                           runs_dir=tmp_path / "runs", **kwargs)
    assert not (tmp_path / "runs").exists()


def test_bad_learning_rates_for_lr_search(tmp_path):
    from mlpot.study.lr_search import run_lr_search

    for lrs in ("1e-3,abc", "0", ""):
        with pytest.raises(ValueError, match="--lrs"):
            run_lr_search(models="schnet", lrs=lrs, output=tmp_path / "out", runs_dir=tmp_path / "runs")


def test_lr_searches_in_one_folder_merge(tmp_path):
    """gcn cannot be compiled, so its search runs apart from the others: both land in one lr_search.json."""
    data = write_sgdml_npz(tmp_path / "ethanol_emt.npz", 30, seed=3)
    base = ["study", "lr-search", "--dataset", str(data), "--size", "10", "--lrs", "1e-3,2e-3", "--budget", "steps",
            "--steps", "2", "--test-size", "5", "--output", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs"),
            *TINY]
    run(base + ["--models", "gcn"])
    summary = run(base + ["--models", "schnet", "--lrs", "2e-3,4e-3"])
    saved = json.loads((tmp_path / "out" / "lr_search.json").read_text())
    assert set(saved["best"]) == {"gcn", "schnet"} and saved["best"]["gcn"] in (1e-3, 2e-3)
    assert saved["rates"] == [1e-3, 2e-3, 4e-3] and saved["runs"]["schnet"] == {"0.002": 1, "0.004": 1}
    assert summary["best"] == saved["best"]
    table = (tmp_path / "out" / "lr_search.md").read_text()  # every model and rate of the folder, not the last call's
    assert "| model | 0.001 | 0.002 | 0.004 | best |" in table and "| gcn |" in table and "| schnet | - |" in table


def test_interrupted_lr_search_keeps_the_last_result(tmp_path, monkeypatch):
    """lr_search.json is what --lr reads: a search that stops part-way (or is still running) leaves the last
    finished one in place, and a file without rates is refused with a one-line error."""
    from mlpot.study import learning_curve as lc

    data = write_sgdml_npz(tmp_path / "ethanol_emt.npz", 30, seed=3)
    base = ["study", "lr-search", "--dataset", str(data), "--size", "10", "--budget", "steps", "--steps", "2",
            "--test-size", "5", "--output", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs"), *TINY]
    run(base + ["--models", "gcn", "--lrs", "1e-3"])
    path = tmp_path / "out" / "lr_search.json"
    before = path.read_text()
    real, calls = lc.run_learning_curve, []

    def stop_at_second_rate(**kwargs):
        calls.append(kwargs["lr"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(**kwargs)

    monkeypatch.setattr(lc, "run_learning_curve", stop_at_second_rate)
    with pytest.raises(KeyboardInterrupt):
        run(base + ["--models", "schnet", "--lrs", "2e-3,4e-3"])
    assert calls == [2e-3, 4e-3] and path.read_text() == before
    assert variants.parse_lrs(str(path), ["gcn"]) == {"gcn": 1e-3}
    other = tmp_path / "learning_curve.json"
    other.write_text(json.dumps({"models": ["gcn"]}))
    with pytest.raises(ValueError, match="not an lr-search result"):
        variants.parse_lrs(str(other), ["gcn"])


def test_stats_reads_one_csv_per_model_as_one(tmp_path):
    rows = synthetic_rows({"egnn-l2": (500.0, -0.35, 0.3), "schnet": (900.0, -0.25, 0.3)})
    paths = []
    for model in ("egnn-l2", "schnet"):
        path = tmp_path / f"ethanol-{model}" / "learning_curve.csv"
        path.parent.mkdir()
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(r for r in rows if r["model"] == model)
        paths.append(path)
    result = run(["study", "stats", *map(str, paths), "--compare", "schnet,egnn-l2", "--n-boot", "300"])
    assert result["groups"][0]["paired"][0]["pooled"]["n"] == 15
    assert (tmp_path / "stats.json").is_file() and (tmp_path / "stats.md").is_file()
    again = run(["study", "stats", str(paths[0]), str(paths[0]), str(paths[1]), "--output", str(tmp_path / "x")])
    assert again["groups"][0]["paired"] == [] and len(again["csv"]) == 2  # a file named twice is read once
    copy = tmp_path / "copy" / "learning_curve.csv"
    copy.parent.mkdir()
    copy.write_text(paths[0].read_text())
    with pytest.raises(ValueError, match="is in both"):
        run(["study", "stats", str(paths[0]), str(copy), "--output", str(tmp_path / "x")])
