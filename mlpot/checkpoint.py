"""Checkpoints: atomic writes, and rebuilding a Potential from its saved description."""

import os
import tempfile
import zipfile
from pathlib import Path

import torch

from mlpot.models import DTYPES as _DTYPES
from mlpot.models import Potential, build_potential


def atomic_torch_save(obj, path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def describe(potential: Potential) -> dict:
    """Everything needed to rebuild ``potential``: kind, species, cutoff, dtype, hparams, weights."""
    return {
        "kind": potential.kind,
        "species": list(potential.species),
        "cutoff": potential.cutoff,
        "dtype": str(potential.energy_scale.dtype).replace("torch.", ""),
        "hparams": potential.hparams,
        "state_dict": potential.state_dict(),
    }


def save_potential(potential: Potential, path, **extra) -> None:
    """Write a checkpoint holding ``describe(potential)`` plus ``extra`` entries."""
    atomic_torch_save({"potential": describe(potential), **extra}, path)


def potential_from_description(desc: dict) -> Potential:
    """Rebuild a Potential from :func:`describe`'s dict."""
    potential = build_potential(
        desc["kind"], desc["species"], desc["cutoff"], dtype=_DTYPES[desc["dtype"]], **desc["hparams"]
    )
    potential.load_state_dict(desc["state_dict"])
    return potential


def potential_from_deployed(path) -> Potential:
    """Rebuild the eager Potential of a deployed TorchScript file from its metadata and weights
    (to deploy it in another format, or to look inside it)."""
    from mlpot import export

    scripted, meta = export.load(path)
    if meta.get("format", "torchscript") != "torchscript":
        raise ValueError(f"{path} is compiled ({meta['format']}) and cannot be rebuilt; use its TorchScript file or checkpoint")
    potential = build_potential(meta["kind"], meta["species"], meta["cutoff"], dtype=_DTYPES[meta["dtype"]], **meta["hparams"])
    wanted = potential.state_dict().keys()  # TorchScript also keeps non-persistent buffers (derived tables)
    try:
        potential.load_state_dict({k: v for k, v in scripted.state_dict().items() if k in wanted})
    except RuntimeError as err:
        raise ValueError(f"{path}: its weights do not fit the model its metadata describes ({err})") from None
    return potential.eval()


def load_potential(path) -> Potential:
    """Rebuild the Potential stored in a checkpoint file written by :func:`save_potential` or training,
    or in a deployed TorchScript file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n.endswith("extra/mlpot.json") for n in names):  # a deployed model
            return potential_from_deployed(path)
        if any("/code/" in n for n in names):  # TorchScript, not torch.save
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
