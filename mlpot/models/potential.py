"""Potential: any model's per-atom energies -> scaled and shifted -> total energy -> autograd derivatives."""

import json
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from mlpot import keys
from mlpot.nn import forces as derivatives


class Potential(nn.Module):
    """Wraps one model (graph -> per-atom energies) with everything the models share.

    ``E_i = scale * model_i + shift[Z_i]``, ``E = sum_i E_i`` per structure (:meth:`energy`; per-atom and
    total energies are float64 in every precision, the forces in the model's); forces
    ``F = -dE/dpos`` (``create_graph`` while training so force losses can be backpropagated), on request
    the virial, and the Hessian, all by autograd in :mod:`mlpot.nn.forces`. Metadata (kind, species,
    cutoff, hyperparameters) travels with it.

    Args:
        model: module with ``forward(graph, species) -> (node_energy (N,), node_features (N, F))``.
        kind: model kind name (``"gcn"``, ``"schnet"``, ``"egnn"``).
        species: atomic numbers the model knows, in the order of its species index.
        cutoff: radial cutoff, Å.
        hparams: the model's constructor arguments (to rebuild it from a checkpoint).
        energy_shift: (S,) per-species energy shift, eV (default zeros).
        energy_scale: scale of the model output, eV (default 1).
    """

    __jit_unused_properties__ = ["hparams"]

    def __init__(
        self,
        model: nn.Module,
        kind: str,
        species: Sequence[int],
        cutoff: float,
        hparams: Optional[dict] = None,
        energy_shift: Optional[Tensor] = None,
        energy_scale: float = 1.0,
    ):
        super().__init__()
        self.model = model
        self.kind = kind
        self.species: List[int] = [int(z) for z in species]
        self.cutoff = float(cutoff)
        self.hparams_json = json.dumps(hparams or {}, sort_keys=True)
        self.compute_forces = True
        index = torch.full((119,), -1, dtype=torch.long)
        index[torch.tensor(self.species)] = torch.arange(len(self.species))
        self.register_buffer("species_index", index)
        shift = torch.zeros(len(self.species)) if energy_shift is None else torch.as_tensor(energy_shift).clone()
        self.register_buffer("energy_shift", shift.to(torch.get_default_dtype()))
        self.register_buffer("energy_scale", torch.tensor(float(energy_scale)))

    @property
    def hparams(self) -> dict:
        return json.loads(self.hparams_json)

    def energy(self, graph: Dict[str, Tensor], check_species: bool = True) -> Dict[str, Tensor]:
        """The graph's entries plus per-atom energies (N,) and energies (B,) in eV and the node features,
        computed from the graph's own positions and shifts (no derivatives).

        ``check_species=False`` skips the unknown-element check (data-dependent control flow, which
        tracing cannot keep: callers that trace check beforehand).
        """
        out: Dict[str, Tensor] = {}
        for key, value in graph.items():
            out[key] = value
        numbers = graph[keys.ATOMIC_NUMBERS]
        species = self.species_index[numbers]
        if check_species and bool((species < 0).any()):
            raise ValueError("structure contains an element this model was not trained on")
        node_energy, features = self.model(out, species)
        # shifted and summed in float64 whatever the model's precision: float32 totals near -4200 eV
        # are quantised at 2^-10 eV ~ 1 meV, which energy errors and committee spreads would show
        scaled = (node_energy * self.energy_scale).to(torch.float64)
        node_energy = scaled + self.energy_shift.to(torch.float64)[species]
        num_graphs = graph[keys.NUM_ATOMS].shape[0]
        energy = torch.zeros(num_graphs, dtype=torch.float64, device=node_energy.device)
        out[keys.NODE_ENERGY] = node_energy
        out[keys.ENERGY] = energy.index_add(0, graph[keys.BATCH], node_energy)
        out[keys.NODE_FEATURES] = features
        return out

    @torch.jit.export
    def energy_and_forces(
        self, graph: Dict[str, Tensor], virial: bool = False, create_graph: bool = False, check_species: bool = True
    ) -> Dict[str, Tensor]:
        """:meth:`energy` plus forces (N, 3) in eV/Å and, with ``virial``, the virial (B, 3, 3) in eV
        (see :mod:`mlpot.nn.forces`). ``create_graph`` keeps the derivatives' autograd graph."""
        inputs, pos, strain = derivatives.differentiable_inputs(graph, virial)
        out = self.energy(inputs, check_species)
        forces, virial_ev = derivatives.forces_and_virial(out[keys.ENERGY], pos, strain, create_graph)
        # the outputs carry the inputs unstrained (the strain is zero: the same values, without its graph)
        for key in (keys.SHIFT, keys.CELL):
            if key in graph:
                out[key] = graph[key]
        out[keys.POSITIONS] = pos
        out[keys.FORCES] = forces
        if virial_ev is not None:
            out[keys.VIRIAL] = virial_ev
        return out

    def forward(self, graph: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Energies (and forces unless ``compute_forces`` is False) of a batch of structures;
        forces keep their autograd graph in training mode (force losses)."""
        if not self.compute_forces:
            return self.energy(graph)
        return self.energy_and_forces(graph, False, self.training, True)

    @torch.jit.export
    def hessian(self, graph: Dict[str, Tensor]) -> Tensor:
        """(3N, 3N) Hessian d2E/dpos2 in eV/Å^2 of the structures in ``graph``, by double backward."""
        inputs, pos, _ = derivatives.differentiable_inputs(graph, False)
        return derivatives.hessian(self.energy(inputs)[keys.ENERGY], pos)
