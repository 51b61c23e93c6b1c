"""NequIP-style E(3)-equivariant interatomic potential built on e3nn (Batzner et al., Nat. Commun. 13, 2453, 2022)."""

import contextlib
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from e3nn import o3
from e3nn.nn import FullyConnectedNet, Gate
from torch import Tensor, nn

from mlpot import keys
from mlpot.nn import equivariant
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


@contextlib.contextmanager
def unrolled_products(module: nn.Module):
    """Within the block, the EGNN layers in ``module`` write their tensor products as sums of outer
    products over the nonzero Wigner 3j blocks (inner sizes 1, 3, 5) instead of one dense batched product
    per output irrep. For compiled training (energy, forces and their weight gradients, compiled by
    Inductor) that is 1.2-1.6x faster a step: Inductor fuses the outer products with the gathers, weights
    and sums around them. Run eagerly (TorchScript) or compiled for energy and forces only (AOTInductor),
    the dense products are faster (aspirin: 6.6 vs 10.1 ms TorchScript, 2.2 vs 4.4 ms AOTInductor,
    float32), so they are the default."""
    layers = [m for m in module.modules() if isinstance(m, Interaction)]
    before = [layer.unrolled for layer in layers]
    for layer in layers:
        layer.unrolled = True
    try:
        yield module
    finally:
        for layer, value in zip(layers, before):
            layer.unrolled = value


class Interaction(nn.Module):
    """One equivariant convolution with gated nonlinearity and a species-dependent self-interaction.

    ``m_i = 1/sqrt(n_avg) sum_j TP(Linear(h_j), Y(r_ij); R(|r_ij|))``, where the tensor-product
    weights R come from an MLP of the radial basis (times the smooth cutoff envelope);
    ``h_i <- Gate(Linear(m_i) + SelfInteraction(h_i, Z_i))`` (+ h_i when the irreps match).

    The parameters live in e3nn modules (``linear_in``, ``tp``, ``radial``, ``linear_out``,
    ``self_interaction``, ``gate``) and :meth:`forward_e3nn` evaluates them path by path; :meth:`forward`
    computes the same numbers as a few matrix products on blocked (N, M, U) features (see
    :mod:`mlpot.nn.equivariant`), which is what runs whenever the irreps allow it (one parity per l).

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
            o3.Irreps(f"{gated.num_irreps}x0e") if gated.num_irreps else o3.Irreps(""),  # lmax 0: no gates
            [torch.sigmoid] if gated.num_irreps else [],
            gated,
        )
        self.linear_out = o3.Linear(irreps_mid, self.gate.irreps_in)
        self.self_interaction = o3.FullyConnectedTensorProduct(
            self.irreps_in, o3.Irreps(f"{num_species}x0e"), self.gate.irreps_in
        )
        self.irreps_out = self.gate.irreps_out
        self.residual = self.irreps_out == self.irreps_in
        try:
            self._build_fused_tables()
            self.fusable = True
        except ValueError:
            self.fusable = False

    def _fused_defaults(self) -> None:
        """Placeholders, so that TorchScript compiles :meth:`forward` for layers it cannot fuse."""
        # the last layer only needs its scalars (the energy reads nothing else): EGNN sets this there
        self.scalars_only = False
        self.mul, self.num_rows_in, self.num_species = 0, 0, 0
        self.num_scalar_outputs, self.num_gates, self.gate_cst = 0, 0, 1.0
        self.mix_plan, self.scalar_acts, self.scalar_dims, self.groups = [0], [0], [0], [0]
        self.unrolled = False  # see unrolled_products
        self.radial_scales, self.scalar_csts = [1.0], [1.0]
        for name in ("lin_index", "weight_columns", "mix_index"):
            self.register_buffer(name, torch.zeros(0, dtype=torch.long), persistent=False)
        for name in ("lin_scale", "coupling", "grouped", "mix_scale", "frozen_w_in", "frozen_mix", "frozen_last"):
            self.register_buffer(name, torch.zeros(0), persistent=False)
        self.frozen = False

    def _build_fused_tables(self) -> None:
        """Index and coefficient tables for :meth:`forward` (kept out of the state dict)."""
        self._fused_defaults()
        mul = equivariant.uniform_multiplicity(self.irreps_in)
        self.mul = mul
        lin_index, lin_scale = equivariant.linear_table(self.linear_in)
        order = equivariant.path_order(self.tp)  # the order of the paths in both tables
        coupling, grouped, weight_columns, groups = equivariant.tensor_product_table(self.tp, order)
        mix_index, mix_scale, plan = equivariant.mixing_table(self.linear_out, self.self_interaction, mul, order)
        self.groups: List[int] = groups
        self.num_rows_in = equivariant.block_rows(self.irreps_in)[-1]
        self.num_species = self.self_interaction.irreps_in2.num_irreps
        self.mix_plan: List[int] = plan
        dtype = torch.get_default_dtype()
        # float64 originals: converting the model to float64 later must not keep float32 roundings
        self._tables64 = {"lin_scale": lin_scale, "coupling": coupling, "grouped": grouped, "mix_scale": mix_scale}
        self.register_buffer("lin_index", lin_index, persistent=False)
        self.register_buffer("lin_scale", lin_scale.to(dtype), persistent=False)
        self.register_buffer("coupling", coupling.to(dtype), persistent=False)
        self.register_buffer("grouped", grouped.to(dtype), persistent=False)
        self.register_buffer("weight_columns", weight_columns, persistent=False)
        # e3nn's radial MLP: x @ (w / sqrt(fan_in)), normalised silu; the constants fold into the weights,
        # the neighbour normalisation into the last layer
        layers = [self.radial[i] for i in range(len(self.radial))]
        csts = [1.0] + [float(layer.act.cst) for layer in layers[:-1]]
        self.radial_scales: List[float] = [c / layer.h_in**0.5 for c, layer in zip(csts, layers)]
        self.radial_scales[-1] *= self.inv_sqrt_neighbors
        self.register_buffer("mix_index", mix_index, persistent=False)
        self.register_buffer("mix_scale", mix_scale.to(dtype), persistent=False)
        # the gate, read off e3nn's Gate. Its input irreps (= the mixing outputs) start with the l = 0
        # ones: the scalars (activation 0 silu / 1 tanh, with e3nn's normalising constants), then the
        # sigmoid gates, one per gated irrep; the gated irreps follow, one mixing output each.
        gate = self.gate
        outputs = [(mul_out, ir) for mul_out, ir in self.linear_out.irreps_out]
        num_scalar_outputs = sum(1 for _, ir in outputs if ir.l == 0)
        natural = (gate.irreps_scalars + gate.irreps_gates + gate.irreps_gated).simplify()
        if natural != self.linear_out.irreps_out or (num_scalar_outputs > 1 and gate.irreps_gates.dim > 0):
            # e3nn sorted the gate's input (both parities): not fused, the e3nn path runs instead
            raise ValueError("fusing needs the gate's scalars, gates and gated irreps in e3nn's sorted order")
        acts = {F.silu: 0, torch.tanh: 1}
        self.num_scalar_outputs = num_scalar_outputs
        self.scalar_acts: List[int] = [acts[a.f] for a in gate.act_scalars.acts]
        self.scalar_csts: List[float] = [float(a.cst) for a in gate.act_scalars.acts]
        self.scalar_dims: List[int] = [mul_ir.dim for mul_ir in gate.irreps_scalars]
        self.gate_cst = float(gate.act_gates.acts[0].cst) if len(gate.act_gates.acts) else 1.0
        self.num_gates = gate.irreps_gates.dim

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name, table in getattr(self, "_tables64", {}).items():
            current = getattr(self, name)
            setattr(self, name, table.to(device=current.device, dtype=current.dtype))
        return self

    def forward(
        self, x: Tensor, species_onehot: Tensor, edge_index: Tensor, sh: Tensor, radial: Tensor, edge_pair: Optional[Tensor] = None
    ) -> Tensor:
        """Blocked node features (N, M_in, U) -> (N, M_out, U); see :mod:`mlpot.nn.equivariant`.

        The same numbers as :meth:`forward_e3nn` (e3nn's modules path by path, flat layout), as a few
        matrix products: the tensor product as one batched product per output irrep with precomputed
        Wigner 3j couplings (or, within :func:`unrolled_products`, as sums of outer products over the
        nonzero Wigner 3j blocks only), the output linear map and the self-interaction as one product per output irrep.
        With ``edge_pair``, ``radial`` holds one row per pair of edges i->j, j->i (same length): the
        radial MLP runs once per pair and its weights are gathered to the edges.
        """
        n, mul = x.shape[0], self.mul
        w_in, all_weights, last = self._weight_tables()
        mixed = torch.einsum("nmu,muv->nmv", x, w_in)
        src = edge_index[1]
        num_edges, rows_in = src.shape[0], self.num_rows_in
        # the dense products read the neighbours' features as one (E, M, U) tensor; the unrolled ones read
        # each input row gathered on its own, so that the gradients add plain per-edge tensors, not the
        # zero-padded slices of one tensor (which Inductor builds with masked loads, slow in float64)
        neighbours = mixed if self.unrolled else mixed[src]  # unused (node features) when unrolled
        neighbour_rows: List[Tensor] = []
        if self.unrolled:
            neighbour_rows = [mixed[:, r].index_select(0, src) for r in range(rows_in)]
        hidden = self._radial_hidden(radial)
        outs: List[Tensor] = []
        for o in range(len(self.mix_plan) // 7):
            first, count, h_row, dim, mul_out, offset, slot = self.mix_plan[7 * o : 7 * o + 7]
            if self.scalars_only and dim > 1:
                continue
            # the paths' outputs (E, dim, paths * U), times their radial weights (the same for every m) and
            # summed over neighbours
            summed: List[Tensor] = []
            if self.unrolled:
                start = slot * mul
                for g in range(len(self.groups) // 5):
                    run_slot, col, group_rows, first_row, k1 = self.groups[5 * g : 5 * g + 5]
                    if run_slot == slot:
                        # a group of paths from one input irrep: a sum of k1 outer products, with its own
                        # radial weights (no per-edge slices, as above)
                        c = (sh @ self.grouped[:, col : col + k1 * group_rows]).view(num_edges, k1, group_rows, 1)
                        run = c[:, 0] * neighbour_rows[first_row].unsqueeze(1)
                        for k in range(1, k1):
                            run = run + c[:, k] * neighbour_rows[first_row + k].unsqueeze(1)
                        width = group_rows // dim * mul
                        weights = self._edge_weights(hidden, last[:, start : start + width], edge_pair)
                        run = run.view(num_edges, dim, width) * weights.unsqueeze(1)
                        summed.append(torch.zeros(n, dim, width, dtype=run.dtype, device=run.device).index_add(0, edge_index[0], run))
                        start += width
            else:
                # all paths at once, one batched product; rows m-major, so (E, dim, paths * U) is a view
                weights = self._edge_weights(hidden, last[:, slot * mul : (slot + count) * mul], edge_pair)
                coupled = (sh @ self.coupling[:, first * rows_in : (first + count * dim) * rows_in]).view(num_edges, count * dim, rows_in)
                run = torch.bmm(coupled, neighbours).view(num_edges, dim, count * mul) * weights.unsqueeze(1)
                summed.append(torch.zeros(n, dim, count * mul, dtype=run.dtype, device=run.device).index_add(0, edge_index[0], run))
            if h_row >= 0:  # the self-interaction's input: h (x) one_hot(species)
                own = x[:, h_row : h_row + dim].unsqueeze(-1) * species_onehot.unsqueeze(1).unsqueeze(1)
                summed.append(own.reshape(n, dim, mul * self.num_species))
            inputs = summed[0] if len(summed) == 1 else torch.cat(summed, dim=2)
            rows = inputs.shape[2]
            weight = all_weights[offset : offset + rows * mul_out].view(rows, mul_out)
            if self.scalars_only and self.num_scalar_outputs == 1:
                weight = weight[:, : self.scalar_dims[0] * len(self.scalar_dims)]  # no gates needed
            outs.append(inputs @ weight)
        if self.scalars_only:
            out = self._activate_scalars(outs, n).view(n, -1, mul)
        else:
            out = self._gate(outs, n)
        if self.residual:
            out = out + x[:, : out.shape[1]]
        return out

    def _weight_tables(self) -> Tuple[Tensor, Tensor, Tensor]:
        """The weights in the fused layout: linear_in per row (M, U, U), the mixing matrices (flat), and the
        radial MLP's last layer with its columns in output-irrep order and its constants folded in.
        Computed from the parameters on every call, or taken from :meth:`freeze`'s copies."""
        if self.frozen:
            return self.frozen_w_in, self.frozen_mix, self.frozen_last
        w_in = self.linear_in.weight[self.lin_index] * self.lin_scale
        mix = torch.cat([self.linear_out.weight, self.self_interaction.weight])[self.mix_index] * self.mix_scale
        last = self.lin_scale  # placeholder until the loop finds the last radial layer
        k = 0
        for layer in self.radial:
            if k == len(self.radial_scales) - 1:
                last = layer.weight[:, self.weight_columns] * self.radial_scales[k]
            k += 1
        return w_in, mix, last

    @torch.jit.unused
    def freeze(self) -> None:
        """Precompute the weight tables for inference (deployed models): they are then constants, not
        recomputed on every call. ``train()`` undoes it."""
        with torch.no_grad():
            self.frozen = False
            w_in, mix, last = self._weight_tables()
            self.frozen_w_in, self.frozen_mix, self.frozen_last = w_in.clone(), mix.clone(), last.clone()
        self.frozen = True

    def train(self, mode: bool = True):
        if mode:
            self.frozen = False
        return super().train(mode)

    def _edge_weights(self, hidden: Tensor, columns: Tensor, edge_pair: Optional[Tensor]) -> Tensor:
        """Radial weights per edge: the MLP's last layer (``columns`` of it) on its hidden features, which
        with ``edge_pair`` are per pair of edges and are gathered to the edges."""
        weights = hidden @ columns
        if edge_pair is not None:
            weights = weights.index_select(0, edge_pair)
        return weights

    def _radial_hidden(self, radial: Tensor) -> Tensor:
        """The radial MLP up to its last layer (each output irrep applies its own columns of the last)."""
        x = radial
        k = 0
        for layer in self.radial:
            if k < len(self.radial_scales) - 1:
                x = F.silu(x @ (layer.weight * self.radial_scales[k]))
            k += 1
        return x

    def _activate_scalars(self, outs: List[Tensor], n: int) -> Tensor:
        """The gate's scalar part: each scalar irrep through its activation, (N, number of scalars)."""
        l0 = outs[0].view(n, -1) if self.num_scalar_outputs == 1 else torch.cat(outs[: self.num_scalar_outputs], dim=2).view(n, -1)
        pieces: List[Tensor] = []
        start = 0
        for act, cst, dim in zip(self.scalar_acts, self.scalar_csts, self.scalar_dims):
            block = l0[:, start : start + dim]
            pieces.append((F.silu(block) if act == 0 else torch.tanh(block)) * cst)
            start += dim
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def _gate(self, outs: List[Tensor], n: int) -> Tensor:
        """e3nn's Gate on the blocked mixing outputs: activated scalars, gated irreps times sigmoid gates."""
        l0 = outs[0].view(n, -1) if self.num_scalar_outputs == 1 else torch.cat(outs[: self.num_scalar_outputs], dim=2).view(n, -1)
        start = sum(self.scalar_dims)
        blocks = [self._activate_scalars(outs, n).view(n, -1, self.mul)]
        if self.num_gates > 0:
            gates = torch.sigmoid(l0[:, start : start + self.num_gates]) * self.gate_cst
            g = 0
            for gated in outs[self.num_scalar_outputs :]:
                width = gated.shape[2]
                blocks.append(gated * gates[:, g : g + width].unsqueeze(1))
                g += width
        return torch.cat(blocks, dim=1)

    def forward_e3nn(self, h: Tensor, species_onehot: Tensor, edge_index: Tensor, sh: Tensor, radial: Tensor) -> Tensor:
        """The layer as e3nn's modules compute it, path by path, on flat e3nn features (the reference)."""
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
        (ins,) = self.to_invariants.instructions  # the 0e channels are the only path to invariants
        self.scalar_row = equivariant.block_rows(irreps)[ins.i_in]
        self.invariants_scale = ins.path_weight
        self.num_features = num_features
        # True runs e3nn's modules path by path (flat layout): the reference the fused layers are tested
        # against, and the path for irreps the fused layers do not handle (both parities)
        self.use_e3nn = not all(layer.fusable for layer in layers)
        layers[-1].scalars_only = True  # its l > 0 outputs would be computed for nothing
        self.readout = nn.Sequential(nn.Linear(num_features, num_features // 2), nn.SiLU(), nn.Linear(num_features // 2, 1))

    @torch.jit.unused
    def freeze(self) -> None:
        """Precompute every layer's fused weight tables (for deploying; ``train()`` undoes it)."""
        if not self.use_e3nn:
            for layer in self.layers:
                layer.freeze()

    def forward(self, graph: Dict[str, Tensor], species: Tensor) -> Tuple[Tensor, Tensor]:
        edge_index = graph[keys.EDGE_INDEX]
        vec, r = edge_vectors(graph[keys.POSITIONS], edge_index, graph[keys.SHIFT])
        sh = self.sh(vec)
        edge_pair: Optional[Tensor] = None
        if keys.PAIR_EDGE in graph and keys.EDGE_PAIR in graph:  # radial functions once per pair i->j, j->i
            r = r.index_select(0, graph[keys.PAIR_EDGE])
            edge_pair = graph[keys.EDGE_PAIR]
        radial = self.basis(r) * self.envelope(r).unsqueeze(-1)
        onehot = (species.unsqueeze(-1) == torch.arange(self.num_species, device=species.device)).to(vec.dtype)
        h = self.embedding(onehot)
        if self.use_e3nn:
            if edge_pair is not None:
                radial = radial.index_select(0, edge_pair)
            for layer in self.layers:
                h = layer.forward_e3nn(h, onehot, edge_index, sh, radial)
            features = self.to_invariants(h)
        else:
            x = h.unsqueeze(1)  # blocked (N, M, U) layout, here 1 x 0e
            for layer in self.layers:
                x = layer(x, onehot, edge_index, sh, radial, edge_pair)
            features = x[:, self.scalar_row] @ (self.to_invariants.weight.view(self.num_features, -1) * self.invariants_scale)
        return self.readout(features).squeeze(-1), features
