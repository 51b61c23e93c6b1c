"""Model names of the learning-curve study: recipes, lmax and pruned-irreps variants, matched parameter
counts, energy-only fits.

A model name is ``KIND[-lK[-noJ]][@PARAMS][+energy]``:

* ``KIND``: ``gcn``, ``schnet`` or ``egnn`` - the recipes of ``training/<molecule>-<kind>.yaml``
  (hyperparameters and learning rate, :data:`RECIPES`).
* ``-lK`` (egnn only): the egnn recipe with ``lmax = K`` (0..3).
* ``-noJ`` (after ``-lK``): without hidden features of the orders l among the digits J (1..K), the edge
  harmonics still up to K (EGNN ``hidden_ls``, see :class:`mlpot.models.egnn.EGNN`); ``egnn-l2-no1``
  has l = 0 and 2 features only, ``egnn-l3-no12`` l = 0 and 3.
* ``@PARAMS``: the width (``num_features``, every other hyperparameter as the recipe) chosen so that the
  parameter count for the molecule's elements comes closest to PARAMS (``150k``, ``1.5M`` or ``60000``);
  e.g. ``egnn-l0@150k`` and ``schnet@150k`` next to ``egnn-l2`` (153 769 parameters for ethanol).
* ``+energy``: trained on energies only (``train.forces_weight = 0``); forces are still predicted (as the
  gradient) and tested. The row of a model that cannot learn energies at all.

Examples: ``egnn-l2``, ``egnn-l0@150k``, ``egnn-l2-no1@150k+energy``, ``schnet@150k``, ``gcn+energy``,
``gcn@150k+energy``.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

# Hyperparameters and learning rates of the recipes in training/<molecule>-<kind>.yaml.
RECIPES: Dict[str, dict] = {
    "gcn": {"kind": "gcn", "hparams": {"num_features": 64, "num_layers": 3}, "lr": 1.0e-3},
    "schnet": {"kind": "schnet", "hparams": {"num_features": 64, "num_layers": 3}, "lr": 1.0e-3},
    "egnn": {"kind": "egnn", "hparams": {"num_features": 32, "lmax": 2, "num_layers": 3, "parity": False}, "lr": 5.0e-3},
}
MIN_WIDTH = {"gcn": 2, "schnet": 2, "egnn": 1}  # gcn/schnet readouts are num_features // 2 wide
MAX_WIDTH = 1024

_NAME = re.compile(
    r"^(?P<kind>[a-z]+)(?:-l(?P<lmax>\d+)(?:-no(?P<drop>\d+))?)?(?:@(?P<params>[0-9.]+[kKmM]?))?(?P<energy>\+energy)?$"
)


def parse_count(text: str) -> int:
    """``150k`` -> 150000, ``1.5M`` -> 1500000, ``60000`` -> 60000."""
    text = str(text).strip()
    scale = {"k": 1e3, "m": 1e6}.get(text[-1:].lower(), 1)
    number = text[:-1] if scale != 1 else text
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"parameter count {text!r}: give a number such as 60000, 150k or 1.5M") from None
    if value < 1:
        raise ValueError(f"parameter count {text!r} must be positive")
    return int(round(value))


def parse_model(name: str, base_hparams: Optional[dict] = None) -> dict:
    """A model name (see the module docstring) -> recipe dict: name, kind, hparams, lr, target_params,
    energy_only. The width of an ``@PARAMS`` name is chosen later, by :func:`match_width`, once the
    elements are known."""
    name = name.strip()
    m = _NAME.match(name)
    if not m or m["kind"] not in RECIPES:
        raise ValueError(f"unknown model {name!r}: use KIND[-lK[-noJ]][@PARAMS][+energy] with KIND gcn, schnet or egnn, "
                         f"e.g. egnn-l1, egnn-l0@150k, egnn-l2-no1, gcn+energy")
    kind = m["kind"]
    recipe = {**RECIPES[kind], "hparams": dict(base_hparams if base_hparams is not None else RECIPES[kind]["hparams"])}
    if m["lmax"] is not None:
        if kind != "egnn":
            raise ValueError(f"unknown model {name!r}: only egnn takes -lK (K = 0..3)")
        lmax = int(m["lmax"])
        if not 0 <= lmax <= 3:
            raise ValueError(f"{name}: lmax must be 0..3")
        recipe["hparams"]["lmax"] = lmax
        recipe["hparams"].pop("hidden_ls", None)  # the name gives the irreps: every l <= K unless -noJ
        if m["drop"] is not None:
            dropped = [int(d) for d in m["drop"]]
            if len(set(dropped)) != len(dropped) or not all(1 <= l <= lmax for l in dropped):
                raise ValueError(f"{name}: -noJ drops distinct orders l of 1..{lmax}, e.g. egnn-l2-no1")
            recipe["hparams"]["hidden_ls"] = [l for l in range(lmax + 1) if l not in dropped]
    recipe["target_params"] = parse_count(m["params"]) if m["params"] else None
    recipe["energy_only"] = bool(m["energy"])
    recipe["name"] = name
    return recipe


def count_parameters(kind: str, hparams: dict, species: Sequence[int], cutoff: float = 5.0) -> int:
    """Trainable parameters of a fresh ``kind`` potential with ``hparams`` for these elements."""
    key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in hparams.items()))  # hashable: hidden_ls
    return _count(kind, key, tuple(sorted(int(z) for z in species)), float(cutoff))


@lru_cache(maxsize=None)
def _count(kind: str, hparams: tuple, species: tuple, cutoff: float) -> int:
    import torch

    from mlpot.models import build_potential

    torch.manual_seed(0)
    potential = build_potential(kind, species, cutoff, **dict(hparams))
    return sum(p.numel() for p in potential.parameters())


def match_width(kind: str, hparams: dict, target: int, species: Sequence[int], cutoff: float = 5.0) -> Tuple[int, int]:
    """(num_features, parameters): the width whose parameter count is closest to ``target``.

    The count grows with the width, almost exactly as a quadratic (weight matrices F x F, per-channel
    weights F, the readout's F // 2): a quadratic through three widths gives the estimate, then a walk
    over neighbouring widths finds the closest one (each count builds the model; EGNNs take seconds)."""
    import numpy as np

    def params(width: int) -> int:
        return count_parameters(kind, {**hparams, "num_features": int(width)}, species, cutoff)

    def miss(width: int) -> int:
        return abs(params(width) - target)

    lo = MIN_WIDTH[kind]
    probes = [max(lo, w) for w in (8, 16, 32)]
    coef = np.polyfit(probes, [params(w) for w in probes], 2)
    roots = [r.real for r in np.roots(coef - np.array([0, 0, target])) if abs(r.imag) < 1e-9 and r.real > 0]
    width = int(min(max(lo, round(max(roots))) if roots else lo, MAX_WIDTH))
    while width > lo and miss(width - 1) <= miss(width):
        width -= 1
    while width < MAX_WIDTH and miss(width + 1) < miss(width):
        width += 1
    if width == MAX_WIDTH and params(width) < target:
        raise ValueError(f"{kind}: even num_features = {MAX_WIDTH} has fewer than {target} parameters")
    return width, params(width)


def resolve(recipe: dict, species: Sequence[int], cutoff: float = 5.0) -> dict:
    """The recipe with its width set for ``@PARAMS`` and its parameter count (``num_parameters``)."""
    recipe = {**recipe, "hparams": dict(recipe["hparams"])}
    if recipe.get("target_params"):
        width, _ = match_width(recipe["kind"], recipe["hparams"], recipe["target_params"], species, cutoff)
        recipe["hparams"]["num_features"] = width
    recipe["num_parameters"] = count_parameters(recipe["kind"], recipe["hparams"], species, cutoff)
    return recipe


def parse_lrs(spec, names: Sequence[str]) -> Dict[str, Optional[float]]:
    """``--lr``: empty (each recipe's rate), one rate for all, ``name=rate,...`` (names not given keep the
    recipe's; a name without its own entry takes the rate of its nearest listed parent: ``egnn-l2-no1@150k``
    that of ``egnn-l2-no1``, else ``egnn-l2``, else ``egnn``), or an
    lr-search JSON file (its ``best`` mapping). Returns model name -> rate (None: the recipe's)."""
    import json
    from pathlib import Path

    out: Dict[str, Optional[float]] = {n: None for n in names}

    def rate(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--lr {spec!r}: {text!r} is not a learning rate") from None

    if spec in (None, ""):
        return out
    spec = str(spec)
    if Path(spec).is_file():
        try:
            best = json.loads(Path(spec).read_text())["best"]
            mapping = {k: float(v) for k, v in best.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"--lr {spec!r}: not an lr-search result (no 'best' rates); give the lr_search.json "
                             "that mlpot study lr-search wrote") from None
    elif "=" not in spec:
        return {n: rate(spec) for n in names}
    else:
        mapping = {}
        for item in spec.split(","):
            if not item.strip():
                continue
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--lr {spec!r}: give one rate, name=rate pairs or an lr-search JSON file")
            mapping[key.strip()] = rate(value)
    for n in names:
        out[n] = next((mapping[k] for k in _lr_parents(n) if k in mapping), None)
    return out


def _lr_parents(name: str) -> List[str]:
    """``name`` and its parents, most specific first: egnn-l2-no1@150k+energy, egnn-l2-no1, egnn-l2, egnn."""
    match = _NAME.match(name)
    if not match:
        return [name]
    kind, lmax, drop = match["kind"], match["lmax"], match["drop"]
    parents = [name]
    if lmax is not None:
        if drop is not None:
            parents.append(f"{kind}-l{lmax}-no{drop}")
        parents.append(f"{kind}-l{lmax}")
    parents.append(kind)
    return list(dict.fromkeys(parents))
