"""Errors of predicted energies and forces, in meV and meV/Å (kcal/mol alongside, as MD17 papers use)."""

from typing import Dict, List

import numpy as np

from mlpot import keys
from mlpot.data.graph import Graph, collate
from mlpot.units import EV_TO_MEV, KCAL_PER_MOL_TO_EV


def predict(model, graphs: List[Graph], batch_size: int = 50) -> Dict[str, np.ndarray]:
    """Run ``model`` (a Potential or a deployed module) over ``graphs``; float64 numpy results in eV, eV/Å."""
    energy, energy_ref, forces, forces_ref, num_atoms = [], [], [], [], []
    for start in range(0, len(graphs), batch_size):
        batch = collate(graphs[start : start + batch_size])
        out = model(batch)
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
    return result


def error_metrics(pred: Dict[str, np.ndarray]) -> Dict[str, float]:
    """MAE and RMSE of energy (per structure) and force components, in meV, meV/Å and kcal/mol(/Å)."""
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
    return metrics


def format_metrics(metrics: Dict[str, float]) -> str:
    """Two human-readable lines."""
    return (
        f"energy MAE {metrics['energy_mae_meV']:.2f} meV ({metrics['energy_mae_kcal_mol']:.3f} kcal/mol), "
        f"RMSE {metrics['energy_rmse_meV']:.2f} meV\n"
        f"forces MAE {metrics['forces_mae_meV_per_A']:.2f} meV/Å ({metrics['forces_mae_kcal_mol_per_A']:.3f} kcal/mol/Å), "
        f"RMSE {metrics['forces_rmse_meV_per_A']:.2f} meV/Å  [{metrics['num_structures']} structures]"
    )

