"""Deployed model files: one TorchScript file that carries its own metadata.

The file is a TorchScript archive of the whole :class:`~mlpot.models.Potential` (energies and
autograd forces, plus an exported ``hessian`` method) with ``mlpot.json`` among its extra files.
Loading it needs only torch; the metadata gives the kind, species, cutoff, dtype and units.
"""

import contextlib
import copy
import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Optional, Tuple

import torch

import mlpot

FORMAT_VERSION = 1
METADATA_FILE = "mlpot.json"
_TORCHSCRIPT_DEPRECATION = r"`torch\.jit\.(script|save|load|trace|trace_method)` is deprecated"


@contextlib.contextmanager
def _quiet_torchscript():
    """Silence exactly torch's TorchScript deprecation warnings (TorchScript stays our format for now)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TORCHSCRIPT_DEPRECATION, category=DeprecationWarning)
        yield


def compile_potential(potential: torch.nn.Module) -> torch.jit.ScriptModule:
    """TorchScript-compile a copy of a Potential in eval mode (e3nn modules go through ``e3nn.util.jit.compile``).

    The argument is left as it was: ``e3nn.util.jit.compile`` swaps submodules in place and ``eval()``
    would switch off ``create_graph`` for a model that is still being trained.
    """
    from e3nn.util.jit import compile as e3nn_compile

    potential = copy.deepcopy(potential).eval()
    with _quiet_torchscript():
        return torch.jit.script(e3nn_compile(potential))


def metadata_of(potential, **extra) -> dict:
    """The metadata dict written into a deployed file."""
    dtype = str(potential.energy_scale.dtype).replace("torch.", "")
    meta = {
        "format_version": FORMAT_VERSION,
        "mlpot_version": mlpot.__version__,
        "torch_version": torch.__version__,
        "kind": potential.kind,
        "species": list(potential.species),
        "cutoff": potential.cutoff,
        "dtype": dtype,
        "units": {"energy": "eV", "length": "Å", "forces": "eV/Å"},
        "periodic": False,  # trained on isolated molecules; training on cells sets True
        "hparams": potential.hparams,
    }
    meta.update(extra)
    return meta


def save(potential, path, **extra) -> dict:
    """Compile ``potential`` and write it with its metadata to ``path`` atomically.

    Extra keyword arguments (e.g. ``dataset="rmd17_ethanol"``, ``metrics={...}``) go into the metadata.
    Returns the metadata written.
    """
    path = Path(path)
    meta = metadata_of(potential, **extra)
    scripted = compile_potential(potential)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with _quiet_torchscript():
            torch.jit.save(scripted, tmp, _extra_files={METADATA_FILE: json.dumps(meta, ensure_ascii=False)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return meta


def read_metadata(path) -> dict:
    """Metadata of a deployed file, checked; raises ValueError for files that are not mlpot models."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an mlpot model file (not a TorchScript archive; truncated or foreign?)")
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith("extra/" + METADATA_FILE)]
        if not names:
            if not any("/code/" in n for n in archive.namelist()):  # TorchScript archives hold code/, torch.save ones not
                raise ValueError(
                    f"{path} is a torch.save file (a training checkpoint?), not a deployed mlpot model; "
                    f"deploy a checkpoint with: mlpot-deploy CHECKPOINT -o MODEL.pt"
                )
            raise ValueError(f"{path} is a TorchScript file but not an mlpot model (no {METADATA_FILE} metadata)")
        try:
            meta = json.loads(archive.read(names[0]).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: unreadable mlpot metadata ({err})") from None
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(
            f"{path} was written before mlpot model files had a format version ({version!r}) and cannot be "
            f"read safely; re-deploy it from its checkpoint: mlpot-deploy CHECKPOINT -o NEW.pt"
        )
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has model format version {version}, newer than this mlpot ({mlpot.__version__}) reads "
            f"(up to {FORMAT_VERSION}); upgrade mlpot (it was written by mlpot {meta.get('mlpot_version')})"
        )
    missing = [k for k in ("kind", "species", "cutoff", "dtype") if k not in meta]
    if missing:
        raise ValueError(f"{path}: metadata lacks {missing}")
    return meta


def load(path, device: str = "cpu", dtype: Optional[torch.dtype] = None) -> Tuple[torch.jit.ScriptModule, dict]:
    """Load a deployed file: (model in eval mode on ``device``, in ``dtype`` or the file's own, metadata)."""
    meta = read_metadata(path)
    try:
        with _quiet_torchscript():
            module = torch.jit.load(str(path), map_location=device)
    except RuntimeError as err:
        raise ValueError(f"{path} could not be loaded as a TorchScript model: {err}") from None
    module.eval()
    if dtype is not None:
        module.to(dtype)
    return module, meta
