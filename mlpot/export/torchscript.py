"""The TorchScript format (``.pt``): compiling, writing and reading it, and rebuilding the eager Potential.

The file is a TorchScript archive of the whole :class:`~mlpot.models.Potential` (energies and autograd
forces, plus the exported ``energy_and_forces`` and ``hessian`` methods) with ``mlpot.json`` among its
extra files.
"""

import contextlib
import copy
import io
import json
import warnings
from typing import Optional

import torch

from mlpot.dtypes import dtype_of
from mlpot.export.metadata import METADATA_FILE, read_metadata
from mlpot.files import write_bytes
from mlpot.models import Potential, build_potential

_TORCHSCRIPT_DEPRECATION = r"`torch\.jit\.(script|save|load|trace|trace_method)` is deprecated"


@contextlib.contextmanager
def quiet_torchscript():
    """Silence exactly torch's TorchScript deprecation warnings (TorchScript stays our format for now)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TORCHSCRIPT_DEPRECATION, category=DeprecationWarning)
        yield


def frozen_copy(potential: Potential) -> Potential:
    """A copy in eval mode with the model's derived weight tables precomputed (when it has any)."""
    potential = copy.deepcopy(potential).eval()
    freeze = getattr(potential.model, "freeze", None)
    if freeze is not None:
        freeze()
    return potential


def compile_potential(potential: Potential) -> torch.jit.ScriptModule:
    """TorchScript-compile a copy of a Potential in eval mode (e3nn modules go through ``e3nn.util.jit.compile``).

    The argument is left as it was: ``e3nn.util.jit.compile`` swaps submodules in place and ``eval()``
    would switch off ``create_graph`` for a model that is still being trained.
    """
    from e3nn.util.jit import compile as e3nn_compile  # e3nn is needed to build, not to load, a file

    with quiet_torchscript():
        return torch.jit.script(e3nn_compile(frozen_copy(potential)))


def save_torchscript(potential: Potential, path, meta: dict) -> None:
    """Compile ``potential`` and write it with ``meta`` to ``path`` atomically (serialised in memory first:
    torch's C++ file writer aborts the process when a write fails, see :func:`mlpot.files.torch_save`)."""
    scripted = compile_potential(potential)
    buffer = io.BytesIO()
    with quiet_torchscript():
        torch.jit.save(scripted, buffer, _extra_files={METADATA_FILE: json.dumps(meta, ensure_ascii=False)})
    write_bytes(path, buffer.getvalue())


def load_torchscript(path, device: str = "cpu", dtype: Optional[torch.dtype] = None) -> torch.jit.ScriptModule:
    """The TorchScript module of a deployed file, in eval mode on ``device`` (in ``dtype`` when given)."""
    try:
        with quiet_torchscript():
            module = torch.jit.load(str(path), map_location=device)
    except RuntimeError as err:
        raise ValueError(f"{path} could not be loaded as a TorchScript model: {err}") from None
    module.eval()
    if dtype is not None:
        module.to(dtype)
    return module


def potential_from_scripted(scripted, meta: dict, path) -> Potential:
    """The eager Potential of a loaded deployed TorchScript module, rebuilt from the file's metadata and
    the module's weights, in eval mode; ValueError when the metadata does not describe these weights."""
    hparams = dict(meta.get("hparams") or {})
    try:
        potential = build_potential(meta["kind"], meta["species"], meta["cutoff"], dtype=dtype_of(meta["dtype"]), **hparams)
        # TorchScript archives also keep non-persistent buffers (index tables the model rebuilds, which a
        # file of another mlpot version may name differently): load exactly the eager model's own entries
        wanted = potential.state_dict().keys()
        potential.load_state_dict({k: v for k, v in scripted.state_dict().items() if k in wanted})
    except (TypeError, ValueError, KeyError, RuntimeError) as err:  # wrong hparams, missing or misshapen weights
        raise ValueError(
            f"{path}: cannot rebuild the eager model from the file's metadata "
            f"(kind {meta.get('kind')}, hparams {hparams}): {type(err).__name__}: {err}"
        ) from None
    return potential.eval()


def potential_from_deployed(path) -> Potential:
    """Rebuild the eager Potential of a deployed TorchScript file from its metadata and weights
    (to deploy it in another format, or to look inside it)."""
    meta = read_metadata(path)
    if meta.get("format", "torchscript") != "torchscript":
        raise ValueError(f"{path} is compiled ({meta['format']}) and cannot be rebuilt; use its TorchScript file or checkpoint")
    return potential_from_scripted(load_torchscript(path), meta, path)
