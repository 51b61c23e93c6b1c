"""Training sets from frames: train/validation/test splits, and frames as labelled graphs."""

from typing import List, Optional, Tuple

import numpy as np
import torch

from mlpot import keys
from mlpot.data.datasets import Frames, block_split, split_indices
from mlpot.data.graph import Graph, make_graph


def split_frames(
    pool: Frames,
    train_size: int,
    val_size: int,
    seed: int,
    test: Optional[Frames] = None,
    test_size: Optional[int] = None,
) -> Tuple[Frames, Frames, Frames]:
    """(train, val, test) frames; a ValueError says which sizes do not fit.

    With a separate ``test`` set, train and val are drawn at random from all of ``pool`` and
    ``test_size`` frames (all when None) at random from ``test``. Without one, ``pool`` (a correlated
    trajectory) is cut into contiguous blocks: the last ``test_size`` frames (all that train + val leave
    when None) test, and train and val are drawn at random from the block before them.
    """
    n_fit = train_size + val_size
    if test is not None:
        if test_size is not None:
            test = test.subset(split_indices(len(test), [test_size], seed)[0])
        fit_idx = np.arange(len(pool))
    else:
        n_test = test_size if test_size is not None else len(pool) - n_fit
        if n_test < 1:
            raise ValueError(f"{len(pool)} frames leave none for testing after {n_fit} for train+val")
        fit_idx, test_idx = block_split(len(pool), [len(pool) - n_test, n_test])
        test = pool.subset(test_idx)
    if n_fit > len(fit_idx):
        raise ValueError(f"train_size + val_size = {n_fit} but only {len(fit_idx)} frames are available")
    train_idx, val_idx = split_indices(len(fit_idx), [train_size, val_size], seed)
    return pool.subset(fit_idx[train_idx]), pool.subset(fit_idx[val_idx]), test


def frames_to_graphs(frames: Frames, cutoff: float, dtype: torch.dtype, device="cpu") -> List[Graph]:
    """One graph per frame, neighbours within ``cutoff`` Å, labelled with ``energy_ref`` (1,) eV and
    ``forces_ref`` (N, 3) eV/Å."""
    graphs = []
    for i in range(len(frames)):
        g = make_graph(frames.numbers[i], frames.positions[i], cutoff, dtype=dtype, device=device)
        g[keys.ENERGY_REF] = torch.tensor([frames.energy[i]], dtype=dtype, device=device)
        g[keys.FORCES_REF] = torch.as_tensor(frames.forces[i], dtype=dtype, device=device)
        graphs.append(g)
    return graphs
