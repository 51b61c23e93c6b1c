"""What a model file is (:func:`sniff`) and what a deployed one says about itself (its ``mlpot.json``).

The bottom of :mod:`mlpot.export`: it imports no model code, so the format modules,
:mod:`mlpot.checkpoint` and the study loader can all ask it.
"""

import json
import zipfile
from pathlib import Path
from typing import Optional, Tuple

import torch

from mlpot.dtypes import name_of
from mlpot.version import FORMAT_VERSION, __version__

METADATA_FILE = "mlpot.json"
FORMATS = ("torchscript", "aoti")
# kinds that compile with AOTInductor; PyG's GCN normalisation (gcn) has data-dependent shapes torch.export cannot keep
AOTI_KINDS = ("egnn", "schnet")
# what sniff() finds besides deployed models (FORMATS): a torch.save archive (maybe an mlpot training
# checkpoint), a TorchScript archive without mlpot metadata, or no zip archive at all (foreign bytes, a
# truncated file, torch's legacy format)
CHECKPOINT = "checkpoint"
FOREIGN_TORCHSCRIPT = "foreign_torchscript"
NOT_A_ZIP = "not_a_zip"


def _inspect(path) -> Tuple[str, Optional[dict]]:
    """(what the file is, its raw metadata or None); see :func:`sniff`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    if not zipfile.is_zipfile(path):
        return NOT_A_ZIP, None
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        found = [n for n in names if n.endswith("extra/" + METADATA_FILE)]
        if not found:
            # TorchScript archives hold code/, torch.save ones not
            return (FOREIGN_TORCHSCRIPT if any("/code/" in n for n in names) else CHECKPOINT), None
        try:
            meta = json.loads(archive.read(found[0]).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: unreadable mlpot metadata ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: unreadable mlpot metadata (not a JSON object)")
    # files written before the aoti format have no entry; an unknown one is reported by read_metadata,
    # after the format version (a newer mlpot's format is best answered by "upgrade mlpot")
    return str(meta.get("format", "torchscript")), meta


def sniff(path) -> str:
    """What the file at ``path`` is, the one place mlpot tells model files apart: ``"torchscript"`` or
    ``"aoti"`` (a deployed mlpot model, by its metadata), ``"checkpoint"`` (a torch.save archive: whether
    it is an mlpot checkpoint shows when it is read), ``"foreign_torchscript"`` (TorchScript without
    mlpot metadata) or ``"not_a_zip"`` (foreign or truncated bytes, or torch's legacy format). A
deployed file of a format this mlpot does not know gives that format's name (read_metadata refuses it).

    Raises FileNotFoundError for a missing file and ValueError for unreadable mlpot metadata; what is
    wrong with the other kinds depends on what the caller wanted, so the caller says it.
    """
    return _inspect(path)[0]


def read_metadata(path) -> dict:
    """Metadata of a deployed file, checked; raises ValueError for files that are not deployed mlpot models."""
    kind, meta = _inspect(path)
    if kind == NOT_A_ZIP:
        raise ValueError(f"{path} is not an mlpot model file (not a TorchScript archive; truncated or foreign?)")
    if kind == FOREIGN_TORCHSCRIPT:
        raise ValueError(f"{path} is a TorchScript file but not an mlpot model (no {METADATA_FILE} metadata)")
    if meta is None:
        raise ValueError(
            f"{path} is a torch.save file (a training checkpoint?), not a deployed mlpot model; "
            f"deploy a checkpoint with: mlpot-deploy CHECKPOINT -o MODEL.pt"
        )
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(
            f"{path} was written before mlpot model files had a format version ({version!r}) and cannot be "
            f"read safely; re-deploy it from its checkpoint: mlpot-deploy CHECKPOINT -o NEW.pt"
        )
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has model format version {version}, newer than this mlpot ({__version__}) reads "
            f"(up to {FORMAT_VERSION}); upgrade mlpot (it was written by mlpot {meta.get('mlpot_version')})"
        )
    if kind not in FORMATS:
        raise ValueError(f"{path} is a deployed file of unknown format {kind!r}; this mlpot reads {', '.join(FORMATS)}")
    missing = [k for k in ("kind", "species", "cutoff", "dtype") if k not in meta]
    if missing:
        raise ValueError(f"{path}: metadata lacks {missing}")
    return meta


def metadata_of(potential, **extra) -> dict:
    """The metadata dict written into a deployed file."""
    meta = {
        "format_version": FORMAT_VERSION,
        "mlpot_version": __version__,
        "torch_version": torch.__version__,
        "kind": potential.kind,
        "species": list(potential.species),
        "cutoff": potential.cutoff,
        "dtype": name_of(potential.energy_scale.dtype),
        "units": {"energy": "eV", "length": "Å", "forces": "eV/Å"},
        "periodic": False,  # trained on isolated molecules; training on cells sets True (and "isolated": True
                            # when the training data held both)
        "hparams": potential.hparams,
    }
    meta.update(extra)
    return meta


def takes_pbc(meta: dict, periodic: bool) -> bool:
    """Whether a model with this metadata was trained on structures of this periodicity (``periodic``:
    periodic in some direction). Files without ``isolated`` were trained on one kind only."""
    trained_periodic = bool(meta.get("periodic", False))
    return trained_periodic if periodic else bool(meta.get("isolated", not trained_periodic))


def trained_on(meta: dict) -> str:
    """What a model was trained on, for error messages."""
    if not meta.get("periodic", False):
        return "isolated molecules (no periodic cell)"
    return "periodic cells and isolated molecules" if meta.get("isolated") else "periodic cells"


def carried_metadata(meta: dict, potential) -> dict:
    """The entries of a deployed file's metadata that a re-deploy of ``potential`` keeps (dataset,
    metrics, periodic...): all but those :func:`metadata_of` and ``save`` write afresh."""
    regenerated = (metadata_of(potential).keys() | {"format"}) - {"periodic"}
    return {k: v for k, v in meta.items() if k not in regenerated}
