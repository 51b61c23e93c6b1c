"""Bad input, table-driven: every case names what is wrong (and what to do), and leaves no partial output.

Each row of CASES is (id, trigger, exception type, regex for the message, output). ``trigger(ctx)`` runs
the bad call; ``output(ctx)``, where given, is the file or folder the call would have written: after the
error it must not exist, and no ``*.tmp`` may be left beside it.
"""

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import ase
import ase.build
import ase.io
from ase.calculators.calculator import PropertyNotImplementedError
import numpy as np
import pytest
import torch

from mlpot import checkpoint, export
from mlpot.calculators import MLPotCalculator
from mlpot.cli import deploy, evaluate, train as train_cli
from mlpot.data.datasets import read_frames
from mlpot.train.config import ConfigError, config_from_dict

from robustness_helpers import (
    SHIFTS, make_config, perturbed_ethanol, quiet_torchscript, tiny_potential, tmp_files, write_sgdml_npz,
    write_yaml,
)

KINDS = ("gcn", "schnet", "egnn")


# === files shared by the cases (written once) ===
def with_metadata(source: Path, path: Path, change: Callable[[dict], None]) -> Path:
    """A copy of a deployed file whose mlpot.json went through ``change``."""
    meta = export.read_metadata(source)
    change(meta)
    with quiet_torchscript():
        torch.jit.save(torch.jit.load(str(source)), str(path), _extra_files={"mlpot.json": json.dumps(meta)})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("files")
    potential = tiny_potential("schnet")
    f = SimpleNamespace(folder=folder)
    f.molecular = folder / "molecular.pt"
    export.save(potential, f.molecular)
    f.periodic = folder / "periodic.pt"
    export.save(potential, f.periodic, periodic=True)
    f.checkpoint = folder / "schnet.ckpt"
    checkpoint.save_potential(potential, f.checkpoint, epoch=3)
    f.future = with_metadata(f.molecular, folder / "future.pt", lambda m: m.update(format_version=export.FORMAT_VERSION + 1))
    f.unversioned = with_metadata(f.molecular, folder / "unversioned.pt", lambda m: m.pop("format_version"))
    f.train = write_sgdml_npz(folder / "train.npz", 14, 0)
    f.test = write_sgdml_npz(folder / "test.npz", 4, 1)
    return f


@pytest.fixture
def ctx(files, tmp_path):
    return SimpleNamespace(**vars(files), tmp=tmp_path)


# === triggers ===
def energy(ctx, atoms, model="molecular", **kwargs):
    atoms.calc = MLPotCalculator(getattr(ctx, model), **kwargs)
    return atoms.get_potential_energy()


def edited_ethanol(edit):
    atoms = perturbed_ethanol()
    edit(atoms)
    return atoms


def set_position(index, value):
    def edit(atoms):
        atoms.positions[index, 1] = value
    return edit


def periodic(atoms):
    atoms.cell = [12.0, 12.0, 12.0]
    atoms.pbc = True
    atoms.center()
    return atoms


def with_cell(atoms, cell):
    atoms.cell = cell
    atoms.pbc = True
    return atoms


def stress(ctx, atoms, model="periodic"):
    atoms.calc = MLPotCalculator(getattr(ctx, model), check_pbc=False)
    return atoms.get_stress()


def extxyz_with_stress(ctx, values):
    """An extxyz file of one periodic ethanol whose stress label (``REF_stress``) has ``values``."""
    atoms = periodic(perturbed_ethanol())
    atoms.info["REF_stress"] = np.asarray(values, dtype=float)
    atoms.info["energy"], atoms.arrays["forces"] = -100.0, np.zeros((len(atoms), 3))
    path = ctx.tmp / "stress.extxyz"
    ase.io.write(path, atoms, format="extxyz")
    return path


def npz(ctx, name, **arrays):
    """An sGDML-layout npz of 3 ethanol frames, changed by ``arrays`` (None drops a key)."""
    base = ase.build.molecule("CH3CH2OH")
    rng = np.random.default_rng(0)
    content = {
        "E": np.full((3, 1), -97080.0) + rng.normal(size=(3, 1)),  # kcal/mol, like MD17 ethanol
        "F": rng.normal(size=(3, 9, 3)),
        "R": base.positions[None] + rng.normal(scale=0.02, size=(3, 9, 3)),
        "z": base.numbers,
    }
    content.update(arrays)
    path = ctx.tmp / f"{name}.npz"
    np.savez(path, **{k: v for k, v in content.items() if v is not None})
    return path


def with_nan(shape, index):
    values = np.zeros(shape)
    values[index] = np.nan
    return values


def with_inf(shape, index):
    values = np.zeros(shape)
    values[index] = np.inf
    return values


def train_with(ctx, change=None, dataset=None):
    config = make_config(dataset or ctx.train, ctx.test, ctx.tmp / "run", epochs=1)
    if change:
        change(config)
    train_cli([str(write_yaml(ctx.tmp / "config.yaml", config)), "--quiet"])


def truncated(source: Path, path: Path) -> Path:
    blob = source.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    return path


def torch_saved_dict(ctx):
    path = ctx.tmp / "weights.pt"
    torch.save({"w": torch.zeros(3), "epoch": 1}, path)
    return path


def plain_torchscript(ctx):
    path = ctx.tmp / "linear.pt"
    with quiet_torchscript():
        torch.jit.save(torch.jit.script(torch.nn.Linear(3, 1)), str(path))
    return path


def random_bytes(ctx, name="noise.pt", size=4096):
    path = ctx.tmp / name
    path.write_bytes(np.random.default_rng(0).bytes(size))
    return path


def damaged_checkpoint(ctx, damage):
    description = checkpoint.describe(tiny_potential("schnet"))
    damage(description)
    path = ctx.tmp / "damaged.ckpt"
    torch.save({"potential": description}, path)
    return path


def shrink_weights(description):
    description["state_dict"] = {k: v[:1] if v.ndim else v for k, v in description["state_dict"].items()}


def deploy_to_output(ctx, checkpoint_path):
    deploy([str(checkpoint_path), "-o", str(ctx.tmp / "out" / "model.pt")])


DEPLOYED = lambda ctx: ctx.tmp / "out" / "model.pt"  # noqa: E731
RUN_DIR = lambda ctx: ctx.tmp / "run"  # noqa: E731
NEEDS_DEPLOY = r"re-deploy it from its checkpoint: mlpot-deploy CHECKPOINT -o NEW\.pt"


@dataclass
class Case:
    id: str
    trigger: Callable
    error: type
    match: str
    output: Optional[Callable] = None


CASES = [
    # --- structures given to a calculator ---
    Case("unknown_element", lambda c: energy(c, edited_ethanol(lambda a: a.numbers.__setitem__(2, 16))),
         ValueError, r"element\(s\) S not supported by this model; it knows H, C, O"),
    Case("unknown_elements_named_all", lambda c: energy(c, ase.Atoms("SiClH", positions=[[0, 0, 0], [2, 0, 0], [0, 2, 0]])),
         ValueError, r"element\(s\) Si, Cl not supported by this model; it knows H, C, O"),
    Case("overlapping_atoms", lambda c: energy(c, edited_ethanol(lambda a: a.positions.__setitem__(5, a.positions[1]))),
         ValueError, r"atoms 1 and 5 are 0\.000 Å apart, closer than 0\.5 Å: the structure is unphysical"),
    Case("nan_position", lambda c: energy(c, edited_ethanol(set_position(3, np.nan))),
         ValueError, r"positions contain NaN or inf \(atoms \[3\]\)"),
    Case("inf_position", lambda c: energy(c, edited_ethanol(set_position(7, np.inf))),
         ValueError, r"positions contain NaN or inf \(atoms \[7\]\)"),
    Case("minus_inf_position", lambda c: energy(c, edited_ethanol(set_position(0, -np.inf))),
         ValueError, r"positions contain NaN or inf \(atoms \[0\]\)"),
    Case("nan_position_hessian",
         lambda c: MLPotCalculator(c.molecular).get_hessian(edited_ethanol(set_position(2, np.nan))),
         ValueError, r"positions contain NaN or inf \(atoms \[2\]\)"),
    Case("empty_structure", lambda c: energy(c, ase.Atoms()), ValueError, r"the structure has no atoms"),
    Case("periodic_cell_to_molecular_model", lambda c: energy(c, periodic(perturbed_ethanol())),
         ValueError, r"trained on isolated molecules \(no periodic cell\) but the structure has "
                     r"pbc=\[True, True, True\]; set atoms\.pbc accordingly, or pass check_pbc=False"),
    Case("slab_to_molecular_model",
         lambda c: energy(c, edited_ethanol(lambda a: (periodic(a), a.set_pbc([True, True, False])))),
         ValueError, r"trained on isolated molecules .* pbc=\[True, True, False\]"),
    Case("zero_volume_cell", lambda c: energy(c, with_cell(perturbed_ethanol(), [[6, 0, 0], [12, 0, 0], [0, 0, 12]]),
                                              model="periodic"),
         ValueError, r"periodic boundary conditions need a cell with non-zero volume: .*set atoms\.cell, or atoms\.pbc = False"),
    Case("pbc_without_cell", lambda c: energy(c, with_cell(perturbed_ethanol(), np.zeros((3, 3))), model="periodic"),
         ValueError, r"periodic boundary conditions need a cell with non-zero volume"),
    Case("stress_of_a_slab", lambda c: stress(c, edited_ethanol(lambda a: (periodic(a), a.set_pbc([True, True, False])))),
         PropertyNotImplementedError, r"stress needs a cell periodic in all three directions, got pbc=\[True, True, False\]"),
    Case("dataset_stress_wrong_shape", lambda c: read_frames(extxyz_with_stress(c, np.ones(4)), stress_key="REF_stress"),
         ValueError, r"stress of frame 0 has 4 values, expected 6 \(Voigt\), 9 or 3x3"),
    # a stress in GPa (a few GPa) read as eV/Å^3, and one in kbar read as GPa
    Case("dataset_stress_in_gpa", lambda c: read_frames(extxyz_with_stress(c, [2.5, 2.5, 2.5, 0, 0, 0]), stress_key="REF_stress"),
         ValueError, r"frame 0 has a stress of 2\.5 eV/Å\^3 \(400\.5 GPa\) read as eV/A\^3, beyond any plausible stress; "
                     r"give the file's stress unit with data\.stress_unit \(--stress-unit\): one of GPa, kbar, bar"),
    Case("dataset_stress_in_kbar_read_as_gpa", lambda c: read_frames(extxyz_with_stress(c, [-250.0, -250.0, -250.0, 0, 0, 0]),
                                                                     stress_key="REF_stress", stress_unit="GPa"),
         ValueError, r"stress of 1\.56 eV/Å\^3 \(250 GPa\) read as GPa"),
    Case("dataset_unknown_stress_unit", lambda c: read_frames(extxyz_with_stress(c, np.zeros(6)), stress_key="REF_stress",
                                                              stress_unit="Pa"),
         ValueError, r"unknown stress unit 'Pa' for .*stress\.extxyz; use one of eV/A\^3, GPa, kbar, bar"),
    Case("molecule_to_periodic_model", lambda c: energy(c, perturbed_ethanol(), model="periodic"),
         ValueError, r"trained on periodic cells but the structure has pbc=\[False, False, False\]; .*check_pbc=False"),
    # --- dataset files ---
    Case("dataset_missing_forces_key", lambda c: read_frames(npz(c, "noforces", F=None)),
         ValueError, r"noforces\.npz: missing keys \['F'\] for the sGDML/MD17 layout \(needs \['E', 'F', 'R', 'z'\], "
                     r"found keys \['E', 'R', 'z'\]\)"),
    Case("dataset_missing_rmd17_key",
         lambda c: read_frames(npz(c, "rmd17", E=None, F=None, R=None, z=None, nuclear_charges=np.ones(9),
                                   coords=np.zeros((3, 9, 3)), energies=np.zeros(3))),
         ValueError, r"missing keys \['forces'\] for the revised MD17 layout"),
    Case("dataset_unrelated_keys", lambda c: read_frames(npz(c, "other", E=None, F=None, R=None, z=None, x=np.ones(3))),
         ValueError, r"not an MD17/rMD17 npz .*found keys \['x'\]"),
    Case("dataset_forces_wrong_shape", lambda c: read_frames(npz(c, "shape", F=np.zeros((3, 8, 3)))),
         ValueError, r"forces have shape \(3, 8, 3\), expected \(3, 9, 3\) like the positions"),
    Case("dataset_energies_wrong_shape", lambda c: read_frames(npz(c, "eshape", E=np.zeros((2, 1)))),
         ValueError, r"energies have shape \(2, 1\), expected \(3,\) or \(3, 1\)"),
    Case("dataset_positions_wrong_shape", lambda c: read_frames(npz(c, "rshape", R=np.zeros((3, 9, 2)))),
         ValueError, r"positions have shape \(3, 9, 2\), expected \(n_frames, 9, 3\)"),
    Case("dataset_nan_energy", lambda c: read_frames(npz(c, "nanE", E=with_nan((3, 1), (1, 0)))),
         ValueError, r"NaN in energies of frame 1 in .*nanE\.npz"),
    Case("dataset_nan_force", lambda c: read_frames(npz(c, "nanF", F=with_nan((3, 9, 3), (2, 4, 1)))),
         ValueError, r"NaN in forces of frame 2 in .*nanF\.npz"),
    Case("dataset_inf_force", lambda c: read_frames(npz(c, "infF", F=with_inf((3, 9, 3), (0, 0, 0)))),
         ValueError, r"infinite value in forces of frame 0"),
    Case("dataset_unknown_unit", lambda c: read_frames(npz(c, "md17"), units="hartree"),
         ValueError, r"unknown energy unit 'hartree' for .*md17\.npz; use one of \['eV', 'kcal/mol'\]"),
    Case("dataset_kcal_read_as_ev", lambda c: read_frames(npz(c, "md17"), units="eV"),
         ValueError, r"md17\.npz: frame \d has energy -970\d\d(\.\d)? eV after reading it as eV, more than any total "
                     r"energy of these atoms can be; the file's energy unit is probably wrong \(pass units=\.\.\.\)"),
    Case("train_on_nan_labels", lambda c: train_with(c, dataset=npz(c, "nanE", E=with_nan((3, 1), (1, 0)))),
         ValueError, r"NaN in energies of frame 1", RUN_DIR),
    # --- configs ---
    Case("config_unknown_key", lambda c: train_with(c, lambda cfg: cfg["train"].update(lrr=1e-3)),
         ConfigError, r"^unknown key\(s\) train\.lrr; allowed: \[", RUN_DIR),
    Case("config_unknown_section", lambda c: train_with(c, lambda cfg: cfg.update(trian={"lr": 1e-3})),
         ConfigError, r"^unknown key\(s\) trian", RUN_DIR),
    Case("config_wrong_type", lambda c: train_with(c, lambda cfg: cfg["train"].update(epochs="ten")),
         ConfigError, r"^train\.epochs: expected int, got str 'ten'", RUN_DIR),
    Case("config_float_for_int", lambda c: train_with(c, lambda cfg: cfg["train"].update(epochs=9.5)),
         ConfigError, r"^train\.epochs: expected int, got float 9\.5", RUN_DIR),
    Case("config_size_neither_count_nor_fraction", lambda c: train_with(c, lambda cfg: cfg["data"].update(train_size=9.5)),
         ConfigError, r"^data\.train_size is 9\.5: give a count of frames \(at least 1\) or a fraction", RUN_DIR),
    Case("config_hparams_not_a_mapping", lambda c: train_with(c, lambda cfg: cfg["model"].update(hparams=[8, 1])),
         ConfigError, r"^model\.hparams: expected a mapping, got list", RUN_DIR),
    Case("config_unknown_hparam", lambda c: train_with(c, lambda cfg: cfg["model"]["hparams"].update(lmax=2)),
         ConfigError, r"^model\.hparams: gcn takes no lmax", RUN_DIR),
    Case("config_bad_choice", lambda c: config_from_dict({"train": {"on_nonfinite": "ignore"}}),
         ConfigError, r"train\.on_nonfinite: 'ignore' is not one of \['stop', 'skip'\]"),
    Case("config_override_wrong_type", lambda c: config_from_dict({}, ["train.batch_size=five"]),
         ConfigError, r"train\.batch_size: expected int, got str 'five'"),
    # --- model files ---
    Case("model_missing", lambda c: MLPotCalculator(c.tmp / "missing.pt"), FileNotFoundError, r"no model file at .*missing\.pt"),
    Case("model_truncated", lambda c: MLPotCalculator(truncated(c.molecular, c.tmp / "half.pt")),
         ValueError, r"half\.pt is not an mlpot model file \(not a TorchScript archive; truncated or foreign\?\)"),
    Case("model_empty_file", lambda c: MLPotCalculator(random_bytes(c, "empty.pt", size=0)),
         ValueError, r"empty\.pt is not an mlpot model file"),
    Case("model_random_bytes", lambda c: MLPotCalculator(random_bytes(c)), ValueError, r"noise\.pt is not an mlpot model file"),
    Case("model_is_torch_saved_dict", lambda c: MLPotCalculator(torch_saved_dict(c)),
         ValueError, r"weights\.pt is a torch\.save file \(a training checkpoint\?\), not a deployed mlpot model; "
                     r"deploy a checkpoint with: mlpot-deploy CHECKPOINT -o MODEL\.pt"),
    Case("model_is_a_checkpoint", lambda c: MLPotCalculator(c.checkpoint),
         ValueError, r"schnet\.ckpt is a torch\.save file .*mlpot-deploy CHECKPOINT"),
    Case("model_is_plain_torchscript", lambda c: MLPotCalculator(plain_torchscript(c)),
         ValueError, r"linear\.pt is a TorchScript file but not an mlpot model \(no mlpot\.json metadata\)"),
    Case("model_future_format_version", lambda c: MLPotCalculator(c.future),
         ValueError, rf"future\.pt has model format version {export.FORMAT_VERSION + 1}, newer than this mlpot .* "
                     rf"reads \(up to {export.FORMAT_VERSION}\); upgrade mlpot"),
    Case("model_without_format_version", lambda c: MLPotCalculator(c.unversioned),
         ValueError, r"unversioned\.pt was written before mlpot model files had a format version \(None\) .*" + NEEDS_DEPLOY),
    Case("eval_truncated_model", lambda c: evaluate([str(truncated(c.molecular, c.tmp / "half.pt")), str(c.test)]),
         ValueError, r"half\.pt is not an mlpot model file"),
    # --- mlpot-deploy with a bad checkpoint writes nothing ---
    Case("deploy_missing_checkpoint", lambda c: deploy_to_output(c, c.tmp / "none.ckpt"),
         FileNotFoundError, r"no checkpoint at .*none\.ckpt", DEPLOYED),
    Case("deploy_truncated_checkpoint", lambda c: deploy_to_output(c, truncated(c.checkpoint, c.tmp / "half.ckpt")),
         ValueError, r"half\.ckpt is not a readable mlpot checkpoint", DEPLOYED),
    Case("deploy_random_bytes", lambda c: deploy_to_output(c, random_bytes(c, "noise.ckpt")),
         ValueError, r"noise\.ckpt is not a readable mlpot checkpoint", DEPLOYED),
    Case("deploy_foreign_dict", lambda c: deploy_to_output(c, torch_saved_dict(c)),
         ValueError, r"weights\.pt is not an mlpot checkpoint \(no 'potential' entry\)", DEPLOYED),
    Case("deploy_plain_torchscript", lambda c: deploy_to_output(c, plain_torchscript(c)),
         ValueError, r"is a TorchScript file without mlpot metadata, not an mlpot checkpoint", DEPLOYED),
    Case("deploy_checkpoint_weights_wrong_shape", lambda c: deploy_to_output(c, damaged_checkpoint(c, shrink_weights)),
         ValueError, r"damaged\.ckpt is a damaged mlpot checkpoint: its model description does not rebuild "
                     r"\(RuntimeError: .*size mismatch", DEPLOYED),
    Case("deploy_checkpoint_without_hparams", lambda c: deploy_to_output(c, damaged_checkpoint(c, lambda d: d.pop("hparams"))),
         ValueError, r"damaged\.ckpt is a damaged mlpot checkpoint: .*\(KeyError: 'hparams'\)", DEPLOYED),
    Case("deploy_checkpoint_unknown_kind", lambda c: deploy_to_output(c, damaged_checkpoint(c, lambda d: d.update(kind="mace"))),
         ValueError, r"damaged\.ckpt is a damaged mlpot checkpoint: .*unknown model kind 'mace'", DEPLOYED),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_named_and_leaves_nothing(case, ctx):
    before = sorted(p.name for p in ctx.folder.iterdir())
    with pytest.raises(case.error) as info:
        case.trigger(ctx)
    message = str(info.value)
    assert re.search(case.match, message, flags=re.S), f"{case.id}: message {message!r} does not match {case.match!r}"
    if case.output is not None:
        output = case.output(ctx)
        assert not output.exists(), f"{case.id}: a failed call left {output}"
        if output.parent.exists():
            assert tmp_files(output.parent) == [], f"{case.id}: temporary files left in {output.parent}"
    assert sorted(p.name for p in ctx.folder.iterdir()) == before, "a case changed the shared files"


def test_failed_deploy_keeps_an_existing_output(files, tmp_path):
    """A deploy that fails does not touch (truncate, delete) the file it was asked to replace."""
    output = tmp_path / "model.pt"
    shutil.copy(files.molecular, output)
    blob = output.read_bytes()
    bad = tmp_path / "half.ckpt"
    truncated(files.checkpoint, bad)
    with pytest.raises(ValueError, match="not a readable mlpot checkpoint"):
        deploy([str(bad), "-o", str(output)])
    assert output.read_bytes() == blob and tmp_files(tmp_path) == []


# === a single atom is not an error ===
@pytest.fixture(scope="module")
def each_kind(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kinds")
    paths = {kind: folder / f"{kind}.pt" for kind in KINDS}
    for kind, path in paths.items():
        export.save(tiny_potential(kind), path)
    return paths


@pytest.mark.parametrize("kind", KINDS)
def test_isolated_atom_is_not_an_error(kind, each_kind):
    """One atom alone: a finite energy, forces exactly zero, the same wherever it sits, and two atoms
    farther apart than the cutoff have the sum of their single-atom energies."""
    calc = MLPotCalculator(each_kind[kind])
    alone = {}
    for z in (1, 6, 8):
        energies = []
        for position in ([0.0, 0.0, 0.0], [3.1, -2.7, 40.0]):
            atoms = ase.Atoms(numbers=[z], positions=[position])
            atoms.calc = calc
            energies.append(atoms.get_potential_energy())
            np.testing.assert_array_equal(atoms.get_forces(), np.zeros((1, 3)))
        assert np.isfinite(energies).all(), (kind, z)
        np.testing.assert_allclose(energies[1], energies[0], rtol=0, atol=1e-9)  # the same wherever it sits
        alone[z] = energies[0]
        assert abs(alone[z] - SHIFTS[z]) < 0.5 * abs(SHIFTS[z]), "the species' energy shift is not applied"
    far = ase.Atoms("OH", positions=[[0, 0, 0], [0, 0, 5.0 + 0.5]])  # cutoff 5 Å
    far.calc = MLPotCalculator(each_kind[kind], skin=0.0)
    np.testing.assert_allclose(far.get_potential_energy(), alone[8] + alone[1], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(far.get_forces(), np.zeros((2, 3)))
