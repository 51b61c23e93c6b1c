"""The checks that need a GPU, in one go of a few minutes: run it the day a CUDA machine is lent.

    OMP_NUM_THREADS=1 python benchmarks/gpu_check.py [--device cuda] [--quick] [--json results.json]

1. deployed-file round trip: a TorchScript file written from a CUDA model runs on the CPU, and one written
   on the CPU runs on CUDA, with the CPU's numbers (float64: 1e-10 eV, eV/Å; float32: 1e-4);
2. a compiled training step (mlpot.train.compiled) on CUDA against the eager step on the CPU (energy,
   forces and weight gradients, float64);
3. an AOTInductor build for CUDA, loaded and run against the CPU's numbers;
4. latency (ms per energy+forces call through MLPotCalculator, ethanol and benzene) and training throughput
   (structures per second, batch of 10 ethanols) on the device.
5. with ``--peers``: mlpot (TorchScript and AOTInductor) against NequIP on the same GPU, through
   ``benchmarks/peers/run.py --device cuda`` (ASE latency, MD steps/s, training frames/s in eager and
   compiled modes, ethanol and aspirin, float32 and float64); its tables go to ``--peers-out``. NequIP
   must import in benchmarks/peers/.venvs/nequip (``setup.sh``) or, where that venv is missing, in
   this interpreter (carry its wheels to the GPU machine; it has no internet).

Without a CUDA device (``torch.cuda.is_available()`` False) it says so and exits 0 unless ``--device cpu``
is given: then every check runs CPU against CPU, which is how the script itself is tested here.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import ase.build
import numpy as np
import torch

from mlpot import export, keys
from mlpot.calculators import MLPotCalculator
from mlpot.data.graph import atoms_to_graph, collate
from mlpot.models import build_potential
from mlpot.train.compiled import CompiledTraining

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
HPARAMS = {"egnn": {"num_features": 16, "lmax": 2, "num_layers": 2, "radial_hidden": 32},
           "schnet": {"num_features": 64, "num_layers": 3}}


def potential(kind, dtype, device="cpu"):
    torch.manual_seed(0)
    return build_potential(kind, (1, 6, 8), 5.0, dtype, **HPARAMS[kind]).eval().to(device)


def outputs(model, graph):
    out = model(dict(graph))
    return out[keys.ENERGY].detach().cpu().double().numpy(), out[keys.FORCES].detach().cpu().double().numpy()


def largest_difference(a, b) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def check(name, difference, tolerance, results) -> None:
    ok = difference <= tolerance
    results[name] = {"difference": difference, "tolerance": tolerance, "ok": ok}
    print(f"{'ok  ' if ok else 'FAIL'} {name}: largest difference {difference:.2e} (tolerance {tolerance:.0e})", flush=True)


def round_trips(device, kinds, folder: Path, results) -> None:
    atoms = ase.build.molecule("CH3CH2OH")
    for kind in kinds:
        for dtype in (torch.float64, torch.float32):
            graph = atoms_to_graph(atoms, 5.0, dtype)
            want = outputs(potential(kind, dtype), graph)
            for written_on, run_on in ((device, "cpu"), ("cpu", device)):
                path = folder / f"{kind}-{written_on}.pt"
                export.save(potential(kind, dtype, written_on), path)
                model, _ = export.load(path, device=run_on, dtype=dtype)
                got = outputs(model, {k: v.to(run_on) for k, v in graph.items()})
                check(f"torchscript {kind} {str(dtype)[6:]} written on {written_on}, run on {run_on}",
                      largest_difference(got, want), TOLERANCE[dtype], results)


def compiled_step(device, kinds, results) -> None:
    graphs = [atoms_to_graph(a, 5.0, torch.float64) for a in perturbed(4)]
    for kind in kinds:
        per_device = {}
        for name, where in (("eager", "cpu"), ("compiled", device)):
            model = potential(kind, torch.float64, where).train()
            step = CompiledTraining(model) if name == "compiled" else model
            out = step(collate([{k: v.to(where) for k, v in g.items()} for g in graphs]))
            loss = out[keys.ENERGY].sum() + (out[keys.FORCES] ** 2).sum()
            grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
            per_device[name] = [out[keys.ENERGY], out[keys.FORCES], *grads]
            if name == "compiled" and not step.active:
                print(f"note: the compiled step fell back to eager on {device}: {step.failed}")
        difference = max(float((a.detach().cpu() - b.detach().cpu()).abs().max())
                         for a, b in zip(per_device["compiled"], per_device["eager"]))
        check(f"compiled training step {kind} float64 on {device} vs eager on cpu", difference, 1e-9, results)


def aoti_build(device, folder: Path, results) -> None:
    atoms = ase.build.molecule("CH3CH2OH")
    graph = atoms_to_graph(atoms, 5.0, torch.float32)
    want = outputs(potential("schnet", torch.float32), graph)
    path = folder / f"schnet-{device}.pt2"
    start = time.perf_counter()
    export.save(potential("schnet", torch.float32, device), path, format="aoti")
    built = time.perf_counter() - start
    model, _ = export.load(path, device=device)
    got = outputs(model, {k: v.to(device) for k, v in graph.items()})
    check(f"AOTInductor schnet float32 built for {device} ({built:.0f} s)", largest_difference(got, want), 1e-4, results)


def perturbed(n, name="CH3CH2OH"):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        atoms = ase.build.molecule(name)
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        out.append(atoms)
    return out


def latency_and_throughput(device, kinds, folder: Path, calls: int, results) -> None:
    molecules = {"ethanol": ase.build.molecule("CH3CH2OH"), "benzene": ase.build.molecule("C6H6")}
    for kind in kinds:
        for dtype in (torch.float32, torch.float64):
            path = folder / f"latency-{kind}-{dtype}.pt"
            export.save(potential(kind, dtype), path)
            calc = MLPotCalculator(str(path), device=device)
            for name, atoms in molecules.items():
                atoms = atoms.copy()
                atoms.calc = calc
                rng = np.random.default_rng(0)
                base = atoms.positions.copy()
                times = []
                for call in range(calls + 10):
                    atoms.positions = base + rng.normal(scale=0.01, size=base.shape)
                    sync(device)
                    start = time.perf_counter()
                    atoms.get_forces()
                    sync(device)
                    if call >= 10:
                        times.append(time.perf_counter() - start)
                ms = 1000 * float(np.median(times))
                results[f"latency {kind} {str(dtype)[6:]} {name} ms"] = ms
                print(f"latency {kind} {str(dtype)[6:]} {name}: {ms:.2f} ms per energy+forces call on {device}")
        model = potential(kind, torch.float32, device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        batch = collate([{k: v.to(device) for k, v in atoms_to_graph(a, 5.0, torch.float32).items()} for a in perturbed(10)])
        steps = max(5, calls // 4)
        for step in range(steps + 3):
            if step == 3:
                sync(device)
                start = time.perf_counter()
            out = model(dict(batch))
            loss = (out[keys.FORCES] ** 2).mean() + out[keys.ENERGY].var()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        sync(device)
        rate = 10 * steps / (time.perf_counter() - start)
        results[f"training {kind} float32 structures per s"] = rate
        print(f"training {kind} float32 on {device}: {rate:.0f} structures/s (batches of 10 ethanols, eager)")


def peers_on_device(device, out: Path, quick: bool, impls: str) -> dict:
    """mlpot against NequIP on ``device`` with the peers benchmark's own protocol; the ratios are in its tables."""
    import subprocess

    command = [sys.executable, str(Path(__file__).parent / "peers" / "run.py"), "--device", device,
               "--impls", impls, "--molecules", "ethanol,aspirin", "--out", str(out),
               *(["--quick"] if quick else ["--calls", "100", "--md-rounds", "2", "--train-rounds", "2"])]
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command)
    table = out / ("results-quick.md" if quick else "results.md")
    if table.is_file():
        print(table.read_text())
    return {"returncode": done.returncode, "tables": str(table), "ok": done.returncode == 0}


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="schnet only, few calls, no AOTInductor build")
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--peers", action="store_true", help="also mlpot vs NequIP on the device (benchmarks/peers)")
    parser.add_argument("--peers-impls", default="mlpot-egnn,mlpot-egnn-aoti,nequip")
    parser.add_argument("--peers-out", type=Path, default=Path("gpu-peers"), help="folder of the peers tables")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: the GPU checks are skipped (run with --device cpu to check the script itself)")
        return 0
    kinds = ["schnet"] if args.quick else ["schnet", "egnn"]
    results = {"device": args.device, "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    with tempfile.TemporaryDirectory() as folder:
        round_trips(args.device, kinds, Path(folder), results)
        compiled_step(args.device, kinds, results)
        if not args.quick:
            aoti_build(args.device, Path(folder), results)
        latency_and_throughput(args.device, kinds, Path(folder), 5 if args.quick else args.calls, results)
    if args.peers:
        results["peers"] = peers_on_device(args.device, args.peers_out, args.quick, args.peers_impls)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    failed = [name for name, r in results.items() if isinstance(r, dict) and not r["ok"]]
    print("all checks passed" if not failed else f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
