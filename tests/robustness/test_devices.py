"""GPU readiness checked without a GPU: the models run on the ``meta`` device (a tensor created on the
CPU inside them would fail to mix with the meta inputs), and ``--device`` names a device that exists."""

import ase.build
import pytest
import torch

from mlpot import commands, keys
from mlpot.data.graph import atoms_to_graph

from robustness_helpers import tiny_potential


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["schnet", "egnn", "gcn"])
def test_models_create_no_tensor_off_their_device(kind, dtype):
    if kind == "gcn":
        pytest.skip("torch_geometric's gcn_norm calls nonzero(), whose size the meta device cannot know")
    atoms = ase.build.bulk("C", "diamond", 3.57, cubic=True)
    atoms.numbers[0] = 8
    graph = {k: v.to("meta") for k, v in atoms_to_graph(atoms, 3.0, dtype).items()}
    potential = tiny_potential(kind, dtype).to("meta")
    out = potential.energy_and_forces(graph, True, False, False)  # no species check: it reads a value
    for key, shape in ((keys.ENERGY, (1,)), (keys.FORCES, (8, 3)), (keys.VIRIAL, (1, 3, 3)), (keys.NODE_ENERGY, (8,))):
        expected = torch.float64 if key in (keys.ENERGY, keys.NODE_ENERGY) else dtype  # energies sum in float64
        assert out[key].device.type == "meta" and out[key].dtype == expected and tuple(out[key].shape) == shape, key


@pytest.mark.parametrize("command", ["eval", "deploy"])
def test_device_must_exist(command, tmp_path, capsys):
    args = {"eval": ["eval", str(tmp_path / "m.pt"), "rmd17_ethanol"],
            "deploy": ["deploy", str(tmp_path / "m.ckpt"), "-o", str(tmp_path / "out.pt")]}[command]
    assert commands.main([*args, "--device", "banana"]) == 2
    assert "--device 'banana' is not a torch device; use e.g. cpu, cuda or cuda:1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert commands.main([*args, "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--device cuda: this machine has 0 CUDA device(s); use --device cpu" in err
    assert not (tmp_path / "out.pt").exists()
