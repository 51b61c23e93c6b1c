"""NequIP-style E(3)-equivariant interatomic potential built on e3nn (Batzner et al., Nat. Commun. 13, 2453, 2022)."""

import contextlib
import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from e3nn import o3
from e3nn.nn import FullyConnectedNet, Gate
from torch import Tensor, nn

from mlpot import keys
from mlpot.nn import equivariant
from mlpot.nn.fused import DenseInteraction, UnrolledInteraction, share_parts
from mlpot.nn.radial import BesselBasis, PolynomialCutoff, edge_vectors

# how the interactions are evaluated, chosen at build time or when the model is frozen (all share the
# parameters): "e3nn" e3nn's modules path by path (the reference, slow); "dense" the fused kernel for
# TorchScript and AOTInductor; "unrolled" the fused kernel for compiled training (see mlpot.nn.fused)
BACKENDS = ("e3nn", "dense", "unrolled")


def hidden_irreps(num_features: int, lmax: int, parity: bool = False, ls: Optional[Sequence[int]] = None) -> o3.Irreps:
    """``num_features`` channels of every l <= lmax (or of each l in ``ls``): parity (-1)^l only, or both
    parities when ``parity``.

    >>> str(hidden_irreps(4, 1))
    '4x0e+4x1o'
    >>> str(hidden_irreps(4, 1, parity=True))
    '4x0e+4x0o+4x1o+4x1e'
    >>> str(hidden_irreps(4, 2, ls=[0, 2]))
    '4x0e+4x2e'
    """
    ls = range(lmax + 1) if ls is None else sorted(ls)
    return o3.Irreps([(num_features, (l, p)) for l in ls for p in ((-1) ** l, -((-1) ** l))[: 2 if parity else 1]])


def check_hidden_ls(hidden_ls: Optional[Sequence[int]], lmax: int) -> None:
    """Raise a one-line ValueError unless ``hidden_ls`` is None or distinct l values in 0..lmax including 0."""
    if hidden_ls is None:
        return
    ls = list(hidden_ls)
    if not all(isinstance(l, int) and not isinstance(l, bool) for l in ls) or len(set(ls)) != len(ls) \
            or 0 not in ls or not all(0 <= l <= lmax for l in ls):
        raise ValueError(f"hidden_ls must be distinct integers in 0..lmax ({lmax}) including 0, got {hidden_ls!r}")


class Interaction(nn.Module):
    """One equivariant convolution with a gated nonlinearity and a species-dependent self-interaction.

    For node features h_i (``irreps_in``), edge spherical harmonics Y(r_ij) (``irreps_sh``) and the
    radial basis B(|r_ij|) times the cutoff envelope:

    - ``m_i = 1/sqrt(n_avg) sum_j TP(Linear_in(h_j), Y(r_ij); R(B(|r_ij|)))``: every path
      l_in x l_sh -> l_out that lands in ``irreps_target``, one weight per channel ("uvu") from the
      radial MLP R (``irreps_mid``: one irrep per path);
    - ``h_i <- Gate(Linear_out(m_i) + SelfInteraction(h_i, onehot(Z_i)))`` (``irreps_out``), plus h_i
      when ``irreps_out == irreps_in``. The gate puts the 0e scalars through silu, the 0o ones through
      tanh, and multiplies each l > 0 irrep by a sigmoid of its own 0e gate.

    This module holds the parameters (e3nn modules) and evaluates them path by path with e3nn, the
    reference backend ("e3nn"); the fused backends of :mod:`mlpot.nn.fused` share these modules.
    Features are passed blocked, (N, M, U) (:func:`mlpot.nn.equivariant.to_blocked`), as every backend takes them.

    Args:
        irreps_in: irreps of the incoming node features (one multiplicity U).
        irreps_sh: irreps of the edge spherical harmonics.
        irreps_target: the hidden irreps the layer may produce (the reachable ones are kept).
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
        # every path l_in x l_sh -> l_out in the target irreps, each into its own output irrep
        paths = [
            (i, j, ir_out)
            for i, (_, ir_in) in enumerate(self.irreps_in)
            for j, (_, ir_sh) in enumerate(irreps_sh)
            for ir_out in ir_in * ir_sh
            if ir_out in irreps_target
        ]
        irreps_mid, perm, _ = o3.Irreps([(self.irreps_in[i].mul, ir) for i, _, ir in paths]).sort()
        instructions = [(i, j, perm[k], "uvu", True) for k, (i, j, _) in enumerate(paths)]
        self.linear_in = o3.Linear(self.irreps_in, self.irreps_in)
        self.tp = o3.TensorProduct(
            self.irreps_in, irreps_sh, irreps_mid, instructions, shared_weights=False, internal_weights=False
        )
        self.radial = FullyConnectedNet([num_basis] + radial_layers * [radial_hidden] + [self.tp.weight_numel], F.silu)

        reachable = irreps_mid.simplify()
        scalars = o3.Irreps([(mul, ir) for mul, ir in irreps_target if ir.l == 0 and ir in reachable])
        gated = o3.Irreps([(mul, ir) for mul, ir in irreps_target if ir.l > 0 and ir in reachable])
        gates = o3.Irreps(f"{gated.num_irreps}x0e") if gated.num_irreps else o3.Irreps("")  # lmax 0: no gates
        self.gate = Gate(
            scalars, [F.silu if ir.p == 1 else torch.tanh for _, ir in scalars], gates, [torch.sigmoid] * len(gates), gated
        )
        self.linear_out = o3.Linear(irreps_mid, self.gate.irreps_in)
        self.self_interaction = o3.FullyConnectedTensorProduct(
            self.irreps_in, o3.Irreps(f"{num_species}x0e"), self.gate.irreps_in
        )
        self.irreps_out = self.gate.irreps_out
        self.residual = self.irreps_out == self.irreps_in
        # the last layer needs only its scalars (the energy reads nothing else); the fused backends use it
        self.scalars_only = False

    @classmethod
    def sharing(cls, layer: nn.Module) -> "Interaction":
        """The e3nn form of a backend of an interaction, sharing its modules."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        share_parts(new, layer)
        return new

    def forward(
        self, x: Tensor, species_onehot: Tensor, edge_index: Tensor, sh: Tensor, radial: Tensor, edge_pair: Optional[Tensor] = None
    ) -> Tensor:
        """Blocked node features (N, M_in, U) -> (N, M_out, U), with e3nn's modules on e3nn's flat layout.

        ``radial`` (E, B), or with ``edge_pair`` (E,) one row per pair of edges gathered to the edges."""
        h = equivariant.to_flat(x, self.irreps_in)
        weights = self.radial(radial)
        if edge_pair is not None:
            weights = weights.index_select(0, edge_pair)
        messages = self.tp(self.linear_in(h)[edge_index[1]], sh, weights)
        summed = torch.zeros(h.shape[0], messages.shape[1], dtype=messages.dtype, device=messages.device)
        summed = summed.index_add(0, edge_index[0], messages) * self.inv_sqrt_neighbors
        out = self.gate(self.linear_out(summed) + self.self_interaction(h, species_onehot))
        if self.residual:
            out = out + h
        return equivariant.to_blocked(out, self.irreps_out)


def with_backend(layer: nn.Module, backend: str) -> nn.Module:
    """``layer`` (an :class:`Interaction` or a backend of one) in the form ``backend``, sharing its modules."""
    forms = {"e3nn": Interaction, "dense": DenseInteraction, "unrolled": UnrolledInteraction}
    if backend not in forms:
        raise ValueError(f"unknown EGNN backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if type(layer) is forms[backend]:
        return layer
    return Interaction.sharing(layer) if backend == "e3nn" else forms[backend](layer)


@contextlib.contextmanager
def using_backend(module: nn.Module, backend: str):
    """Within the block, every EGNN in ``module`` evaluates its interactions with ``backend``; the
    layers it had before come back afterwards (the same objects, frozen tables included)."""
    models = [m for m in module.modules() if isinstance(m, EGNN)]
    before = [(list(m.layers), m.backend) for m in models]
    for model in models:
        model.set_backend(backend)
    try:
        yield module
    finally:
        for model, (layers, name) in zip(models, before):
            for i, layer in enumerate(layers):
                model.layers[i] = layer
            model.backend = name


def unrolled_products(module: nn.Module):
    """The EGNNs in ``module`` with the "unrolled" backend within the block: the form compiled training
    traces (Inductor fuses it 1.2-1.6x faster a step; see :mod:`mlpot.nn.fused`)."""
    return using_backend(module, "unrolled")


class EGNN(nn.Module):
    """E(3)-equivariant message-passing potential in the style of NequIP.

    Irreps, with F = ``num_features`` and L = ``lmax``:

    - edges: ``irreps_sh = Y^0 + ... + Y^L`` of r_ij / |r_ij| (0e+1o+2e+...), and a Bessel radial basis
      times a polynomial cutoff envelope;
    - nodes: the embedding ``h^0 = Linear(onehot(Z))``, ``F x 0e``; every interaction t = 1..T
      (:class:`Interaction`) maps h^(t-1) into ``irreps_hidden = hidden_irreps(F, L, parity)``
      (F channels of each l <= L with parity (-1)^l, or of both parities), keeping the reachable irreps;
      with ``hidden_ls`` only the l listed there (below);
    - readout: ``E_i = MLP(Linear(h^T)_0e)``: the 0e channels of the last layer through an equivariant
      linear map to F invariants (the node features of latent studies), then an MLP to per-atom energies.

    The interactions run with one of :data:`BACKENDS` (all share the parameters, so one state dict serves
    each): ``backend`` at build time, or :meth:`set_backend` / :func:`using_backend` when the model is
    frozen for export or traced for compiled training.

    Pruned hidden irreps (``hidden_ls``, e.g. [0, 2]: no l = 1 channels, after Lee et al. 2024): the
    edge harmonics stay Y^0..Y^L, so the model keeps exactly the paths of the full model that neither
    start nor end at an l = 1 feature: a pure feature ablation. Dropping Y^1 too would also cut paths
    between the kept features (2e x 1o -> 2o with ``parity``), an ablation of edge geometry on top.
    Without ``parity`` (the recipes) there are no such paths: l in {0, 2} times 1o has odd parity and
    lands in no hidden irrep, so Y^1 enters no tensor product, and each edge enters only through Y^0
    and Y^2, which are even in its direction.

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
        parity: keep both parities of each l (default False, as the recipes): odd scalars, polar and axial vectors.
        cutoff_p: smoothness order of the polynomial cutoff (default 6).
        backend: how the interactions are evaluated, one of :data:`BACKENDS` (default "dense").
        hidden_ls: the l of the hidden features, distinct values in 0..lmax including 0 (default None:
            every l <= lmax); e.g. [0, 2] drops the l = 1 channels.
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
        parity: bool = False,
        cutoff_p: int = 6,
        backend: str = "dense",
        hidden_ls: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        if not 0 <= lmax <= 3:
            raise ValueError(f"lmax must be between 0 and 3, got {lmax}")
        check_hidden_ls(hidden_ls, lmax)
        self.num_species = num_species
        self.num_features = num_features
        irreps_sh = o3.Irreps.spherical_harmonics(lmax)
        irreps_hidden = hidden_irreps(num_features, lmax, parity, hidden_ls)
        self.sh = o3.SphericalHarmonics(irreps_sh, normalize=True, normalization="component")
        self.basis = BesselBasis(cutoff, num_basis)
        self.envelope = PolynomialCutoff(cutoff, cutoff_p)
        self.embedding = nn.Linear(num_species, num_features)  # onehot(Z) -> F x 0e
        irreps = o3.Irreps(f"{num_features}x0e")
        layers = []
        for _ in range(num_layers):
            layers.append(
                Interaction(irreps, irreps_sh, irreps_hidden, num_species, num_basis, radial_hidden, radial_layers, avg_num_neighbors)
            )
            irreps = layers[-1].irreps_out
        layers[-1].scalars_only = True  # its l > 0 outputs would be computed for nothing
        self.layers = nn.ModuleList(layers)
        self.irreps_out = irreps
        self.to_invariants = o3.Linear(irreps, o3.Irreps(f"{num_features}x0e"))
        (ins,) = self.to_invariants.instructions  # the 0e channels are the only path to invariants
        self.scalar_row = equivariant.block_rows(irreps)[ins.i_in]
        self.invariants_scale = ins.path_weight
        self.readout = nn.Sequential(nn.Linear(num_features, num_features // 2), nn.SiLU(), nn.Linear(num_features // 2, 1))
        self.backend = "e3nn"
        self.set_backend(backend)

    @torch.jit.unused
    def set_backend(self, backend: str) -> None:
        """Evaluate the interactions with ``backend`` (one of :data:`BACKENDS`) from now on."""
        for i, layer in enumerate(self.layers):
            self.layers[i] = with_backend(layer, backend)
        self.backend = backend

    @torch.jit.unused
    def freeze(self) -> None:
        """Precompute every layer's fused weight tables (for deploying; ``train()`` undoes it)."""
        for layer in self.layers:
            if isinstance(layer, DenseInteraction):
                layer.freeze()

    def forward(self, graph: Dict[str, Tensor], species: Tensor) -> Tuple[Tensor, Tensor]:
        """Per-atom energies (N,) and invariant node features (N, F) of a graph; ``species`` (N,) indices."""
        edge_index = graph[keys.EDGE_INDEX]
        vec, r = edge_vectors(graph[keys.POSITIONS], edge_index, graph[keys.SHIFT])
        sh = self.sh(vec)
        edge_pair: Optional[Tensor] = None
        if keys.PAIR_EDGE in graph and keys.EDGE_PAIR in graph:  # radial functions once per pair i->j, j->i
            r = r.index_select(0, graph[keys.PAIR_EDGE])
            edge_pair = graph[keys.EDGE_PAIR]
        radial = self.basis(r) * self.envelope(r).unsqueeze(-1)
        onehot = (species.unsqueeze(-1) == torch.arange(self.num_species, device=species.device)).to(vec.dtype)
        x = self.embedding(onehot).unsqueeze(1)  # blocked (N, M, U) layout, here 1 x 0e
        for layer in self.layers:
            x = layer(x, onehot, edge_index, sh, radial, edge_pair)
        # to_invariants on the 0e rows (its only path), in the blocked layout
        features = x[:, self.scalar_row] @ (self.to_invariants.weight.view(self.num_features, -1) * self.invariants_scale)
        return self.readout(features).squeeze(-1), features
