"""The precisions mlpot runs in: one table used by configs, command lines, calculators and deployed files."""

import torch

# name (as configs, command lines and model files write it) -> torch dtype
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DTYPE_NAMES = tuple(DTYPES)


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (``"float32"`` or ``"float64"``); a ValueError names the choices."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return DTYPES[name]


def name_of(dtype: torch.dtype) -> str:
    """The name of a torch dtype mlpot runs in (``torch.float64`` -> ``"float64"``)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"mlpot runs in {', '.join(DTYPE_NAMES)}, not {dtype}")
