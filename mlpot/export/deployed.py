"""Writing and reading deployed files in either format: :func:`save` and :func:`load` pick the format module."""

from pathlib import Path
from typing import Optional

import torch

from mlpot.export import aoti, torchscript
from mlpot.export.metadata import FORMATS, metadata_of, read_metadata


def save(potential, path, format: str = "torchscript", **extra) -> dict:
    """Compile ``potential`` and write it with its metadata to ``path`` atomically.

    ``format`` is ``"torchscript"`` (default) or ``"aoti"`` (AOTInductor package, see
    :mod:`mlpot.export.aoti`; compiling takes a minute or two). Extra keyword arguments (e.g.
    ``dataset="rmd17_ethanol"``, ``metrics={...}``) go into the metadata. Returns the metadata written.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown deploy format {format!r}; choose one of {FORMATS}")
    meta = metadata_of(potential, format=format, **extra)
    write = torchscript.save_torchscript if format == "torchscript" else aoti.save_aoti
    write(potential, Path(path), meta)
    return meta


def load(path, device: str = "cpu", dtype: Optional[torch.dtype] = None):
    """Load a deployed file: (model in eval mode on ``device``, in ``dtype`` or the file's own, metadata).

    The model is called as ``model(graph)`` and has ``model.hessian(graph)`` (TorchScript only).
    """
    meta = read_metadata(path)
    if meta.get("format", "torchscript") == "aoti":
        return aoti.load_aoti(path, device, dtype, meta), meta
    return torchscript.load_torchscript(path, device, dtype), meta
