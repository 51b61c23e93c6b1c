"""Which named dataset stands for each molecule, and at which level of theory: stated once, here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoleculeDatasets:
    """The named datasets (see :func:`mlpot.data.known_datasets`) that stand for one molecule.

    Two choices per molecule, because the callers want different things:

    Attributes:
        reference: the set simulations take a molecule's starting geometry and reference ensemble from
            (``mlpot md``, ``relax``, ``vibrations``, the symmetry study's structure): the highest level
            of theory available here, since that is what a simulation should come close to.
        reference_level: level of theory of ``reference``.
        study: the revised MD17 set (PBE/def2-SVP, five 1000/1000 train/test splits) that the studies
            train and test on: one level of theory and one split protocol for every molecule, so that
            learning curves and errors compare across molecules.
    """

    reference: str
    reference_level: str
    study: str


# rMD17 is one level of theory for all molecules.
RMD17_LEVEL = "PBE/def2-SVP (revised MD17)"

MOLECULES = {
    # the sGDML ethanol CCSD(T) set is not in the shared data, so rMD17 ethanol stands in for it
    "ethanol": MoleculeDatasets(reference="rmd17_ethanol", reference_level=RMD17_LEVEL, study="rmd17_ethanol"),
    "toluene": MoleculeDatasets(reference="toluene_ccsd_t", reference_level="CCSD(T)/cc-pVDZ (sGDML)",
                                study="rmd17_toluene"),
    "aspirin": MoleculeDatasets(reference="aspirin_ccsd", reference_level="CCSD/cc-pVDZ (sGDML)",
                                study="rmd17_aspirin"),
}


def reference_dataset(spec: str) -> str:
    """A molecule name -> the dataset of its reference geometry and ensemble; any other name or path unchanged."""
    entry = MOLECULES.get(str(spec))
    return entry.reference if entry else str(spec)


def study_dataset(spec: str) -> str:
    """A molecule name -> the rMD17 dataset the studies use for it; any other name or path unchanged."""
    entry = MOLECULES.get(str(spec))
    return entry.study if entry else str(spec)
