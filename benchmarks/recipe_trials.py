"""Recipe changes tried on the accuracy-against-time curve (issue 16 item 3): the ethanol EGNN recipe
(`training/ethanol-egnn.yaml`) trained once per variant at a short wall-clock budget, one thread, and tested on
the whole rMD17 split 01 test file. A change is kept in the recipes only where it beats the baseline.

    python benchmarks/recipe_trials.py --budget 480 --core 1        # runs what is missing, then writes the table
    python benchmarks/recipe_trials.py --render                     # the table from the results file only

Each variant trains into runs/recipe-trials/<name> (resumable: a finished run is read, not rerun; an
interrupted one continues with `mlpot-train --resume`). Results go to benchmarks/recipe_trials.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "training" / "ethanol-egnn.yaml"
RESULTS = Path(__file__).with_suffix(".json")
TABLE = Path(__file__).with_suffix(".md")

# name -> (what it changes, config overrides). "baseline" is the recipe itself.
VARIANTS = {
    "baseline": ("the recipe (batch 5, lr 5e-3, force weight 100, EMA 0.99, even parity)", []),
    "batch-2": ("batch size 2", ["train.batch_size=2"]),
    "batch-10": ("batch size 10", ["train.batch_size=10"]),
    "lr-1e-2": ("learning rate 1e-2", ["train.lr=1.0e-2"]),
    "forces-1000": ("force weight 1000", ["train.forces_weight=1000.0"]),
    "ema-0.999": ("EMA decay 0.999", ["train.ema_decay=0.999"]),
    "parity": ("odd parity too (parity: true)", ["model.hparams.parity=true"]),
}


def run_variant(name: str, budget: float, core: int | None, runs: Path) -> dict:
    run_dir = runs / name
    metrics = run_dir / "metrics.json"
    if not metrics.exists():
        prefix = ["taskset", "-c", str(core)] if core is not None else []
        if (run_dir / "last.pt").exists():
            cmd = prefix + [sys.executable, "-m", "mlpot", "train", "--resume", str(run_dir), "--quiet"]
        else:
            sets = [f"run_dir={run_dir}", f"train.max_time={budget}"] + VARIANTS[name][1]
            cmd = prefix + [sys.executable, "-m", "mlpot", "train", str(RECIPE), "--quiet"]
            for s in sets:
                cmd += ["--set", s]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    m = json.loads(metrics.read_text())
    with open(run_dir / "log.csv") as f:
        curve = [(float(r["time_s"]), float(r["val_forces_mae_meV_per_A"])) for r in csv.DictReader(f)]
    return {
        "name": name, "change": VARIANTS[name][0], "overrides": VARIANTS[name][1], "budget_s": budget,
        "epochs": m["epochs_run"], "best_epoch": m["best_epoch"], "train_time_s": m["train_time_s"],
        "test_energy_mae_meV": m["test"]["energy_mae_meV"], "test_forces_mae_meV_per_A": m["test"]["forces_mae_meV_per_A"],
        "val_curve": curve,
    }


def render(results: dict) -> str:
    rows = results["runs"]
    base = next((r for r in rows if r["name"] == "baseline"), None)
    lines = [
        f"# Recipe trials: ethanol EGNN, {rows[0]['budget_s'] / 60:.0f} min of training each (compile included), one thread",
        "",
        "Each row changes one setting of `training/ethanol-egnn.yaml`; test = rMD17 ethanol split 01 (1000 frames).",
        "Kept only where the test force MAE beats the baseline's at the same budget. Written by `benchmarks/recipe_trials.py`.",
        "",
        "| variant | change | epochs | energy MAE meV | force MAE meV/Å | vs baseline | decision |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if base is None or r is base:
            vs, decision = ("1.00x", "") if r is base else ("-", "no baseline yet")
        else:
            ratio = r["test_forces_mae_meV_per_A"] / base["test_forces_mae_meV_per_A"]
            vs, decision = f"{ratio:.2f}x", ("better: keep" if ratio < 0.97 else "dropped")
            if r.get("shared_machine") != base.get("shared_machine"):
                decision = "not comparable: " + ("this run" if r.get("shared_machine") else "the baseline") + \
                    " shared the machine (rerun)"
        lines.append(f"| {r['name']} | {r['change']} | {r['epochs']} | {r['test_energy_mae_meV']:.2f} | "
                     f"{r['test_forces_mae_meV_per_A']:.2f} | {vs} | {decision} |")
    lines += ["", "'better' needs a 3 % margin: one seed per variant, and run-to-run spread of a seed change is a few %."]
    if any(r.get("shared_machine") for r in rows):
        lines.append("- shared machine: run in an earlier session while other jobs took CPU time from it (far fewer epochs "
                     "than a quiet core gives in the same budget); compared only with runs made the same way.")
    if base:
        for r in rows:
            same_batch = not any(o.startswith("train.batch_size") for o in r["overrides"])
            if (r is not base and same_batch and abs(r["epochs"] / base["epochs"] - 1) > 0.15
                    and r.get("shared_machine") == base.get("shared_machine")):
                lines.append(f"- {r['name']}: {r['epochs']} epochs against the baseline's {base['epochs']} at the same batch size: "
                             "the two got different CPU shares, so the comparison is not yet fair; rerun both on a quiet machine.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=480.0, help="training seconds per variant")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS) + " (default: all)")
    p.add_argument("--core", type=int, default=None, help="pin the trainings to this CPU core")
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "recipe-trials"))
    p.add_argument("--render", action="store_true", help="only rewrite the table from the results file")
    args = p.parse_args(argv)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": []}
    if not args.render:
        for name in args.variants.split(","):
            if name not in VARIANTS:
                p.error(f"unknown variant {name!r}: use {', '.join(VARIANTS)}")
            row = run_variant(name, args.budget, args.core, Path(args.runs_dir))
            results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": []}  # another process may have added rows
            results["runs"] = [r for r in results["runs"] if r["name"] != name] + [row]
            results["runs"].sort(key=lambda r: list(VARIANTS).index(r["name"]))
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")
            TABLE.write_text(render(results))
    TABLE.write_text(render(results))
    print(TABLE.read_text())


if __name__ == "__main__":
    main()
