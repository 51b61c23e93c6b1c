"""Deployed model files: one file that carries its own metadata, in one of two formats.

- ``torchscript`` (default, ``.pt``): a TorchScript archive of the whole Potential
  (:mod:`mlpot.export.torchscript`).
- ``aoti`` (``.pt2``): energy and forces traced, exported and compiled ahead of time by AOTInductor
  (:mod:`mlpot.export.aoti`).

Loading either needs only torch; the metadata gives the kind, species, cutoff, dtype and units. The
modules build on each other in one direction: :mod:`~mlpot.export.metadata` (what a file is and says)
<- ``torchscript`` <- ``aoti`` <- :mod:`~mlpot.export.deployed` (``save``/``load`` in either format).
"""

from mlpot.export.aoti import AOTI_INPUTS, AOTIModel, EnergyAndForces, compiled_copy, example_graph, output_disagreement
from mlpot.export.deployed import load, save
from mlpot.export.metadata import (
    AOTI_KINDS,
    CHECKPOINT,
    FOREIGN_TORCHSCRIPT,
    FORMATS,
    METADATA_FILE,
    NOT_A_ZIP,
    carried_metadata,
    metadata_of,
    read_metadata,
    sniff,
    takes_pbc,
    trained_on,
)
from mlpot.export.torchscript import compile_potential, potential_from_deployed, potential_from_scripted
from mlpot.version import FORMAT_VERSION

__all__ = [
    "AOTIModel", "AOTI_INPUTS", "AOTI_KINDS", "CHECKPOINT", "EnergyAndForces", "FOREIGN_TORCHSCRIPT", "FORMATS",
    "FORMAT_VERSION", "METADATA_FILE", "NOT_A_ZIP", "carried_metadata", "compile_potential", "compiled_copy",
    "example_graph", "load", "metadata_of", "output_disagreement", "potential_from_deployed",
    "potential_from_scripted", "read_metadata", "save", "sniff", "takes_pbc", "trained_on",
]
