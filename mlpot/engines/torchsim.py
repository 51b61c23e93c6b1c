"""A deployed mlpot model as a TorchSim model: many systems in one batched call.

TorchSim (``pip install torch-sim-atomistic``) keeps B systems in one ``SimState`` (positions (N, 3) in Å,
``cell`` (B, 3, 3) with cell vectors as columns, one ``pbc`` flag for all, ``system_idx`` (N,)) and asks
its model for ``energy`` (B,) in eV, ``forces`` (N, 3) in eV/Å and, for periodic systems, ``stress``
(B, 3, 3) in eV/Å^3 with ASE's sign (``-virial / volume``).
"""

from typing import Dict, Optional

import numpy as np
import torch
from torch_sim.models.interface import ModelInterface
from torch_sim.state import SimState

from mlpot import export, keys
from mlpot.data.graph import check_structure, collate, local_positions, make_graph
from mlpot.dtypes import DTYPES, dtype_of


class MLPotModel(ModelInterface):
    """TorchSim model interface on top of a deployed mlpot file (TorchScript ``.pt``, or AOTI for energy and forces).

    The B systems are joined into one graph and the model runs once per call. Neighbour lists are built
    per system with ``cutoff + skin`` and reused until an atom has moved more than ``skin / 2`` (or the
    atoms, cells or pbc change); the models' cutoffs are smooth, so the skin changes no number.

    Args:
        model: path of a deployed file.
        device: torch device (default ``"cpu"``).
        dtype: ``"float32"``/``"float64"`` (or a torch dtype); default the file's own. TorchSim's state
            must use the same dtype.
        compute_stress: also return the stress (periodic systems only; TorchScript files only).
        skin: neighbour-list skin, Å (default 0.5; 0 rebuilds every call).
    """

    def __init__(self, model, device: str = "cpu", dtype=None, compute_stress: bool = False, skin: float = 0.5):
        super().__init__()
        if isinstance(dtype, str):
            dtype = dtype_of(dtype)
        self.model, self.metadata = export.load(model, device=device, dtype=dtype)
        self._device = torch.device(device)
        self._dtype = dtype or DTYPES[self.metadata["dtype"]]
        self._compute_stress = bool(compute_stress)
        self._compute_forces = True
        self._memory_scales_with = "n_atoms_x_density"
        if self._compute_stress and not hasattr(self.model, "energy_and_forces"):
            raise ValueError(f"{model} has no virial output (stress); deploy it in TorchScript format, or pass compute_stress=False")
        self.cutoff = float(self.metadata["cutoff"])
        self.species = [int(z) for z in self.metadata["species"]]
        self.periodic_model = bool(self.metadata.get("periodic", False))
        self.skin = float(skin)
        self._graph: Optional[Dict[str, torch.Tensor]] = None
        self._built_for = None

    def forward(self, state, **kwargs) -> Dict[str, torch.Tensor]:
        """``energy`` (B,) eV, ``forces`` (N, 3) eV/Å and, with ``compute_stress``, ``stress`` (B, 3, 3) eV/Å^3."""
        if isinstance(state, dict):
            state = SimState(**{"masses": torch.ones_like(state["positions"][:, 0]), **state})
        positions = state.positions.detach().to("cpu", torch.float64).numpy()
        if not np.isfinite(positions).all():
            bad = np.nonzero(~np.isfinite(positions).all(axis=1))[0].tolist()
            raise ValueError(f"positions contain NaN or inf (atoms {bad})")
        if self._needs_new_graph(state, positions):
            self._build_graph(state, positions)
        graph = dict(self._graph)
        graph[keys.POSITIONS] = torch.as_tensor(positions + self._offset, dtype=self._dtype, device=self._device)
        stress = self._compute_stress and bool(_pbc(state).any())
        out = self.model.energy_and_forces(graph, True, False, True) if stress else self.model(graph)
        # TorchSim keeps a state in one dtype: the energy (summed in float64) comes back in the model's
        results = {"energy": out[keys.ENERGY].detach().to(self._dtype), "forces": out[keys.FORCES].detach()}
        if stress:
            volume = torch.linalg.det(graph[keys.CELL]).abs()
            results["stress"] = -out[keys.VIRIAL].detach() / volume[:, None, None]
        return results

    def _needs_new_graph(self, state, positions: np.ndarray) -> bool:
        if self._graph is None or self.skin <= 0:
            return True
        numbers, system_idx, cell, pbc, built_positions = self._built_for
        if not np.array_equal(_pbc(state), pbc) or not (torch.equal(state.atomic_numbers.cpu(), numbers)
                                          and torch.equal(state.system_idx.cpu(), system_idx)
                                          and torch.equal(state.cell.detach().cpu(), cell)):
            return True
        return np.linalg.norm(positions - built_positions, axis=1).max() > 0.5 * self.skin

    def _build_graph(self, state, positions: np.ndarray) -> None:
        """One graph per system, joined; ``_offset`` moves ``positions`` into the graphs' frame (float64)."""
        pbc = _pbc(state)
        periodic = bool(pbc.any())
        if not export.takes_pbc(self.metadata, periodic):
            raise ValueError(f"this model was trained on {export.trained_on(self.metadata)} but the TorchSim state "
                             f"has pbc={pbc.tolist()}; build the state with pbc={self.periodic_model}")
        if periodic and not pbc.all():
            raise ValueError(f"MLPotModel runs molecules or cells periodic in all three directions, got pbc={pbc.tolist()}")
        numbers = state.atomic_numbers.cpu().numpy()
        system_idx = state.system_idx.cpu().numpy()
        cells = state.row_vector_cell.detach().to("cpu", torch.float64).numpy()
        check_structure(numbers, positions, self.species, 0.0)
        if not np.all(np.diff(system_idx) >= 0):
            raise ValueError("TorchSim's system_idx must be sorted (atoms of one system together)")
        graphs, offsets = [], np.zeros_like(positions)
        for b in range(state.n_systems):
            mask = system_idx == b
            cell, cell_pbc = (cells[b], pbc) if periodic else (None, None)
            graphs.append(make_graph(numbers[mask], positions[mask], self.cutoff + max(self.skin, 0.0), cell=cell,
                                     pbc=cell_pbc, dtype=self._dtype, device=self._device))
            offsets[mask] = local_positions(positions[mask], cell, cell_pbc) - positions[mask]
        self._graph = collate(graphs)
        self._offset = offsets
        self._built_for = (state.atomic_numbers.cpu().clone(), state.system_idx.cpu().clone(),
                           state.cell.detach().cpu().clone(), pbc, positions.copy())


def _pbc(state) -> np.ndarray:
    """(3,) bool periodic directions of a TorchSim state (one flag in torch-sim 0.3, three in later versions)."""
    pbc = state.pbc.cpu().numpy() if isinstance(state.pbc, torch.Tensor) else np.asarray(state.pbc)
    return np.broadcast_to(pbc.astype(bool), (3,)).copy()


__all__ = ["MLPotModel"]
