"""Study statistics: bootstrap slope intervals, paired tests, aggregation, the stats command, old CSVs."""

import csv
import json

import numpy as np
import pytest

from mlpot.study import learning_curve, stats


def power_law_rows(model, slope, sizes=(50, 100, 250, 500, 1000), seeds=(0, 1, 2, 3), noise=0.05, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        for s in seeds:
            f = scale * 100.0 * (n / 50.0) ** slope * np.exp(noise * rng.standard_normal())
            rows.append({"model": model, "size": n, "seed": s, "split": 1,
                         "forces_mae_meV_per_A": f, "energy_mae_meV": f / 5})
    return rows


def test_slope_interval_covers_the_true_slope_and_shrinks_with_noise():
    covered = 0
    for k in range(40):  # a 95 % interval: it should cover the true slope in most synthetic data sets
        true = -0.3 - 0.01 * k
        fit = stats.slope_with_ci(power_law_rows("a", true, seed=k), "forces_mae_meV_per_A", "a", n_boot=400)
        assert fit["ci"][0] <= fit["slope"] <= fit["ci"][1]
        covered += fit["ci"][0] < true < fit["ci"][1]
    assert covered >= 32
    wide = stats.slope_with_ci(power_law_rows("a", -0.5, noise=0.3), "forces_mae_meV_per_A", "a")
    narrow = stats.slope_with_ci(power_law_rows("a", -0.5, noise=0.02), "forces_mae_meV_per_A", "a")
    assert narrow["ci"][1] - narrow["ci"][0] < wide["ci"][1] - wide["ci"][0]
    one = stats.slope_with_ci(power_law_rows("a", -0.5, seeds=(0,)), "forces_mae_meV_per_A", "a")
    assert one["ci_from_one_run_per_size"] and one["ci"][0] == pytest.approx(one["ci"][1])
    assert stats.slope_with_ci(power_law_rows("a", -0.5, sizes=(50,)), "forces_mae_meV_per_A", "a") is None


def test_paired_test_finds_a_real_difference_and_not_a_null_one():
    better = power_law_rows("a", -0.5, scale=0.8, seed=1)
    worse = power_law_rows("b", -0.5, scale=1.0, seed=2)
    same = power_law_rows("c", -0.5, scale=1.0, seed=3)
    t = stats.paired_test(better + worse, "forces_mae_meV_per_A", "a", "b")
    assert t["n_pairs"] == 20 and t["ratio_a_over_b"] == pytest.approx(0.8, rel=0.05)
    assert t["t_p"] < 1e-3 and t["wilcoxon_p"] < 1e-3 and t["a_better_in"] >= 18
    null = stats.paired_test(same + worse, "forces_mae_meV_per_A", "c", "b")
    assert null["t_p"] > 0.01 and null["wilcoxon_p"] > 0.01
    # pairs need the same size, seed and split: another split pairs with nothing
    other_split = [dict(r, split=2) for r in worse]
    assert stats.paired_test(better + other_split, "forces_mae_meV_per_A", "a", "b")["n_pairs"] == 0


def test_aggregate_mean_std_n():
    rows = [{"model": "a", "size": 10, "x": v} for v in (1.0, 2.0, 3.0)] + [{"model": "a", "size": 20, "x": 5.0}]
    agg = stats.aggregate(rows, "x")["a"]
    assert agg[10] == {"mean": 2.0, "std": 1.0, "n": 3, "min": 1.0, "max": 3.0}
    assert agg[20]["std"] == 0.0 and agg[20]["n"] == 1


def test_stats_command_writes_tables_and_refuses_unknown_models(tmp_path):
    from mlpot.commands import main

    rows = power_law_rows("egnn", -0.6, scale=0.5) + power_law_rows("schnet", -0.4, seed=5)
    path = tmp_path / "learning_curve.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert main(["study", "stats", str(path), "--compare", "egnn,schnet"]) in (0, None)
    md = (tmp_path / "stats.md").read_text()
    assert "± " in md and "Wilcoxon" in md and "| egnn | schnet |" in md
    result = json.loads((tmp_path / "stats.json").read_text())
    assert result["paired"][0]["n_pairs"] == 20
    assert main(["study", "stats", str(path), "--compare", "egnn,mace"]) == 2


def test_old_csv_gains_the_new_columns_when_a_row_is_appended(tmp_path):
    path = tmp_path / "learning_curve.csv"
    old_fields = [f for f in learning_curve.CSV_FIELDS if f not in ("split", "patience")]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=old_fields)
        writer.writeheader()
        writer.writerow({k: {"model": "gcn", "size": 50, "seed": 0, "steps": 4000}.get(k, "1") for k in old_fields})
    old = learning_curve._read_rows(path)[0]
    assert learning_curve._row_key(old) == ("gcn", 50, 0, 1, 4000, 0)  # read as split 1, no early stopping
    learning_curve._append_row(path, {"model": "gcn", "size": 100, "seed": 0, "split": 2, "steps": 4000, "patience": 20})
    rows = learning_curve._read_rows(path)
    assert list(rows[0]) == learning_curve.CSV_FIELDS
    assert [learning_curve._row_key(r) for r in rows] == [("gcn", 50, 0, 1, 4000, 0), ("gcn", 100, 0, 2, 4000, 20)]


def test_converged_budget_config():
    recipe = learning_curve.parse_model("schnet")
    cfg = learning_curve.make_config(recipe, "rmd17_ethanol", 250, 8000, "runs/x", seed=2, split=3, patience=25)
    assert cfg.data.index == 3 and cfg.train.early_stopping_patience == 25 and cfg.data.seed == 2
