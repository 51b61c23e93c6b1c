"""Torch's CPU thread count, set for a block of work and restored after it: library code leaves the process as it was."""

import contextlib
from typing import Iterator, Optional

import torch


@contextlib.contextmanager
def torch_threads(num_threads: Optional[int]) -> Iterator[None]:
    """Run the block with ``num_threads`` torch CPU threads (None or 0: as they are), then restore the count."""
    before = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
