"""ASE calculators for deployed mlpot models (energies in eV, forces in eV/Å)."""

from typing import Optional, Sequence

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from mlpot import export, keys
from mlpot.data.graph import check_structure, make_graph

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class MLPotCalculator(Calculator):
    """Any deployed mlpot model as an ASE calculator.

    The neighbour list is built with ``cutoff + skin`` and reused until an atom has moved more than
    ``skin / 2`` (or the atoms, cell or pbc change); the models' cutoffs are smooth, so pairs beyond
    the cutoff contribute exactly zero and the skin changes no number.

    Args:
        model: path of a deployed ``.pt`` file.
        device: torch device (default ``"cpu"``).
        dtype: ``"float32"``/``"float64"`` (or a torch dtype); default the file's own.
        skin: neighbour-list skin, Å (default 0.5; 0 rebuilds every call).
        min_distance: two atoms closer than this (Å) raise a ValueError (default 0.5).
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces"]
    allowed_kinds: Optional[Sequence[str]] = None

    def __init__(self, model, device: str = "cpu", dtype=None, skin: float = 0.5, min_distance: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
            dtype = _DTYPES[dtype]
        self.model, self.metadata = export.load(model, device=device, dtype=dtype)
        kind = self.metadata["kind"]
        if self.allowed_kinds is not None and kind not in self.allowed_kinds:
            raise ValueError(
                f"{type(self).__name__} needs a model of kind {' or '.join(self.allowed_kinds)}, "
                f"but {model} holds a {kind!r} model; use MLPotCalculator for any kind"
            )
        self.device = torch.device(device)
        self.dtype = dtype or _DTYPES[self.metadata["dtype"]]
        self.cutoff = float(self.metadata["cutoff"])
        self.species = [int(z) for z in self.metadata["species"]]
        self.skin = float(skin)
        self.min_distance = float(min_distance)
        self._graph = None
        self._graph_positions = None

    def _needs_new_graph(self, atoms, system_changes) -> bool:
        if self._graph is None or self.skin <= 0:
            return True
        if {"numbers", "cell", "pbc"} & set(system_changes):
            return True
        moved = np.linalg.norm(atoms.positions - self._graph_positions, axis=1).max()
        return moved > 0.5 * self.skin

    def _graph_of(self, atoms, system_changes):
        if self._needs_new_graph(atoms, system_changes):
            periodic = bool(atoms.pbc.any())
            self._graph = make_graph(
                atoms.numbers,
                atoms.positions,
                self.cutoff + max(self.skin, 0.0),
                cell=atoms.cell.array if periodic else None,
                pbc=atoms.pbc if periodic else None,
                dtype=self.dtype,
                device=self.device,
            )
            self._graph_positions = atoms.positions.copy()
        graph = dict(self._graph)
        graph[keys.POSITIONS] = torch.as_tensor(atoms.positions, dtype=self.dtype, device=self.device)
        return graph

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        check_structure(atoms.numbers, atoms.positions, self.species, self.min_distance)
        out = self.model(self._graph_of(atoms, system_changes))
        energy = float(out[keys.ENERGY].detach().sum())
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "energies": out[keys.NODE_ENERGY].detach().cpu().double().numpy(),
            "forces": out[keys.FORCES].detach().cpu().double().numpy(),
        }

    def get_hessian(self, atoms=None) -> np.ndarray:
        """(3N, 3N) Hessian d2E/dR2 in eV/Å^2 by double backward (use float64 for accuracy)."""
        atoms = atoms if atoms is not None else self.atoms
        check_structure(atoms.numbers, atoms.positions, self.species, self.min_distance)
        graph = self._graph_of(atoms, all_changes)
        return self.model.hessian(graph).detach().cpu().double().numpy()


class EGNNCalculator(MLPotCalculator):
    """ASE calculator for a deployed equivariant (``egnn``) model."""

    allowed_kinds = ("egnn",)


class GNNCalculator(MLPotCalculator):
    """ASE calculator for a deployed invariant (``gcn`` or ``schnet``) model."""

    allowed_kinds = ("gcn", "schnet")


__all__ = ["EGNNCalculator", "GNNCalculator", "MLPotCalculator"]
