"""MACE: ScaleShiftMACE built in Python, torch.save'd (the .model file MACE's tools write) -> MACECalculator."""

import contextlib
from pathlib import Path

from protocol import (
    CACHE, CUTOFF, EGNN_SIZE, SPECIES, PickledModel, avg_num_neighbors, minimum, optimizer_step, rmd17_frames,
    version,
)


class MACE(PickledModel):
    name = "mace"

    def path(self) -> Path:
        return CACHE / f"mace-{version('mace-torch')}-torch{version('torch')}" / "model.model"

    def build(self):
        import numpy as np
        import torch
        from e3nn import o3
        from mace import modules

        torch.manual_seed(0)
        with default_dtype(torch.float64):
            s = EGNN_SIZE
            model = modules.ScaleShiftMACE(
                r_max=CUTOFF,
                num_bessel=s["num_bessel"],
                num_polynomial_cutoff=s["cutoff_p"],
                max_ell=s["lmax"],
                interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
                interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
                num_interactions=s["num_layers"],
                num_elements=len(SPECIES),
                hidden_irreps=o3.Irreps(f"{s['num_features']}x0e + {s['num_features']}x1o + {s['num_features']}x2e"),
                MLP_irreps=o3.Irreps(f"{s['readout_hidden']}x0e"),
                atomic_energies=np.zeros(len(SPECIES)),
                avg_num_neighbors=avg_num_neighbors(),
                atomic_numbers=SPECIES,
                correlation=3,
                gate=torch.nn.functional.silu,
                radial_MLP=list(s["radial"]),
                radial_type="bessel",
                atomic_inter_scale=1.0,
                atomic_inter_shift=0.0,
            )
        return model

    def calculator(self, dtype: str):
        from mace.calculators import MACECalculator

        return MACECalculator(model_paths=str(self.path()), device="cpu", default_dtype=dtype)

    def info(self) -> dict:
        import torch

        model = self.loaded("float64")
        return {
            "impl": self.name, "kind": "egnn", "params": sum(p.numel() for p in model.parameters()),
            "versions": {"mace-torch": version("mace-torch"), "torch": torch.__version__, "e3nn": version("e3nn"),
                         "ase": version("ase")},
            "deploy": "ScaleShiftMACE -> torch.save(model) -> MACECalculator(model_paths=..., default_dtype=...)",
            "size": {"hidden_irreps": "32x0e+32x1o+32x2e", "max_ell": 2, "num_interactions": 3, "correlation": 3,
                     "num_bessel": 8, "num_polynomial_cutoff": 6, "radial_MLP": [64, 64], "MLP_irreps": "16x0e",
                     "interaction": "RealAgnosticResidualInteractionBlock", "r_max": CUTOFF},
        }

    def _batch(self, atoms_list, dtype):
        import torch
        from mace import data as mdata
        from mace.tools import torch_geometric, utils

        z_table = utils.AtomicNumberTable(SPECIES)
        configs = [mdata.config_from_atoms(a, key_specification=mace_keys()) for a in atoms_list]
        with default_dtype(getattr(torch, dtype)):
            items = [mdata.AtomicData.from_config(c, z_table=z_table, cutoff=CUTOFF) for c in configs]
        return items, torch_geometric

    def train_setup(self, molecule, dtype, batch_size, mode="eager"):
        import torch

        torch.manual_seed(0)
        model = self.loaded(dtype).train()
        frames = rmd17_frames(molecule, 50)
        for a in frames:  # MACE reads labels from info/arrays under its key names
            a.info["REF_energy"] = a.get_potential_energy()
            a.arrays["REF_forces"] = a.get_forces()
        items, tg = self._batch(frames, dtype)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        state = {"i": 0}

        def step():
            i = state["i"]
            batch = tg.Batch.from_data_list([items[(i + k) % len(items)] for k in range(batch_size)])
            state["i"] = i + batch_size
            d = batch.to_dict()
            out = model(d, training=True, compute_force=True)
            n = (d["ptr"][1:] - d["ptr"][:-1]).to(out["energy"].dtype)
            e_err = (out["energy"] - d["energy"]) / n
            f_err = out["forces"] - d["forces"]
            return optimizer_step(optimizer, e_err, f_err)

        return step, batch_size

    def eager_energy_forces(self, molecule, dtype):
        model = self.loaded(dtype).eval()
        items, tg = self._batch([minimum(molecule)], dtype)
        batch = tg.Batch.from_data_list(items)

        def fn():
            return model(batch.to_dict(), training=False, compute_force=True, compute_stress=True)

        return fn


def mace_keys():
    from mace.data.utils import KeySpecification

    return KeySpecification(info_keys={"energy": "REF_energy"}, arrays_keys={"forces": "REF_forces"})


@contextlib.contextmanager
def default_dtype(dtype):
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
