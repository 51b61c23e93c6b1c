"""A chemist's own files: extxyz with cells, pbc, stress and weights (ASE's EMT labels), renamed keys,
random splits of many molecules, fractions, and a short periodic training run whose deployed model
takes the structures it was trained on."""

import json
import warnings

import ase
import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from mlpot import export, keys
from mlpot.calculators import MLPotCalculator
from mlpot.checkpoint import potential_from_description
from mlpot.data import collate
from mlpot.data.datasets import Frames, read_frames
from mlpot.data.graph import atoms_to_graph
from mlpot.data.splits import frames_to_graphs, resolve_size, split_frames
from mlpot.train.config import ConfigError, config_from_dict
from mlpot.train.loop import train as run_training

MOLECULES = ("CH4", "NH3", "H2O", "C2H6", "CH3OH")  # EMT knows H, C, N, O


def emt_bulk(n: int, seed: int = 0) -> list:
    """n rattled, slightly strained Cu and Al fcc cells labelled by EMT (energy, forces, stress)."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        atoms = bulk("Cu" if i % 2 == 0 else "Al", "fcc", a=3.6 if i % 2 == 0 else 4.05, cubic=True)
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.01 * rng.standard_normal((3, 3))), scale_atoms=True)
        atoms.rattle(0.05, seed=seed * 1000 + i)
        atoms.calc = EMT()
        atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        atoms.info["weight"] = 1.0 + i % 3
        images.append(atoms)
    return images


def emt_molecules(copies: int, names=MOLECULES, seed: int = 0) -> list:
    """copies rattled frames of each molecule (no cell), labelled by EMT."""
    images = []
    for k in range(copies):
        for name in names:
            atoms = molecule(name)
            atoms.rattle(0.03, seed=seed + 17 * k + len(images))
            atoms.calc = EMT()
            atoms.get_potential_energy(), atoms.get_forces()
            images.append(atoms)
    return images


def write_ref_keys(path, images):
    """The images as a MACE-style extxyz: labels under REF_energy, REF_forces, REF_stress, no calculator."""
    out = []
    for atoms in images:
        copy = ase.Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        copy.info["REF_energy"] = atoms.get_potential_energy()
        copy.arrays["REF_forces"] = atoms.get_forces()
        copy.info["REF_stress"] = atoms.get_stress(voigt=False).reshape(9)
        copy.info["config_weight"] = atoms.info["weight"]
        out.append(copy)
    ase.io.write(path, out, format="extxyz")
    return path


# === reading ===
def test_extxyz_keeps_cell_pbc_stress_and_weights(tmp_path):
    images = emt_bulk(4)
    path = tmp_path / "bulk.extxyz"
    ase.io.write(path, images, format="extxyz")
    frames = read_frames(path)
    assert frames.periodic and frames.pbc.shape == (4, 3) and frames.pbc.all()
    for i, atoms in enumerate(images):
        np.testing.assert_allclose(frames.cells[i], atoms.cell.array, atol=1e-8)
        np.testing.assert_allclose(frames.stress[i], atoms.get_stress(voigt=False), atol=1e-10)
        np.testing.assert_allclose(frames.forces[i], atoms.get_forces(), atol=1e-8)
    np.testing.assert_array_equal(frames.weights, [1.0, 2.0, 3.0, 1.0])
    sub = frames.subset([2, 0])
    np.testing.assert_array_equal(sub.weights, [3.0, 1.0])
    np.testing.assert_array_equal(sub.stress[0], frames.stress[2])
    back = sub.to_atoms(0)
    assert back.pbc.all() and back.info["weight"] == 3.0
    np.testing.assert_allclose(back.get_stress(voigt=False), frames.stress[2])
    np.testing.assert_allclose(back.cell.array, frames.cells[2])


def test_virial_is_read_as_stress(tmp_path):
    atoms = emt_bulk(1)[0]
    stress = atoms.get_stress(voigt=False)
    plain = ase.Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=True)
    plain.calc = SinglePointCalculator(plain, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
    plain.info["virial"] = (-stress * atoms.get_volume()).reshape(9)
    path = tmp_path / "virial.extxyz"
    ase.io.write(path, [plain], format="extxyz")
    np.testing.assert_allclose(read_frames(path).stress[0], stress, atol=1e-10)


def test_molecules_have_zero_cell_and_no_pbc(tmp_path):
    path = tmp_path / "mols.extxyz"
    ase.io.write(path, emt_molecules(1), format="extxyz")
    frames = read_frames(path)
    assert not frames.periodic and frames.stress is None
    np.testing.assert_array_equal(frames.cells, np.zeros((len(MOLECULES), 3, 3)))
    np.testing.assert_array_equal(frames.weights, np.ones(len(MOLECULES)))


def test_renamed_keys_are_read(tmp_path):
    images = emt_bulk(3)
    path = write_ref_keys(tmp_path / "ref.extxyz", images)
    frames = read_frames(path, energy_key="REF_energy", forces_key="REF_forces", stress_key="REF_stress")
    np.testing.assert_allclose(frames.energy, [a.get_potential_energy() for a in images], atol=1e-8)
    np.testing.assert_allclose(frames.forces[1], images[1].get_forces(), atol=1e-8)
    np.testing.assert_allclose(frames.stress[2], images[2].get_stress(voigt=False), atol=1e-10)
    np.testing.assert_array_equal(frames.weights, [1.0, 2.0, 3.0])


@pytest.mark.parametrize("unit, per_ev_a3", [("GPa", 160.21766208), ("kbar", 1602.1766208)])
def test_stress_in_gpa_or_kbar_is_converted(tmp_path, unit, per_ev_a3):
    images = emt_bulk(3)
    path = write_ref_keys(tmp_path / "ref.extxyz", images)
    in_unit = ase.io.read(path, index=":")
    for atoms in in_unit:
        atoms.info["REF_stress"] = atoms.info["REF_stress"] * per_ev_a3
    ase.io.write(path, in_unit, format="extxyz")
    frames = read_frames(path, energy_key="REF_energy", forces_key="REF_forces", stress_key="REF_stress", stress_unit=unit)
    np.testing.assert_allclose(frames.stress[2], images[2].get_stress(voigt=False), rtol=1e-9, atol=1e-12)


def test_missing_key_error_names_the_files_keys(tmp_path):
    path = write_ref_keys(tmp_path / "ref.extxyz", emt_bulk(2))
    with pytest.raises(ValueError, match=r"frame 0 has no 'energy'; it has info keys \[.*'REF_energy'.*\], "
                       r"arrays keys \[.*'REF_forces'.*\]; name the right one with data.energy_key") as err:
        read_frames(path)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="no 'forces'.*data.forces_key"):
        read_frames(path, energy_key="REF_energy")
    # through a config it is one ConfigError line
    cfg = config_from_dict({"data": {"dataset": str(path), "train_size": 1, "val_size": 1}, "run_dir": str(tmp_path / "r")})
    from mlpot.train.loop import load_splits

    with pytest.raises(ConfigError, match="data.dataset: .*no 'energy'"):
        load_splits(cfg)


def test_bad_shapes_are_one_line_errors():
    z, r = [np.array([1, 1])], [np.zeros((2, 3))]
    with pytest.raises(ValueError, match=r"cells \(Å\) have shape \(1, 3\), expected \(1, 3, 3\)"):
        Frames(z, r, [0.0], r, cells=np.zeros((1, 3)))
    with pytest.raises(ValueError, match="periodic along .* zero cell vector"):
        Frames(z, r, [0.0], r, pbc=np.ones((1, 3), dtype=bool))
    with pytest.raises(ValueError, match="weights must be >= 0"):
        Frames(z, r, [0.0], r, weights=[-1.0])
    with pytest.raises(ValueError, match="NaN in stress .* of frame 0"):
        Frames(z, r, [0.0], r, stress=np.full((1, 3, 3), np.nan))


# === splits ===
def many_molecules(copies=6) -> Frames:
    images = emt_molecules(copies)
    return Frames(
        numbers=[a.numbers for a in images], positions=[a.positions for a in images],
        energy=[a.get_potential_energy() for a in images], forces=[a.get_forces() for a in images], name="mols",
    )


def test_many_molecules_split_at_random_without_warning():
    frames = many_molecules()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unseen-composition warning: a random split sees them all
        train, val, test = split_frames(frames, 0.6, 5, seed=0)
    assert (len(train), len(val), len(test)) == (18, 5, 7)
    everything = [tuple(map(tuple, r)) for part in (train, val, test) for r in part.positions]
    assert len(set(everything)) == len(frames)  # disjoint and complete
    # contiguous blocks would test only on the last frames; random draws them from the whole file
    assert set(test.compositions()) != {frames.compositions()[-1]}


def test_unseen_composition_warning_names_them():
    frames = many_molecules(4)  # the file lists CH4, NH3, ..., repeated
    order = np.argsort([c in ("C2H6", "CH4O") for c in frames.compositions()], kind="stable")
    grouped = frames.subset(order)  # all CH4, NH3 and H2O first: every element, but not every molecule
    with pytest.warns(UserWarning, match=r"test set holds composition\(s\) the training set never saw: C2H6, CH4O;"):
        split_frames(grouped, 6, 2, seed=0, split="contiguous")


def test_an_element_training_never_saw_is_an_error():
    frames = many_molecules(3).subset([0, 5, 10, 1])  # CH4, CH4, CH4, NH3: the test block alone has N
    with pytest.raises(ValueError, match=r"the test set holds element\(s\) N that no training frame has"):
        split_frames(frames, 2, 1, seed=0, split="contiguous", test_size=1)


def test_single_trajectory_keeps_contiguous_test_block():
    frames = many_molecules(1).subset([0] * 10)  # one composition: a trajectory
    frames.positions = [r + 0.01 * i for i, r in enumerate(frames.positions)]
    train, val, test = split_frames(frames, 4, 2, seed=0, test_size=3)
    np.testing.assert_array_equal([r[0, 0] for r in test.positions], [frames.positions[i][0, 0] for i in (7, 8, 9)])


def test_fractions():
    assert resolve_size(0.25, 10, "train_size") == 2 and resolve_size(7, 10, "train_size") == 7
    with pytest.raises(ValueError, match="0.01 of 10 frames is no frame"):
        resolve_size(0.01, 10, "train_size")
    cfg = config_from_dict({"data": {"train_size": 0.8, "val_size": 0.1, "test_size": 0.1}})
    assert cfg.data.train_size == 0.8 and isinstance(cfg.data.val_size, float)
    assert isinstance(config_from_dict({"data": {"train_size": 12}}).data.train_size, int)
    for bad in (1.5, 0.0, -3):
        with pytest.raises(ConfigError, match="data.train_size is .*: give a count of frames .* or a fraction"):
            config_from_dict({"data": {"train_size": bad}})
    with pytest.raises(ConfigError, match="data.split: 'blocks' is not one of"):
        config_from_dict({"data": {"split": "blocks"}})


def test_negative_loss_weights_are_refused():
    assert config_from_dict({"train": {"stress_weight": 1.0}}).train.stress_weight == 1.0
    with pytest.raises(ConfigError, match="train.stress_weight is -1.0; loss weights must be >= 0"):
        config_from_dict({"train": {"stress_weight": -1.0}})


# === training on periodic data ===
def test_frames_to_graphs_keeps_cells():
    images = emt_bulk(2)
    frames = Frames([a.numbers for a in images], [a.positions for a in images], [0.0, 0.0],
                    [a.get_forces() for a in images], cells=[a.cell.array for a in images], pbc=[a.pbc for a in images])
    graph = frames_to_graphs(frames, 4.0, torch.float64)[0]
    assert graph[keys.PBC].all()
    np.testing.assert_allclose(graph[keys.CELL][0].numpy(), images[0].cell.array)
    # 4 atoms in a 3.6 Å cell with a 4 Å cutoff: each atom has its 12 nearest fcc neighbours and more
    assert graph[keys.EDGE_INDEX].shape[1] / 4 >= 12


def test_weighted_loss_scales_each_frame():
    from mlpot.train.loop import _loss_fn

    loss = _loss_fn("mse", 0.01)
    x = torch.tensor([1.0, 2.0])
    assert loss(x, torch.ones(2)) == (x**2).mean()
    assert loss(x, torch.tensor([0.0, 1.0])) == 2.0  # frame 0 counts for nothing


def train_tiny_schnet(path, run_dir, train_size: int, val_size: int, **train):
    """A float64 SchNet of 8 features and 1 layer trained on the file ``path`` into ``run_dir`` (returned)."""
    cfg = config_from_dict({
        "data": {"dataset": str(path), "train_size": train_size, "val_size": val_size},
        "model": {"kind": "schnet", "cutoff": 4.0, "dtype": "float64", "hparams": {"num_features": 8, "num_layers": 1}},
        "train": {"batch_size": 4, "num_threads": 1, "device": "cpu", **train},
        "run_dir": str(run_dir),
    })
    run_training(cfg, progress=False)
    return run_dir


def test_periodic_training_deploys_a_periodic_model(tmp_path):
    images = emt_bulk(16)
    path = tmp_path / "bulk.extxyz"
    ase.io.write(path, images, format="extxyz")
    run_dir = train_tiny_schnet(path, tmp_path / "run", 10, 3, epochs=2)
    model = run_dir / "model.pt"
    _, meta = export.load(model)
    assert meta["periodic"] is True
    best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=False)
    eager = potential_from_description(best["potential"]).eval()
    calc = MLPotCalculator(str(model), dtype="float64")
    for atoms in images[:3]:
        atoms = atoms.copy()
        atoms.calc = calc
        energy = atoms.get_potential_energy()  # a molecular model would refuse the periodic cell
        expected = eager(collate([atoms_to_graph(atoms, 4.0, torch.float64)]))[keys.ENERGY]
        assert energy == pytest.approx(float(expected.detach()), abs=1e-9)
    assert json.loads((run_dir / "metrics.json").read_text())["test"]


def test_frames_of_weight_zero_do_not_train(tmp_path):
    """With every frame's weight 0 the loss and its gradients are 0, so Adam leaves the weights as built."""
    from mlpot.train.loop import Trainer

    images = emt_bulk(8)
    for atoms in images:
        atoms.info["weight"] = 0.0
    path = tmp_path / "zero.extxyz"
    ase.io.write(path, images, format="extxyz")

    trainer = Trainer(config_from_dict({
        "data": {"dataset": str(path), "train_size": 5, "val_size": 2},
        "model": {"kind": "schnet", "cutoff": 4.0, "dtype": "float64", "hparams": {"num_features": 8, "num_layers": 1}},
        "train": {"epochs": 1, "batch_size": 2, "num_threads": 1, "device": "cpu", "ema_decay": None},
        "run_dir": str(tmp_path / "run"),
    }))
    before = {k: v.clone() for k, v in trainer.potential.state_dict().items()}
    sums, steps = trainer.train_epoch(0, progress=False)
    assert steps == 3 and sums["loss"] == 0.0 and sums["f"] > 0  # errors are there, the loss ignores them
    for name, value in trainer.potential.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_molecules_and_cells_in_one_file_deploy_a_model_that_takes_both(tmp_path):
    """A file of isolated molecules and periodic cells: the deployed model says so (periodic and isolated)
    and its calculator takes both kinds; a cells-only model still refuses a molecule."""
    images = emt_bulk(8) + emt_molecules(2)
    path = tmp_path / "mixed.extxyz"
    ase.io.write(path, images, format="extxyz")
    run_dir = train_tiny_schnet(path, tmp_path / "run", 12, 4, epochs=1, stress_weight=1.0)  # stress loss: the cells' only
    _, meta = export.load(run_dir / "model.pt")
    assert meta["periodic"] is True and meta["isolated"] is True
    assert np.isfinite(json.loads((run_dir / "metrics.json").read_text())["test"]["forces_mae_meV_per_A"])
    calc = MLPotCalculator(str(run_dir / "model.pt"), dtype="float64")
    for atoms in (images[0].copy(), images[-1].copy()):
        atoms.calc = calc
        assert np.isfinite(atoms.get_potential_energy())
    assert export.takes_pbc({"periodic": True}, True) and not export.takes_pbc({"periodic": True}, False)
    assert export.takes_pbc({"periodic": False}, False) and not export.takes_pbc({"periodic": False}, True)
    assert export.trained_on(meta) == "periodic cells and isolated molecules"


def test_molecules_need_no_stress_beside_cells_that_have_one(tmp_path):
    path = tmp_path / "mixed.extxyz"
    ase.io.write(path, emt_bulk(2) + emt_molecules(1, names=("CH4",)), format="extxyz")
    frames = read_frames(path)
    assert frames.stress is not None and np.abs(frames.stress[2]).max() == 0 and np.abs(frames.stress[0]).max() > 0
    bulk_without = emt_bulk(1)[0].copy()  # copy(): no calculator, so no stress
    bulk_without.info["energy"], bulk_without.arrays["forces"] = -1.0, np.zeros((len(bulk_without), 3))
    ase.io.write(path, emt_bulk(2) + [bulk_without], format="extxyz")
    with pytest.raises(ValueError, match="frame 2 .periodic in all three directions. has no stress"):
        read_frames(path)
