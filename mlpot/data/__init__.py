"""Reference data (MD17 family, extxyz), the molecule -> dataset registry, and the Graph batches models consume."""

from mlpot.data.datasets import (
    Frames,
    block_split,
    data_format,
    dataset_path,
    default_cache_dir,
    default_data_dir,
    known_datasets,
    load_dataset,
    read_frames,
    split_indices,
)
from mlpot.data.graph import Graph, atoms_to_graph, check_structure, collate, make_graph
from mlpot.data.neighbors import neighbor_list
from mlpot.data.registry import MOLECULES, MoleculeDatasets, reference_dataset, study_dataset

__all__ = [
    "Frames",
    "Graph",
    "MOLECULES",
    "MoleculeDatasets",
    "atoms_to_graph",
    "block_split",
    "check_structure",
    "collate",
    "data_format",
    "dataset_path",
    "default_cache_dir",
    "default_data_dir",
    "known_datasets",
    "load_dataset",
    "make_graph",
    "neighbor_list",
    "read_frames",
    "reference_dataset",
    "split_indices",
    "study_dataset",
]
