"""Many small systems at once: ms per system-step of NVE MD for B ethanol replicas, TorchSim against ASE.

Usage: python benchmarks/torchsim.py [--systems 100] [--steps 20] [--dtype float32] [--threads 1] [--model deploy/ethanol.pt]

TorchSim integrates all replicas in one state, one batched model call per step (mlpot.engines.torchsim);
ASE runs one VelocityVerlet per replica and one MLPotCalculator evaluates them in turn, one call per
replica-step. Both start from the same geometries and momenta and take the same 0.5 fs velocity-Verlet
steps, so they follow the same trajectories (the table gives the largest position difference at the end).
The two engines take their steps in turn, so a machine shared with other jobs slows both alike; the
table gives wall-clock and CPU time (this process only).
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


class TorchSimRun:
    """All replicas in one TorchSim state; :meth:`step` is one NVE step of all of them."""

    def __init__(self, systems, model, temperature_K: float, seed: int):
        self.model = model
        state = ts.io.atoms_to_state(systems, model.device, model.dtype)
        kT = torch.tensor(temperature_K * ts.units.MetalUnits.temperature, dtype=model.dtype)
        dt = torch.tensor(TIMESTEP_FS * 1e-3 * ts.units.MetalUnits.time, dtype=model.dtype)  # ps -> internal
        init, self.update = ts.nve(model=model, dt=dt, kT=kT, seed=seed)
        self.state = init(state)
        self.momenta = self.state.momenta.double().numpy().copy()
        self.start = self.state.positions.double().numpy().copy()  # as rounded to the state's dtype

    def step(self) -> None:
        self.state = self.update(self.state)

    def positions(self) -> np.ndarray:
        return self.state.positions.double().numpy()


class ASERun:
    """One VelocityVerlet per replica, one calculator for all; :meth:`step` steps every replica in turn."""

    def __init__(self, systems, calculator, positions: np.ndarray, momenta: np.ndarray):
        self.dyns, self.forces, offset = [], [], 0
        for atoms in systems:
            atoms = atoms.copy()
            n = len(atoms)
            atoms.positions = positions[offset:offset + n]
            atoms.calc = calculator
            atoms.set_momenta(momenta[offset:offset + n])
            offset += n
            self.dyns.append(VelocityVerlet(atoms, timestep=TIMESTEP_FS * units.fs))
            self.forces.append(atoms.get_forces(md=True))

    def step(self) -> None:
        for k, dyn in enumerate(self.dyns):
            self.forces[k] = dyn.step(self.forces[k])  # one calculator call per replica-step

    def positions(self) -> np.ndarray:
        return np.concatenate([dyn.atoms.positions for dyn in self.dyns])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps of each engine first (TorchScript optimises its first calls)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=300.0, help="of the initial momenta, K")
    parser.add_argument("--model", default=str(ROOT / "deploy" / "ethanol.pt"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    systems = replicas(args.systems)
    runs = {"TorchSim + MLPotModel": TorchSimRun(systems, MLPotModel(args.model, dtype=args.dtype), args.temperature, seed=1)}
    first = runs["TorchSim + MLPotModel"]
    runs["ASE + MLPotCalculator"] = ASERun(systems, MLPotCalculator(args.model, dtype=args.dtype), first.start, first.momenta)
    wall, cpu = dict.fromkeys(runs, 0.0), dict.fromkeys(runs, 0.0)
    for step in range(args.warmup + args.steps):
        for name, run in runs.items():  # in turn: what else runs on the machine slows both alike
            tic, tic_cpu = time.perf_counter(), time.process_time()
            run.step()
            if step >= args.warmup:
                wall[name] += time.perf_counter() - tic
                cpu[name] += time.process_time() - tic_cpu

    system_steps = args.systems * args.steps
    print(f"{args.systems} ethanol replicas ({sum(len(a) for a in systems)} atoms), NVE {TIMESTEP_FS} fs, "
          f"{args.steps} timed steps after {args.warmup}, {args.dtype}, cpu, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'engine':24s} {'wall ms/system-step':>20s} {'CPU ms/system-step':>19s}")
    for name in ("ASE + MLPotCalculator", "TorchSim + MLPotModel"):
        print(f"{name:24s} {1000 * wall[name] / system_steps:20.3f} {1000 * cpu[name] / system_steps:19.3f}")
    ase_name, ts_name = "ASE + MLPotCalculator", "TorchSim + MLPotModel"
    difference = np.abs(runs[ase_name].positions() - first.positions()).max()
    print(f"TorchSim speed-up: {wall[ase_name] / wall[ts_name]:.2f}x wall, {cpu[ase_name] / cpu[ts_name]:.2f}x CPU; "
          f"largest position difference at the end: {difference:.2e} Å")


if __name__ == "__main__":
    main()
