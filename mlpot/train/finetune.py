"""Fine-tuning: a new run that starts from a deployed model's weights (``model.init``, ``mlpot train --init``).

Rule: the architecture comes from the file. ``model.kind`` and ``model.cutoff`` must be the file's, and any
``model.hparams`` the config gives must equal the file's (one-line ConfigError otherwise); hyperparameters the
config leaves out are the file's. The precision is the config's. The training data must hold every element
the file knows; elements it adds get freshly initialised weights (their embedding rows, their one-hot rows
of an EGNN's self-interaction). The output scale is the file's; so are the E0s of the file's elements unless
``model.e0s`` is given (then all E0s are fitted to the new data as it says); new elements' E0s are fitted to
the new data (``auto``).
"""

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

from mlpot import export
from mlpot.data.datasets import Frames
from mlpot.data.statistics import e0_record, fit_statistics
from mlpot.dtypes import dtype_of
from mlpot.export.torchscript import potential_from_deployed
from mlpot.models import build_potential
from mlpot.train.config import Config, ConfigError, parse_e0s

# fitted from the training data, not part of the architecture: a config may differ from the file there
_FITTED_HPARAMS = ("avg_num_neighbors",)


def initial_potential(cfg: Config, train_frames: Frames, species: List[int], device) -> Tuple[torch.nn.Module, Dict]:
    """(potential, training statistics) of a run that starts from ``cfg.model.init``."""
    path = Path(cfg.model.init)
    if not path.is_file():
        raise ConfigError(f"model.init: {path} does not exist")
    try:
        meta = export.read_metadata(path)
        old = potential_from_deployed(path)
    except ValueError as err:
        raise ConfigError(f"model.init: {err}") from None
    m = cfg.model
    if meta["kind"] != m.kind:
        raise ConfigError(f"model.init: {path} is a {meta['kind']} model but the config trains a {m.kind}; set model.kind: {meta['kind']}")
    if float(meta["cutoff"]) != m.cutoff:
        raise ConfigError(f"model.init: {path} has cutoff {meta['cutoff']} Å but the config says {m.cutoff}; set model.cutoff: {meta['cutoff']}")
    hparams = dict(meta.get("hparams") or {})
    conflicts = sorted(k for k, v in m.hparams.items() if k not in _FITTED_HPARAMS and hparams.get(k) != v)
    if conflicts:
        raise ConfigError(
            f"model.init: model.hparams {', '.join(f'{k}={m.hparams[k]!r}' for k in conflicts)} differ from {path}'s "
            f"({', '.join(f'{k}={hparams.get(k)!r}' for k in conflicts)}); leave them out (they come from the file)"
        )
    missing = sorted(set(old.species) - set(species))
    if missing:
        raise ConfigError(f"model.init: {path} knows elements {missing} that no training frame has; "
                          f"its elements {old.species} must all be in the training data")

    stats = fit_statistics(train_frames, species, m.cutoff, parse_e0s(m.e0s))  # neighbours, pair distances, E0s
    new = build_potential(m.kind, species, m.cutoff, dtype=old.energy_scale.dtype, energy_scale=float(old.energy_scale), **hparams)
    transfer_weights(old, new)
    shift = np.array(stats["energy_shift"])
    if m.e0s is None:  # E0s of the file's elements come from the file
        old_shift = old.energy_shift.double().numpy()
        for k, z in enumerate(species):
            if z in old.species:
                shift[k] = old_shift[old.species.index(z)]
        mode = f"from {path.name}"
        if len(species) > len(old.species):
            mode += f", new elements {stats['e0s']['mode']}"
        stats["e0s"] = e0_record(species, shift, mode)
    with torch.no_grad():
        new.energy_shift.copy_(torch.as_tensor(shift, dtype=new.energy_shift.dtype))
    stats["energy_shift"] = shift.tolist()
    stats["energy_scale"] = float(old.energy_scale)
    stats["init"] = str(path)
    return new.to(dtype_of(m.dtype)).to(device), stats


def transfer_weights(old, new) -> None:
    """Copy ``old``'s weights into ``new`` (the same kind and hyperparameters, a superset of its species):
    weights that do not depend on the species as they are, species-indexed ones row by row (the rows of
    species ``old`` lacks keep ``new``'s initialisation)."""
    from e3nn import o3

    rows = [new.species.index(z) for z in old.species]
    old_modules = dict(old.named_modules())
    old_state = old.state_dict()
    with torch.no_grad():
        for name, module in new.named_modules():
            if isinstance(module, o3.TensorProduct) and module.weight_numel and module.internal_weights:
                old_module = old_modules[name]
                if module.weight.shape == old_module.weight.shape:
                    continue  # copied below with the state dict
                # a self-interaction with the species one-hot as its second input: each path's weights are
                # (mul_in, species, mul_out), scaled by a path weight 1/sqrt(fan-in) that counts the species,
                # so the copies are rescaled to give the old outputs
                paths = zip(module.instructions, old_module.instructions,
                            module.weight_views(module.weight), old_module.weight_views(old_module.weight))
                for new_path, old_path, new_view, old_view in paths:
                    new_view[:, rows] = old_view.to(new_view.dtype) * (old_path.path_weight / new_path.path_weight)
        for key, value in new.state_dict().items():
            before = old_state[key]
            if key == "species_index" or key.endswith("energy_shift"):
                continue
            if before.shape == value.shape:
                value.copy_(before)
                continue
            species_dims = [d for d in range(value.dim()) if before.shape[d] == len(old.species) and value.shape[d] == len(new.species)]
            if value.dim() != before.dim() or len(species_dims) != 1:
                if _is_tensor_product_weight(new, key):
                    continue  # done above
                raise ConfigError(f"model.init: cannot map the weights {key} {tuple(before.shape)} -> {tuple(value.shape)} to new elements")
            value.index_copy_(species_dims[0], torch.tensor(rows), before.to(value.dtype))


def _is_tensor_product_weight(potential, key: str) -> bool:
    from e3nn import o3

    module = dict(potential.named_modules()).get(key.rsplit(".", 1)[0])
    return isinstance(module, o3.TensorProduct)
