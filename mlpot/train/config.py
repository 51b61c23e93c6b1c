"""Training configuration: three small dataclasses filled from YAML, with strict key and type checks."""

import copy
import dataclasses
import inspect
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from mlpot.dtypes import DTYPE_NAMES


class ConfigError(ValueError):
    """A configuration problem, named by its key."""


@dataclass
class DataConfig:
    """Which frames to fit and how to split them."""

    dataset: str = "rmd17_ethanol"  # a name from mlpot.data.known_datasets() or a file path
    test_dataset: Optional[str] = None  # file/name of the test set; default: the dataset's own test split
    index: int = 1  # rMD17 split 1..5
    data_dir: Optional[str] = None  # default: $MLPOT_DATA_DIR
    # sizes: a count of frames, or a fraction 0 < x < 1 of the frames they are drawn from
    train_size: Union[int, float] = 950
    val_size: Union[int, float] = 50
    test_size: Optional[Union[int, float]] = None  # None: the whole test split (or all train + val leave)
    # auto: random for a file of many structures (several compositions or periodic), contiguous blocks
    # for one trajectory (as for the MD17 names); see mlpot.data.splits.split_mode
    split: str = "auto"
    seed: int = 0
    # label names in ASE files (MACE-style files: REF_energy, REF_forces, REF_stress)
    energy_key: str = "energy"
    forces_key: str = "forces"
    stress_key: str = "stress"
    stress_unit: str = "eV/A^3"  # of the file's stresses: eV/A^3 (ASE's), GPa, kbar or bar


@dataclass
class ModelConfig:
    """Model kind, cutoff, precision and the kind's own hyperparameters."""

    kind: str = "egnn"
    cutoff: float = 5.0
    dtype: str = "float32"
    hparams: Dict[str, Any] = field(default_factory=dict)
    # per-element reference energies E0 (the per-species energy shift): auto | average | least_squares
    # (mlpot.data.statistics.energy_shift), or a mapping element (symbol or atomic number) -> eV;
    # None: auto, or with model.init the file's E0s
    e0s: Optional[Union[str, Dict[Any, Any]]] = None
    # a deployed TorchScript file to start from (fine-tuning, mlpot train --init; see mlpot.train.finetune)
    init: Optional[str] = None


@dataclass
class TrainConfig:
    """Optimisation, schedule and bookkeeping."""

    epochs: int = 100
    max_time: Optional[float] = None  # seconds; training stops after the epoch that passes it
    batch_size: int = 5
    optimizer: str = "adam"  # adam | adamw
    lr: float = 5e-3
    weight_decay: float = 0.0
    scheduler: str = "plateau"  # plateau | cosine | none
    warmup_epochs: int = 0
    lr_factor: float = 0.8  # plateau: multiply the LR by this
    lr_patience: int = 10  # plateau: epochs without improvement before a cut
    min_lr: float = 1e-6
    loss: str = "mse"  # mse | mae | huber
    huber_delta: float = 0.01
    energy_weight: float = 1.0  # on per-atom energy errors
    forces_weight: float = 100.0
    stress_weight: float = 0.0  # on stress errors, eV/Å^3 (frames with a stress and a full periodic cell)
    grad_clip: Optional[float] = 10.0
    ema_decay: Optional[float] = 0.99
    early_stopping_patience: Optional[int] = 50
    on_nonfinite: str = "stop"  # stop | skip: what a NaN/inf loss does (skip leaves the weights unchanged)
    max_skipped_batches: int = 10  # per epoch, with on_nonfinite: skip
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    num_threads: Optional[int] = None
    # compile the energy-and-forces function for training steps (egnn, schnet): 1.5-3x faster steps on a
    # CPU after a 10-90 s compile at the first step; falls back to eager with a warning if it cannot
    compile: bool = False


@dataclass
class Config:
    """A whole training run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run_dir: str = "runs/run"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {
    "data.split": ("auto", "random", "contiguous"),
    "model.kind": ("gcn", "schnet", "egnn"),
    "model.dtype": DTYPE_NAMES,
    "train.optimizer": ("adam", "adamw"),
    "train.scheduler": ("plateau", "cosine", "none"),
    "train.loss": ("mse", "mae", "huber"),
    "train.on_nonfinite": ("stop", "skip"),
    "train.device": ("auto", "cpu", "cuda"),
}


def _check_type(key: str, value, annotation):
    """Return ``value`` converted to ``annotation`` where that is lossless, else raise ConfigError."""
    origin = get_origin(annotation)
    if origin is Union:  # Optional[X], or X | Y tried in order
        if value is None and type(None) in get_args(annotation):
            return None
        inner = [a for a in get_args(annotation) if a is not type(None)]
        for candidate in inner[:-1]:
            try:
                return _check_type(key, value, candidate)
            except ConfigError:
                pass
        return _check_type(key, value, inner[-1])
    if annotation is Any:
        return value
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-3 as a string
        except ValueError:
            pass
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


def _fill(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(prefix + k for k in unknown)}; allowed: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        key = prefix + name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _fill(hint, value or {}, key + ".")
        else:
            kwargs[name] = _check_type(key, value, hint)
            if key in _CHOICES and kwargs[name] not in _CHOICES[key]:
                raise ConfigError(f"{key}: {kwargs[name]!r} is not one of {list(_CHOICES[key])}")
    return cls(**kwargs)


def _apply_override(raw: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    dotted, text = assignment.split("=", 1)
    value = yaml.safe_load(text)
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or an empty section (`train:` with nothing under it)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
    node[parts[-1]] = value


def check_model_hparams(kind: str, hparams: dict) -> None:
    """Raise ConfigError for hyperparameters the model kind does not take."""
    from mlpot.models import MODELS

    signature = inspect.signature(MODELS[kind].__init__)
    allowed = [p for p in signature.parameters if p not in ("self", "num_species", "cutoff")]
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise ConfigError(f"model.hparams: {kind} takes no {', '.join(unknown)}; it takes {allowed}")


def parse_e0s(value) -> Union[str, Dict[int, float]]:
    """``model.e0s`` as :func:`mlpot.data.statistics.energy_shift` takes it: a mode name, or atomic number -> eV."""
    from ase.data import atomic_numbers

    from mlpot.data.statistics import E0_MODES

    if value is None:
        return "auto"
    if isinstance(value, str):
        if value not in E0_MODES:
            raise ConfigError(f"model.e0s: {value!r} is not one of {list(E0_MODES)} or a mapping element -> eV")
        return value
    mapping = {}
    for element, energy in value.items():
        z = atomic_numbers.get(element) if isinstance(element, str) else element
        if not isinstance(z, int) or isinstance(z, bool) or not 1 <= z <= 118:
            raise ConfigError(f"model.e0s: {element!r} is not an element symbol or atomic number")
        if isinstance(energy, bool) or not isinstance(energy, (int, float)):
            raise ConfigError(f"model.e0s: the E0 of {element} is {energy!r}, not a number of eV")
        mapping[z] = float(energy)
    return mapping


def config_from_dict(raw: dict, overrides: List[str] = ()) -> Config:
    """Validated Config from a nested dict plus ``section.key=value`` overrides."""
    raw = copy.deepcopy(dict(raw or {}))  # overrides must not reach into the caller's nested dicts
    for assignment in overrides:
        _apply_override(raw, assignment)
    config = _fill(Config, raw, "")
    check_model_hparams(config.model.kind, config.model.hparams)
    parse_e0s(config.model.e0s)
    for key in ("train_size", "val_size", "test_size"):
        size = getattr(config.data, key)
        if size is None or (isinstance(size, int) and size >= 1):
            continue
        if isinstance(size, int) or not 0 < size < 1:
            raise ConfigError(f"data.{key} is {size!r}: give a count of frames (at least 1) or a fraction (0 < x < 1)")
    for key in ("energy_weight", "forces_weight", "stress_weight"):
        if getattr(config.train, key) < 0:
            raise ConfigError(f"train.{key} is {getattr(config.train, key)!r}; loss weights must be >= 0")
    if not 1 <= config.data.index <= 5:
        raise ConfigError(f"data.index: rMD17 splits are numbered 1..5, got {config.data.index}")
    if config.train.batch_size < 1:
        raise ConfigError("train.batch_size must be at least 1")
    from mlpot.train.compiled import COMPILE_KINDS

    if config.train.compile and config.model.kind not in COMPILE_KINDS:
        raise ConfigError(f"train.compile: supported for {', '.join(COMPILE_KINDS)}, not {config.model.kind}; set it to false")
    return config


def load_config(path, overrides: List[str] = ()) -> Config:
    """Read and validate a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    return config_from_dict(raw or {}, overrides)
