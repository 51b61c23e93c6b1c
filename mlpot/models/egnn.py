"""NequIP-style E(3)-equivariant interatomic potential built on e3nn (Batzner et al., Nat. Commun. 13, 2453, 2022)."""

import math
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from e3nn import o3
from e3nn.nn import FullyConnectedNet, Gate
from torch import Tensor, nn

from mlpot import keys
from mlpot.nn.radial import BesselBasis, PolynomialCutoff, edge_vectors


def hidden_irreps(num_features: int, lmax: int, parity: bool = True) -> o3.Irreps:
    """``num_features`` channels of every l <= lmax; both parities when ``parity`` is True.

    >>> str(hidden_irreps(4, 1))
    '4x0e+4x0o+4x1o+4x1e'
    """
    irreps = []
    for l in range(lmax + 1):
        natural = (-1) ** l
        for p in ((natural, -natural) if parity else (natural,)):
            irreps.append((num_features, (l, p)))
    return o3.Irreps(irreps)


class Interaction(nn.Module):
    """One equivariant convolution with gated nonlinearity and a species-dependent self-interaction.

    ``m_i = 1/sqrt(n_avg) sum_j TP(Linear(h_j), Y(r_ij); R(|r_ij|))``, where the tensor-product
    weights R come from an MLP of the radial basis (times the smooth cutoff envelope);
    ``h_i <- Gate(Linear(m_i) + SelfInteraction(h_i, Z_i))`` (+ h_i when the irreps match).

    Args:
        irreps_in: irreps of the incoming node features.
        irreps_sh: irreps of the edge spherical harmonics.
        irreps_target: the hidden irreps the layer may produce (reachable ones are kept).
        num_species: number of elements (one-hot size for the self-interaction).
        num_basis: radial basis size.
        radial_hidden: width of the radial MLP.
        radial_layers: hidden layers of the radial MLP.
        avg_num_neighbors: normalises the neighbour sum.
    """

    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_sh: o3.Irreps,
        irreps_target: o3.Irreps,
        num_species: int,
        num_basis: int,
        radial_hidden: int,
        radial_layers: int,
        avg_num_neighbors: float,
    ):
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_in)
        self.inv_sqrt_neighbors = 1.0 / math.sqrt(avg_num_neighbors)
        # every path l_in x l_sh -> l_out that lands in the target irreps, one weight per channel
        mid: List[Tuple[int, o3.Irrep]] = []
        instructions = []
        for i, (mul, ir_in) in enumerate(self.irreps_in):
            for j, (_, ir_sh) in enumerate(irreps_sh):
                for ir_out in ir_in * ir_sh:
                    if ir_out in irreps_target:
                        instructions.append((i, j, len(mid), "uvu", True))
                        mid.append((mul, ir_out))
        irreps_mid, perm, _ = o3.Irreps(mid).sort()
        instructions = [(i, j, perm[k], mode, train) for i, j, k, mode, train in instructions]
        self.linear_in = o3.Linear(self.irreps_in, self.irreps_in)
        self.tp = o3.TensorProduct(
            self.irreps_in, irreps_sh, irreps_mid, instructions, shared_weights=False, internal_weights=False
        )
        self.radial = FullyConnectedNet([num_basis] + radial_layers * [radial_hidden] + [self.tp.weight_numel], F.silu)

        reachable = irreps_mid.simplify()
        scalars = o3.Irreps([(mul, ir) for mul, ir in irreps_target if ir.l == 0 and ir in reachable])
        gated = o3.Irreps([(mul, ir) for mul, ir in irreps_target if ir.l > 0 and ir in reachable])
        self.gate = Gate(
            scalars,
            [F.silu if ir.p == 1 else torch.tanh for _, ir in scalars],
            o3.Irreps(f"{gated.num_irreps}x0e"),
            [torch.sigmoid],
            gated,
        )
        self.linear_out = o3.Linear(irreps_mid, self.gate.irreps_in)
        self.self_interaction = o3.FullyConnectedTensorProduct(
            self.irreps_in, o3.Irreps(f"{num_species}x0e"), self.gate.irreps_in
        )
        self.irreps_out = self.gate.irreps_out
        self.residual = self.irreps_out == self.irreps_in

    def forward(self, h: Tensor, species_onehot: Tensor, edge_index: Tensor, sh: Tensor, radial: Tensor) -> Tensor:
        weights = self.radial(radial)
        x = self.linear_in(h)
        messages = self.tp(x[edge_index[1]], sh, weights)
        summed = torch.zeros(h.shape[0], messages.shape[1], dtype=messages.dtype, device=messages.device)
        summed = summed.index_add(0, edge_index[0], messages) * self.inv_sqrt_neighbors
        out = self.gate(self.linear_out(summed) + self.self_interaction(h, species_onehot))
        if self.residual:
            out = out + h
        return out


class EGNN(nn.Module):
    """E(3)-equivariant message-passing potential in the style of NequIP.

    Node features are e3nn irreps (``num_features`` channels of each l <= ``lmax``, even and odd
    parity); edges carry spherical harmonics ``Y^l(r_ij / |r_ij|)`` up to ``lmax`` and a Bessel radial
    basis times a polynomial cutoff envelope. After ``num_layers`` interactions, the scalar (0e)
    channels go through an equivariant linear map to ``num_features`` invariants (the node features
    used in latent studies) and an MLP to per-atom energies.

    Args:
        num_species: number of elements the model knows.
        cutoff: radial cutoff, Å.
        num_features: channels per irrep (default 32).
        lmax: highest rotation order of features and spherical harmonics, 0..3 (default 2).
        num_layers: interaction layers (default 3).
        num_basis: Bessel functions (default 8).
        radial_hidden: width of the radial MLP (default 64).
        radial_layers: hidden layers of the radial MLP (default 2).
        avg_num_neighbors: normaliser of the neighbour sum, set from training data (default 10).
        parity: keep both parities of each l (default True); False keeps only (-1)^l.
        cutoff_p: smoothness order of the polynomial cutoff (default 6).
    """

    def __init__(
        self,
        num_species: int,
        cutoff: float,
        num_features: int = 32,
        lmax: int = 2,
        num_layers: int = 3,
        num_basis: int = 8,
        radial_hidden: int = 64,
        radial_layers: int = 2,
        avg_num_neighbors: float = 10.0,
        parity: bool = True,
        cutoff_p: int = 6,
    ):
        super().__init__()
        if not 0 <= lmax <= 3:
            raise ValueError(f"lmax must be between 0 and 3, got {lmax}")
        self.num_species = num_species
        irreps_sh = o3.Irreps.spherical_harmonics(lmax)
        irreps_hidden = hidden_irreps(num_features, lmax, parity)
        self.sh = o3.SphericalHarmonics(irreps_sh, normalize=True, normalization="component")
        self.basis = BesselBasis(cutoff, num_basis)
        self.envelope = PolynomialCutoff(cutoff, cutoff_p)
        self.embedding = nn.Linear(num_species, num_features)
        irreps = o3.Irreps(f"{num_features}x0e")
        layers = []
        for _ in range(num_layers):
            layer = Interaction(
                irreps, irreps_sh, irreps_hidden, num_species, num_basis, radial_hidden, radial_layers, avg_num_neighbors
            )
            layers.append(layer)
            irreps = layer.irreps_out
        self.layers = nn.ModuleList(layers)
        self.irreps_out = irreps
        self.to_invariants = o3.Linear(irreps, o3.Irreps(f"{num_features}x0e"))
        self.readout = nn.Sequential(nn.Linear(num_features, num_features // 2), nn.SiLU(), nn.Linear(num_features // 2, 1))

    def forward(self, graph: Dict[str, Tensor], species: Tensor) -> Tuple[Tensor, Tensor]:
        edge_index = graph[keys.EDGE_INDEX]
        vec, r = edge_vectors(graph[keys.POSITIONS], edge_index, graph[keys.SHIFT])
        sh = self.sh(vec)
        radial = self.basis(r) * self.envelope(r).unsqueeze(-1)
        onehot = F.one_hot(species, self.num_species).to(vec.dtype)
        h = self.embedding(onehot)
        for layer in self.layers:
            h = layer(h, onehot, edge_index, sh, radial)
        features = self.to_invariants(h)
        return self.readout(features).squeeze(-1), features
