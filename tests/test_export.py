"""Deployed files: round trip through a fresh torch-only process, metadata, dtypes, and the deploy CLI."""

import json
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import ase.build
import numpy as np
import pytest
import torch

import mlpot
from mlpot import checkpoint, export, keys
from mlpot.cli import deploy
from mlpot.data import atoms_to_graph, collate

from conftest import TINY_HPARAMS

CUTOFF = 5.0
BLOCKED = ("mlpot", "e3nn", "torch_geometric")

# Runs in a fresh interpreter: the packages that built the model cannot be imported, only torch.
TORCH_ONLY_SCRIPT = textwrap.dedent(
    """
    import sys

    BLOCKED = {blocked!r}
    for name in BLOCKED:
        sys.modules[name] = None  # any `import name` (or name.sub) now raises ImportError
    import torch

    model_path, graph_path, hessian_graph_path, out_path = sys.argv[1:]
    for name in BLOCKED:
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"{{name}} was importable")
    extra = {{"mlpot.json": ""}}
    model = torch.jit.load(model_path, _extra_files=extra)
    model.eval()
    graph = torch.load(graph_path)
    out = model(graph)
    hessian = model.hessian(torch.load(hessian_graph_path))
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED and sys.modules[m] is not None)
    torch.save(
        {{
            "energy": out["energy"].detach(),
            "forces": out["forces"].detach(),
            "node_energy": out["node_energy"].detach(),
            "hessian": hessian.detach(),
            "metadata": extra["mlpot.json"],
            "loaded": loaded,
        }},
        out_path,
    )
    """
).format(blocked=BLOCKED)


def molecules():
    ethanol = ase.build.molecule("CH3CH2OH")
    ethanol.positions += np.random.default_rng(0).uniform(-0.05, 0.05, ethanol.positions.shape)
    return [ethanol, ase.build.molecule("H2O")]


def batch_graph(dtype):
    return collate([atoms_to_graph(atoms, CUTOFF, dtype) for atoms in molecules()])


def eager(potential, graph):
    out = potential(graph)
    return {k: out[k].detach() for k in (keys.ENERGY, keys.FORCES, keys.NODE_ENERGY)}


def assert_relative(actual, expected, rtol):
    scale = expected.abs().max().item()
    assert scale > 0
    assert (actual - expected).abs().max().item() <= rtol * scale, (actual, expected)


def test_load_in_torch_only_process_matches_eager(kind, tiny_potential, tmp_path):
    potential = tiny_potential(kind, torch.float64, cutoff=CUTOFF)
    path = tmp_path / f"{kind}.pt"
    export.save(potential, path)
    graph = batch_graph(torch.float64)
    water = atoms_to_graph(molecules()[1], CUTOFF, torch.float64)
    torch.save(graph, tmp_path / "graph.pt")
    torch.save(water, tmp_path / "water.pt")
    (tmp_path / "run.py").write_text(TORCH_ONLY_SCRIPT)
    script, graph_file, water_file, out_file = (tmp_path / n for n in ("run.py", "graph.pt", "water.pt", "out.pt"))
    result = subprocess.run(
        [sys.executable, str(script), str(path), str(graph_file), str(water_file), str(out_file)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    loaded = torch.load(out_file)
    assert loaded["loaded"] == []
    assert json.loads(loaded["metadata"])["kind"] == kind

    expected = eager(potential, graph)
    assert expected[keys.FORCES].norm() > 1e-4
    for key in (keys.ENERGY, keys.FORCES, keys.NODE_ENERGY):
        assert loaded[key].dtype == torch.float64
        assert loaded[key].shape == expected[key].shape
        assert_relative(loaded[key], expected[key], 1e-6)
    assert_relative(loaded["hessian"], potential.hessian(water), 1e-6)


def test_metadata_contents(kind, tiny_potential, tmp_path):
    potential = tiny_potential(kind, torch.float64, species=(8, 1, 6), cutoff=4.5)
    path = tmp_path / "model.pt"
    written = export.save(potential, path, dataset="rmd17_ethanol", metrics={"energy_mae_mev": 1.5})
    meta = export.read_metadata(path)
    assert meta == json.loads(json.dumps(written))
    assert meta["kind"] == kind
    assert meta["species"] == [1, 6, 8]
    assert meta["cutoff"] == 4.5
    assert meta["dtype"] == "float64"
    assert meta["units"] == {"energy": "eV", "length": "Å", "forces": "eV/Å"}
    assert meta["format_version"] == export.FORMAT_VERSION
    assert meta["mlpot_version"] == mlpot.__version__
    assert meta["torch_version"] == torch.__version__
    assert meta["hparams"] == TINY_HPARAMS[kind]
    assert meta["dataset"] == "rmd17_ethanol"
    assert meta["metrics"] == {"energy_mae_mev": 1.5}

    module, loaded_meta = export.load(path)
    assert loaded_meta == meta
    assert not module.training


def test_save_leaves_the_potential_untouched(kind, tiny_potential, tmp_path):
    # saving mid-training must not switch the model to eval mode or swap its layers for compiled ones
    potential = tiny_potential(kind, torch.float64).train()
    layers = {name: type(module) for name, module in potential.named_modules()}
    state = {k: v.clone() for k, v in potential.state_dict().items()}
    export.save(potential, tmp_path / "model.pt")
    assert potential.training
    assert {name: type(module) for name, module in potential.named_modules()} == layers
    assert potential.state_dict().keys() == state.keys()
    assert all(torch.equal(potential.state_dict()[k], v) for k, v in state.items())
    # training still gets force gradients with respect to the weights
    out = potential(batch_graph(torch.float64))
    assert out[keys.FORCES].requires_grad
    export.save(potential, tmp_path / "again.pt")  # a second save works too


@pytest.mark.parametrize("saved, loaded", [(torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_dtype_conversion_on_load(kind, tiny_potential, tmp_path, saved, loaded):
    potential = tiny_potential(kind, saved)
    path = tmp_path / "model.pt"
    export.save(potential, path)
    module, meta = export.load(path, dtype=loaded)
    assert meta["dtype"] == str(saved).removeprefix("torch.")
    out = module(batch_graph(loaded))
    expected = eager(potential, batch_graph(saved))
    for key in (keys.ENERGY, keys.FORCES, keys.NODE_ENERGY):
        # energies are summed in float64 in every precision; forces come in the precision asked for
        assert out[key].dtype == (torch.float64 if key != keys.FORCES else loaded), key
        assert_relative(out[key].detach().double(), expected[key].double(), 1e-4)
    assert module.hessian(atoms_to_graph(molecules()[1], CUTOFF, loaded)).dtype == loaded

    # without a dtype the file's own is kept
    module, _ = export.load(path)
    assert module(batch_graph(saved))[keys.FORCES].dtype == saved


def test_deploy_cli_from_checkpoint(kind, tiny_potential, tmp_path, capsys):
    potential = tiny_potential(kind, torch.float64)
    ckpt = tmp_path / "run" / "best.ckpt"
    checkpoint.save_potential(potential, ckpt, epoch=3)

    # the checkpoint rebuilds the same potential
    rebuilt = checkpoint.load_potential(ckpt).eval()
    graph = batch_graph(torch.float64)
    for key, value in eager(rebuilt, graph).items():
        assert_relative(value, eager(potential, graph)[key], 1e-12)

    out_path = tmp_path / "deployed" / "model.pt"
    deploy([str(ckpt), "-o", str(out_path), "--dataset", "rmd17_ethanol"])
    assert "wrote" in capsys.readouterr().out
    module, meta = export.load(out_path)
    assert (meta["kind"], meta["dtype"], meta["dataset"]) == (kind, "float64", "rmd17_ethanol")
    expected = eager(potential, graph)
    out = module(graph)
    for key in (keys.ENERGY, keys.FORCES):
        assert_relative(out[key].detach(), expected[key], 1e-10)

    out32 = tmp_path / "model32.pt"
    deploy([str(ckpt), "-o", str(out32), "--dtype", "float32"])
    module, meta = export.load(out32)
    assert meta["dtype"] == "float32" and "dataset" not in meta
    out = module(batch_graph(torch.float32))
    assert out[keys.FORCES].dtype == torch.float32 and out[keys.ENERGY].dtype == torch.float64
    assert_relative(out[keys.FORCES].detach().double(), expected[keys.FORCES], 1e-4)


def test_deploy_console_script(tiny_potential, tmp_path):
    script = Path(sys.executable).with_name("mlpot-deploy")
    script = str(script) if script.exists() else shutil.which("mlpot-deploy")
    if script is None:
        pytest.skip("mlpot-deploy console script is not installed")
    ckpt = tmp_path / "schnet.ckpt"
    checkpoint.save_potential(tiny_potential("schnet", torch.float64), ckpt)
    out_path = tmp_path / "schnet.pt"
    result = subprocess.run(
        [script, str(ckpt), "-o", str(out_path), "--dtype", "float32"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    meta = export.read_metadata(out_path)
    assert (meta["kind"], meta["dtype"], meta["species"]) == ("schnet", "float32", [1, 6, 8])

    bad = subprocess.run([script, str(ckpt)], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--output" in bad.stderr


def test_sniff_tells_model_files_apart(tiny_potential, tmp_path):
    """One function says what a file is; read_metadata, load_potential and the study loader act on it."""
    potential = tiny_potential("schnet", torch.float64)
    export.save(potential, tmp_path / "model.pt")
    checkpoint.save_potential(potential, tmp_path / "best.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated upstream
        torch.jit.save(torch.jit.script(torch.nn.Linear(3, 1)), str(tmp_path / "linear.pt"))
    (tmp_path / "noise.pt").write_bytes(np.random.default_rng(0).bytes(512))
    kinds = {name: export.sniff(tmp_path / name) for name in ("model.pt", "best.pt", "other.pt", "linear.pt", "noise.pt")}
    assert kinds == {
        "model.pt": "torchscript", "best.pt": export.CHECKPOINT, "other.pt": export.CHECKPOINT,
        "linear.pt": export.FOREIGN_TORCHSCRIPT, "noise.pt": export.NOT_A_ZIP,
    }
    with pytest.raises(FileNotFoundError, match="no model file at"):
        export.sniff(tmp_path / "missing.pt")
    # each reader words what is wrong for what it wanted
    with pytest.raises(ValueError, match="is a torch.save file .a training checkpoint.., not a deployed mlpot model"):
        export.read_metadata(tmp_path / "best.pt")
    with pytest.raises(ValueError, match="TorchScript file without mlpot metadata, not an mlpot checkpoint"):
        checkpoint.load_potential(tmp_path / "linear.pt")
    with pytest.raises(ValueError, match="not a readable mlpot checkpoint"):
        checkpoint.load_potential(tmp_path / "noise.pt")
    # both loaders rebuild the same eager model from the deployed file
    from mlpot.study.common import load_model

    graph = batch_graph(torch.float64)
    expected = eager(potential, graph)
    for rebuilt in (checkpoint.load_potential(tmp_path / "model.pt"), load_model(tmp_path / "model.pt").potential):
        for key in (keys.ENERGY, keys.FORCES):
            assert_relative(eager(rebuilt, graph)[key], expected[key], 1e-12)
