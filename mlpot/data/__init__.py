"""Reference data (MD17 family, extxyz) and the Graph batches models consume."""

from mlpot.data.datasets import (
    Frames,
    block_split,
    dataset_path,
    known_datasets,
    load_dataset,
    read_frames,
    split_indices,
)
from mlpot.data.graph import Graph, atoms_to_graph, check_structure, collate, make_graph
from mlpot.data.neighbors import neighbor_list

__all__ = [
    "Frames",
    "Graph",
    "atoms_to_graph",
    "block_split",
    "check_structure",
    "collate",
    "dataset_path",
    "known_datasets",
    "load_dataset",
    "make_graph",
    "neighbor_list",
    "read_frames",
    "split_indices",
]
