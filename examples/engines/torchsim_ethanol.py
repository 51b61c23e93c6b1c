"""100 ethanol replicas at once in TorchSim: Langevin MD at 300 K, one batched model call per step.

Usage: python examples/engines/torchsim_ethanol.py [--systems 100] [--steps 200] [--model deploy/ethanol.pt]
MLPOT_EXAMPLE_QUICK=1 runs 10 replicas for 10 steps. Needs TorchSim (pip install torch-sim-atomistic==0.3.0).
benchmarks/torchsim.py times it against ASE.
"""

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch_sim as ts
from ase.build import molecule

from mlpot.engines.torchsim import MLPotModel

ROOT = Path(__file__).resolve().parents[2]
QUICK = os.environ.get("MLPOT_EXAMPLE_QUICK") == "1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", type=int, default=10 if QUICK else 100)
    parser.add_argument("--steps", type=int, default=10 if QUICK else 200)
    parser.add_argument("--model", default=str(ROOT / "deploy" / "ethanol.pt"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    rng = np.random.default_rng(0)
    systems = []
    for _ in range(args.systems):  # each replica its own system, displaced by up to 0.05 Å
        atoms = molecule("CH3CH2OH")
        atoms.positions += rng.uniform(-0.05, 0.05, size=atoms.positions.shape)
        systems.append(atoms)
    model = MLPotModel(args.model)
    tic = time.perf_counter()
    state = ts.integrate(system=systems, model=model, integrator=ts.nvt_langevin, n_steps=args.steps,
                         temperature=300.0, timestep=0.0005)  # ps
    elapsed = time.perf_counter() - tic
    temperature = ts.quantities.calc_temperature(masses=state.masses, momenta=state.momenta, system_idx=state.system_idx)
    energy = model(state)["energy"]
    print(f"{args.systems} replicas after {args.steps} steps of 0.5 fs: Epot {energy.mean():.4f} eV "
          f"(spread {energy.std():.4f} eV), T {temperature.mean():.1f} K (spread {temperature.std():.1f} K)")
    print(f"{args.steps} steps in {elapsed:.1f} s: {1000 * elapsed / (args.steps * args.systems):.3f} ms per system-step "
          f"(TorchScript's first calls included; benchmarks/torchsim.py times warm steps)")


if __name__ == "__main__":
    main()
