#!/usr/bin/env bash
# Retrain every recipe (molecule x model) and collect the deployed files and model cards into deploy/.
# Each run takes up to train.max_time seconds (45 min) on one CPU thread; pass --set overrides through.
set -euo pipefail
cd "$(dirname "$0")/.."
for recipe in training/*-{gcn,schnet,egnn}.yaml; do
    name=$(basename "$recipe" .yaml)
    if [ -f "runs/$name/metrics.json" ]; then echo "skip $name (done)"; continue; fi
    if [ -f "runs/$name/last.pt" ]; then
        mlpot-train --resume "runs/$name" --quiet "$@"
    else
        mlpot-train "$recipe" --quiet "$@"
    fi
done
python deploy/collect.py runs/{ethanol,toluene,aspirin}-{egnn,schnet}
