"""SchNet: continuous-filter convolutions on a radial basis (Schütt et al., J. Chem. Phys. 148, 241722, 2018)."""

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlpot import keys
from mlpot.nn.radial import CosineCutoff, GaussianBasis, edge_vectors


def shifted_softplus(x: Tensor) -> Tensor:
    """ssp(x) = ln(0.5 e^x + 0.5): smooth and zero at x = 0."""
    return F.softplus(x) - math.log(2.0)


class Interaction(nn.Module):
    """One SchNet interaction: ``v_i = Dense(ssp(Dense(sum_j x_j * W(r_ij))))``, W a filter network."""

    def __init__(self, num_features: int, num_basis: int):
        super().__init__()
        self.filter_in = nn.Linear(num_basis, num_features)
        self.filter_out = nn.Linear(num_features, num_features)
        self.atom_in = nn.Linear(num_features, num_features, bias=False)
        self.atom_mid = nn.Linear(num_features, num_features)
        self.atom_out = nn.Linear(num_features, num_features)

    def forward(self, h: Tensor, basis: Tensor, envelope: Tensor, edge_index: Tensor, edge_pair: Optional[Tensor] = None) -> Tensor:
        # filters vanish smoothly at the cutoff through the envelope; with edge_pair, basis and envelope
        # hold one row per pair i->j, j->i (same length) and the filters are gathered to the edges
        w = self.filter_out(shifted_softplus(self.filter_in(basis))) * envelope.unsqueeze(-1)
        if edge_pair is not None:
            w = w.index_select(0, edge_pair)
        x = self.atom_in(h)
        messages = x[edge_index[1]] * w
        x = torch.zeros_like(x).index_add(0, edge_index[0], messages)
        return self.atom_out(shifted_softplus(self.atom_mid(x)))


class SchNet(nn.Module):
    """SchNet-style invariant potential.

    ``h_i^0 = embedding(Z_i)``, then ``h_i <- h_i + v_i`` for each interaction, where
    ``v_i = Dense(ssp(Dense(sum_j Dense(h_j) * W(r_ij))))`` and the filter
    ``W(r) = Dense(ssp(Dense(g(r)))) * f_c(r)`` acts on a Gaussian basis ``g`` with a cosine cutoff.

    Args:
        num_species: number of elements the model knows.
        cutoff: radial cutoff, Å.
        num_features: width of atom features and filters (default 64).
        num_layers: number of interactions (default 3).
        num_basis: Gaussians in the radial basis (default 32).
    """

    def __init__(self, num_species: int, cutoff: float, num_features: int = 64, num_layers: int = 3, num_basis: int = 32):
        super().__init__()
        self.embedding = nn.Embedding(num_species, num_features)
        self.basis = GaussianBasis(cutoff, num_basis)
        self.cutoff_fn = CosineCutoff(cutoff)
        self.interactions = nn.ModuleList([Interaction(num_features, num_basis) for _ in range(num_layers)])
        self.readout_hidden = nn.Linear(num_features, num_features // 2)
        self.readout_out = nn.Linear(num_features // 2, 1)

    def forward(self, graph: Dict[str, Tensor], species: Tensor) -> Tuple[Tensor, Tensor]:
        edge_index = graph[keys.EDGE_INDEX]
        _, r = edge_vectors(graph[keys.POSITIONS], edge_index, graph[keys.SHIFT])
        edge_pair: Optional[Tensor] = None
        if keys.PAIR_EDGE in graph and keys.EDGE_PAIR in graph:  # filters once per pair i->j, j->i
            r = r.index_select(0, graph[keys.PAIR_EDGE])
            edge_pair = graph[keys.EDGE_PAIR]
        basis = self.basis(r)
        envelope = self.cutoff_fn(r)
        h = self.embedding(species)
        for interaction in self.interactions:
            h = h + interaction(h, basis, envelope, edge_index, edge_pair)
        return self.readout_out(shifted_softplus(self.readout_hidden(h))).squeeze(-1), h
