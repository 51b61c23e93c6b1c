"""Many small systems at once: ms per system-step of NVE MD for B ethanol replicas, TorchSim against ASE.

Usage: python benchmarks/torchsim.py [--systems 100] [--steps 20] [--dtype float32] [--threads 1] [--model deploy/ethanol.pt]

TorchSim integrates all replicas in one state, one batched model call per step (mlpot.engines.torchsim);
ASE runs one VelocityVerlet per replica and one MLPotCalculator evaluates them in turn, one call per
replica-step. Both start from the same geometries and momenta and use the same 0.5 fs velocity-Verlet
step, so they follow the same trajectories: the table gives the largest position difference at the end.
"""

import argparse
import time
from pathlib import Path

import ase.build
import numpy as np
import torch
import torch_sim as ts
from ase import units
from ase.md.verlet import VelocityVerlet

from mlpot.calculators import MLPotCalculator
from mlpot.engines.torchsim import MLPotModel

ROOT = Path(__file__).resolve().parents[1]
TIMESTEP_FS = 0.5


def replicas(count: int, seed: int = 0):
    """``count`` ethanols, each displaced by up to 0.05 Å at random (every replica is its own system)."""
    rng = np.random.default_rng(seed)
    systems = []
    for _ in range(count):
        atoms = ase.build.molecule("CH3CH2OH")
        atoms.positions += rng.uniform(-0.05, 0.05, size=atoms.positions.shape)
        systems.append(atoms)
    return systems


def run_torchsim(systems, model, steps: int, temperature_K: float, seed: int):
    """(seconds for ``steps`` NVE steps after one warm-up step, initial momenta, final positions (B*N, 3))."""
    state = ts.io.atoms_to_state(systems, model.device, model.dtype)
    kT = torch.tensor(temperature_K * ts.units.MetalUnits.temperature, dtype=model.dtype)
    dt = torch.tensor(TIMESTEP_FS * 1e-3 * ts.units.MetalUnits.time, dtype=model.dtype)  # ps -> internal
    init, update = ts.nve(model=model, dt=dt, kT=kT, seed=seed)
    state = init(state)
    momenta = state.momenta.clone()
    start = state.positions.clone()
    state = update(state)  # warm-up: TorchScript's first calls optimise the graph
    state.positions, state.momenta = start.clone(), momenta.clone()  # back to the start, so ASE can follow
    state.forces = model(state)["forces"]
    tic = time.perf_counter()
    for _ in range(steps):
        state = update(state)
    return time.perf_counter() - tic, momenta.double().numpy(), state.positions.double().numpy()


def run_ase(systems, calculator, momenta: np.ndarray, steps: int):
    """(seconds for ``steps`` velocity-Verlet steps of every replica in turn, final positions (B*N, 3))."""
    dyns, forces, offset = [], [], 0
    for atoms in systems:
        atoms = atoms.copy()
        atoms.calc = calculator
        atoms.set_momenta(momenta[offset:offset + len(atoms)])
        offset += len(atoms)
        dyns.append(VelocityVerlet(atoms, timestep=TIMESTEP_FS * units.fs))
        forces.append(atoms.get_forces(md=True))
    tic = time.perf_counter()
    for _ in range(steps):
        for k, dyn in enumerate(dyns):
            forces[k] = dyn.step(forces[k])  # one calculator call per replica-step
    return time.perf_counter() - tic, np.concatenate([dyn.atoms.positions for dyn in dyns])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=300.0, help="of the initial momenta, K")
    parser.add_argument("--model", default=str(ROOT / "deploy" / "ethanol.pt"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    systems = replicas(args.systems)
    model = MLPotModel(args.model, dtype=args.dtype)
    ts_seconds, momenta, ts_positions = run_torchsim(systems, model, args.steps, args.temperature, seed=1)
    # ASE starts from TorchSim's state positions (rounded to its dtype), so both runs see the same numbers
    start = ts.io.atoms_to_state(systems, model.device, model.dtype).positions.double().numpy()
    offset = 0
    for atoms in systems:
        atoms.positions = start[offset:offset + len(atoms)]
        offset += len(atoms)
    ase_seconds, ase_positions = run_ase(systems, MLPotCalculator(args.model, dtype=args.dtype), momenta, args.steps)

    system_steps = args.systems * args.steps
    atoms = sum(len(a) for a in systems)
    print(f"{args.systems} ethanol replicas ({atoms} atoms), NVE {TIMESTEP_FS} fs x {args.steps} steps, "
          f"{args.dtype}, cpu, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"{'engine':28s} {'ms/system-step':>15s} {'total s':>9s}")
    print(f"{'ASE + MLPotCalculator':28s} {1000 * ase_seconds / system_steps:15.3f} {ase_seconds:9.2f}")
    print(f"{'TorchSim + MLPotModel':28s} {1000 * ts_seconds / system_steps:15.3f} {ts_seconds:9.2f}")
    print(f"TorchSim speed-up: {ase_seconds / ts_seconds:.1f}x; "
          f"largest position difference at the end: {np.abs(ase_positions - ts_positions).max():.2e} Å")


if __name__ == "__main__":
    main()
