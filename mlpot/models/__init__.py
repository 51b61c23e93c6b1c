"""The model zoo: every kind maps a graph to per-atom energies; Potential does the rest."""

from typing import Optional, Sequence

import torch

from mlpot.dtypes import DTYPES
from mlpot.models.egnn import EGNN
from mlpot.models.gcn import GCN
from mlpot.models.potential import Potential
from mlpot.models.schnet import SchNet

MODELS = {"gcn": GCN, "schnet": SchNet, "egnn": EGNN}


def build_potential(
    kind: str,
    species: Sequence[int],
    cutoff: float = 5.0,
    dtype: torch.dtype = torch.float32,
    energy_shift: Optional[torch.Tensor] = None,
    energy_scale: float = 1.0,
    **hparams,
) -> Potential:
    """A fresh Potential of model ``kind`` for the given elements, in ``dtype``.

    Example:
        >>> pot = build_potential("schnet", species=[1, 6, 8], cutoff=5.0, num_layers=2)
    """
    if kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {sorted(MODELS)}")
    species = sorted(int(z) for z in species)
    model = MODELS[kind](num_species=len(species), cutoff=cutoff, **hparams)
    potential = Potential(model, kind, species, cutoff, hparams, energy_shift, energy_scale)
    return potential.to(dtype)


__all__ = ["DTYPES", "EGNN", "GCN", "MODELS", "Potential", "SchNet", "build_potential"]
