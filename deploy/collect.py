"""Copy trained runs' model.pt into deploy/ and write a model card next to each.

Usage: python deploy/collect.py runs/ethanol-egnn [runs/...]
The EGNN of a molecule ships as ``<molecule>.pt``; other kinds as ``<molecule>-<kind>.pt``.
"""

import json
import shutil
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def e0_line(run: Path) -> str:
    """The card's line on the reference energies (E0s) the run's model.pt records."""
    from mlpot import export

    e0s = export.read_metadata(run / "model.pt").get("e0s")
    if e0s is None:
        return "- reference energies (E0s): not recorded (a model.pt from before model.e0s)"
    values = ", ".join(f"{symbol} {energy:.4f}" for symbol, energy in e0s["eV"].items())
    return f"- reference energies (E0s): `{e0s['mode']}`: {values} eV (`model.e0s`)"


def card(name: str, run: Path, metrics: dict, config: dict) -> str:
    test, model = metrics["test"], metrics["model"]
    lines = [
        f"# {name}",
        "",
        f"- model kind: `{model['kind']}`, cutoff {model['cutoff']} Å, {model['dtype']}, "
        f"{metrics['num_parameters']} parameters",
        f"- hyperparameters: `{json.dumps(model['hparams'], sort_keys=True)}`",
        f"- data: `{metrics['dataset']}`; {metrics['train_size']} training and {metrics['val_size']} validation "
        f"frames drawn (seed {config['data']['seed']}) from its training file; test set: "
        f"{test['num_structures']} frames of `{Path(metrics['test_source']).name}`",
        e0_line(run),
        f"- training: {metrics['epochs_run']} epochs (best {metrics['best_epoch']}, stopped by {metrics['stopped_by']}), "
        f"{metrics['train_time_s'] / 60:.1f} min on {metrics['hardware']}; batch {config['train']['batch_size']}, "
        f"lr {config['train']['lr']}, {config['train']['scheduler']} schedule, EMA {config['train']['ema_decay']}, "
        f"force weight {config['train']['forces_weight']}"
        f"{', compiled training steps (train.compile)' if config['train'].get('compile') else ''}",
        f"- recipe: `training/{run.name}.yaml` (`mlpot-train training/{run.name}.yaml`)",
        "",
        "| test set | MAE | RMSE |",
        "|---|---|---|",
        f"| energy | {test['energy_mae_meV']:.2f} meV ({test['energy_mae_kcal_mol']:.3f} kcal/mol) | {test['energy_rmse_meV']:.2f} meV |",
        f"| forces | {test['forces_mae_meV_per_A']:.2f} meV/Å ({test['forces_mae_kcal_mol_per_A']:.3f} kcal/mol/Å) | "
        f"{test['forces_rmse_meV_per_A']:.2f} meV/Å |",
        "",
    ]
    return "\n".join(lines)


def main(runs) -> None:
    for run in map(Path, runs):
        if not (run / "metrics.json").is_file():
            print(f"skip {run}: no metrics.json (unfinished)")
            continue
        metrics = json.loads((run / "metrics.json").read_text())
        config = yaml.safe_load((run / "config.yaml").read_text())
        molecule, kind = run.name.rsplit("-", 1)
        name = molecule if kind == "egnn" else f"{molecule}-{kind}"
        shutil.copyfile(run / "model.pt", HERE / f"{name}.pt")
        (HERE / f"{name}.md").write_text(card(name, run, metrics, config))
        print(f"deploy/{name}.pt  forces MAE {metrics['test']['forces_mae_meV_per_A']:.2f} meV/Å")


if __name__ == "__main__":
    main(sys.argv[1:])
