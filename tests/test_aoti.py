"""The AOTInductor deploy format: torch.export + AOTInductor with forces inside, loaded by the same calculator."""

import json
import subprocess
import sys
import textwrap

import ase.build
import ase.io
import numpy as np
import pytest
import torch

from mlpot import checkpoint, commands, export, keys
from mlpot.calculators import MLPotCalculator
from mlpot.cli import deploy
from mlpot.data import atoms_to_graph, collate

from conftest import make_tiny_potential, perturbed_ethanol

CUTOFF = 5.0

TORCH_ONLY_SCRIPT = textwrap.dedent(
    """
    import sys
    for name in ("mlpot", "e3nn", "torch_geometric"):
        sys.modules[name] = None
    import torch
    model_path, graph_path, out_path = sys.argv[1:]
    runner = torch._inductor.aoti_load_package(model_path)
    graph = torch.load(graph_path)
    names = ("pos", "atomic_numbers", "edge_index", "shift", "batch", "num_atoms", "pair_edge", "edge_pair")
    energy, forces, *_ = runner(*(graph[k] for k in names))  # then node energy and (new files) the virial
    torch.save({"energy": energy, "forces": forces}, out_path)
    """
)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A tiny float64 EGNN as a checkpoint, a TorchScript file and (through mlpot-deploy) an AOTI file."""
    folder = tmp_path_factory.mktemp("aoti")
    potential = make_tiny_potential("egnn", torch.float64, cutoff=CUTOFF)
    checkpoint.save_potential(potential, folder / "model.ckpt")
    export.save(potential, folder / "model.pt", dataset="tiny")
    deploy([str(folder / "model.pt"), "-o", str(folder / "model.pt2"), "--format", "aoti"])
    return potential, folder


def structures():
    """Molecules of different sizes: the compiled file has dynamic atom and edge counts."""
    water = ase.build.molecule("H2O")
    methanol = ase.build.molecule("CH3OH")
    methanol.positions += np.random.default_rng(1).normal(0, 0.05, methanol.positions.shape)
    return [perturbed_ethanol(seed=2), water, methanol]


def test_metadata_records_the_format(deployed):
    _, folder = deployed
    meta = export.read_metadata(folder / "model.pt2")
    assert meta["format"] == "aoti" and meta["kind"] == "egnn" and meta["dtype"] == "float64"
    assert export.sniff(folder / "model.pt2") == "aoti" and export.sniff(folder / "model.ckpt") == export.CHECKPOINT
    assert meta["dataset"] == "tiny"  # carried over from the TorchScript file it was deployed from


def test_aoti_equals_eager_for_every_size_and_batch(deployed):
    potential, folder = deployed
    model, _ = export.load(folder / "model.pt2")
    graphs = [atoms_to_graph(atoms, CUTOFF, torch.float64) for atoms in structures()]
    for graph in graphs + [collate(graphs)]:
        expected = potential(graph)
        got = model(graph)
        assert got[keys.ENERGY].shape == expected[keys.ENERGY].shape
        torch.testing.assert_close(got[keys.ENERGY], expected[keys.ENERGY].detach(), rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(got[keys.FORCES], expected[keys.FORCES].detach(), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(got[keys.NODE_ENERGY], expected[keys.NODE_ENERGY].detach(), rtol=1e-6, atol=1e-10)


def test_aoti_loads_with_torch_only(deployed, tmp_path):
    potential, folder = deployed
    graph = atoms_to_graph(perturbed_ethanol(seed=4), CUTOFF, torch.float64)
    torch.save(graph, tmp_path / "graph.pt")
    subprocess.run(
        [sys.executable, "-c", TORCH_ONLY_SCRIPT, str(folder / "model.pt2"), str(tmp_path / "graph.pt"), str(tmp_path / "out.pt")],
        check=True,
    )
    out = torch.load(tmp_path / "out.pt")
    expected = potential(graph)
    torch.testing.assert_close(out["forces"], expected[keys.FORCES].detach(), rtol=1e-6, atol=1e-9)


def test_calculator_runs_either_format_alike(deployed):
    _, folder = deployed
    for atoms in structures():
        results = []
        for name in ("model.pt", "model.pt2"):
            atoms = atoms.copy()
            atoms.calc = MLPotCalculator(folder / name)
            results.append((atoms.get_potential_energy(), atoms.get_forces()))
        assert abs(results[0][0] - results[1][0]) < 1e-9
        np.testing.assert_allclose(results[0][1], results[1][1], atol=1e-9)


@pytest.fixture(scope="module")
def aoti_cache(tmp_path_factory):
    """One cache of AOTInductor builds for the tests that compile ``deployed``'s TorchScript file (one compile)."""
    return tmp_path_factory.mktemp("aoti-cache")


def test_calculator_compiles_a_torchscript_file_on_first_use(deployed, aoti_cache, monkeypatch):
    _, folder = deployed
    monkeypatch.setenv("MLPOT_CACHE_DIR", str(aoti_cache))
    atoms = perturbed_ethanol(seed=8)
    atoms.calc = MLPotCalculator(folder / "model.pt", compile=True)
    (built,) = (aoti_cache / "aoti").iterdir()
    assert export.read_metadata(built)["format"] == "aoti" and atoms.calc.metadata["dataset"] == "tiny"
    stamp = built.stat().st_mtime_ns
    again = MLPotCalculator(folder / "model.pt", compile=True)  # cached: no second compile
    assert built.stat().st_mtime_ns == stamp and again.metadata["format"] == "aoti"
    reference = atoms.copy()
    reference.calc = MLPotCalculator(folder / "model.pt")
    np.testing.assert_allclose(atoms.get_forces(), reference.get_forces(), atol=1e-9)


def test_md_compile_runs_on_the_aoti_build_and_keeps_the_float64_frequencies(deployed, aoti_cache, tmp_path,
                                                                            monkeypatch):
    _, folder = deployed
    monkeypatch.setenv("MLPOT_CACHE_DIR", str(aoti_cache))
    structure = tmp_path / "ethanol.xyz"
    ase.io.write(structure, perturbed_ethanol(seed=3))

    def md(out, *extra):
        return commands.run(["md", str(folder / "model.pt"), str(structure), "--time", "5fs", "--timestep", "0.5fs",
                             "--temperature", "300", "--quiet", "--output", str(tmp_path / out), *extra])

    compiled, plain = md("compiled", "--compile"), md("plain")
    (built,) = (aoti_cache / "aoti").iterdir()
    assert export.read_metadata(built)["format"] == "aoti"
    assert json.loads((tmp_path / "compiled" / "run.json").read_text())["compile"] is True
    # the Hessian step runs on the TorchScript file in float64 (an AOTI build cannot): the same outcome as
    # without --compile (on this untrained model a relaxation that ends unphysical, in a note of the same words)
    assert compiled.harmonic_cm == plain.harmonic_cm and compiled.notes == plain.notes
    assert not any("AOTInductor" in note for note in compiled.notes)
    got, want = (ase.io.read(tmp_path / out / "md.traj", index=":") for out in ("compiled", "plain"))
    np.testing.assert_allclose(got[-1].positions, want[-1].positions, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="compile True .now None."):
        md("compiled", "--resume")


def test_aoti_file_refuses_what_it_cannot_do(deployed):
    _, folder = deployed
    calc = MLPotCalculator(folder / "model.pt2")
    atoms = perturbed_ethanol()
    atoms.calc = calc
    with pytest.raises(NotImplementedError, match="TorchScript"):
        calc.get_hessian(atoms)
    with pytest.raises(ValueError, match="compiled .AOTInductor. for float64"):
        MLPotCalculator(folder / "model.pt2", dtype="float32")
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        checkpoint.load_potential(folder / "model.pt2")


def test_deployed_torchscript_rebuilds_the_eager_model(deployed):
    potential, folder = deployed
    rebuilt = checkpoint.load_potential(folder / "model.pt")
    graph = atoms_to_graph(perturbed_ethanol(seed=6), CUTOFF, torch.float64)
    torch.testing.assert_close(rebuilt(graph)[keys.FORCES], potential(graph)[keys.FORCES], rtol=0, atol=1e-12)


def test_strided_and_wrong_dtype_inputs(deployed):
    """Compiled code reads raw memory: a strided view must still give the right numbers, a wrong dtype an error."""
    potential, folder = deployed
    model, _ = export.load(folder / "model.pt2")
    atoms = perturbed_ethanol(seed=7)
    table = np.concatenate([atoms.positions, np.ones((len(atoms), 1))], axis=1)
    graph = atoms_to_graph(atoms, CUTOFF, torch.float64)
    graph[keys.POSITIONS] = torch.from_numpy(table)[:, :3]  # every 4th number skipped: not contiguous
    assert not graph[keys.POSITIONS].is_contiguous()
    torch.testing.assert_close(model(graph)[keys.FORCES], potential(graph)[keys.FORCES].detach(), rtol=1e-6, atol=1e-9)
    graph[keys.POSITIONS] = graph[keys.POSITIONS].float()
    with pytest.raises(ValueError, match="compiled for torch.float64"):
        model(graph)


def test_unknown_format_and_unsupported_kind_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown deploy format"):
        export.save(make_tiny_potential("egnn"), tmp_path / "x.pt", format="onnx")
    with pytest.raises(ValueError, match="use torchscript"):
        export.save(make_tiny_potential("gcn"), tmp_path / "x.pt2", format="aoti")
    assert not list(tmp_path.iterdir())


def test_md_compile_on_a_gcn_file_is_a_one_line_error(tmp_path, capsys):
    model, structure = tmp_path / "gcn.pt", tmp_path / "ethanol.xyz"
    export.save(make_tiny_potential("gcn"), model, format="torchscript")
    ase.io.write(structure, perturbed_ethanol(seed=3))
    rc = commands.main(["md", str(model), str(structure), "--time", "5fs", "--compile", "--quiet",
                        "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "run it without compile" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
