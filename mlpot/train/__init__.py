"""Fitting potentials to energies and forces."""

from mlpot.train.config import Config, ConfigError, load_config
from mlpot.train.loop import train

__all__ = ["Config", "ConfigError", "load_config", "train"]
