"""The seed study's invariant baseline: graph convolutions weighted by interatomic distance."""

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import GCNConv
from torch_geometric.nn.conv.gcn_conv import gcn_norm

from mlpot import keys
from mlpot.nn.radial import CosineCutoff, GaussianBasis, edge_vectors


class DistanceGCNConv(GCNConv):
    """PyG's GCNConv restricted to dense edge weights, with a self loop on every atom.

    The parent's forward also accepts sparse adjacency types; their TorchScript code does not load
    back without torch_sparse, so this forward takes plain tensors only. It adds the self loops
    itself: PyG adds one only to nodes without an ``i -> i`` edge, but in a periodic cell smaller
    than the cutoff an atom's edge to its own image is such an edge, and taking it as the loop would
    make the cell's energy differ from its supercell's. Same parameters; the same maths on molecules.
    """

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor) -> Tensor:
        n = x.size(0)
        if self.add_self_loops:
            loop = torch.arange(n, device=edge_index.device, dtype=edge_index.dtype)
            edge_index = torch.cat([edge_index, torch.stack([loop, loop])], dim=1)
            edge_weight = torch.cat([edge_weight, edge_weight.new_full((n,), 2.0 if self.improved else 1.0)])
        edge_index, edge_weight = gcn_norm(edge_index, edge_weight, n, self.improved, False, self.flow, x.dtype)
        out = self.propagate(edge_index, x=self.lin(x), edge_weight=edge_weight)
        if self.bias is not None:
            out = out + self.bias
        return out


class GCN(nn.Module):
    """Distance-weighted graph convolutional network (Kipf & Welling 2017 on a radius graph).

    Atoms start as one-hot species vectors. Each layer is a residual ``torch_geometric`` GCNConv,
    ``h <- h + silu(D^-1/2 (A + I) D^-1/2 h W)``, on the graph of atoms closer than the cutoff, with
    edge weights ``A_ij = f_c(r_ij) * sigmoid(w . g(r_ij))``: a learnable function of the distance on a
    Gaussian basis ``g`` times a cosine cutoff ``f_c``, so weights, energies and forces go smoothly
    to zero at the cutoff. An MLP maps the last features to per-atom energies. The model sees
    distances only, so it is invariant but cannot tell angles apart directly.

    Args:
        num_species: number of elements the model knows.
        cutoff: radial cutoff, Å.
        num_features: width of the node features (default 64).
        num_layers: number of GCN layers (default 3).
        num_basis: Gaussians in the edge-weight function (default 16).
    """

    def __init__(self, num_species: int, cutoff: float, num_features: int = 64, num_layers: int = 3, num_basis: int = 16):
        super().__init__()
        self.num_species = num_species
        self.embedding = nn.Linear(num_species, num_features)
        self.basis = GaussianBasis(cutoff, num_basis)
        self.cutoff_fn = CosineCutoff(cutoff)
        self.edge_weights = nn.ModuleList([nn.Linear(num_basis, 1) for _ in range(num_layers)])
        self.convs = nn.ModuleList([DistanceGCNConv(num_features, num_features) for _ in range(num_layers)])
        self.readout = nn.Sequential(nn.Linear(num_features, num_features // 2), nn.SiLU(), nn.Linear(num_features // 2, 1))

    def forward(self, graph: Dict[str, Tensor], species: Tensor) -> Tuple[Tensor, Tensor]:
        edge_index = graph[keys.EDGE_INDEX]
        _, r = edge_vectors(graph[keys.POSITIONS], edge_index, graph[keys.SHIFT])
        basis = self.basis(r)
        envelope = self.cutoff_fn(r)
        h = self.embedding(F.one_hot(species, self.num_species).to(r.dtype))
        for edge_weight, conv in zip(self.edge_weights, self.convs):
            w = envelope * torch.sigmoid(edge_weight(basis)).squeeze(-1)
            h = h + F.silu(conv(h, edge_index, w))
        return self.readout(h).squeeze(-1), h
