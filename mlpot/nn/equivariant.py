"""Fused forms of e3nn operations, derived from the e3nn modules' own instructions.

e3nn evaluates a tensor product or an equivariant linear map path by path: hundreds of small
tensor operations per layer, which on a CPU and for a small molecule cost far more than the
arithmetic. The functions here read an e3nn module's instructions, path weights and Wigner 3j
symbols once and return index and coefficient tables, so that a layer runs as a handful of
matrix products on the same parameters (state dicts stay interchangeable with e3nn's).

Layouts: e3nn's flat layout stores ``mul x ir`` as (mul, 2l+1) row-major; the "blocked" layout
used here is (N, M, U): the m components of every irrep stacked along M, channels along U
(all irreps of a blocked tensor must have the same multiplicity U).
"""

from typing import List, Tuple

import torch
from e3nn import o3
from torch import Tensor


def uniform_multiplicity(irreps: o3.Irreps) -> int:
    """The multiplicity shared by every irrep of ``irreps``, or 0 when they differ."""
    muls = {mul for mul, _ in irreps}
    return muls.pop() if len(muls) == 1 else 0


def block_rows(irreps: o3.Irreps) -> List[int]:
    """Start row of each irrep in the blocked layout, plus the total (len(irreps) + 1 entries)."""
    rows = [0]
    for _, ir in irreps:
        rows.append(rows[-1] + ir.dim)
    return rows


def irrep_runs(irreps: o3.Irreps) -> List[Tuple[int, int, int]]:
    """(first index, count, dim) of each run of consecutive equal irreps."""
    runs: List[Tuple[int, int, int]] = []
    for i, (_, ir) in enumerate(irreps):
        if runs and irreps[runs[-1][0]].ir == ir:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, ir.dim)
        else:
            runs.append((i, 1, ir.dim))
    return runs


def path_order(tp: o3.TensorProduct) -> List[int]:
    """The output slots of ``tp`` reordered so that, within each run of equal output irreps, the paths
    from the same input irrep are adjacent (stable in the slot index): ``order[position] = slot``."""
    in1_of_slot = {ins.i_out: ins.i_in1 for ins in tp.instructions}
    order: List[int] = []
    for start, count, _ in irrep_runs(tp.irreps_out):
        order += sorted(range(start, start + count), key=lambda s: (in1_of_slot.get(s, -1), s))
    return order


def tensor_product_table(tp: o3.TensorProduct, order: List[int]) -> Tuple[Tensor, Tensor, Tensor, List[int]]:
    """For a ``uvu`` tensor product of (mul x irreps_in1) with (1 x irreps_in2) and per-edge weights.

    Output irreps come in ``order``, the tensor product's :func:`path_order` (within each run of equal
    irreps, the paths from one input irrep are adjacent; :func:`mixing_table` takes the same). Returns:

    - ``coupling`` (M2, K * M1): Wigner 3j symbols times path weights, such that
      ``(y @ coupling).view(-1, K, M1) @ x_blocked`` is every path's output (before its weight), stacked
      along K. Within each run of equal irreps the rows go m-major (m, then path): a run's rows then
      view as (N, 2l+1, paths * U) with no copy.
    - ``grouped`` (M2, columns) and ``groups`` (5 ints per group: first slot of its run, first column,
      rows D * P, first input row r1, input rows k1): the same products split by input irrep, so that
      only the nonzero Wigner 3j blocks are multiplied (about a third of ``coupling`` for l <= 2). A group
      of P paths into irreps of dim D gives ``sum_k (y @ grouped[:, col + k * D * P : col + (k + 1) * D * P])
      [..., None] * x_blocked[:, r1 + k, None]`` of shape (E, D * P, U), rows m-major.
    - ``weight_columns`` (P * U,): the columns of the flat per-edge weights in path order, so that the
      weights of a run are one contiguous block.
    """
    rows1, rows2, rows_out = block_rows(tp.irreps_in1), block_rows(tp.irreps_in2), block_rows(tp.irreps_out)
    m1, m2, k = rows1[-1], rows2[-1], rows_out[-1]
    coupling = torch.zeros(m1, m2, k, dtype=torch.float64)
    path_of_slot = [-1] * len(tp.irreps_out)
    in1_of_slot = [-1] * len(tp.irreps_out)
    for p, ins in enumerate(tp.instructions):
        if ins.connection_mode != "uvu" or tp.irreps_in2[ins.i_in2].mul != 1:
            raise ValueError("only uvu tensor products with a multiplicity-1 second input can be fused")
        l1, l2, l3 = (tp.irreps_in1[ins.i_in1].ir.l, tp.irreps_in2[ins.i_in2].ir.l, tp.irreps_out[ins.i_out].ir.l)
        if path_of_slot[ins.i_out] >= 0:
            raise ValueError("fusing needs one tensor-product path per output irrep")
        w3j = o3.wigner_3j(l1, l2, l3, dtype=torch.float64) * ins.path_weight
        out = slice(rows_out[ins.i_out], rows_out[ins.i_out + 1])
        coupling[rows1[ins.i_in1] : rows1[ins.i_in1 + 1], rows2[ins.i_in2] : rows2[ins.i_in2 + 1], out] += w3j
        path_of_slot[ins.i_out], in1_of_slot[ins.i_out] = p, ins.i_in1
    if min(path_of_slot) < 0:
        raise ValueError("every output irrep of a fused tensor product needs a path")
    dense_rows: List[Tensor] = []
    columns: List[Tensor] = []
    groups: List[int] = []
    col = 0
    for start, count, dim in irrep_runs(tp.irreps_out):
        run = order[start : start + count]
        dense_rows.append(torch.stack([torch.arange(rows_out[s], rows_out[s + 1]) for s in run], 1).reshape(-1))
        g = 0
        while g < count:
            i_in1 = in1_of_slot[run[g]]
            members = [s for s in run[g:] if in1_of_slot[s] == i_in1]
            rows = torch.stack([torch.arange(rows_out[s], rows_out[s + 1]) for s in members], 1).reshape(-1)
            first_row, k1 = rows1[i_in1], rows1[i_in1 + 1] - rows1[i_in1]
            block = coupling[first_row : first_row + k1, :, rows]  # (k1, M2, D * P)
            columns.append(block.permute(1, 0, 2).reshape(m2, -1))
            groups += [start, col, rows.numel(), first_row, k1]
            col += rows.numel() * k1
            g += len(members)
    mul = tp.irreps_in1[0].mul
    weight_columns = torch.cat([path_of_slot[s] * mul + torch.arange(mul) for s in order])
    # (M1, M2, K) -> (M2, K, M1) so that y @ coupling gives rows ready for a batched matmul with x
    dense = coupling[:, :, torch.cat(dense_rows)].permute(1, 2, 0).reshape(m2, k * m1)
    return dense, torch.cat(columns, dim=1), weight_columns, groups


def linear_table(linear: o3.Linear) -> Tuple[Tensor, Tensor]:
    """For an o3.Linear mapping blocked (N, M, U) features to the same irreps: the weight index
    (M, U, U) and scale (M, 1, 1) of every row, so ``x @ (weight[index] * scale)`` row by row is it."""
    irreps = linear.irreps_in
    mul = uniform_multiplicity(irreps)
    if linear.irreps_out != irreps or not mul or len(linear.instructions) != len(irreps):
        raise ValueError("fusing needs a linear map between equal irreps of one multiplicity")
    index, scale = [], []
    for b, ins in enumerate(linear.instructions):
        if ins.i_in != b or ins.i_out != b:
            raise ValueError("fusing needs one linear path per irrep, in order")
        block = b * mul * mul + torch.arange(mul * mul).view(1, mul, mul)
        d = irreps[b].ir.dim
        index.append(block.expand(d, mul, mul))
        scale.append(torch.full((d, 1, 1), ins.path_weight, dtype=torch.float64))
    return torch.cat(index), torch.cat(scale)


def mixing_table(
    linear: o3.Linear, self_interaction: o3.FullyConnectedTensorProduct, mul_in: int, order: List[int]
) -> Tuple[Tensor, Tensor, List[int]]:
    """One matrix per output irrep for ``linear(summed) + self_interaction(h, one_hot(species))``.

    For output irrep o the input is ``cat([summed rows of o's inputs, h rows of o's irrep (x) one_hot])``
    along channels, and the weight matrix is ``weights[index[o]] * scale[o]`` where ``weights`` is
    ``cat([linear.weight, self_interaction.weight])``. Returns (index, scale) flattened over all
    outputs, and for each output: [first input row of summed, number of summed irreps, first row
    of h (-1: no self-interaction), irrep dim, mul_out, offset into index, first summed irrep].
    The summed irreps of an output come in ``order`` (the tensor product's :func:`path_order`).
    """
    position = {slot: p for p, slot in enumerate(order)}
    lin_offsets, offset = [], 0
    for ins in linear.instructions:
        lin_offsets.append(offset)
        offset += ins.path_shape[0] * ins.path_shape[1]
    si_offsets = []
    for ins in self_interaction.instructions:
        si_offsets.append(offset)
        offset += ins.path_shape[0] * ins.path_shape[1] * ins.path_shape[2]
    num_species = self_interaction.irreps_in2.num_irreps
    runs = irrep_runs(linear.irreps_in)
    rows_mid, rows_h = block_rows(linear.irreps_in), block_rows(self_interaction.irreps_in1)
    index, scale, plan = [], [], []
    for o, (mul_out, ir_out) in enumerate(linear.irreps_out):
        lin = [(i, ins) for i, ins in enumerate(linear.instructions) if ins.i_out == o]
        slots = sorted(ins.i_in for _, ins in lin)
        lin.sort(key=lambda item: position[item[1].i_in])
        if not slots or (slots[0], len(slots), ir_out.dim) not in runs:
            raise ValueError("fusing needs the inputs of each output irrep to be one run of equal irreps")
        rows_idx, rows_scale = [], []
        for i, ins in lin:
            block = lin_offsets[i] + torch.arange(mul_in * mul_out).view(mul_in, mul_out)
            rows_idx.append(block)
            rows_scale.append(torch.full((mul_in, mul_out), ins.path_weight, dtype=torch.float64))
        si = [(i, ins) for i, ins in enumerate(self_interaction.instructions) if ins.i_out == o]
        h_row = -1
        if si:
            (i, ins), = si
            w3j = o3.wigner_3j(ir_out.l, 0, ir_out.l, dtype=torch.float64)[0, 0, 0].item()
            block = si_offsets[i] + torch.arange(mul_in * num_species * mul_out).view(mul_in * num_species, mul_out)
            rows_idx.append(block)
            rows_scale.append(torch.full(block.shape, ins.path_weight * w3j, dtype=torch.float64))
            h_row = rows_h[ins.i_in1]
        first = rows_mid[slots[0]]
        plan.append([first, len(slots), h_row, ir_out.dim, mul_out, sum(int(t.numel()) for t in index), slots[0]])
        index.append(torch.cat(rows_idx).reshape(-1))
        scale.append(torch.cat(rows_scale).reshape(-1))
    return torch.cat(index), torch.cat(scale), [v for row in plan for v in row]


def to_blocked(flat: Tensor, irreps: o3.Irreps) -> Tensor:
    """e3nn's flat features (N, irreps.dim) -> blocked (N, M, U); ``irreps`` of one multiplicity U."""
    blocks, start = [], 0
    for mul, ir in irreps:
        blocks.append(flat[:, start : start + mul * ir.dim].reshape(-1, mul, ir.dim).transpose(1, 2))
        start += mul * ir.dim
    return torch.cat(blocks, dim=1)


def to_flat(blocked: Tensor, irreps: o3.Irreps) -> Tensor:
    """Blocked features (N, M, U) -> e3nn's flat layout (N, irreps.dim); the inverse of :func:`to_blocked`."""
    blocks = []
    for (mul, ir), row in zip(irreps, block_rows(irreps)):
        blocks.append(blocked[:, row : row + ir.dim].transpose(1, 2).reshape(-1, mul * ir.dim))
    return torch.cat(blocks, dim=1)


def gate_layout(gate) -> Tuple[List[int], int, List[int]]:
    """Where e3nn's ``Gate`` finds its inputs among the irreps of its (sorted) input.

    e3nn sorts the gate's input irreps (0o before 0e, 1o, 1e, 2o before 2e): with both parities the
    l = 0 part is ``[scalars 0o, scalars 0e, gates 0e]`` and the l > 0 part is not in the order of the
    gated irreps. Returns the start of each scalar irrep (in ``irreps_scalars`` order) and of the gates
    within the concatenated l = 0 entries of the input, and for each gated irrep (in ``irreps_gated``
    order) the index of its irrep in ``gate.irreps_in``.
    """
    cut = gate.sc.cut  # e3nn's Extract: the sorted, unsimplified input irreps and each output's indices
    sorted_irreps = cut.irreps_in
    starts, offset = [], 0
    for mul, ir in sorted_irreps:
        starts.append(offset)
        offset += mul * ir.dim if ir.l == 0 else 0
    scalars, gates, gated = cut.instructions
    l0_items = sum(1 for _, ir in sorted_irreps if ir.l == 0)
    l0_irreps = sum(1 for _, ir in gate.irreps_in if ir.l == 0)
    if sorted(gated) != list(range(l0_items, len(sorted_irreps))) or len(gates) > 1:
        raise ValueError("fusing needs one gate irrep and each l > 0 irrep of the gate's input gated once")
    if len(scalars) != len(gate.act_scalars.acts):
        raise ValueError("fusing needs one activation per scalar irrep")
    gate_start = starts[gates[0]] if gates else 0
    return [starts[i] for i in scalars], gate_start, [l0_irreps + i - l0_items for i in gated]
