"""``mlpot study ...``: every study on a tiny model and a few EMT-labelled ethanols (seconds each)."""

import csv
import json

import numpy as np
import pytest
import torch

from mlpot import export, keys
from mlpot.commands import main, run
from mlpot.study import baselines, latent, learning_curve, symmetry
from mlpot.study.common import load_frames, load_model

from conftest import five_point_derivative, make_tiny_potential, write_sgdml_npz

import sklearn  # noqa: F401  (in the test extra: a missing install fails here instead of skipping)

TINY = ["--set", "model.hparams.num_features=4", "--set", "model.hparams.num_layers=1"]


@pytest.fixture(scope="module")
def frames_file(tmp_path_factory):
    return write_sgdml_npz(tmp_path_factory.mktemp("data") / "ethanol_emt.npz", 40, seed=3)


def _deploy(path, kind, frames_file, **hparams):
    potential = make_tiny_potential(kind, torch.float64, **hparams)
    export.save(potential, path, dataset=str(frames_file))
    return str(path)


@pytest.fixture(scope="module")
def tiny_egnn(tmp_path_factory, frames_file):
    path = tmp_path_factory.mktemp("model") / "egnn.pt"
    # untrained, seed 1: the latent study's untrained control with init seed 1 is this very model
    return _deploy(path, "egnn", frames_file, seed=1, num_features=4, num_layers=2, radial_hidden=8, parity=False)


def test_model_names_and_budget_rule():
    assert learning_curve.parse_model("egnn-l1")["hparams"]["lmax"] == 1
    assert learning_curve.parse_model("egnn")["hparams"]["lmax"] == 2
    for bad in ("gcn-l1", "egnn-l9", "mace"):
        with pytest.raises(ValueError):
            learning_curve.parse_model(bad)
    assert learning_curve.split_sizes(1000) == (950, 50)
    assert learning_curve.split_sizes(50) == (45, 5)
    small = learning_curve.make_config(learning_curve.parse_model("gcn"), "rmd17_ethanol", 50, 4000, "runs/x")
    large = learning_curve.make_config(learning_curve.parse_model("gcn"), "rmd17_ethanol", 1000, 4000, "runs/x")
    steps = [c.train.epochs * -(-c.data.train_size // c.train.batch_size) for c in (small, large)]
    assert all(4000 <= s < 4000 + 190 for s in steps)  # the same number of optimizer steps at every size


def test_learning_curve_rows_plot_and_resume(tmp_path, frames_file):
    args = ["study", "learning-curve", "--dataset", str(frames_file), "--models", "gcn,egnn-l0", "--sizes", "10,15",
            "--steps", "4", "--test-size", "5", "--output", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs"), *TINY]
    result = run(args)
    csv_path = tmp_path / "out" / "learning_curve.csv"
    rows = list(csv.DictReader(open(csv_path)))
    assert sorted((r["model"], int(r["size"])) for r in rows) == [("egnn-l0", 10), ("egnn-l0", 15), ("gcn", 10), ("gcn", 15)]
    assert all(np.isfinite(float(r[k])) for r in rows for k in ("energy_mae_meV", "forces_mae_meV_per_A"))
    assert all(int(r["test_frames"]) == 5 and int(r["steps_run"]) >= 4 for r in rows)
    assert all(r["note"] == "" for r in rows)  # every run, egnn with lmax 0 included, deployed its model.pt
    assert (tmp_path / "out" / "learning_curve.png").stat().st_size > 0
    slopes = json.loads((tmp_path / "out" / "learning_curve.json").read_text())["slopes"]
    assert set(slopes["forces_mae_meV_per_A"]) == {"gcn", "egnn-l0"}
    assert all(np.isfinite(v) for v in slopes["energy_mae_meV"].values())
    assert result["rows"] == 4
    run(args)  # finished runs are skipped, not trained or appended again
    assert len(list(csv.DictReader(open(csv_path)))) == 4


def test_latent_numbers_and_figure(tmp_path, tiny_egnn, frames_file):
    result = run(["study", "latent", tiny_egnn, str(frames_file), "--frames", "30", "--perplexities", "5",
                  "--pairs", "500", "--k", "3", "--output", str(tmp_path)])
    assert result["embedding"].shape == (30, 2) and np.isfinite(result["embedding"]).all()
    assert set(result["knn_r2"]) == {"energy_eV", "C-C_A", "C-O_A", "C-C-O_deg"}  # ethanol: geometry too
    names = {"energy_eV", "C-C_A", "C-O_A", "C-C-O_deg", "geometry"}
    untrained = result["control_untrained"]
    assert untrained["init_seeds"] == [0, 1, 2, 3, 4]
    blocks = [result, untrained["per_seed"][0], result["control_distances"]]
    for block in [*blocks, untrained]:
        assert set(block["spearman_latent_distance_vs"]) == names
        assert all(np.isfinite(v["mean"]) for v in block["knn_r2"].values())
    # each control is computed from its own features, not copied from the model's
    model_rho, untrained_rho, geometry_rho = (b["spearman_latent_distance_vs"]["energy_eV"] for b in blocks)
    assert abs(model_rho - untrained_rho) > 1e-3 and abs(model_rho - geometry_rho) > 1e-3
    assert result["rebuild_check"]["max_energy_diff_eV"] < 1e-8
    saved = json.loads((tmp_path / "latent.json").read_text())
    assert saved["frames"] == 30 and (tmp_path / "latent_tsne.png").stat().st_size > 0
    assert saved["spearman_latent_distance_vs"] == pytest.approx(result["spearman_latent_distance_vs"], rel=1e-12)


def test_spearman_of_latent_distances_against_hand_values():
    """Three structures 1 and 2 apart on a line (pair distances 1, 2, 3): targets whose pair differences are
    in the same order (rho = 1), the reverse order (rho = -1), and the order 1, 3, 2 (rho = 0.5 when the
    three pairs are drawn equally often: the Pearson correlation of the ranks (1, 2, 3) and (1, 3, 2))."""
    x = np.array([[0.0], [1.0], [3.0]])
    targets = {"same": np.array([0.0, 2.0, 6.0]), "reverse": np.array([0.0, 3.0, 1.0]),
               "one-three-two": np.array([0.0, 1.0, -2.0])}
    targets["geometry"] = np.array([[0.0, 5], [0, 10], [0, 20]])
    rho = latent.spearman_tests({"x": x}, targets, *latent.random_pairs(3, 20000, seed=0))["x"]["spearman_latent_distance_vs"]
    assert rho["same"] == pytest.approx(1.0, abs=1e-12) and rho["geometry"] == pytest.approx(1.0, abs=1e-12)
    assert rho["reverse"] == pytest.approx(-1.0, abs=1e-12)  # a pair i == i (0 apart in both) would break this
    assert rho["one-three-two"] == pytest.approx(0.5, abs=0.03)  # 20000 random pairs: 0.495-0.512 over seeds 0-4


def test_latent_untrained_seeds_tsne_runs_and_claims(tmp_path, tiny_egnn, frames_file, capsys):
    result = run(["study", "latent", tiny_egnn, str(frames_file), "--frames", "30", "--pairs", "300", "--k", "3",
                  "--init-seeds", "0,1,2", "--tsne-seeds", "3,4", "--perplexities", "5,8", "--permutations", "50",
                  "--output", str(tmp_path)])
    untrained = result["control_untrained"]
    per_seed = {b["init_seed"]: b for b in untrained["per_seed"]}
    assert untrained["init_seeds"] == [0, 1, 2] and sorted(per_seed) == [0, 1, 2]
    rho = {s: b["spearman_latent_distance_vs"] for s, b in per_seed.items()}
    # tiny_egnn is the untrained network of seed 1: the control rebuilds the architecture from the seed
    assert rho[1] == pytest.approx(result["spearman_latent_distance_vs"], rel=1e-9)
    assert {n: v["mean"] for n, v in per_seed[1]["knn_r2"].items()} == pytest.approx(
        {n: v["mean"] for n, v in result["knn_r2"].items()}, rel=1e-9)
    assert abs(rho[0]["energy_eV"] - rho[2]["energy_eV"]) > 1e-3  # other seeds, other networks
    energy = [rho[s]["energy_eV"] for s in (0, 1, 2)]
    assert untrained["spearman_latent_distance_vs"]["energy_eV"] == pytest.approx(
        {"mean": np.mean(energy), "std": np.std(energy, ddof=1), "min": min(energy), "max": max(energy)})
    # permutation p-values: 50 permutations, p = (count + 1) / 51
    assert result["permutations"]["count"] == 50
    p_values = [*result["spearman_p"].values(), *(v["p"] for v in result["knn_r2"].values()),
                *(v["p"] for v in result["control_distances"]["knn_r2_standardized"].values()),
                *per_seed[0]["spearman_p"].values()]
    assert len(p_values) == 5 + 4 + 4 + 5
    assert all(1 / 51 - 1e-12 <= p <= 1 and abs(p * 51 - round(p * 51)) < 1e-9 for p in p_values)
    assert result["control_distances"]["spearman_p"]["geometry"] == pytest.approx(1 / 51)  # rho = 1
    # t-SNE: per perplexity a PCA map and one random-init map per seed, their agreement
    runs = result["tsne"]["runs"]
    assert [(r["perplexity"], r["init"], r["seed"]) for r in runs] == [
        (p, init, s) for p in (5.0, 8.0) for init, s in (("pca", 0), ("random", 3), ("random", 4))]
    assert all(np.isfinite(r["knn_r2_from_map"]["energy_eV"]["mean"]) for r in runs)
    matrix = np.array(result["tsne"]["map_agreement"]["matrix"])
    assert matrix.shape == (6, 6) and np.allclose(np.diag(matrix), 1.0) and np.allclose(matrix, matrix.T)
    assert result["tsne"]["map_agreement"]["min"] < 0.999  # random starts give other maps
    for name in ("latent_tsne.png", "latent_tsne_grid.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert len(np.loadtxt(tmp_path / "tsne_runs.csv", delimiter=",", skiprows=1)) == 6 * 30
    saved = json.loads((tmp_path / "latent.json").read_text())
    assert saved["control_untrained"]["per_seed"][2]["spearman_p"] == pytest.approx(per_seed[2]["spearman_p"])
    printed = capsys.readouterr().out
    claims = printed[printed.index("claims:"):].splitlines()
    assert [line.split()[0] for line in claims[2:6]] == ["energy", "C-C", "C-O", "C-C-O"]
    assert f"{result['spearman_latent_distance_vs']['C-O_A']:.3f}" in claims[4]


@pytest.mark.parametrize("option, value", [
    ("--init-seeds", ""), ("--init-seeds", "0,x"), ("--init-seeds", "1,1"), ("--tsne-seeds", ","),
    ("--perplexities", ""), ("--perplexities", "0"), ("--perplexities", "30,-5"), ("--perplexities", "nan"),
    ("--permutations", "0"),
])
def test_latent_bad_options_are_one_line_errors(tmp_path, tiny_egnn, frames_file, capsys, option, value):
    from mlpot.commands import main

    assert main(["study", "latent", tiny_egnn, str(frames_file), option, value, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"mlpot study latent: error: {option} "), err
    assert not (tmp_path / "latent.json").exists()


def test_permutation_p_values_separate_signal_from_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    noise = {f"noise {n}": rng.normal(size=60) for n in range(40)}
    targets = {"signal": 2 * x[:, 0] + x[:, 1] ** 2, **noise}
    permutations = latent.frame_permutations(60, 200, seed=0)
    assert (np.sort(permutations, axis=1) == np.arange(60)).all()
    assert (latent.frame_permutations(60, 200, seed=0) == permutations).all()  # seeded
    assert not (latent.frame_permutations(60, 200, seed=1) == permutations).all()
    i, j = latent.random_pairs(60, 2000, seed=0)
    spearman = latent.spearman_tests({"x": x}, targets, i, j, permutations)["x"]["spearman_p"]
    knn = latent.knn_r2(x, targets, k=5, folds=5, seed=0, permutations=permutations)
    for p in (spearman, {name: v["p"] for name, v in knn.items()}):
        assert p["signal"] == pytest.approx(1 / 201)  # no permutation reaches the real target
        null = np.array([p[name] for name in noise])
        # a target unrelated to x: p uniform on (0, 1], about 2 of 40 below 0.05 (binomial: 6 or more has p = 0.05)
        assert p["noise 0"] > 0.05 and np.mean(null < 0.05) <= 0.15 and 0.3 < null.mean() < 0.7


def test_knn_r2_and_spearman_equal_sklearn_and_scipy():
    from scipy.stats import spearmanr
    from sklearn.model_selection import KFold, cross_val_score
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 4)) * [1, 10, 0.1, 1]
    targets = {"t": np.round(x[:, 0] + rng.normal(size=50), 1)}  # rounded: ties in the ranks
    for standardize in (False, True):
        ours = latent.knn_r2(x, targets, k=4, folds=5, seed=2, standardize=standardize)["t"]
        knn = KNeighborsRegressor(n_neighbors=4)
        scores = cross_val_score(make_pipeline(StandardScaler(), knn) if standardize else knn, x, targets["t"],
                                 cv=KFold(n_splits=5, shuffle=True, random_state=2), scoring="r2")
        assert ours == pytest.approx({"mean": scores.mean(), "std": scores.std()}, rel=1e-10)
    i, j = latent.random_pairs(50, 500, seed=3)
    rho = latent.spearman_tests({"x": x}, targets, i, j)["x"]["spearman_latent_distance_vs"]["t"]
    expected = spearmanr(np.linalg.norm(x[i] - x[j], axis=1), np.abs(targets["t"][i] - targets["t"][j])).statistic
    assert rho == pytest.approx(expected, rel=1e-12)


def test_rebuild_mismatch_is_reported(tmp_path, frames_file):
    potential = make_tiny_potential("schnet", torch.float64)
    path = tmp_path / "wrong.pt"
    export.save(potential, path, dataset=str(frames_file), cutoff=3.0)  # metadata that does not describe the weights
    with pytest.raises(ValueError, match="does not reproduce"):
        run(["study", "latent", str(path), str(frames_file), "--frames", "10", "--output", str(tmp_path)])
    from mlpot.study.common import check_rebuild, graphs_of, load_frames

    model = load_model(path)
    with pytest.raises(ValueError, match="does not reproduce"):
        check_rebuild(model, graphs_of(load_frames(str(frames_file), num_frames=3), model))


def test_irreps_shares_ablation_and_retrain(tmp_path, tiny_egnn, frames_file):
    result = run(["study", "irreps", tiny_egnn, str(frames_file), "--frames", "10", "--output", str(tmp_path),
                  "--retrain", "--steps", "3", "--size", "10", "--test-size", "5", "--latency-calls", "5",
                  "--runs-dir", str(tmp_path / "runs")])
    shares = result["norm_shares"]
    assert len(shares) == 2
    assert set(shares[0]["share_by_l"]) == {"0", "1", "2"}
    for layer in shares:  # the last layer may compute only its scalars (all the readout reads)
        assert set(layer["share_by_l"]) | {label[:-1] for label in layer["not_computed"]} == {"0", "1", "2"}
        assert sum(layer["share_by_l"].values()) == pytest.approx(1.0)
    rows = {(r["layer"], r["l"]): r for r in result["ablation"]}
    base = rows[("none", None)]["forces_mae_meV_per_A"]
    assert rows[("all", 0)]["forces_mae_meV_per_A"] != pytest.approx(base, rel=1e-6)  # zeroing scalars matters
    # the readout reads only the last layer's scalars: its l > 0 channels are computed but unused
    assert rows[("2", 1)]["energy_mae_meV"] == pytest.approx(rows[("none", None)]["energy_mae_meV"], rel=1e-9)
    retrained = result["retrain"]["retrained"]
    assert [t["lmax"] for t in retrained] == [2, 1]
    assert all(t["latency_ms"] > 0 and np.isfinite(t["test_on_study_frames"]["forces_mae_meV_per_A"]) for t in retrained)
    assert (tmp_path / "irreps.png").stat().st_size > 0 and (tmp_path / "irreps.json").is_file()


def test_norm_shares_group_both_parities(frames_file):
    from mlpot.study.common import LoadedModel, graphs_of, load_frames
    from mlpot.study.irreps import norm_shares

    potential = make_tiny_potential("egnn", torch.float64, num_features=4, num_layers=3, lmax=1, parity=True)
    model = LoadedModel(potential, None, {"kind": "egnn", "cutoff": 5.0, "dtype": "float64", "hparams": {}}, "tiny")
    first, layer, last = norm_shares(potential, graphs_of(load_frames(str(frames_file), num_frames=4), model))
    assert set(first["by_irrep"]) == {"0e", "1o"}  # from 0e inputs and Y^0, Y^1 only these are reachable
    assert {"0e", "1o", "1e"} <= set(layer["by_irrep"]) and set(layer["share_by_l"]) == {"0", "1"}
    assert set(layer["by_irrep"]) <= set(last["by_irrep"]) | set(last["not_computed"])
    assert layer["share_by_l"]["1"] == pytest.approx(layer["by_irrep"]["1o"]["share"] + layer["by_irrep"]["1e"]["share"])
    assert sum(layer["share_by_l"].values()) == pytest.approx(1.0)


def test_irreps_needs_an_egnn(tmp_path, frames_file):
    path = _deploy(tmp_path / "gcn.pt", "gcn", frames_file)
    with pytest.raises(ValueError, match="the irreps study needs an EGNN model"):
        run(["study", "irreps", path, str(frames_file), "--frames", "5", "--output", str(tmp_path)])


def test_symmetry_spreads_and_baseline(tmp_path, tiny_egnn, frames_file):
    result = run(["study", "symmetry", tiny_egnn, "--structure", str(frames_file), "-n", "5", "--copies", "0,2,inf",
                  "--baseline-steps", "30", "--test-frames", "5", "--output", str(tmp_path)])
    for name in ("rotations", "reflections", "translations"):  # float64 model: measured 0 eV and 2e-16 eV/Å
        assert result[name]["energy_spread_eV"] < 1e-9
        assert result[name]["max_force_error_eV_per_A"] < 1e-9
    rows = result["baseline"]["rows"]
    assert [r["augmentation_copies"] for r in rows] == [0, 2, "inf"]
    assert all(np.isfinite(r[s]["energy_mae_meV"]) for r in rows for s in ("canonical", "rotated", "translated"))
    sym = result["baseline"]["symmetric_model"]
    assert sym["rotated"]["energy_mae_meV"] == pytest.approx(sym["canonical"]["energy_mae_meV"], rel=1e-8)
    assert sym["translated"]["forces_mae_meV_per_A"] == pytest.approx(sym["canonical"]["forces_mae_meV_per_A"], rel=1e-8)
    assert (tmp_path / "symmetry.json").is_file() and (tmp_path / "symmetry_baseline.png").stat().st_size > 0


def test_cartesian_baseline_is_not_rotation_invariant(ethanol):
    torch.manual_seed(0)
    mlp = symmetry.CartesianMLP(len(ethanol)).double().eval()

    class Module:
        def __call__(self, graph):
            e, f = mlp(graph[keys.POSITIONS].unsqueeze(0))
            return {keys.ENERGY: e, keys.FORCES: f[0]}

    model = symmetry._Model(Module(), ethanol.numbers, 5.0, torch.float64)
    spreads = symmetry.symmetry_spreads(model, ethanol.positions, 5, seed=0)
    assert spreads["rotations"]["energy_spread_eV"] > 1e-3
    rots = symmetry.random_rotations(50, np.random.default_rng(0))
    assert np.allclose(np.linalg.det(rots), 1.0) and np.allclose(rots @ rots.transpose(0, 2, 1), np.eye(3))


def test_augmentation_steps_scale_with_the_augmented_set():
    # 100 frames, 2 passes, batch 32: 0 copies -> 7 steps (ceil(200 / 32)), raised to the floor of 10;
    # 15 copies -> 100 steps; inf -> the largest finite level's
    assert symmetry.level_steps([0, 15, "inf"], 10, 2.0, 100) == [10, 100, 100]
    assert symmetry.level_steps([0, 512], 10, 1.0, 1000) == [32, 16032]
    assert symmetry.level_steps([0, "inf"], 10, None, 100) == [10, 10]


def test_symmetry_baseline_bad_options_are_one_line_errors(tmp_path, tiny_egnn, capsys):
    for option, value in (("--baseline-epochs", "0"), ("--baseline-hidden", "0"), ("--baseline-model", "cnn")):
        assert main(["study", "symmetry", tiny_egnn, option, value, "--output", str(tmp_path / "out")]) == 2
        message = capsys.readouterr().err.strip()
        assert "\n" not in message and option in message
    assert not (tmp_path / "out").exists()


def _gnn(ethanol, seed=0, hidden=16):
    torch.manual_seed(seed)
    model = baselines.CartesianGNN(ethanol.numbers, hidden, num_basis=16).double().eval()
    torch.nn.init.normal_(model.readout[-1].weight, std=0.5)  # zero at init: give it a nonzero energy surface
    return model


def test_cartesian_gnn_invariances_and_forces(ethanol):
    model = _gnn(ethanol)
    x = torch.as_tensor(ethanol.positions)[None]
    e0 = model.energy(x)
    assert torch.allclose(model.energy(x + torch.tensor([1.3, -0.7, 2.1], dtype=torch.float64)), e0, rtol=0, atol=1e-10)
    numbers = torch.as_tensor(ethanol.numbers)
    perm = torch.randperm(len(ethanol), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(model.energy(x[:, perm], numbers[perm]), e0, rtol=0, atol=1e-10)
    hydrogens = torch.nonzero(numbers == 1).squeeze(1)
    same = torch.arange(len(ethanol))
    same[hydrogens] = hydrogens.flip(0)  # permutes atoms of one species only: the molecule's own species apply
    assert torch.allclose(model.energy(x[:, same]), e0, rtol=0, atol=1e-10)
    rots = torch.as_tensor(symmetry.random_rotations(5, np.random.default_rng(0)))
    centred = x - x.mean(dim=1, keepdim=True)
    assert (model.energy(centred @ rots.transpose(1, 2)) - model.energy(centred)).abs().max() > 1e-3
    _, forces = model(x)
    fd = five_point_derivative(lambda p: float(model.energy(torch.as_tensor(p).reshape(1, -1, 3))), x.flatten().numpy(), 1e-3)
    assert np.allclose(-fd.reshape(-1, 3), forces[0].numpy(), rtol=1e-7, atol=1e-8)


def test_cartesian_gnn_training_reduces_the_error(frames_file):
    frames = load_frames(str(frames_file), None)
    pos, forces = np.stack(frames.positions), np.stack(frames.forces)
    before = symmetry.train_baseline(pos, frames.energy, forces, 0, 0, 0, model="gnn", hidden=32, numbers=frames.numbers[0])
    after = symmetry.train_baseline(pos, frames.energy, forces, 0, 300, 0, model="gnn", hidden=32, numbers=frames.numbers[0])
    e0 = symmetry._errors(symmetry._mlp_predict(before), pos, frames.energy, forces)
    e1 = symmetry._errors(symmetry._mlp_predict(after), pos, frames.energy, forces)
    assert e1["forces_mae_meV_per_A"] < 0.5 * e0["forces_mae_meV_per_A"]
    assert e1["energy_mae_meV"] < e0["energy_mae_meV"]


def test_symmetry_gnn_baseline_end_to_end(tmp_path, tiny_egnn, frames_file):
    result = run(["study", "symmetry", tiny_egnn, "--structure", str(frames_file), "-n", "2", "--copies", "0,1,inf",
                  "--baseline-model", "gnn", "--baseline-hidden", "8", "--baseline-steps", "5", "--test-frames", "5",
                  "--output", str(tmp_path)])
    baseline = result["baseline"]
    assert baseline["baseline_model"] == "gnn" and baseline["hidden"] == 8 and baseline["baseline_parameters"] > 0
    assert [r["augmentation_copies"] for r in baseline["rows"]] == [0, 1, "inf"]
    assert all(np.isfinite(r[s]["forces_mae_meV_per_A"]) for r in baseline["rows"] for s in ("canonical", "rotated"))
    saved = json.loads((tmp_path / "symmetry.json").read_text())
    assert saved["baseline"]["baseline_model"] == "gnn" and (tmp_path / "symmetry_baseline.png").stat().st_size > 0
