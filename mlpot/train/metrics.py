"""Errors of predicted energies, forces and stresses, in meV, meV/Å and meV/Å^3 (kcal/mol and GPa alongside)."""

from typing import Dict, List, Optional

import numpy as np

from mlpot import keys
from mlpot.data.datasets import Frames
from mlpot.data.graph import Graph, collate
from mlpot.units import EV_PER_A3_TO_GPA, EV_TO_MEV, KCAL_PER_MOL_TO_EV


def stress_labels(frames: Frames) -> Optional[np.ndarray]:
    """The frames' reference stress (M, 3, 3) eV/Å^3, NaN for frames that have none or are not periodic in
    all three directions (their stress is undefined); None when no frame has a usable stress."""
    if frames.stress is None:
        return None
    usable = frames.pbc.all(axis=1) & (np.abs(np.linalg.det(frames.cells)) > 0)
    if not usable.any():
        return None
    return np.where(usable[:, None, None], frames.stress, np.nan)


def predict(model, graphs: List[Graph], batch_size: int = 50, stress_ref: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Run ``model`` (a Potential or a deployed module) over ``graphs``; float64 numpy results in eV, eV/Å.

    With ``stress_ref`` (M, 3, 3) eV/Å^3 (NaN rows: no reference, see :func:`stress_labels`) the virial is
    computed too and ``stress`` = -virial / volume and ``stress_ref`` are returned (NaN rows where there is no
    reference)."""
    energy, energy_ref, forces, forces_ref, num_atoms, stress = [], [], [], [], [], []
    for start in range(0, len(graphs), batch_size):
        batch = collate(graphs[start : start + batch_size])
        if stress_ref is None:
            out = model(batch)
        else:
            out = model.energy_and_forces(batch, True)
            volume = np.abs(np.linalg.det(batch[keys.CELL].detach().double().cpu().numpy()))
            with np.errstate(divide="ignore", invalid="ignore"):
                stress.append(-out[keys.VIRIAL].detach().double().cpu().numpy() / volume[:, None, None])
        energy.append(out[keys.ENERGY].detach().double().cpu().numpy())
        forces.append(out[keys.FORCES].detach().double().cpu().numpy())
        num_atoms.append(batch[keys.NUM_ATOMS].cpu().numpy())
        if keys.ENERGY_REF in batch:
            energy_ref.append(batch[keys.ENERGY_REF].double().cpu().numpy())
            forces_ref.append(batch[keys.FORCES_REF].double().cpu().numpy())
    result = {"energy": np.concatenate(energy), "forces": np.concatenate(forces), "num_atoms": np.concatenate(num_atoms)}
    if energy_ref:
        result["energy_ref"] = np.concatenate(energy_ref)
        result["forces_ref"] = np.concatenate(forces_ref)
    if stress_ref is not None:
        usable = np.isfinite(stress_ref).all(axis=(1, 2))
        result["stress"] = np.where(usable[:, None, None], np.concatenate(stress), np.nan)
        result["stress_ref"] = np.asarray(stress_ref, dtype=np.float64)
    return result


def error_metrics(pred: Dict[str, np.ndarray]) -> Dict[str, float]:
    """MAE and RMSE of energy (per structure) and force components, in meV, meV/Å and kcal/mol(/Å); with
    stresses in ``pred``, their MAE and RMSE over the 9 components of the frames that have one, in
    meV/Å^3 and GPa."""
    de = pred["energy"] - pred["energy_ref"]
    df = pred["forces"] - pred["forces_ref"]
    metrics = {
        "energy_mae_meV": float(np.abs(de).mean() * EV_TO_MEV),
        "energy_rmse_meV": float(np.sqrt((de**2).mean()) * EV_TO_MEV),
        "energy_per_atom_mae_meV": float(np.abs(de / pred["num_atoms"]).mean() * EV_TO_MEV),
        "forces_mae_meV_per_A": float(np.abs(df).mean() * EV_TO_MEV),
        "forces_rmse_meV_per_A": float(np.sqrt((df**2).mean()) * EV_TO_MEV),
        "num_structures": int(len(de)),
    }
    for name in ("energy_mae", "energy_rmse", "forces_mae", "forces_rmse"):
        key = [k for k in metrics if k.startswith(name + "_meV")][0]
        metrics[name + "_kcal_mol" + ("_per_A" if name.startswith("forces") else "")] = (
            metrics[key] / EV_TO_MEV / KCAL_PER_MOL_TO_EV
        )
    if "stress" in pred:
        usable = np.isfinite(pred["stress_ref"]).all(axis=(1, 2))
        ds = (pred["stress"] - pred["stress_ref"])[usable]
        metrics["stress_mae_meV_per_A3"] = float(np.abs(ds).mean() * EV_TO_MEV)
        metrics["stress_rmse_meV_per_A3"] = float(np.sqrt((ds**2).mean()) * EV_TO_MEV)
        metrics["stress_mae_GPa"] = float(np.abs(ds).mean() * EV_PER_A3_TO_GPA)
        metrics["num_structures_with_stress"] = int(usable.sum())
    return metrics


def format_metrics(metrics: Dict[str, float]) -> str:
    """Two human-readable lines (three with stress)."""
    text = (
        f"energy MAE {metrics['energy_mae_meV']:.2f} meV ({metrics['energy_mae_kcal_mol']:.3f} kcal/mol), "
        f"RMSE {metrics['energy_rmse_meV']:.2f} meV\n"
        f"forces MAE {metrics['forces_mae_meV_per_A']:.2f} meV/Å ({metrics['forces_mae_kcal_mol_per_A']:.3f} kcal/mol/Å), "
        f"RMSE {metrics['forces_rmse_meV_per_A']:.2f} meV/Å  [{metrics['num_structures']} structures]"
    )
    if "stress_mae_meV_per_A3" in metrics:
        text += (
            f"\nstress MAE {metrics['stress_mae_meV_per_A3']:.3f} meV/Å^3 ({metrics['stress_mae_GPa']:.4f} GPa), "
            f"RMSE {metrics['stress_rmse_meV_per_A3']:.3f} meV/Å^3  [{metrics['num_structures_with_stress']} structures]"
        )
    return text
