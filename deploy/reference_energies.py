"""Give the shipped models the `average` reference energies (E0s) of their training sets, without changing
any energy or force on their training molecule, and say so in their cards.

Usage: MLPOT_DATA_DIR=... python deploy/reference_energies.py [deploy/ethanol.pt ...]   (default: all deploy/*.pt)

The shipped files were trained with E0s fitted by least squares on one composition, which splits the
molecule's energy among its elements in proportion to their counts (ethanol: every H atom about -616 eV).
Each file's per-species shift becomes one value for every element: the per-atom mean of the old shifts over
the training molecule, sum_s n_s E0_s / N. Over that composition it sums to the same total, so energies of
the training molecule stay (to float rounding) and forces, which no constant shift touches, stay exactly;
it equals the training set's mean per-atom energy (the ``average`` mode of ``model.e0s``) to the printed
difference. All other metadata is kept; the file is written atomically; running it again changes nothing.
"""

import sys
from pathlib import Path

import numpy as np
import torch

from mlpot import export, files, keys
from mlpot.data import collate
from mlpot.data.datasets import load_dataset
from mlpot.data.splits import frames_to_graphs
from mlpot.data.statistics import composition_matrix, e0_record, energy_shift, training_ranges
from mlpot.dtypes import dtype_of
from mlpot.export.torchscript import potential_from_deployed
from mlpot.train.config import load_config
from mlpot.train.loop import load_splits

HERE = Path(__file__).resolve().parent
CHECK_FRAMES = 20  # test frames on which old and new energies and forces are compared
CARD_LINE = "- reference energies (E0s):"


def recipe(path: Path) -> Path:
    """training/<molecule>-<kind>.yaml of deploy/<molecule>[-<kind>].pt (the EGNN ships without a suffix)."""
    name = path.stem if "-" in path.stem else f"{path.stem}-egnn"
    return HERE.parent / "training" / f"{name}.yaml"


def predictions(model, graphs):
    out = model(collate(graphs))
    return out[keys.ENERGY].detach().double().numpy(), out[keys.FORCES].detach().double().numpy()


def card_text(meta: dict, data_average: float) -> str:
    value = next(iter(meta["e0s"]["eV"].values()))
    return (f"{CARD_LINE} `average`, {value:.4f} eV for every element ({', '.join(meta['e0s']['eV'])}), the training "
            f"set's mean per-atom energy ({data_average:.4f} eV), set by `deploy/reference_energies.py` without changing "
            f"any energy or force of the training molecule. Total energies of other molecules are off by their atom "
            f"count times the difference of their mean per-atom energy from this one (not by an arbitrary split)")


def update_card(card: Path, line: str) -> None:
    lines = [l for l in card.read_text().splitlines() if not l.startswith(CARD_LINE)]
    at = next(i for i, l in enumerate(lines) if l.startswith("- data:")) + 1
    lines.insert(at, line)
    files.write_text(card, "\n".join(lines) + "\n")


def redeploy(path: Path) -> None:
    meta = export.read_metadata(path)
    cfg = load_config(recipe(path))
    train_frames = load_splits(cfg)[0]
    species = list(meta["species"])
    counts = composition_matrix(train_frames, species)
    if len(np.unique(counts, axis=0)) != 1:
        raise SystemExit(f"{path}: its training set has several compositions; retrain it with model.e0s instead")
    n = counts[0]
    data_average = float(energy_shift(train_frames, species, "average")[0][0])

    old = potential_from_deployed(path)
    shift = old.energy_shift.double().numpy()
    value = float(n @ shift / n.sum())
    ranges = training_ranges(train_frames)
    current = "e0s" in meta and np.allclose(shift, value, rtol=1e-7, atol=0)
    if current and all(k in meta for k in ranges) and meta.get("energy_sum") == "float64":
        print(f"{path.name}: already average ({value:.4f} eV), unchanged")
        update_card(path.with_suffix(".md"), card_text(meta, data_average))
        return
    new = potential_from_deployed(path)
    with torch.no_grad():
        new.energy_shift.fill_(value)

    test = load_dataset(meta["dataset"], split="test", data_dir=cfg.data.data_dir)
    graphs = frames_to_graphs(test.subset(range(CHECK_FRAMES)), meta["cutoff"], dtype_of(meta["dtype"]))
    before = predictions(export.load(path)[0], graphs)

    extra = export.carried_metadata(meta, new)
    extra["e0s"] = e0_record(species, [value] * len(species), "average")
    extra.update(ranges)  # what the calculators warn outside of (compositions, stretched bonds)
    extra["energy_sum"] = "float64"  # compiled by today's Potential: energies summed in float64
    tmp = path.with_name(path.stem + ".new.pt")
    export.save(new, tmp, **extra)
    after = predictions(export.load(tmp)[0], graphs)
    energy_error = float(np.max(np.abs(after[0] - before[0]) / np.abs(before[0])))
    force_error = float(np.max(np.abs(after[1] - before[1])))
    if energy_error > 1e-6 or force_error > 1e-7:
        tmp.unlink()
        raise SystemExit(f"{path}: the re-deployed file differs (energy {energy_error:.1e} relative, forces {force_error:.1e} eV/Å)")
    tmp.replace(path)  # atomic: the file was written completely under another name
    old_e0s = ", ".join(f"Z={z} {e:.2f}" for z, e in zip(species, shift))
    print(f"{path.name}: E0s {old_e0s} eV -> {value:.4f} eV each (training-set mean per-atom energy {data_average:.4f} eV, "
          f"difference {1000 * (value - data_average):.3f} meV); on {CHECK_FRAMES} test frames energies differ by "
          f"{energy_error:.1e} relative, forces by {force_error:.1e} eV/Å")
    update_card(path.with_suffix(".md"), card_text(export.read_metadata(path), data_average))


def main(paths) -> None:
    for path in paths or sorted(HERE.glob("*.pt")):
        redeploy(Path(path))


if __name__ == "__main__":
    main(sys.argv[1:])
