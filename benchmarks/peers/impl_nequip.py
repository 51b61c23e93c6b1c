"""NequIP: nequip-train (1 epoch, for the checkpoint its tools need) -> nequip-compile --mode aotinductor --target ase
-> NequIPCalculator.from_compiled_model (its documented ASE path; TorchScript compile is refused by nequip on
torch >= 2.10)."""

import os
import subprocess
import sys
import time
from pathlib import Path

from protocol import CACHE, CUTOFF, EGNN_SIZE, SYMBOLS, Impl, minimum, optimizer_step, rmd17_frames, version

NEQUIP_CONFIG = """\
run: [train]
seed: 0
cutoff_radius: {cutoff}
chemical_symbols: [H, C, O]
model_type_names: ${{chemical_symbols}}
data:
  _target_: nequip.data.datamodule.ASEDataModule
  seed: ${{seed}}
  split_dataset:
    file_path: {data}
    train: 15
    val: 5
  transforms:
    - _target_: nequip.data.transforms.NeighborListTransform
      r_max: ${{cutoff_radius}}
    - _target_: nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper
      model_type_names: ${{model_type_names}}
      chemical_species_to_atom_type_map: ${{list_to_identity_dict:${{chemical_symbols}}}}
  train_dataloader:
    _target_: torch.utils.data.DataLoader
    batch_size: 5
  val_dataloader:
    _target_: torch.utils.data.DataLoader
    batch_size: 5
  stats_manager:
    _target_: nequip.data.CommonDataStatisticsManager
    type_names: ${{model_type_names}}
trainer:
  _target_: lightning.Trainer
  max_epochs: 1
  accelerator: cpu
  enable_progress_bar: false
  logger: false
  callbacks:
    - _target_: lightning.pytorch.callbacks.ModelCheckpoint
      dirpath: ${{hydra:runtime.output_dir}}
      save_last: true
training_module:
  _target_: nequip.train.EMALightningModule
  loss:
    _target_: nequip.train.EnergyForceLoss
    per_atom_energy: true
    coeffs:
      total_energy: 1.0
      forces: 100.0
  val_metrics:
    _target_: nequip.train.EnergyForceMetrics
    coeffs:
      total_energy_mae: 1.0
      forces_mae: 1.0
  optimizer:
    _target_: torch.optim.Adam
    lr: 0.005
  model:
    _target_: nequip.model.NequIPGNNModel
    seed: ${{seed}}
    model_dtype: {dtype}
    type_names: ${{model_type_names}}
    r_max: ${{cutoff_radius}}
    l_max: {lmax}
    parity: false
    num_layers: {num_layers}
    num_features: {num_features}
    radial_mlp_depth: {radial_depth}
    radial_mlp_width: {radial_width}
    num_bessels: {num_bessel}
    polynomial_cutoff_p: {cutoff_p}
    readout_mlp_hidden_layers_depth: 1
    readout_mlp_hidden_layers_width: {readout_hidden}
    avg_num_neighbors: ${{training_data_stats:num_neighbors_mean}}
    per_type_energy_shifts: ${{training_data_stats:per_atom_energy_mean}}
    per_type_energy_scales: ${{training_data_stats:forces_rms}}
global_options:
  allow_tf32: false
"""


class NequIP(Impl):
    TRAIN_MODES = ("eager", "compile")  # its model's compile_mode
    name = "nequip"

    def dir(self, dtype: str) -> Path:
        where = "" if self.device == "cpu" else f"-{self.device}"  # nequip-compile builds for one device
        return CACHE / f"nequip-{version('nequip')}-torch{version('torch')}{where}" / dtype

    def prepare(self, dtype: str) -> dict:
        d = self.dir(dtype)
        compiled = d / "model.nequip.pt2"
        ckpt = d / "train" / "last.ckpt"
        if compiled.is_file() and ckpt.is_file():
            return {"seconds": 0.0, "cached": True, "file": str(compiled)}
        d.mkdir(parents=True, exist_ok=True)
        tic = time.perf_counter()
        import ase.io

        data = d / "ethanol.extxyz"
        # a box (non-periodic) so the compile tool's stress self-check compares finite numbers
        ase.io.write(data, rmd17_frames("ethanol", 20, cell=[20.0, 20.0, 20.0]))
        s = EGNN_SIZE
        (d / "config.yaml").write_text(NEQUIP_CONFIG.format(
            cutoff=CUTOFF, data=data, dtype=dtype, lmax=s["lmax"], num_layers=s["num_layers"],
            num_features=s["num_features"], radial_depth=len(s["radial"]), radial_width=s["radial"][0],
            num_bessel=s["num_bessel"], cutoff_p=s["cutoff_p"], readout_hidden=s["readout_hidden"]))
        bindir = Path(sys.executable).parent
        env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="1")
        steps = [
            [str(bindir / "nequip-train"), "-cp", str(d), "-cn", "config", f"hydra.run.dir={d / 'train'}"],
            [str(bindir / "nequip-compile"), str(ckpt), str(compiled), "--mode", "aotinductor", "--device", self.device,
             "--target", "ase"],
        ]
        for cmd in steps:
            with open(d / "build.log", "a") as fh:
                fh.write("$ " + " ".join(cmd) + "\n")
                fh.flush()
                rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=d).returncode
            if rc != 0:
                compiled.unlink(missing_ok=True)
                raise RuntimeError(f"{cmd[0]} failed (rc {rc}); see {d / 'build.log'}")
        return {"seconds": time.perf_counter() - tic, "cached": False, "file": str(compiled)}

    def calculator(self, dtype: str):
        from nequip.integrations.ase import NequIPCalculator

        return NequIPCalculator.from_compiled_model(str(self.dir(dtype) / "model.nequip.pt2"), device=self.device,
                                                    chemical_species_to_atom_type_map=True)

    def eager_model(self, dtype: str, mode: str = "eager"):
        """The trained model as NequIP's trainer builds it: ``eager``, or ``compile`` (its train-time
        torch.compile: make_fx of the forces, then torch.compile with dynamic shapes)."""
        from nequip.model.saved_models.load_utils import load_saved_model
        from nequip.utils.global_state import global_state_initialized, set_global_state

        self.ensure(dtype)
        if not global_state_initialized():
            set_global_state(allow_tf32=False)
        return load_saved_model(str(self.dir(dtype) / "train" / "last.ckpt"), mode).to(self.device)

    def info(self) -> dict:
        import torch

        model = self.eager_model("float32")
        return {
            "impl": self.name, "kind": "egnn", "params": sum(p.numel() for p in model.parameters()),
            "versions": {"nequip": version("nequip"), "torch": torch.__version__, "e3nn": version("e3nn"),
                         "ase": version("ase"), "lightning": version("lightning")},
            "deploy": f"nequip-train (1 epoch, 15 frames) -> nequip-compile --mode aotinductor --device {self.device} "
                      "--target ase -> NequIPCalculator.from_compiled_model",
            "size": {"num_features": 32, "l_max": 2, "parity": False, "num_layers": 3, "num_bessels": 8,
                     "polynomial_cutoff_p": 6, "radial_mlp": "2x64", "readout": "1x16", "r_max": CUTOFF},
        }

    def _data(self, atoms_list, dtype):
        from nequip.data import from_ase
        from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform

        nl = NeighborListTransform(r_max=CUTOFF)
        types = ChemicalSpeciesToAtomTypeMapper(model_type_names=SYMBOLS,
                                                chemical_species_to_atom_type_map={s: s for s in SYMBOLS})
        out = []
        for a in atoms_list:
            d = types(nl(from_ase(a)))
            out.append({k: v.to(self.device) if hasattr(v, "to") else v for k, v in d.items()})
        return out

    def train_setup(self, molecule, dtype, batch_size, mode="eager"):
        import torch
        from nequip.data import AtomicDataDict

        torch.manual_seed(0)
        model = self.eager_model(dtype, mode)
        model.train()
        frames = rmd17_frames(molecule, 50)
        data = self._data(frames, dtype)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        state = {"i": 0}
        tdtype = getattr(torch, dtype)

        def step():
            i = state["i"]
            batch = AtomicDataDict.batched_from_list([data[(i + k) % len(data)] for k in range(batch_size)])
            state["i"] = i + batch_size
            out = model(batch)
            n = batch[AtomicDataDict.NUM_NODES_KEY].to(tdtype)
            e_err = (out[AtomicDataDict.TOTAL_ENERGY_KEY].reshape(-1) - batch[AtomicDataDict.TOTAL_ENERGY_KEY].reshape(-1)) / n
            f_err = out[AtomicDataDict.FORCE_KEY] - batch[AtomicDataDict.FORCE_KEY]
            return optimizer_step(optimizer, e_err, f_err)

        return step, batch_size

    def eager_energy_forces(self, molecule, dtype):
        model = self.eager_model(dtype).eval()
        data = self._data([minimum(molecule)], dtype)[0]
        return lambda: model(dict(data))
