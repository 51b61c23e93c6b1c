"""Edge geometry, radial bases and smooth cutoff functions."""

import math
from typing import Tuple

import torch
from torch import Tensor, nn


def edge_vectors(pos: Tensor, edge_index: Tensor, shift: Tensor) -> Tuple[Tensor, Tensor]:
    """Edge vectors ``pos[j] - pos[i] + shift`` (E, 3) and their lengths (E,), in Å.

    Computed from ``pos`` inside the model so autograd forces reach every edge.
    """
    vec = pos[edge_index[1]] - pos[edge_index[0]] + shift
    return vec, torch.linalg.norm(vec, dim=-1)


class CosineCutoff(nn.Module):
    """f(r) = (cos(pi r / r_c) + 1) / 2 for r < r_c, else 0 (Behler 2011)."""

    def __init__(self, cutoff: float):
        super().__init__()
        self.cutoff = float(cutoff)

    def forward(self, r: Tensor) -> Tensor:
        f = 0.5 * (torch.cos(r * (math.pi / self.cutoff)) + 1.0)
        return f * (r < self.cutoff).to(r.dtype)

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}"


class PolynomialCutoff(nn.Module):
    """Polynomial envelope of Klicpera et al. 2020 (DimeNet, eq. 8): smooth to order ``p`` at r_c."""

    def __init__(self, cutoff: float, p: int = 6):
        super().__init__()
        self.cutoff = float(cutoff)
        self.p = int(p)

    def forward(self, r: Tensor) -> Tensor:
        p = float(self.p)
        x = r / self.cutoff
        f = (
            1.0
            - 0.5 * (p + 1.0) * (p + 2.0) * torch.pow(x, p)
            + p * (p + 2.0) * torch.pow(x, p + 1.0)
            - 0.5 * p * (p + 1.0) * torch.pow(x, p + 2.0)
        )
        return f * (x < 1.0).to(r.dtype)

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, p={self.p}"


class BesselBasis(nn.Module):
    """sqrt(2/r_c) sin(n pi r / r_c) / r, n = 1..num_basis, with trainable frequencies (NequIP)."""

    def __init__(self, cutoff: float, num_basis: int = 8, trainable: bool = True):
        super().__init__()
        self.cutoff = float(cutoff)
        self.num_basis = int(num_basis)
        freqs = torch.arange(1, num_basis + 1, dtype=torch.get_default_dtype()) * math.pi / self.cutoff
        self.freqs = nn.Parameter(freqs, requires_grad=trainable)
        self.prefactor = math.sqrt(2.0 / self.cutoff)

    def forward(self, r: Tensor) -> Tensor:
        r = r.unsqueeze(-1)
        return self.prefactor * torch.sin(self.freqs * r) / r

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, num_basis={self.num_basis}"


class GaussianBasis(nn.Module):
    """exp(-gamma (r - mu_k)^2) on ``num_basis`` centres mu_k evenly spaced in [0, r_c] (SchNet)."""

    def __init__(self, cutoff: float, num_basis: int = 32):
        super().__init__()
        self.cutoff = float(cutoff)
        self.num_basis = int(num_basis)
        centers = torch.linspace(0.0, self.cutoff, num_basis, dtype=torch.get_default_dtype())
        self.register_buffer("centers", centers)
        self.gamma = 0.5 / float(centers[1] - centers[0]) ** 2

    def forward(self, r: Tensor) -> Tensor:
        exponent = -self.gamma * (r.unsqueeze(-1) - self.centers) ** 2
        # values below e^-80 (~1e-35) are set to zero: in float32 they would be denormal numbers, which
        # slow every later matrix product several-fold and change nothing at float32 or float64 precision
        keep = exponent > -80.0
        return torch.exp(exponent.clamp(min=-80.0)) * keep.to(exponent.dtype)

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, num_basis={self.num_basis}"
