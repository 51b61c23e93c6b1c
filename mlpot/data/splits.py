"""Training sets from frames: train/validation/test splits, and frames as labelled graphs."""

import warnings
from typing import List, Optional, Tuple, Union

import ase.data
import numpy as np
import torch

from mlpot import keys
from mlpot.data.datasets import Frames, block_split, split_indices
from mlpot.data.graph import Graph, make_graph

SPLITS = ("auto", "random", "contiguous")
Size = Union[int, float]  # a count of frames, or a fraction 0 < x < 1 of those available


def resolve_size(size: Size, available: int, label: str) -> int:
    """The number of frames ``size`` means out of ``available``: a count as is, a fraction rounded."""
    if isinstance(size, float):
        if not 0 < size < 1:
            raise ValueError(f"{label} {size!r} is neither a count (an integer) nor a fraction (0 < x < 1)")
        count = int(round(size * available))
        if count < 1:
            raise ValueError(f"{label} {size!r} of {available} frames is no frame; use a larger fraction or a count")
        return count
    return int(size)


def split_mode(pool: Frames, split: str = "auto") -> str:
    """``random`` or ``contiguous``: ``auto`` takes random for a file of many structures (more than one
    composition, or any periodic frame) and contiguous blocks for a single trajectory (one composition)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {list(SPLITS)}")
    if split != "auto":
        return split
    return "random" if pool.periodic or len(set(pool.compositions())) > 1 else "contiguous"


def unseen_compositions(train: Frames, other: Frames) -> List[str]:
    """The compositions (Hill formulas) of ``other`` that no frame of ``train`` has, sorted."""
    return sorted(set(other.compositions()) - set(train.compositions()))


def split_frames(
    pool: Frames,
    train_size: Size,
    val_size: Size,
    seed: int,
    test: Optional[Frames] = None,
    test_size: Optional[Size] = None,
    split: str = "auto",
) -> Tuple[Frames, Frames, Frames]:
    """(train, val, test) frames; a ValueError says which sizes do not fit.

    Sizes are counts or fractions (0 < x < 1) of the frames they are drawn from. With a separate ``test``
    set, train and val are drawn at random from all of ``pool`` and ``test_size`` frames (all when None)
    at random from ``test``. Without one, ``split`` (see :func:`split_mode`) says how ``pool`` is cut:
    ``contiguous`` (a correlated trajectory) tests on the last ``test_size`` frames (all that train + val
    leave when None) and draws train and val at random from the block before them; ``random`` draws all
    three at random. Warns (UserWarning) naming every composition in val or test that train lacks, and
    raises ValueError for an element that train lacks.
    """
    mode = split_mode(pool, split)
    n_pool = len(pool)
    n_train = resolve_size(train_size, n_pool, "train_size")
    n_val = resolve_size(val_size, n_pool, "val_size")
    n_fit = n_train + n_val
    if test is not None:
        if test_size is not None:
            n_test = resolve_size(test_size, len(test), "test_size")
            if n_test > len(test):
                raise ValueError(f"test_size = {n_test} but the test set has only {len(test)} frames")
            test = test.subset(split_indices(len(test), [n_test], seed)[0])
        fit_idx = np.arange(n_pool)
    else:
        n_test = resolve_size(test_size, n_pool, "test_size") if test_size is not None else n_pool - n_fit
        if n_test < 1:
            raise ValueError(
                f"the data has {n_pool} frames but train_size ({train_size}) + val_size ({val_size}) take {n_fit} "
                f"and leave none for testing; set data.train_size and data.val_size to smaller counts or to "
                f"fractions (e.g. 0.8 and 0.1)"
            )
        if mode == "contiguous":
            fit_idx, test_idx = block_split(n_pool, [n_pool - n_test, n_test])
        else:
            # test first, so that train and val are drawn from the rest as in the contiguous case
            test_idx, fit_idx = split_indices(n_pool, [n_test, n_pool - n_test], seed + 1)
        test = pool.subset(test_idx)
    if n_fit > len(fit_idx):
        raise ValueError(
            f"train_size ({train_size}) + val_size ({val_size}) = {n_fit} frames, but only {len(fit_idx)} are "
            f"available for them; set data.train_size and data.val_size to smaller counts or to fractions"
        )
    train_idx, val_idx = split_indices(len(fit_idx), [n_train, n_val], seed)
    train, val = pool.subset(fit_idx[train_idx]), pool.subset(fit_idx[val_idx])
    elements = {int(z) for zs in train.numbers for z in zs}
    for label, frames in (("validation", val), ("test", test)):
        missing = sorted({int(z) for zs in frames.numbers for z in zs} - elements)
        if missing:
            symbols = ", ".join(ase.data.chemical_symbols[z] for z in missing)
            raise ValueError(
                f"the {label} set holds element(s) {symbols} that no training frame has, so the model cannot "
                f"predict them; use a larger train_size or another seed"
            )
        unseen = unseen_compositions(train, frames)
        if unseen:
            warnings.warn(
                f"the {label} set holds composition(s) the training set never saw: {', '.join(unseen)}; "
                f"its errors there measure extrapolation (a random split, data.split: random, or a larger data.train_size mixes them in)",
                stacklevel=2,
            )
    return train, val, test


def frames_to_graphs(frames: Frames, cutoff: float, dtype: torch.dtype, device="cpu") -> List[Graph]:
    """One graph per frame (with its cell and pbc where it is periodic), neighbours within ``cutoff`` Å,
    labelled with ``energy_ref`` (1,) eV and ``forces_ref`` (N, 3) eV/Å."""
    graphs = []
    for i in range(len(frames)):
        periodic = bool(frames.pbc[i].any())
        cell, pbc = (frames.cells[i], frames.pbc[i]) if periodic else (None, None)
        g = make_graph(frames.numbers[i], frames.positions[i], cutoff, cell, pbc, dtype=dtype, device=device)
        g[keys.ENERGY_REF] = torch.tensor([frames.energy[i]], dtype=torch.float64, device=device)  # as the model's
        g[keys.FORCES_REF] = torch.as_tensor(frames.forces[i], dtype=dtype, device=device)
        graphs.append(g)
    return graphs
