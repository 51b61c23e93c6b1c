"""Which rotation orders an EGNN uses (after Lee et al. 2024, "Deconstructing equivariant representations
in molecular systems"): feature-norm share per l in every interaction layer on real data, test errors
with each l's channels zeroed, and optionally a retrain without the highest l.

Share of l in layer k: sum over atoms, frames and the channels of order l of the squared feature
components, divided by the same sum over all channels of the layer's output (e3nn "component"
normalisation: every component of every irrep counts alike). The mean channel norm (the norm of
one channel's 2l+1 components, averaged over atoms and channels) is reported alongside.
Ablation: a forward hook on ``potential.model.layers[k]`` sets the output channels of order l to zero
(``irreps_out.slices()`` of e3nn's flat layout, or the rows of l in a blocked (N, rows, channels)
layout), in one layer or in all layers; energies and autograd forces are then those of the ablated
model. A model whose layers are not called as modules (no hooks run) is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from mlpot.data.graph import collate
from mlpot.data.registry import study_dataset
from mlpot.threads import torch_threads
from mlpot.study.common import (
    evaluate, load_model, load_model_and_data, median_latency_ms, output_dir, pyplot, write_json,
)


def _entries(layer) -> List[tuple]:
    """(label like '1o', l, slice, multiplicity) for every irrep entry of a layer's output."""
    out = []
    for (mul, ir), sl in zip(layer.irreps_out, layer.irreps_out.slices()):
        if mul > 0:
            out.append((str(ir), ir.l, sl, mul))
    return out


def _blocks(layer, output: torch.Tensor) -> List[tuple]:
    """(label, l, (N, mul, 2l+1) view) of each irrep entry of a layer output.

    Layouts: e3nn's flat (N, irreps_out.dim) (entries side by side, ``irreps_out.slices()``), and the
    blocked (N, M, U) one (M = sum of the entries' 2l+1 rows, U channels) of fused implementations.
    """
    entries = _entries(layer)
    scalars = [e for e in entries if e[1] == 0]
    scalars_first = entries[: len(scalars)] == scalars
    if output.dim() == 2:
        for chosen in (entries, scalars if scalars_first else None):
            if chosen is not None and output.shape[1] == sum(mul * (2 * l + 1) for _, l, _, mul in chosen):
                return [(label, l, output[:, sl].reshape(output.shape[0], mul, 2 * l + 1)) for label, l, sl, mul in chosen]
    if output.dim() == 3 and all(mul == output.shape[2] for *_, mul in entries):
        # a layer that computes only its scalars (the last one: the readout reads nothing else) has only their rows
        for chosen in (entries, scalars if scalars_first else None):
            if chosen is not None and output.shape[1] == sum(2 * l + 1 for _, l, _, _ in chosen):
                out, row = [], 0
                for label, l, _, mul in chosen:
                    out.append((label, l, output[:, row : row + 2 * l + 1, :].transpose(1, 2)))
                    row += 2 * l + 1
                return out
    raise ValueError(f"layer output of shape {tuple(output.shape)} does not match its irreps_out {layer.irreps_out}")


def _zero_mask(layer, output: torch.Tensor, l: int) -> torch.Tensor:
    """A 0/1 tensor shaped like ``output`` (either layout) that is 0 on the channels of order ``l``."""
    mask = torch.ones_like(output)
    for label, ll, block in _blocks(layer, mask):
        if ll == l:
            block.zero_()  # a view into mask
    return mask


def _require_hooks(fired: bool) -> None:
    if not fired:
        raise ValueError(
            "the EGNN's interaction layers were not called as modules (forward hooks did not run): "
            "this implementation cannot be studied layer by layer"
        )


def _layers(potential):
    layers = getattr(potential.model, "layers", None)
    if potential.kind != "egnn" or layers is None:
        raise ValueError(f"the irreps study needs an EGNN model, got kind {potential.kind!r}")
    return list(layers)


@torch.no_grad()
def norm_shares(potential, graphs, batch_size: int = 100) -> List[dict]:
    """Per layer: squared-norm share and mean channel norm of each irrep and each l."""
    layers = _layers(potential)
    sums = [dict() for _ in layers]  # label -> [sum_sq, sum_channel_norm, count_channels]
    handles = []

    def hook_for(k):
        def hook(module, inputs, output):
            for label, l, block in _blocks(module, output.detach().double()):
                acc = sums[k].setdefault(label, [0.0, 0.0, 0])
                acc[0] += float((block**2).sum())
                acc[1] += float(block.norm(dim=-1).sum())
                acc[2] += block.shape[0] * block.shape[1]

        return hook

    for k, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(hook_for(k)))
    saved = potential.compute_forces
    potential.compute_forces = False
    try:
        for start in range(0, len(graphs), batch_size):
            potential(collate(list(graphs[start : start + batch_size])))
    finally:
        potential.compute_forces = saved
        for h in handles:
            h.remove()
    _require_hooks(all(sums))
    result = []
    for k, layer in enumerate(layers):
        total = sum(v[0] for v in sums[k].values()) or 1.0
        per_irrep = {label: {"share": v[0] / total, "mean_channel_norm": v[1] / max(v[2], 1)} for label, v in sums[k].items()}
        not_computed = [label for label, _, _, _ in _entries(layer) if label not in sums[k]]
        per_l: Dict[str, dict] = {}
        for label, v in sums[k].items():
            l = label[:-1]
            acc = per_l.setdefault(l, [0.0, 0.0, 0])
            acc[0] += v[0]
            acc[1] += v[1]
            acc[2] += v[2]
        result.append({
            "layer": k + 1, "irreps_out": str(layer.irreps_out),
            "share_by_l": {l: v[0] / total for l, v in sorted(per_l.items(), key=lambda kv: int(kv[0]))},
            "mean_channel_norm_by_l": {l: v[1] / max(v[2], 1) for l, v in sorted(per_l.items(), key=lambda kv: int(kv[0]))},
            "by_irrep": per_irrep,
            "not_computed": not_computed,  # in irreps_out but not produced by this implementation (unused)
        })
    return result


class zero_channels:
    """Context manager: zero the output channels of order ``l`` in ``layer_indices`` (0-based) of an EGNN."""

    def __init__(self, potential, l: int, layer_indices: Sequence[int]):
        self.layers = _layers(potential)
        self.l = l
        self.layer_indices = list(layer_indices)
        self.handles = []
        self.fired = 0

    def __enter__(self):
        for k in self.layer_indices:
            if not any(l == self.l for _, l, _, _ in _entries(self.layers[k])):
                continue

            def hook(module, inputs, output):
                self.fired += 1
                return output * _zero_mask(module, output, self.l)

            self.handles.append(self.layers[k].register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


def ablation(potential, graphs) -> List[dict]:
    """Test MAE with each l zeroed in each layer and in all layers at once; first row: nothing zeroed."""
    layers = _layers(potential)
    ls = sorted({l for layer in layers for _, l, _, _ in _entries(layer)})
    base = evaluate(potential, graphs)
    rows = [{"layer": "none", "l": None, "energy_mae_meV": base["energy_mae_meV"], "forces_mae_meV_per_A": base["forces_mae_meV_per_A"]}]
    targets = [(str(k + 1), [k]) for k in range(len(layers))] + [("all", list(range(len(layers))))]
    for l in ls:
        for name, idx in targets:
            present = [k for k in idx if any(e[1] == l for e in _entries(layers[k]))]
            if not present:
                continue
            with zero_channels(potential, l, present) as zeroed:
                m = evaluate(potential, graphs)
            _require_hooks(zeroed.fired > 0)
            rows.append({"layer": name, "l": l, "energy_mae_meV": m["energy_mae_meV"],
                         "forces_mae_meV_per_A": m["forces_mae_meV_per_A"]})
    return rows


def plot_irreps(shares: List[dict], rows: List[dict], path: Path, title: str) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ls = sorted({int(l) for s in shares for l in s["share_by_l"]})
    x = np.arange(len(shares))
    bottom = np.zeros(len(shares))
    for l in ls:
        vals = np.array([s["share_by_l"].get(str(l), 0.0) for s in shares])
        ax1.bar(x, vals, bottom=bottom, label=f"l={l}", color=f"C{l}")
        for xi, (b, v) in enumerate(zip(bottom, vals)):
            if v > 0.04:
                ax1.text(xi, b + v / 2, f"{100 * v:.0f}%", ha="center", va="center", fontsize=8, color="white")
        bottom += vals
    names = [f"layer {s['layer']}" + ("\n(l>0 not computed)" if s.get("not_computed") else "") for s in shares]
    ax1.set(xticks=x, xticklabels=names, ylabel="share of squared feature norm",
            title="feature norm by l (test frames)")
    ax1.legend(fontsize=8)
    base = rows[0]["forces_mae_meV_per_A"]
    groups = list(dict.fromkeys(r["layer"] for r in rows[1:]))
    width = 0.8 / max(1, len(ls))
    for j, l in enumerate(ls):
        vals = [next((r["forces_mae_meV_per_A"] for r in rows[1:] if r["layer"] == g and r["l"] == l), np.nan) for g in groups]
        ax2.bar(np.arange(len(groups)) + (j - (len(ls) - 1) / 2) * width, vals, width, label=f"l={l} zeroed", color=f"C{l}")
    ax2.axhline(base, color="k", ls="--", lw=1, label=f"intact ({base:.1f})")
    ax2.set_yscale("log")
    ax2.set(xticks=np.arange(len(groups)), xticklabels=["all layers" if g == "all" else f"layer {g}" for g in groups],
            ylabel="test force MAE (meV/Å)",
            title="ablation: channels of one l set to 0")
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def retrain(model, lmax_values: Sequence[int], dataset: str, size: int, steps: int, runs_dir: Path, seed: int = 0,
            test_size: Optional[int] = None, data_dir=None, threads: int = 1, overrides: Sequence[str] = ()) -> List[dict]:
    """Train the model's architecture (its metadata's hparams) at each lmax under the learning-curve budget rule."""
    from mlpot.study.learning_curve import RECIPES, make_config, train_one

    results = []
    for lmax in lmax_values:
        hparams = {**model.meta["hparams"], "lmax": int(lmax)}
        recipe = {"kind": "egnn", "hparams": hparams, "lr": RECIPES["egnn"]["lr"], "name": f"egnn-l{lmax}"}
        run_dir = runs_dir / f"lmax{lmax}-n{size}-seed{seed}-steps{steps}"
        cfg = make_config(recipe, dataset, size, steps, run_dir, seed, test_size, None, threads, data_dir, overrides)
        cfg.model.cutoff = float(model.meta["cutoff"])
        cfg.model.dtype = model.meta["dtype"]
        metrics = train_one(cfg)
        results.append({"lmax": int(lmax), "run_dir": str(run_dir), "model": str(run_dir / "model.pt"),
                        "test": {k: metrics["test"][k] for k in ("energy_mae_meV", "forces_mae_meV_per_A", "num_structures")},
                        "train_time_s": metrics["train_time_s"], "epochs_run": metrics["epochs_run"],
                        "num_parameters": metrics["num_parameters"]})
    return results


def latency_of(path_or_module, graph, calls: int) -> float:
    from mlpot import export

    module = export.load(path_or_module)[0] if isinstance(path_or_module, (str, Path)) else path_or_module
    with torch_threads(1):
        return median_latency_ms(module, graph, calls)


def run_irreps(model_spec, data: Optional[str] = None, frames: Optional[int] = 1000, split: str = "test", seed: int = 0,
               output=None, data_dir=None, do_retrain: bool = False, retrain_lmax: Optional[int] = None,
               steps: int = 4000, size: int = 1000, runs_dir=None, test_size: Optional[int] = None,
               latency_calls: int = 100, threads: int = 1, overrides: Sequence[str] = (),
               retrain_dataset: Optional[str] = None) -> dict:
    model = load_model(model_spec)
    if model.kind != "egnn":
        raise ValueError(f"the irreps study needs an EGNN model; {model.path} is {model.kind!r}")
    model, data, fr, graphs = load_model_and_data(model, data, split, frames, seed, data_dir)
    out = output_dir(output, "mlpot-study-irreps")
    shares = norm_shares(model.potential, graphs)
    rows = ablation(model.potential, graphs)
    lmax = int(model.meta["hparams"].get("lmax", 2))
    result = {
        "model": model.path, "hparams": model.meta["hparams"], "data": str(data), "split": split, "frames": len(fr),
        "rebuild_check": model.checked, "norm_shares": shares, "ablation": rows,
    }
    title = f"{model.label}: {len(fr)} frames of {data} ({split})"
    plot_irreps(shares, rows, out / "irreps.png", title)
    if do_retrain:
        new_lmax = lmax - 1 if retrain_lmax is None else int(retrain_lmax)
        if not 0 <= new_lmax <= 3:
            raise ValueError(f"--retrain-lmax must be 0..3, got {new_lmax}")
        dataset = study_dataset(str(retrain_dataset or model.meta.get("dataset") or data))
        runs = Path(runs_dir or Path("runs") / "study" / f"irreps-{Path(model.path).stem}")
        trained = retrain(model, [lmax, new_lmax] if new_lmax != lmax else [lmax], dataset, size, steps, runs, seed,
                          test_size, data_dir, threads, overrides)
        graph = graphs[0]
        from mlpot import export

        original_module = model.scripted
        if original_module is None:
            original_module = export.compile_potential(model.potential)
        original_test = evaluate(model.scripted if model.scripted is not None else model.potential, graphs)
        original_latency = latency_of(original_module, graph, latency_calls)
        for t in trained:
            t["latency_ms"] = latency_of(t["model"], graph, latency_calls)
            m = evaluate(export.load(t["model"])[0], graphs)
            t["test_on_study_frames"] = {k: m[k] for k in ("energy_mae_meV", "forces_mae_meV_per_A")}
        result["retrain"] = {
            "budget": {"steps": steps, "size": size, "rule": "as mlpot study learning-curve"},
            "original": {"lmax": lmax, "test_on_study_frames": {k: original_test[k] for k in ("energy_mae_meV", "forces_mae_meV_per_A")},
                         "latency_ms": original_latency},
            "retrained": trained,
            "latency": "median ms of one energy+forces call on one structure, 1 thread, TorchScript, "
                       f"{latency_calls} calls after 10 warm-up calls",
        }
    write_json(out / "irreps.json", result)
    print(format_irreps(result))
    print(f"wrote {out / 'irreps.png'}, {out / 'irreps.json'}")
    result["output"] = str(out)
    return result


def format_irreps(result: dict) -> str:
    lines = [f"irreps study of {result['model']} ({result['hparams']}), {result['frames']} frames"]
    for s in result["norm_shares"]:
        shares = ", ".join(f"l={l} {100 * v:.1f}%" for l, v in s["share_by_l"].items())
        norms = ", ".join(f"l={l} {v:.3f}" for l, v in s["mean_channel_norm_by_l"].items())
        skipped = f"; not computed: {', '.join(s['not_computed'])}" if s.get("not_computed") else ""
        lines.append(f"layer {s['layer']} ({s['irreps_out']}): squared-norm share {shares}; mean channel norm {norms}{skipped}")
    lines.append("ablation (test MAE with channels of one l zeroed): layer, l, E meV, F meV/Å")
    for r in result["ablation"]:
        lines.append(f"  {r['layer']:>5} {'-' if r['l'] is None else r['l']:>3} {r['energy_mae_meV']:12.2f} {r['forces_mae_meV_per_A']:12.2f}")
    if "retrain" in result:
        rt = result["retrain"]
        o = rt["original"]
        lines.append(f"original (lmax {o['lmax']}): E {o['test_on_study_frames']['energy_mae_meV']:.2f} meV, "
                     f"F {o['test_on_study_frames']['forces_mae_meV_per_A']:.2f} meV/Å, {o['latency_ms']:.2f} ms/call")
        for t in rt["retrained"]:
            lines.append(f"retrained lmax {t['lmax']} ({rt['budget']['steps']} steps, N={rt['budget']['size']}): "
                         f"E {t['test_on_study_frames']['energy_mae_meV']:.2f} meV, F {t['test_on_study_frames']['forces_mae_meV_per_A']:.2f} meV/Å, "
                         f"{t['latency_ms']:.2f} ms/call, {t['num_parameters']} parameters, {t['train_time_s']:.0f} s")
    return "\n".join(lines)
