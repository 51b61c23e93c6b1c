"""Non-symmetric baselines of the symmetry study (study tools, not mlpot models).

:class:`CartesianGNN` passes messages between the atoms of one molecule like an invariant GNN, but its edges
also carry the Cartesian components of the unit vector r_ij / |r_ij|. It is therefore invariant to
translations and to permutations of the atoms (with their species), but not to rotations: orientation
has to be learned, e.g. from rotated copies of the training frames.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from mlpot.nn.forces import forces_and_virial
from mlpot.nn.radial import CosineCutoff, GaussianBasis


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.SiLU(), nn.Linear(hidden, n_out))


class CartesianGNN(nn.Module):
    """E = scale * sum_i MLP(h_i) + offset after ``num_layers`` residual message-passing layers.

    ``h_i^0 = embedding(Z_i)``; ``m_ij = SiLU(Dense(h_i, h_j, g(r_ij) f_c(r_ij), r_ij / |r_ij|)) f_c(r_ij)`` over
    all pairs i != j (g a Gaussian basis, f_c a cosine cutoff), ``h_i <- h_i + MLP(h_i, sum_j m_ij)``.
    Takes positions (B, n, 3) of frames of one molecule, in the model's precision; energies in float64, forces
    by autograd.
    """

    def __init__(self, numbers: Sequence[int], hidden: int = 128, num_layers: int = 3, num_basis: int = 64,
                 cutoff: float = 5.0, scale: float = 1.0, offset: float = 0.0):
        super().__init__()
        numbers = torch.as_tensor(list(numbers))
        elements, species = torch.unique(numbers, return_inverse=True)
        self.register_buffer("elements", elements)
        self.register_buffer("species", species)
        n = len(numbers)
        src, dst = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        off = src != dst
        self.register_buffer("src", src[off])  # receiving atom i
        self.register_buffer("dst", dst[off])  # sending atom j, r_ij = x_j - x_i
        self.embedding = nn.Embedding(len(elements), hidden)
        self.basis = GaussianBasis(cutoff, num_basis)
        self.cutoff_fn = CosineCutoff(cutoff)
        # the message MLP's first layer on (h_i, h_j, edge inputs), split so h is transformed once per atom
        self.msg_i = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(num_layers)])
        self.msg_j = nn.ModuleList([nn.Linear(hidden, hidden, bias=False) for _ in range(num_layers)])
        self.msg_e = nn.ModuleList([nn.Linear(num_basis + 3, hidden, bias=False) for _ in range(num_layers)])
        self.updates = nn.ModuleList([_mlp(2 * hidden, hidden, hidden) for _ in range(num_layers)])
        self.readout = _mlp(hidden, hidden // 2, 1)
        self.scale, self.offset = scale, offset
        for layer in self.modules():  # unit-variance init: PyTorch's default shrinks each layer's output ~3-fold
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.readout[-1].weight)  # starts as the mean energy with zero forces

    def energy(self, positions: Tensor, numbers: Optional[Tensor] = None) -> Tensor:
        """(B,) energies of (B, n, 3) positions; ``numbers`` (n,) overrides the molecule's atomic numbers."""
        species = self.species if numbers is None else torch.searchsorted(self.elements, numbers)
        vec = positions[:, self.dst] - positions[:, self.src]  # (B, E, 3)
        r = torch.linalg.norm(vec, dim=-1, keepdim=True)
        env = self.cutoff_fn(r)
        edges = torch.cat([self.basis(r.squeeze(-1)) * env, vec / r], dim=-1)
        h = self.embedding(species).expand(len(positions), -1, -1)
        for msg_i, msg_j, msg_e, update in zip(self.msg_i, self.msg_j, self.msg_e, self.updates):
            m = torch.nn.functional.silu(msg_i(h)[:, self.src] + msg_j(h)[:, self.dst] + msg_e(edges)) * env
            agg = h.new_zeros(h.shape).index_add(1, self.src, m)
            # the message MLP's second (linear) layer commutes with the sum over j: the update applies it
            h = h + update(torch.cat([h, agg], dim=-1))
        # in float64 whatever the model's precision: the offset (a molecule's total energy) is thousands of eV
        return self.readout(h).squeeze(-1).sum(-1).double() * self.scale + self.offset

    def forward(self, positions: Tensor):
        positions = positions.detach().requires_grad_(True)
        energy = self.energy(positions)
        forces, _ = forces_and_virial(energy, positions, None, create_graph=self.training)
        return energy, forces
