"""SchNetPack: NeuralNetworkPotential(SchNet) -> torch.save (the best_model file its training writes) ->
SpkCalculator(model_file, neighbor_list=MatScipyNeighborList) (--neighbor-list picks another)."""

from pathlib import Path

from protocol import CACHE, CUTOFF, SCHNET_SIZE, PickledModel, minimum, optimizer_step, rmd17_frames, version


def patch_torch_for_schnetpack():
    """schnetpack 2.1.1 imports ``T_co`` from torch.utils.data.dataloader, which torch 2.13 no longer defines."""
    import typing

    import torch.utils.data.dataloader as dl

    if not hasattr(dl, "T_co"):
        dl.T_co = typing.TypeVar("T_co", covariant=True)


class SchNetPack(PickledModel):
    name = "schnetpack"
    model_kind = "schnet"
    compare_with = "mlpot-schnet"

    def __init__(self, args):
        super().__init__(args)
        patch_torch_for_schnetpack()
        self.nl_name = args.neighbor_list

    def path(self) -> Path:
        return CACHE / f"schnetpack-{version('schnetpack')}-torch{version('torch')}" / "best_model"

    def neighbor_list(self):
        import schnetpack as spk

        return {"ase": spk.transform.ASENeighborList, "matscipy": spk.transform.MatScipyNeighborList,
                "torch": spk.transform.TorchNeighborList}[self.nl_name](cutoff=CUTOFF)

    def build(self):
        import schnetpack as spk
        import torch

        torch.manual_seed(0)
        s = SCHNET_SIZE
        schnet = spk.representation.SchNet(
            n_atom_basis=s["num_features"], n_interactions=s["num_layers"],
            radial_basis=spk.nn.GaussianRBF(n_rbf=s["num_gaussians"], cutoff=CUTOFF),
            cutoff_fn=spk.nn.CosineCutoff(CUTOFF),
        )
        return spk.model.NeuralNetworkPotential(
            representation=schnet,
            input_modules=[spk.atomistic.PairwiseDistances()],
            output_modules=[spk.atomistic.Atomwise(n_in=s["num_features"], output_key="energy"),
                            spk.atomistic.Forces(energy_key="energy", force_key="forces")],
        )

    def calculator(self, dtype: str):
        import torch
        from schnetpack.interfaces import SpkCalculator

        return SpkCalculator(model_file=str(self.path()), neighbor_list=self.neighbor_list(), energy_key="energy",
                             force_key="forces", energy_unit="eV", position_unit="Angstrom", device="cpu",
                             dtype=getattr(torch, dtype))

    def info(self) -> dict:
        import torch

        model = self.loaded("float32")
        return {
            "impl": self.name, "kind": "schnet", "params": sum(p.numel() for p in model.parameters()),
            "versions": {"schnetpack": version("schnetpack"), "torch": torch.__version__, "ase": version("ase"),
                         "matscipy": version("matscipy")},
            "deploy": f"NeuralNetworkPotential(SchNet) -> torch.save -> SpkCalculator(model_file, "
                      f"neighbor_list={type(self.neighbor_list()).__name__})",
            "size": {"n_atom_basis": 64, "n_interactions": 3, "n_rbf": 32, "cutoff": CUTOFF},
            "patch": "torch.utils.data.dataloader.T_co defined before importing schnetpack (removed in torch 2.13)",
        }

    def _inputs(self, atoms_list, dtype):
        import torch
        from schnetpack.interfaces import AtomsConverter

        conv = AtomsConverter(neighbor_list=self.neighbor_list(), device="cpu", dtype=getattr(torch, dtype))
        return conv

    def train_setup(self, molecule, dtype, batch_size, mode="eager"):
        import schnetpack.properties as P
        import torch
        from schnetpack.data.loader import _atoms_collate_fn

        torch.manual_seed(0)
        tdtype = getattr(torch, dtype)
        model = self.loaded(dtype).train()
        frames = rmd17_frames(molecule, 50)
        # per-frame samples as schnetpack's dataset yields them (neighbour list and dtype cast applied once),
        # collated into a batch each step by its DataLoader's collate function, as in its training loop
        conv = self._inputs(frames, dtype)
        samples = []
        for a in frames:
            sample = {P.n_atoms: torch.tensor([len(a)]), P.Z: torch.from_numpy(a.numbers),
                      P.R: torch.from_numpy(a.positions), P.cell: torch.zeros(1, 3, 3, dtype=torch.float64),
                      P.pbc: torch.zeros(1, 3, dtype=torch.bool), P.idx: torch.tensor([len(samples)])}
            for transform in conv.transforms:
                sample = transform(sample)
            sample["energy_ref"] = torch.tensor([a.get_potential_energy()], dtype=tdtype)
            sample["forces_ref"] = torch.as_tensor(a.get_forces(), dtype=tdtype)
            samples.append(sample)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        state = {"i": 0}

        def step():
            i = state["i"]
            batch = _atoms_collate_fn([samples[(i + k) % len(samples)] for k in range(batch_size)])
            state["i"] = i + batch_size
            ref_e, ref_f = batch.pop("energy_ref"), batch.pop("forces_ref")
            n = batch[P.n_atoms].to(ref_e.dtype)
            out = model(batch)
            e_err = (out["energy"].to(ref_e.dtype) - ref_e) / n
            f_err = out["forces"].to(ref_f.dtype) - ref_f
            return optimizer_step(optimizer, e_err, f_err)

        return step, batch_size

    def eager_energy_forces(self, molecule, dtype):
        model = self.loaded(dtype).eval()
        inputs = self._inputs(None, dtype)(minimum(molecule))
        return lambda: model(dict(inputs))
