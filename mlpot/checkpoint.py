"""Training checkpoints: describing a Potential, writing it, and rebuilding it from its description."""

from pathlib import Path

import torch

from mlpot import export
from mlpot.dtypes import dtype_of, name_of
from mlpot.files import torch_save
from mlpot.models import Potential, build_potential


def describe(potential: Potential) -> dict:
    """Everything needed to rebuild ``potential``: kind, species, cutoff, dtype, hparams, weights."""
    return {
        "kind": potential.kind,
        "species": list(potential.species),
        "cutoff": potential.cutoff,
        "dtype": name_of(potential.energy_scale.dtype),
        "hparams": potential.hparams,
        "state_dict": potential.state_dict(),
    }


def save_potential(potential: Potential, path, **extra) -> None:
    """Write a checkpoint holding ``describe(potential)`` plus ``extra`` entries, atomically."""
    torch_save({"potential": describe(potential), **extra}, path)


def potential_from_description(desc: dict) -> Potential:
    """Rebuild a Potential from :func:`describe`'s dict."""
    potential = build_potential(
        desc["kind"], desc["species"], desc["cutoff"], dtype=dtype_of(desc["dtype"]), **desc["hparams"]
    )
    potential.load_state_dict(desc["state_dict"])
    return potential


def load_potential(path) -> Potential:
    """Rebuild the Potential stored in a checkpoint file written by :func:`save_potential` or training,
    or in a deployed TorchScript file (see :func:`mlpot.export.potential_from_deployed`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    kind = export.sniff(path)
    if kind in export.FORMATS:
        return export.potential_from_deployed(path)
    if kind == export.FOREIGN_TORCHSCRIPT:
        raise ValueError(f"{path} is a TorchScript file without mlpot metadata, not an mlpot checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for foreign or truncated files
        raise ValueError(f"{path} is not a readable mlpot checkpoint: {err}") from None
    if not isinstance(ckpt, dict) or "potential" not in ckpt:
        raise ValueError(f"{path} is not an mlpot checkpoint (no 'potential' entry)")
    try:
        return potential_from_description(ckpt["potential"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # missing entries, wrong types or shapes
        raise ValueError(
            f"{path} is a damaged mlpot checkpoint: its model description does not rebuild "
            f"({type(err).__name__}: {err})"
        ) from None
