"""The floor: FLOPs of one energy+forces call of mlpot's EGNN (and SchNet), and the time they take at this CPU's
measured single-thread matmul throughput.

Usage: python benchmarks/peers/flops.py [--threads 1] [--models egnn,schnet] [--json out.json]

Counting: every aten op of one eager energy+forces call (forward and the autograd backward for the forces) goes
through a TorchDispatchMode that applies torch.utils.flop_counter's formulas (the ones FlopCounterMode uses) to
mm/addmm/bmm/baddbmm/conv; e3nn's tensor products (codegen'd einsums) reach these as bmm/mm, and the check below
compares the count for one TensorProduct with its analytic cost. Elementwise ops, gathers and scatters are not
matmuls: their written elements are reported separately (roughly one FLOP each, memory-bound).

Floors, per molecule and dtype:
  * peak floor = matmul FLOPs / peak single-thread GEMM throughput (1024^3 matmul)
  * shape floor = the same matmuls (every shape the model runs, with its count) timed back to back on this CPU,
    which is what the FLOPs cost at the sizes that matter (small: tens to hundreds of rows).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import protocol  # noqa: E402  (the same counting code the peers' workers use)
from impl_mlpot import MLPot  # noqa: E402


def _time(fn, min_time: float = 0.05, repeats: int = 5) -> float:
    """Median seconds per call of ``fn``, each measurement looping until ``min_time``."""
    fn()
    n = 1
    while True:
        tic = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - tic > min_time / 5:
            break
        n *= 2
    samples = []
    for _ in range(repeats):
        tic = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - tic) / n)
    return statistics.median(samples)


def peak_gflops(dtype: torch.dtype, size: int = 1024) -> float:
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    t = _time(lambda: torch.mm(a, b), min_time=0.5, repeats=3)
    return 2 * size**3 / t / 1e9


def gflops_at(dtype: torch.dtype, m: int, k: int, n: int, batch: int = 1) -> float:
    a = torch.randn(batch, m, k, dtype=dtype)
    b = torch.randn(batch, k, n, dtype=dtype)
    fn = (lambda: torch.bmm(a, b)) if batch > 1 else (lambda: torch.mm(a[0], b[0]))
    return 2 * batch * m * k * n / _time(fn) / 1e9


def shapes_time(shapes, dtype: torch.dtype) -> dict:
    """Seconds that the given matmuls ([[batch, m, k, n], count], ...) take, each timed alone, summed."""
    total, flops = 0.0, 0
    for (batch, m, k, n), count in shapes:
        a = torch.randn(batch, m, k, dtype=dtype)
        b = torch.randn(batch, k, n, dtype=dtype)
        fn = (lambda a=a, b=b: torch.bmm(a, b)) if batch > 1 else (lambda a=a, b=b: torch.mm(a[0], b[0]))
        total += count * _time(fn, min_time=0.01, repeats=3)
        flops += count * 2 * batch * m * k * n
    return {"seconds": total, "flops": flops, "gflops": flops / total / 1e9 if total else 0.0}


def throughput_table(dtype: torch.dtype) -> dict:
    """GFLOP/s at the shapes EGNN/SchNet run for these molecules: (edges x 64) @ (64 x W), and a peak."""
    out = {"peak_1024": peak_gflops(dtype)}
    for edges in (72, 210, 420):  # directed pairs within 5 Å: ethanol (9 atoms), toluene (15), aspirin (21)
        for w in (64, 192, 1152):
            out[f"{edges}x64@64x{w}"] = gflops_at(dtype, edges, 64, w)
    return out


def tp_check() -> dict:
    """Does the counter see e3nn's TensorProduct? Compare its count with the analytic cost of the same paths."""
    from e3nn import o3

    from mlpot.models.egnn import Interaction

    irreps = o3.Irreps("32x0e+32x1o+32x2e")
    sh = o3.Irreps.spherical_harmonics(2)
    layer = Interaction(irreps, sh, irreps, 3, 8, 64, 2, 10.0)
    tp = layer.tp
    edges = 210
    x = irreps.randn(edges, -1)
    y = sh.randn(edges, -1)
    w = torch.randn(edges, tp.weight_numel)
    counted = protocol.flops_of(lambda: tp(x, y, w))
    # analytic, per edge and instruction (uvu, mul u): contracting the (2l1+1)(2l2+1) products of x1 and Y with the
    # Clebsch-Gordan (Wigner 3j) tensor into 2l3+1 outputs for each of the u channels, 2 FLOPs per multiply-add,
    # with the dense tensor (what a matmul does) and with only its nonzero entries (the least any code must do)
    dense = sparse = 0
    for ins in tp.instructions:
        l1 = tp.irreps_in1[ins.i_in1].ir.l
        l2 = tp.irreps_in2[ins.i_in2].ir.l
        l3 = tp.irreps_out[ins.i_out].ir.l
        mul = tp.irreps_in1[ins.i_in1].mul
        nnz = int((o3.wigner_3j(l1, l2, l3).abs() > 1e-10).sum())
        dense += edges * mul * (2 * (2 * l1 + 1) * (2 * l2 + 1) * (2 * l3 + 1) + (2 * l3 + 1))
        sparse += edges * mul * (2 * nnz + (2 * l3 + 1))
    return {"edges": edges, "paths": len(tp.instructions), "counted_matmul_flops": counted["flops"],
            "counted_per_op": counted["per_op"], "other_op_elements": counted["other_op_elements"],
            "other_ops": counted["other_ops"], "analytic_dense_cg_flops": dense, "analytic_sparse_cg_flops": sparse}


def model_flops(kind: str, molecule: str) -> dict:
    from types import SimpleNamespace

    impl = MLPot(SimpleNamespace(model=kind, format="torchscript"))
    return impl.flops(molecule, "float64")


def floors(count: dict, dtypes=("float32", "float64")) -> dict:
    out = {}
    for name in dtypes:
        dtype = getattr(torch, name)
        timed = shapes_time(count["matmul_shapes"], dtype)
        out[name] = {"shape_floor_ms": 1000 * timed["seconds"], "shape_gflops": timed["gflops"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="egnn,schnet")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"threads": torch.get_num_threads(), "torch": torch.__version__, "throughput_gflops": {}}
    for name in ("float32", "float64"):
        report["throughput_gflops"][name] = throughput_table(getattr(torch, name))
    print(f"matmul GFLOP/s, {torch.get_num_threads()} thread(s):")
    for name, table in report["throughput_gflops"].items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in table.items()))
    report["tp_check"] = tp_check()
    tc = report["tp_check"]
    print(f"e3nn TensorProduct (32x0e+32x1o+32x2e x Y<=2, {tc['paths']} uvu paths, {tc['edges']} edges): counter sees "
          f"{tc['counted_matmul_flops'] / 1e6:.2f} MFLOP ({tc['counted_per_op']}) plus "
          f"{tc['other_op_elements'] / 1e6:.2f} M elements written by uncounted (elementwise) ops; analytic cost "
          f"{tc['analytic_sparse_cg_flops'] / 1e6:.2f} MFLOP with the nonzero Clebsch-Gordan entries only, "
          f"{tc['analytic_dense_cg_flops'] / 1e6:.2f} MFLOP dense")
    report["models"] = {}
    print("| model | molecule | MFLOP per E+F call | other-op Melem | peak floor f32 / f64 ms | shape floor f32 / f64 ms |")
    print("|---|---|---|---|---|---|")
    for kind in args.models.split(","):
        for molecule in protocol.MOLECULES:
            count = model_flops(kind, molecule)
            fl = floors(count)
            peak = {n: count["flops"] / (report["throughput_gflops"][n]["peak_1024"] * 1e9) * 1000 for n in fl}
            report["models"][f"{kind}/{molecule}"] = {"count": count, "floors": fl, "peak_floor_ms": peak}
            print(f"| {kind} | {molecule} | {count['flops'] / 1e6:.2f} | {count['other_op_elements'] / 1e6:.2f} | "
                  f"{peak['float32']:.3f} / {peak['float64']:.3f} | "
                  f"{fl['float32']['shape_floor_ms']:.3f} / {fl['float64']['shape_floor_ms']:.3f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
