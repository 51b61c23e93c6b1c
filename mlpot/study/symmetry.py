"""Symmetry demo: a model's energy under random rotations, reflections and translations, forces rotated
accordingly, and for contrast a non-symmetric baseline that must learn rotations from augmentation.

For the model: N random proper rotations and N random improper ones (rotation times inversion through
the centroid, i.e. a rotation-reflection) about the centroid, and N random translations (uniform in
±5 Å per axis). Printed: the energy spread max - min over the original and its copies (eV) and the
largest |F(g x) - g F(x)| (eV/Å). Run in float64 by default: in float32 the total energy of a
molecule (thousands of eV) alone rounds at ~1e-4 eV.

Baseline (:class:`CartesianMLP`, a study tool, not an mlpot model): an MLP from the flattened
Cartesian coordinates of one molecule to its energy, forces by autograd, fitted to energies and
forces. The reference frames are first brought to one orientation (centred, Kabsch-rotated onto the
first training frame; forces rotated with them), because MD17 frames come in random orientations.
Inputs are standardised per coordinate (a fixed affine map from the training set), the loss is
(ΔE/σ_E)^2 + 10 (ΔF/σ_F)^2, Adam with a cosine schedule, batches of 32. It is trained with 0, 1, 4,
16, 64 (and up to 512 or more) fixed random rotated copies per training frame and with a fresh random
rotation for every sample ("inf"), on the same distinct frames, and tested on the canonical test frames, on
randomly rotated copies and on copies translated by up to 1 Å. Steps: ``baseline_steps`` at every level, or
with ``baseline_epochs`` E scaled to the augmented set, max(baseline_steps, E x frames x (1 + copies) / batch)
(``inf``: the steps of the largest finite level), so that a level with 500 copies sees each copy as often as
the level without copies sees each frame. ``baseline_hidden`` sets the MLP's width.

``baseline_model="gnn"`` swaps the MLP for :class:`mlpot.study.baselines.CartesianGNN`, a message-passing
network whose edges carry the Cartesian unit vectors r_ij / |r_ij|: invariant to translations and permutations,
not to rotations, and far easier to train than the MLP (width 64, learning rate 1e-3, float32).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch import nn

from mlpot import keys
from mlpot.data.graph import make_graph
from mlpot.nn.forces import forces_and_virial
from mlpot.data.registry import study_dataset
from mlpot.threads import torch_threads
from mlpot.study.baselines import CartesianGNN
from mlpot.study.common import (
    evaluate, load_frames, load_model, output_dir, pyplot, write_json,
)


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3, 3) uniformly random proper rotations (QR of Gaussian matrices, sign-fixed)."""
    a = rng.normal(size=(n, 3, 3))
    q, r = np.linalg.qr(a)
    q = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]
    q[np.linalg.det(q) < 0, :, 0] *= -1
    return q


class _Model:
    """Energy and forces of one structure from a deployed module or an eager Potential."""

    def __init__(self, module, numbers, cutoff, dtype):
        self.module, self.numbers, self.cutoff, self.dtype = module, np.asarray(numbers), cutoff, dtype

    def __call__(self, positions):
        out = self.module(make_graph(self.numbers, positions, self.cutoff, dtype=self.dtype))
        return float(out[keys.ENERGY].detach().double().sum()), out[keys.FORCES].detach().double().numpy()


def symmetry_spreads(model: _Model, positions: np.ndarray, n: int, seed: int, shift: float = 5.0) -> Dict[str, dict]:
    """Energy spread (eV) and max force error (eV/Å) over n random rotations, reflections and translations."""
    rng = np.random.default_rng(seed)
    centre = positions.mean(axis=0)
    e0, f0 = model(positions)
    rotations = random_rotations(n, rng)
    groups = {
        "rotations": [(m, np.zeros(3)) for m in rotations],
        "reflections": [(-m, np.zeros(3)) for m in random_rotations(n, rng)],  # det -1: rotation x inversion
        "translations": [(np.eye(3), rng.uniform(-shift, shift, size=3)) for _ in range(n)],
    }
    result = {"energy_eV": e0}
    for name, ops in groups.items():
        energies, ferr = [e0], 0.0
        for m, t in ops:
            e, f = model((positions - centre) @ m.T + centre + t)
            energies.append(e)
            ferr = max(ferr, float(np.abs(f - f0 @ m.T).max()))
        result[name] = {"count": n, "energy_spread_eV": float(np.max(energies) - np.min(energies)),
                        "max_force_error_eV_per_A": ferr}
    return result


# === the non-symmetric baseline ===
def kabsch(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Proper rotation R minimising ||x R - ref|| for centred (n, 3) x and ref."""
    u, _, vt = np.linalg.svd(x.T @ ref)
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


def canonicalize(positions: np.ndarray, forces: np.ndarray, ref: np.ndarray):
    """Centre every (F, n, 3) frame and rotate it (and its forces) onto ``ref`` (centred)."""
    pos, frc = [], []
    for x, f in zip(positions, forces):
        x = x - x.mean(axis=0)
        r = kabsch(x, ref)
        pos.append(x @ r)
        frc.append(f @ r)
    return np.stack(pos), np.stack(frc)


class CartesianMLP(nn.Module):
    """E = scale * MLP(flattened Cartesian coordinates) + offset; knows no symmetry at all."""

    def __init__(self, num_atoms: int, hidden: int = 128, scale: float = 1.0, offset: float = 0.0,
                 mean: Optional[np.ndarray] = None, std: Optional[np.ndarray] = None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3 * num_atoms, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1))
        self.scale, self.offset = scale, offset
        # a fixed affine map of the inputs (per-coordinate mean and spread of the training set)
        self.register_buffer("mean", torch.as_tensor(np.zeros(3 * num_atoms) if mean is None else mean.reshape(-1)))
        self.register_buffer("std", torch.as_tensor(np.ones(3 * num_atoms) if std is None else std.reshape(-1)))

    def forward(self, positions: torch.Tensor):
        positions = positions.detach().requires_grad_(True)
        x = (positions.flatten(1) - self.mean) / self.std
        energy = self.net(x).squeeze(-1) * self.scale + self.offset
        forces, _ = forces_and_virial(energy, positions, None, create_graph=self.training)
        return energy, forces


BASELINE_MODELS = ("mlp", "gnn")
BASELINE_LR = {"mlp": 3e-3, "gnn": 1e-3}
BASELINE_HIDDEN = {"mlp": 128, "gnn": 64}


def build_baseline(kind: str, x: np.ndarray, energy: np.ndarray, forces: np.ndarray, numbers=None,
                   hidden: int = 128) -> nn.Module:
    """A baseline ("mlp" or "gnn") with its output scaled to the data: the MLP's to the spread of ``energy`` (its
    inputs, ``x`` (frames, n, 3), standardised), the GNN's per-atom energies to the force spread x 1 Å."""
    e_scale, offset = float(energy.std()) or 1.0, float(energy.mean())
    if kind == "mlp":
        model = CartesianMLP(x.shape[1], hidden, scale=e_scale, offset=offset, mean=x.mean(axis=0),
                             std=np.maximum(x.std(axis=0), 1e-3))
    elif kind == "gnn":
        # float32: twice as fast as float64 on CPUs, and its energies are float64 anyway
        return CartesianGNN(numbers, hidden, scale=float(forces.std()) or 1.0, offset=offset).float()
    else:
        raise ValueError(f"--baseline-model {kind!r}: choose one of {', '.join(BASELINE_MODELS)}")
    return model.double()


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_baseline(pos: np.ndarray, energy: np.ndarray, forces: np.ndarray, copies, steps: int, seed: int,
                   batch_size: int = 32, lr: Optional[float] = None, forces_weight: float = 10.0, hidden: int = 128,
                   model: str = "mlp", numbers=None) -> nn.Module:
    """Fit a baseline (:class:`CartesianMLP`, or :class:`CartesianGNN` of the atomic ``numbers``) with ``copies``
    fixed random rotations per frame (int) or a fresh one per sample ("inf"); ``lr`` defaults per model."""
    kind, lr = model, BASELINE_LR.get(model, 3e-3) if lr is None else lr
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    x, e, f = pos, energy, forces
    if copies != "inf" and int(copies) > 0:
        rots = random_rotations(len(pos) * int(copies), rng).reshape(len(pos), int(copies), 3, 3)
        x = np.concatenate([pos, np.einsum("fad,fkbd->fkab", pos, rots).reshape(-1, *pos.shape[1:])])
        f = np.concatenate([forces, np.einsum("fad,fkbd->fkab", forces, rots).reshape(-1, *pos.shape[1:])])
        e = np.concatenate([energy, np.repeat(energy, int(copies))])
    e_scale, f_scale = float(energy.std()) or 1.0, float(forces.std()) or 1.0  # losses in units of the data's spread
    model = build_baseline(kind, x, energy, forces, numbers, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-5)
    dtype = next(model.parameters()).dtype
    xt, et, ft = torch.as_tensor(x, dtype=dtype), torch.as_tensor(e), torch.as_tensor(f, dtype=dtype)
    model.train()
    for _ in range(steps):
        idx = torch.as_tensor(rng.integers(0, len(xt), size=batch_size))
        xb, eb, fb = xt[idx], et[idx], ft[idx]
        if copies == "inf":
            r = torch.as_tensor(random_rotations(batch_size, rng), dtype=dtype)
            xb, fb = xb @ r.transpose(1, 2), fb @ r.transpose(1, 2)
        pe, pf = model(xb)
        loss = (((pe - eb) / e_scale) ** 2).mean() + forces_weight * (((pf - fb) / f_scale) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def _errors(predict, pos, energy, forces) -> Dict[str, float]:
    e, f = predict(pos)
    return {"energy_mae_meV": float(np.abs(e - energy).mean() * 1000), "forces_mae_meV_per_A": float(np.abs(f - forces).mean() * 1000)}


def _mlp_predict(model: nn.Module):
    dtype = next(model.parameters()).dtype

    def predict(pos):
        e, f = model(torch.as_tensor(pos, dtype=dtype))
        return e.detach().numpy(), f.detach().numpy()

    return predict


def _test_sets(pos, forces, seed: int, shift: float = 1.0) -> Dict[str, tuple]:
    rng = np.random.default_rng(seed + 1)
    rots = random_rotations(len(pos), rng)
    shifts = rng.uniform(-shift, shift, size=(len(pos), 1, 3))
    return {
        "canonical": (pos, forces),
        "rotated": (np.einsum("fad,fbd->fab", pos, rots), np.einsum("fad,fbd->fab", forces, rots)),
        "translated": (pos + shifts, forces),
    }


def level_steps(copies_list: Sequence, steps: int, epochs: Optional[float], frames: int, batch_size: int = 32) -> list:
    """Optimizer steps of each augmentation level: ``steps``, or with ``epochs`` the steps of that many passes over
    the level's frames x (1 + copies) samples (at least ``steps``); ``inf`` gets the largest finite level's."""
    if epochs is None:
        return [steps for _ in copies_list]
    scaled = {c: max(steps, int(np.ceil(epochs * frames * (1 + int(c)) / batch_size))) for c in copies_list if c != "inf"}
    return [scaled[c] if c != "inf" else max(scaled.values(), default=steps) for c in copies_list]


def run_baseline(dataset: str, copies_list: Sequence, steps: int, seed: int, test_frames: int, data_dir=None,
                 symmetric=None, train_frames: Optional[int] = None, epochs: Optional[float] = None,
                 hidden: Optional[int] = None, model: str = "mlp") -> dict:
    """Train the Cartesian baseline (``model`` "mlp" or "gnn") for every augmentation level; test errors on
    canonical/rotated/translated frames."""
    import time

    train = load_frames(dataset, "train", train_frames, seed, data_dir)
    test = load_frames(dataset, "test", test_frames, seed, data_dir)
    ref = train.positions[0] - train.positions[0].mean(axis=0)
    ptr, ftr = canonicalize(np.stack(train.positions), np.stack(train.forces), ref)
    pte, fte = canonicalize(np.stack(test.positions), np.stack(test.forces), ref)
    sets = _test_sets(pte, fte, seed)
    hidden = hidden or BASELINE_HIDDEN[model]
    numbers = train.numbers[0]
    rows, params = [], num_parameters(build_baseline(model, ptr, train.energy, ftr, numbers, hidden))
    for copies, n_steps in zip(copies_list, level_steps(copies_list, steps, epochs, len(ptr))):
        tic = time.perf_counter()
        fitted = train_baseline(ptr, train.energy, ftr, copies, n_steps, seed, hidden=hidden, model=model,
                                numbers=numbers)
        row = {"augmentation_copies": copies, "steps": n_steps, "train_s": round(time.perf_counter() - tic, 1)}
        for name, (p, f) in sets.items():
            row[name] = _errors(_mlp_predict(fitted), p, test.energy, f)
        rows.append(row)
        print(f"  baseline, {copies} rotated copies per frame: E MAE canonical {row['canonical']['energy_mae_meV']:.1f}, "
              f"rotated {row['rotated']['energy_mae_meV']:.1f}, translated {row['translated']['energy_mae_meV']:.1f} meV; "
              f"F MAE canonical {row['canonical']['forces_mae_meV_per_A']:.1f}, rotated "
              f"{row['rotated']['forces_mae_meV_per_A']:.1f} meV/Å ({n_steps} steps, {row['train_s']:.0f} s)", flush=True)
    result = {"dataset": dataset, "train_frames": len(train), "test_frames": len(test), "steps": steps,
              "epochs": epochs, "hidden": hidden, "baseline_model": model, "baseline_parameters": params,
              "lr": BASELINE_LR[model], "rows": rows}
    if symmetric is not None:
        module, cutoff, dtype = symmetric
        from mlpot.data.splits import frames_to_graphs

        sym = {}
        for name, (p, f) in sets.items():
            frames = test.subset(np.arange(len(test)))
            frames.positions, frames.forces = list(p), list(f)
            m = evaluate(module, frames_to_graphs(frames, cutoff, dtype))
            sym[name] = {"energy_mae_meV": m["energy_mae_meV"], "forces_mae_meV_per_A": m["forces_mae_meV_per_A"]}
        result["symmetric_model"] = sym
    return result


def plot_baseline(result: dict, path: Path, model_label: str) -> None:
    plt = pyplot()
    rows = result["rows"]
    labels = [str(r["augmentation_copies"]) for r in rows]
    x = np.arange(len(rows))
    label = "GNN" if result.get("baseline_model") == "gnn" else "MLP"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, unit in ((axes[0], "energy_mae_meV", "energy MAE (meV)"), (axes[1], "forces_mae_meV_per_A", "force MAE (meV/Å)")):
        for j, name in enumerate(("canonical", "rotated", "translated")):
            ax.plot(x, [r[name][key] for r in rows], "o-", color=f"C{j}", label=f"{label}, {name} test")
        if "symmetric_model" in result:
            ax.axhline(result["symmetric_model"]["rotated"][key], color="k", ls="--", lw=1,
                       label=f"{model_label} (any orientation)")
        ax.set(xticks=x, xticklabels=labels, xlabel="random rotated copies per training frame", ylabel=unit, yscale="log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    budget = (f"{result['epochs']:g} passes over each augmented set (at least {result['steps']} steps)"
              if result.get("epochs") else f"{result['steps']} steps each")
    params = f", {result['baseline_parameters']:,} parameters" if "baseline_parameters" in result else ""
    fig.suptitle(f"non-symmetric Cartesian {label} (width {result.get('hidden', 128)}{params}), {result['train_frames']} frames of "
                 f"{result['dataset']}, {budget}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_symmetry(model_spec, structure: Optional[str] = None, n: int = 100, dtype: str = "float64", seed: int = 0,
                 output=None, data_dir=None, baseline: bool = True, copies: str = "0,1,4,16,64,inf",
                 baseline_steps: int = 10000, baseline_data: Optional[str] = None, test_frames: int = 500,
                 train_frames: Optional[int] = None, baseline_epochs: Optional[float] = None,
                 baseline_hidden: Optional[int] = None, baseline_model: str = "mlp") -> dict:
    from mlpot.workflows.analysis import load_structure

    if baseline_epochs is not None and not baseline_epochs > 0:
        raise ValueError(f"--baseline-epochs {baseline_epochs:g}: give a positive number of passes")
    if baseline_model not in BASELINE_MODELS:
        raise ValueError(f"--baseline-model {baseline_model!r}: choose one of {', '.join(BASELINE_MODELS)}")
    baseline_hidden = baseline_hidden if baseline_hidden is not None else BASELINE_HIDDEN[baseline_model]
    if baseline_hidden < 1:
        raise ValueError(f"--baseline-hidden {baseline_hidden}: give a positive width")
    loaded = load_model(model_spec, dtype=dtype)
    module = loaded.scripted if loaded.scripted is not None else loaded.potential
    spec = structure or loaded.meta.get("dataset") or "ethanol"
    atoms = load_structure(spec, data_dir)
    torch_dtype = loaded.dtype
    model = _Model(module, atoms.numbers, loaded.meta["cutoff"], torch_dtype)
    out = output_dir(output, f"mlpot-study-symmetry-{loaded.kind}")
    result = {"model": loaded.path, "kind": loaded.kind, "hparams": loaded.meta.get("hparams"), "dtype": dtype,
              "structure": spec, "num_atoms": len(atoms), "seed": seed}
    result.update(symmetry_spreads(model, atoms.positions, n, seed))
    print(format_spreads(result))
    if baseline:
        data = study_dataset(baseline_data or loaded.meta.get("dataset") or "ethanol")
        levels = [c.strip() if c.strip() == "inf" else int(c) for c in str(copies).split(",") if c.strip()]
        steps_text = (f"{baseline_epochs:g} passes over each augmented set" if baseline_epochs else f"{baseline_steps} steps per level")
        print(f"non-symmetric baseline (Cartesian {baseline_model.upper()}, width {baseline_hidden}) on {data}, "
              f"{steps_text}:", flush=True)
        with torch_threads(None):  # the baseline's training sets its own thread count
            result["baseline"] = run_baseline(data, levels, baseline_steps, seed, test_frames, data_dir,
                                              (module, loaded.meta["cutoff"], torch_dtype), train_frames,
                                              baseline_epochs, baseline_hidden, baseline_model)
        sym = result["baseline"]["symmetric_model"]
        print(f"  {loaded.kind} on the same test frames: E MAE canonical {sym['canonical']['energy_mae_meV']:.2f}, "
              f"rotated {sym['rotated']['energy_mae_meV']:.2f}, translated {sym['translated']['energy_mae_meV']:.2f} meV")
        plot_baseline(result["baseline"], out / "symmetry_baseline.png", loaded.kind)
    write_json(out / "symmetry.json", result)
    print(f"wrote {out / 'symmetry.json'}" + (f", {out / 'symmetry_baseline.png'}" if baseline else ""))
    result["output"] = str(out)
    return result


def format_spreads(result: dict) -> str:
    lines = [f"symmetry of {result['kind']} ({result['model']}) in {result['dtype']} on {result['structure']} "
             f"({result['num_atoms']} atoms), E = {result['energy_eV']:.6f} eV"]
    for name in ("rotations", "reflections", "translations"):
        r = result[name]
        lines.append(f"  {r['count']} random {name:<12}: energy spread {r['energy_spread_eV']:.2e} eV, "
                     f"max force error {r['max_force_error_eV_per_A']:.2e} eV/Å")
    return "\n".join(lines)
