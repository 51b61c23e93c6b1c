"""Forces, virial and Hessian of a potential energy by autograd: the only derivative code in mlpot.

Every path that needs derivatives (``Potential.forward`` and ``hessian``, the AOTInductor trace and
compiled training, all through ``Potential.energy_and_forces``) makes its inputs differentiable with
:func:`differentiable_inputs`, computes the energy of the graph it returns, and differentiates it with
:func:`forces_and_virial` or :func:`hessian`.

The virial is W = -dE/d(eps) (B, 3, 3), eV, at eps = 0, for a symmetric strain eps of each structure
applied to its positions, Cartesian edge shifts and cell (r -> r (1 + eps), rows as vectors). The
stress in ASE's convention is (1/V) dE/d(eps) = -W / V.
"""

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from mlpot import keys


def differentiable_inputs(graph: Dict[str, Tensor], virial: bool) -> Tuple[Dict[str, Tensor], Tensor, Optional[Tensor]]:
    """A shallow copy of ``graph`` whose energy can be differentiated, the positions leaf and the strain.

    Positions that do not require gradients are replaced by a detached copy that does. With ``virial``
    a zero (B, 3, 3) strain that requires gradients is applied (symmetrised) to positions, shifts
    and cell, which changes no value; without it the strain is None.
    """
    pos = graph[keys.POSITIONS]
    if not pos.requires_grad:
        pos = pos.detach().requires_grad_(True)
    out: Dict[str, Tensor] = {}
    for key, value in graph.items():
        out[key] = value
    out[keys.POSITIONS] = pos
    strain: Optional[Tensor] = None
    if virial:
        num_graphs = graph[keys.NUM_ATOMS].shape[0]
        strain = torch.zeros((num_graphs, 3, 3), dtype=pos.dtype, device=pos.device).requires_grad_(True)
        # symmetrised so that dE/d(strain) is the symmetric virial and a rotation cannot leak into it
        symmetric = 0.5 * (strain + strain.transpose(1, 2))
        batch = graph[keys.BATCH]
        out[keys.POSITIONS] = pos + torch.bmm(pos.unsqueeze(1), symmetric[batch]).squeeze(1)
        shift = graph[keys.SHIFT]
        edge_graph = batch[graph[keys.EDGE_INDEX][0]]
        out[keys.SHIFT] = shift + torch.bmm(shift.unsqueeze(1), symmetric[edge_graph]).squeeze(1)
        if keys.CELL in graph:
            cell = graph[keys.CELL]
            out[keys.CELL] = cell + torch.bmm(cell, symmetric)
    return out, pos, strain


def forces_and_virial(
    energy: Tensor, pos: Tensor, strain: Optional[Tensor], create_graph: bool
) -> Tuple[Tensor, Optional[Tensor]]:
    """Forces -dE/dpos (N, 3) in eV/Å and, when ``strain`` is given, the virial -dE/d(strain) (B, 3, 3)
    in eV, of the energies ``energy`` (B,). ``create_graph`` keeps their autograd graph (force losses)."""
    inputs: List[Tensor] = [pos]
    if strain is not None:
        inputs.append(strain)
    grads = torch.autograd.grad([energy.sum()], inputs, create_graph=create_graph, allow_unused=True)
    grad = grads[0]
    forces = torch.zeros_like(pos) if grad is None else -grad
    virial: Optional[Tensor] = None
    if strain is not None:
        grad_strain = grads[1]
        virial = torch.zeros_like(strain) if grad_strain is None else -grad_strain
    return forces, virial


def hessian(energy: Tensor, pos: Tensor) -> Tensor:
    """(3N, 3N) Hessian d2E/dpos2 in eV/Å^2 of the summed energies ``energy`` (B,), by double backward."""
    grads = torch.autograd.grad([energy.sum()], [pos], create_graph=True, allow_unused=True)
    grad = grads[0]
    n = pos.numel()
    result = torch.zeros(n, n, dtype=pos.dtype, device=pos.device)
    if grad is None:
        return result
    flat = grad.reshape(-1)
    for k in range(n):
        row = torch.autograd.grad([flat[k]], [pos], retain_graph=True, allow_unused=True)[0]
        if row is not None:
            result[k] = row.reshape(-1)
    return result
