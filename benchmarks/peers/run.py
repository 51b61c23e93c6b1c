"""mlpot against NequIP, MACE and SchNetPack in ONE interleaved run: ASE energy+forces latency, ASE MD steps/s,
training frames/s, and the FLOP floor. Writes results.md and results.json beside this file.

Usage (after `bash benchmarks/peers/setup.sh`), with mlpot's dev venv:
    python benchmarks/peers/run.py [--quick] [--calls 200] [--threads 1]
        [--impls mlpot-egnn,mlpot-egnn-aoti,mlpot-schnet,mlpot-schnet-aoti,nequip,mace,schnetpack]
        [--molecules ethanol,toluene,aspirin] [--dtypes float32,float64]

Every implementation runs in its own worker process (worker.py, in its own venv); the driver interleaves them
round-robin in small rounds (--per-round calls each, the starting implementation rotating) so that all see the
same machine load. Comparisons are like with like: mlpot egnn vs NequIP and MACE, mlpot schnet vs SchNetPack.
Both mlpot deploy formats (TorchScript and AOTInductor) are separate implementations in the same run; training
(eager, format-independent) and the FLOP count run once per mlpot model.
"""

import argparse
import datetime
import json
import os
import platform
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # benchmarks/timing.py: the latency statistics, shared with the workers

from timing import quartiles  # noqa: E402

# mlpot implementations: name -> (model kind, deploy format); the first of each kind's list in CLASSES is the
# TorchScript one, which also runs training and the FLOP count (eager, the same for every format)
MLPOT_IMPLS = {"mlpot-egnn": ("egnn", "torchscript"), "mlpot-egnn-aoti": ("egnn", "aoti"),
               "mlpot-schnet": ("schnet", "torchscript"), "mlpot-schnet-aoti": ("schnet", "aoti")}
FORMAT_LABEL = {"torchscript": "TorchScript", "aoti": "AOTI"}
PEER_LABEL = {"mlpot-egnn": "mlpot egnn TorchScript", "mlpot-egnn-aoti": "mlpot egnn AOTI",
              "mlpot-schnet": "mlpot schnet TorchScript", "mlpot-schnet-aoti": "mlpot schnet AOTI",
              "nequip": "NequIP", "mace": "MACE", "schnetpack": "SchNetPack",
              # training modes other than eager are stored as "<implementation>+<mode>"
              "nequip+compile": "NequIP (compile)"}
CLASSES = {"egnn": (["mlpot-egnn", "mlpot-egnn-aoti"], ["nequip", "nequip+compile", "mace"]),
           "schnet": (["mlpot-schnet", "mlpot-schnet-aoti"], ["schnetpack"])}
DEFAULT_IMPLS = ",".join([*MLPOT_IMPLS, "nequip", "mace", "schnetpack"])
LATENCY_TARGET = 0.5  # mlpot latency <= 0.5x the fastest peer
TRAIN_TARGET = 2.0  # mlpot training frames/s >= 2x the fastest peer


class WorkerError(RuntimeError):
    pass


class Worker:
    """One worker.py subprocess speaking JSON lines."""

    def __init__(self, name: str, python: Path, args: list, env: dict, log_path: Path):
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "a")
        self.log.write(f"\n=== {datetime.datetime.now().isoformat()} {python} worker.py {' '.join(args)}\n")
        self.log.flush()
        self.proc = subprocess.Popen([str(python), str(HERE / "worker.py"), *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, env=env, text=True, bufsize=1)
        self.dead = None
        self._read(timeout=300)

    def _read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.dead = f"no answer within {timeout:.0f} s"
            self.proc.kill()
            raise WorkerError(self.dead)
        line = self.proc.stdout.readline()
        if not line:
            self.dead = f"worker exited (rc {self.proc.poll()}); see {self.log_path}"
            raise WorkerError(self.dead)
        msg = json.loads(line)
        if not msg.get("ok"):
            raise WorkerError(msg.get("error", "?"))
        return msg.get("result", msg)

    def ask(self, timeout: float = 600, **req) -> dict:
        if self.dead:
            raise WorkerError(self.dead)
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001
                self.proc.kill()
        self.log.close()


def python_of(impl: str) -> Path:
    """The interpreter of an implementation's worker: its own venv (setup.sh) where there is one, else this one
    (e.g. a GPU machine with the peer installed beside mlpot)."""
    venv = HERE / ".venvs" / impl / "bin" / "python"
    if impl.startswith("mlpot") or not venv.is_file():
        return Path(sys.executable)
    return venv


def worker_args(name: str, args) -> list:
    common = ["--threads", str(args.threads), "--device", args.device]
    if name in MLPOT_IMPLS:
        kind, fmt = MLPOT_IMPLS[name]
        return ["--impl", "mlpot", "--model", kind, "--format", fmt, *common]
    return ["--impl", name, *common]


def expand_impls(spec: str) -> list:
    """--impls names; ``mlpot`` stands for all four mlpot implementations (two models x two formats)."""
    names = []
    for impl in spec.split(","):
        impl = impl.strip()
        new = list(MLPOT_IMPLS) if impl == "mlpot" else [impl]
        for n in new:
            if n not in PEER_LABEL:
                raise SystemExit(f"unknown implementation {n!r}; choose from mlpot, {', '.join(PEER_LABEL)}")
            if n not in names:
                names.append(n)
    return names


def eager_runners(names) -> list:
    """The implementations that run training and the FLOP count: every peer, and one mlpot implementation per
    model (TorchScript if selected, else AOTI): those run mlpot's eager model, whatever the deploy format."""
    out = []
    for n in names:
        if n in MLPOT_IMPLS:
            kind = MLPOT_IMPLS[n][0]
            if any(MLPOT_IMPLS.get(m, (None,))[0] == kind for m in out):
                continue
        out.append(n)
    return out


def train_key(name: str, mode: str) -> str:
    """Results key of one training mode: the implementation's name for eager, "<name>+<mode>" otherwise."""
    return name if mode == "eager" else f"{name}+{mode}"


def mlpot_commit() -> str:
    """`git rev-parse --short HEAD` of the mlpot checkout, plus -dirty when tracked files differ from HEAD or
    there are untracked files in the mlpot package (this benchmark folder, untracked, does not count)."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        tracked = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        untracked = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=all",
                                    "--", "mlpot"], capture_output=True, text=True, timeout=30, check=True).stdout
        dirty = bool(tracked) or any(line.startswith("??") for line in untracked.splitlines())
        return head + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return "?"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="timed latency calls per molecule/dtype/impl")
    parser.add_argument("--per-round", type=int, default=20, help="calls per implementation per round")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls per molecule/dtype/impl first")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="where every implementation runs its models (cuda on a GPU)")
    parser.add_argument("--impls", default=DEFAULT_IMPLS,
                        help="comma-separated; 'mlpot' stands for the four mlpot-* (egnn/schnet x torchscript/aoti)")
    parser.add_argument("--molecules", default="ethanol,toluene,aspirin")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--md-steps", type=int, default=50, help="VelocityVerlet steps per round")
    parser.add_argument("--md-rounds", type=int, default=4)
    parser.add_argument("--md-dtypes", default="float32,float64")
    parser.add_argument("--train-steps", type=int, default=10, help="timed optimizer steps (batch 5) per round")
    parser.add_argument("--train-rounds", type=int, default=3)
    parser.add_argument("--train-dtypes", default="float32,float64")
    parser.add_argument("--quick", action="store_true", help="smoke test: few calls, one round of MD and training")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--render", type=Path, help="only rewrite the markdown from an existing results JSON")
    args = parser.parse_args()
    if args.render:
        res = json.loads(args.render.read_text())
        saved = argparse.Namespace(**res["args"])
        md = args.render.with_suffix(".md")
        md.write_text(render(res, saved.molecules.split(","), saved.dtypes.split(","), saved))
        print(f"wrote {md}")
        return
    if args.quick:
        args.calls, args.per_round, args.warmup = 6, 3, 2
        args.md_steps, args.md_rounds, args.train_steps, args.train_rounds = 5, 1, 2, 1

    import torch

    torch.set_num_threads(args.threads)
    import flops as floor_mod

    started = time.time()
    molecules = args.molecules.split(",")
    dtypes = args.dtypes.split(",")
    names = expand_impls(args.impls)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               TORCHINDUCTOR_COMPILE_THREADS="1", PYTHONUNBUFFERED="1")
    env.setdefault("MLPOT_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    results = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "args": vars(args) | {"out": str(args.out), "render": None},
               "mlpot_commit": mlpot_commit(),
               "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads, "device": args.device,
                           "python": platform.python_version()},
               "info": {}, "failed": {}, "prepare": {}, "latency": {}, "md": {}, "train": {}, "flops": {}}

    def fail(name, what, err):
        msg = f"{what}: {err}"
        print(f"  !! {name} {msg}", flush=True)
        results["failed"].setdefault(name, []).append(msg)

    # --- start workers, deploy every model ---
    workers = {}
    for name in names:
        py = python_of(name)
        if not py.exists():
            fail(name, "not installed", f"{py} missing; run benchmarks/peers/setup.sh")
            continue
        print(f"starting {name} ({py})", flush=True)
        try:
            w = Worker(name, py, worker_args(name, args), env, HERE / ".cache" / "logs" / f"{name}.log")
            for dt in sorted(set(dtypes) | set(args.md_dtypes.split(",")) | set(args.train_dtypes.split(","))):
                tic = time.perf_counter()
                got = results["prepare"].setdefault(name, {})[dt] = w.ask(cmd="prepare", dtype=dt, timeout=1500)
                print(f"  {name} {dt} deployed ({time.perf_counter() - tic:.1f} s"
                      + (", cached" if got.get("cached") else "") + ")", flush=True)
            results["info"][name] = w.ask(cmd="info")
            workers[name] = w
        except WorkerError as err:
            fail(name, "setup", err)
    order = list(workers)
    eager_order = eager_runners(order)

    def interleaved(cmd_fn, rounds, label, among=None):
        """Round-robin over the workers (or those in ``among``); the first one rotates each round.
        Returns name -> list of results."""
        names_ = order if among is None else among
        out = {n: [] for n in names_}
        for r in range(rounds):
            k = r % max(len(names_), 1)
            for name in names_[k:] + names_[:k]:
                w = workers[name]
                if w.dead or name in skip:
                    continue
                try:
                    out[name].append(cmd_fn(w, r))
                except WorkerError as err:
                    fail(name, label, err)
                    skip.add(name)
        return out

    # --- latency ---
    rounds = max(1, -(-args.calls // args.per_round))
    for molecule in molecules:
        for dt in dtypes:
            skip = set()
            label = f"latency {molecule} {dt}"
            interleaved(lambda w, r: w.ask(cmd="latency", molecule=molecule, dtype=dt, calls=args.warmup, seed=99),
                        1, label + " warm-up")
            got = interleaved(lambda w, r: w.ask(cmd="latency", molecule=molecule, dtype=dt, calls=args.per_round,
                                                 seed=r), rounds, label)
            line = []
            for name, parts in got.items():
                if not parts:
                    continue
                times = [t for p in parts for t in p["times"]]
                q1, med, q3 = quartiles(times)
                results["latency"].setdefault(name, {}).setdefault(molecule, {})[dt] = {
                    "median_ms": 1000 * med, "q1_ms": 1000 * q1, "q3_ms": 1000 * q3, "calls": len(times),
                    "evals_per_call": parts[-1]["evals_per_call"], "finite": all(p["finite"] for p in parts)}
                line.append(f"{name} {1000 * med:.2f}")
            print(f"latency {molecule} {dt} (median ms, {rounds} rounds): " + ", ".join(line), flush=True)

    # --- MD ---
    for molecule in molecules:
        for dt in args.md_dtypes.split(","):
            skip = set()
            got = interleaved(lambda w, r: w.ask(cmd="md", molecule=molecule, dtype=dt, steps=args.md_steps),
                              args.md_rounds, f"md {molecule} {dt}")
            for name, parts in got.items():
                if parts:
                    results["md"].setdefault(name, {}).setdefault(molecule, {})[dt] = {
                        "steps_per_s": statistics.median(p["steps_per_s"] for p in parts),
                        "rounds": [p["steps_per_s"] for p in parts], "finite": all(p["finite"] for p in parts)}
            print(f"md {molecule} {dt} (steps/s): " + ", ".join(
                f"{n} {results['md'][n][molecule][dt]['steps_per_s']:.1f}" for n in got if got[n]), flush=True)

    # --- training: every mode each implementation's trainer offers (eager; compile for mlpot and NequIP),
    # interleaved like the rest; each (molecule, dtype, mode) keeps training from round to round ---
    entries = [(n, mode) for n in eager_order for mode in results["info"][n].get("train_modes", ["eager"])]
    for molecule in molecules:
        for dt in args.train_dtypes.split(","):
            got = {train_key(n, mode): [] for n, mode in entries}
            failed = set()
            for r in range(args.train_rounds):
                k = r % max(len(entries), 1)
                for name, mode in entries[k:] + entries[:k]:
                    key = train_key(name, mode)
                    if workers[name].dead or key in failed:
                        continue
                    try:
                        got[key].append(workers[name].ask(cmd="train", molecule=molecule, dtype=dt, mode=mode,
                                                          steps=args.train_steps, batch_size=5, timeout=1200))
                    except WorkerError as err:
                        fail(key, f"train {molecule} {dt}", err)
                        failed.add(key)
            for key, parts in got.items():
                if parts:
                    results["train"].setdefault(key, {}).setdefault(molecule, {})[dt] = {
                        "frames_per_s": statistics.median(p["frames_per_s"] for p in parts),
                        "rounds": [p["frames_per_s"] for p in parts], "batch_size": 5,
                        "first_step_s": parts[0]["first_step_s"], "status": parts[-1].get("status"),
                        "loss_finite": all(p["loss_finite"] for p in parts)}
            print(f"train {molecule} {dt} (frames/s): " + ", ".join(
                f"{n} {results['train'][n][molecule][dt]['frames_per_s']:.1f}" for n in got if got[n]), flush=True)

    # --- FLOPs and floors ---
    results["throughput_gflops"] = {dt: {"peak_1024": floor_mod.peak_gflops(getattr(torch, dt))} for dt in dtypes}
    for name in eager_order:
        w = workers[name]
        for molecule in molecules:
            try:
                count = w.ask(cmd="flops", molecule=molecule, dtype="float64")
            except WorkerError as err:
                fail(name, f"flops {molecule}", err)
                continue
            floors = floor_mod.floors(count, dtypes)
            for dt in dtypes:
                floors[dt]["peak_floor_ms"] = count["flops"] / (results["throughput_gflops"][dt]["peak_1024"] * 1e9) * 1e3
            results["flops"].setdefault(name, {})[molecule] = {
                "flops": count["flops"], "per_op": count["per_op"], "other_op_elements": count["other_op_elements"],
                "floors": floors}
        print(f"flops {name}: " + ", ".join(f"{m} {results['flops'][name][m]['flops'] / 1e6:.1f} MFLOP"
                                           for m in results["flops"].get(name, {})), flush=True)
    try:
        results["tp_check"] = floor_mod.tp_check()
    except Exception as err:  # noqa: BLE001
        results["tp_check"] = {"error": str(err)}

    for w in workers.values():
        w.close()
    results["wall_s"] = time.time() - started
    suffix = "-quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"results{suffix}.json").write_text(json.dumps(results, indent=1))
    (args.out / f"results{suffix}.md").write_text(render(results, molecules, dtypes, args))
    print(f"wrote {args.out / f'results{suffix}.md'} and results{suffix}.json ({results['wall_s'] / 60:.1f} min)")


# ==================================================================================================
def fmt(x, nd=2):
    return "–" if x is None else f"{x:.{nd}f}"


def get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def ours_in(table: dict, ours: list) -> list:
    """The mlpot implementations of one model that have results in ``table`` (TorchScript first)."""
    return [n for n in ours if n in table]


def fmt_names(names) -> str:
    return ", ".join(FORMAT_LABEL[MLPOT_IMPLS[n][1]] for n in names if n in MLPOT_IMPLS)


def render(res, molecules, dtypes, args) -> str:
    info = res["info"]
    md_dtypes = args.md_dtypes.split(",")
    train_dtypes = args.train_dtypes.split(",")
    L = []
    m = res["machine"]
    L.append("# mlpot vs NequIP, MACE, SchNetPack on CPU\n")
    L.append(f"Run {res['started']}, mlpot commit **{res.get('mlpot_commit', '?')}**, {m['cpu']} ({m['cores']} cores), "
             f"**{m['threads']} torch thread(s)** per "
             f"implementation, Python {m['python']}; whole run {res['wall_s'] / 60:.1f} min"
             + (" (**--quick smoke test: too few calls to quote**)" if args.quick else "") + ".\n")
    L.append("Targets: energy+forces latency **<= 0.5x the fastest peer** (ratio mlpot/peer, < 1 means mlpot is "
             "faster); training throughput **>= 2x the fastest peer** (ratio mlpot/peer, > 1 means mlpot is faster). "
             "Weights are untrained (latency does not depend on them). mlpot is timed in both deploy formats, "
             "TorchScript (`.pt`) and AOTInductor (`.pt2`, \"AOTI\"), as separate implementations in the same "
             "interleaved run; the mlpot/peer ratios use the faster of the two in each row (column \"best mlpot\"), "
             "and \"aoti/torchscript\" compares the two formats.\n")

    L.append("## Models and versions\n")
    L.append("| implementation | class | parameters | size | deployed for ASE as | versions |")
    L.append("|---|---|---|---|---|---|")
    for name, i in info.items():
        cls = "egnn" if i["kind"] == "egnn" else "schnet"
        vs = ", ".join(f"{k} {v}" for k, v in i["versions"].items())
        size = ", ".join(f"{k} {v}" for k, v in i.get("size", {}).items())
        deploy = i["deploy"]
        cached = get(res, "prepare", name)
        if i.get("build_key"):
            deploy += f" (build cached in .cache/ as key {i['build_key']}"
            deploy += (", reused" if cached and all(v.get("cached") for v in cached.values()) else ", built this run") + ")"
        L.append(f"| {PEER_LABEL.get(name, name)} | {cls} | {i['params']:,} | {size} | {deploy} | {vs} |")
    L.append("")

    def format_cols(table, ours, mol, dt, key, lower_is_better):
        """(values of each mlpot format, aoti/torchscript ratio, best name, best value) for one row."""
        vals = {n: get(table, n, mol, dt, key) for n in ours}
        have = {n: v for n, v in vals.items() if v}
        best = (min if lower_is_better else max)(have, key=have.get) if have else None
        ts = [n for n in ours if MLPOT_IMPLS[n][1] == "torchscript"]
        ao = [n for n in ours if MLPOT_IMPLS[n][1] == "aoti"]
        ratio = vals[ao[0]] / vals[ts[0]] if (ts and ao and vals[ts[0]] and vals[ao[0]]) else None
        return vals, ratio, best, (have[best] if best else None)

    for cls, (all_ours, peers) in CLASSES.items():
        peers = [p for p in peers if p in res["latency"]]
        ours = ours_in(res["latency"], all_ours)
        if not ours or not peers:
            continue
        two = len(ours) == 2
        model = f"mlpot {cls}"
        L.append(f"## Energy+forces latency through ASE: {model} ({fmt_names(ours)}) vs "
                 f"{', '.join(PEER_LABEL[p] for p in peers)}\n")
        L.append("Median ms per `atoms.get_potential_energy(); atoms.get_forces()` (IQR in brackets), positions "
                 "displaced by N(0, 0.01 Å) before each call, GFN2-xTB minima."
                 + (" aoti/torchscript = AOTI latency / TorchScript latency (< 1: the AOTInductor file is faster). "
                    "mlpot/peer ratios use the faster mlpot format of the row (\"best mlpot\")." if two else "")
                 + "\n")
        head = ["molecule", "dtype"] + [PEER_LABEL[n] for n in ours] + [PEER_LABEL[p] for p in peers] + \
               (["aoti/torchscript", "best mlpot"] if two else []) + \
               [f"mlpot/{PEER_LABEL[p]}" for p in peers] + ["mlpot/fastest peer", "target <= 0.5"]
        L.append("| " + " | ".join(head) + " |")
        L.append("|" + "---|" * len(head))
        for mol in molecules:
            for dt in dtypes:
                _, fratio, best, o = format_cols(res["latency"], ours, mol, dt, "median_ms", True)
                row = [mol, dt]
                for n in ours + peers:
                    x = get(res["latency"], n, mol, dt)
                    row.append(f"{fmt(x['median_ms'])} [{fmt(x['q1_ms'])}–{fmt(x['q3_ms'])}]" if x else "–")
                meds = [get(res["latency"], p, mol, dt, "median_ms") for p in peers]
                if two:
                    row += [fmt(fratio), FORMAT_LABEL[MLPOT_IMPLS[best][1]] if best else "–"]
                row += [fmt(o / v) if (o and v) else "–" for v in meds]
                fastest = min([v for v in meds if v], default=None)
                ratio = o / fastest if (o and fastest) else None
                row += [fmt(ratio), "–" if ratio is None else ("yes" if ratio <= LATENCY_TARGET else "no")]
                L.append("| " + " | ".join(row) + " |")
        evals = {p: get(res["latency"], p, molecules[0], dtypes[0], "evals_per_call") for p in ours + peers}
        odd = {p: e for p, e in evals.items() if e and e != 1}
        if odd:
            L.append("")
            L.append("Model evaluations per energy+forces call: " + ", ".join(
                f"{PEER_LABEL[p]} {e:g}" for p, e in odd.items()) + " (its ASE calculator keeps only the property "
                "asked for, so `get_potential_energy()` then `get_forces()` runs the model twice; MD, which asks "
                "for forces only, runs it once).")
        L.append("")

    if res["md"]:
        L.append("## ASE MD (VelocityVerlet, 0.25 fs, 300 K start), steps per second\n")
        L.append("Ratio mlpot/peer > 1 means mlpot is faster (the faster mlpot format of the row, \"best mlpot\"); "
                 "aoti/torchscript = AOTI steps/s / TorchScript steps/s (> 1: the AOTInductor file is faster).\n")
        for cls, (all_ours, peers) in CLASSES.items():
            peers = [p for p in peers if p in res["md"]]
            ours = ours_in(res["md"], all_ours)
            if not ours or not peers:
                continue
            two = len(ours) == 2
            head = ["molecule", "dtype"] + [PEER_LABEL[n] for n in ours] + [PEER_LABEL[p] for p in peers] + \
                   (["aoti/torchscript", "best mlpot"] if two else []) + [f"mlpot/{PEER_LABEL[p]}" for p in peers]
            L.append("| " + " | ".join(head) + " |")
            L.append("|" + "---|" * len(head))
            for mol in molecules:
                for dt in md_dtypes:
                    vals, fratio, best, o = format_cols(res["md"], ours, mol, dt, "steps_per_s", False)
                    pv = [get(res["md"], p, mol, dt, "steps_per_s") for p in peers]
                    row = [mol, dt] + [fmt(vals[n], 1) for n in ours] + [fmt(v, 1) for v in pv]
                    if two:
                        row += [fmt(fratio), FORMAT_LABEL[MLPOT_IMPLS[best][1]] if best else "–"]
                    row += [fmt(o / v) if (o and v) else "–" for v in pv]
                    L.append("| " + " | ".join(row) + " |")
            L.append("")

    if res["train"]:
        L.append("## Training throughput, frames per second (batch 5, energy + autograd forces, "
                 "loss E + 100 F MSE, backward, Adam step)\n")
        L.append("Real rMD17 frames (every 10th of `rmd17_<molecule>_train_01.npz`, eV and Å); each implementation's "
                 "own model in train mode, its own batching and its trainer's optimizer (mlpot-train: fused Adam; "
                 "the others: torch.optim.Adam as their trainers build it), graphs/neighbour lists built once before "
                 "timing; median step time over the rounds, training continuing from round to round. Every "
                 "training mode an implementation's trainer offers is timed: eager, and compiled where there is "
                 "one (mlpot-train's `train.compile: true`, which mlpot's recipes use; NequIP's "
                 "`compile_mode: compile`; MACE and SchNetPack have none). mlpot trains its eager model (the deploy "
                 "format plays no part), so it has one row per model. The ratio is mlpot's faster mode over the "
                 "fastest peer mode; > 1 means mlpot is faster. The first step of a compiled mode compiles (its "
                 "seconds are listed below the table).\n")
        for cls, (all_ours, peers) in CLASSES.items():
            peers = [p for p in peers if p in res["train"]]
            ours = ours_in(res["train"], all_ours)
            if not ours or not peers:
                continue
            ours = [o for o in (ours[0], ours[0] + "+compile") if o in res["train"]]
            label = {ours[0]: f"mlpot {cls} eager", ours[0] + "+compile": f"mlpot {cls} compiled"}
            head = ["molecule", "dtype"] + [label[o] for o in ours] + [PEER_LABEL[p] for p in peers] + \
                   [f"mlpot/{PEER_LABEL[p]}" for p in peers] + ["mlpot/fastest peer", "target >= 2"]
            L.append("| " + " | ".join(head) + " |")
            L.append("|" + "---|" * len(head))
            first_steps = []
            for mol in molecules:
                for dt in train_dtypes:
                    mine = [get(res["train"], o, mol, dt, "frames_per_s") for o in ours]
                    o = max([v for v in mine if v], default=None)
                    vals = [get(res["train"], p, mol, dt, "frames_per_s") for p in peers]
                    best = max([v for v in vals if v], default=None)
                    ratio = o / best if (o and best) else None
                    row = [mol, dt] + [fmt(v, 1) for v in mine] + [fmt(v, 1) for v in vals] + \
                          [fmt(o / v) if (o and v) else "–" for v in vals] + \
                          [fmt(ratio), "–" if ratio is None else ("yes" if ratio >= TRAIN_TARGET else "no")]
                    L.append("| " + " | ".join(row) + " |")
                    for n in ours + peers:
                        t = get(res["train"], n, mol, dt, "first_step_s")
                        status = get(res["train"], n, mol, dt, "status")
                        if "+" in n and t is not None:
                            first_steps.append(f"{label.get(n, PEER_LABEL.get(n, n))} {mol} {dt} {t:.0f} s"
                                               + (f" ({status})" if status and status != "compiled" else ""))
            L.append("")
            if first_steps:
                L.append("First step of the compiled modes (trace + compile): " + "; ".join(first_steps) + ".\n")

    if res["flops"]:
        tp = res.get("throughput_gflops", {})
        L.append("## The floor\n")
        L.append("Matmul FLOPs of one eager energy+forces call (forward + autograd backward), counted per aten op "
                 "with torch.utils.flop_counter's formulas in each implementation's own worker (so the peers' counts "
                 "are their own). Elementwise arithmetic, scatter-adds and reductions are not in the FLOPs; the elements "
                 "they write are the \"other\" column (about one FLOP each, memory-bound). Peak floor = FLOPs / single-thread peak GEMM (" + ", ".join(
                     f"{dt} {v['peak_1024']:.0f} GFLOP/s" for dt, v in tp.items()) + " at 1024^3); shape floor = "
                 "the same matmuls, at the shapes the model runs, timed back to back on this CPU. "
                 "x above floor = measured ASE latency / shape floor.\n")
        head = ["implementation", "molecule", "matmul MFLOP/call", "other M elem/call"] + \
               [f"shape floor {dt} ms" for dt in dtypes] + \
               [f"peak floor {dt} ms" for dt in dtypes] + [f"x above floor {dt}" for dt in dtypes]
        L.append("| " + " | ".join(head) + " |")
        L.append("|" + "---|" * len(head))
        for name, per_mol in res["flops"].items():
            # mlpot's count is taken once per model (eager); every deploy format of it gets a row with that count
            same = [name]
            if name in MLPOT_IMPLS:
                kind = MLPOT_IMPLS[name][0]
                same = [n for n in MLPOT_IMPLS if MLPOT_IMPLS[n][0] == kind and (n == name or n in res["latency"])]
            for mol in molecules:
                c = per_mol.get(mol)
                if not c:
                    continue
                for lat_name in same:
                    row = [PEER_LABEL.get(lat_name, lat_name), mol, fmt(c["flops"] / 1e6, 1),
                           fmt(c["other_op_elements"] / 1e6, 2)]
                    row += [fmt(c["floors"][dt]["shape_floor_ms"], 3) for dt in dtypes]
                    row += [fmt(c["floors"][dt]["peak_floor_ms"], 3) for dt in dtypes]
                    for dt in dtypes:
                        lat = get(res["latency"], lat_name, mol, dt, "median_ms")
                        row.append(fmt(lat / c["floors"][dt]["shape_floor_ms"], 0) if lat else "–")
                    L.append("| " + " | ".join(row) + " |")
        t = res.get("tp_check", {})
        if "counted_matmul_flops" in t:
            L.append("")
            L.append(f"Does the counter see e3nn's tensor products? One mlpot EGNN TensorProduct "
                     f"({t['paths']} uvu paths, {t['edges']} edges): the counter sees "
                     f"{t['counted_matmul_flops'] / 1e6:.2f} MFLOP of matmuls ({', '.join(t['counted_per_op'])}, "
                     f"from e3nn's einsums), and its elementwise ops (outer products, the l=0 paths) write "
                     f"{t['other_op_elements'] / 1e6:.2f} M further elements that no formula counts; the analytic "
                     f"cost of the same paths is {t['analytic_sparse_cg_flops'] / 1e6:.2f} MFLOP with only the "
                     f"nonzero Clebsch-Gordan entries and {t['analytic_dense_cg_flops'] / 1e6:.2f} MFLOP dense. "
                     f"So the FLOP counts (and floors) above are matmul counts: a lower bound, "
                     f"missing that elementwise share.")
        L.append("")

    if res["failed"]:
        L.append("## Failures\n")
        for name, msgs in res["failed"].items():
            for msg in msgs:
                L.append(f"- {PEER_LABEL.get(name, name)}: {msg}")
        L.append("")
    L.append("How it was measured, the exact versions and the caveats: README.md beside this file.")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
