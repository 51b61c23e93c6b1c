"""A full disk (a file-size limit, ``ulimit -f``) or a read-only folder while md or deploy replace earlier
results: one line naming the file, exit 2, and the earlier results left exactly as they were."""

import os
import shutil
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import ase.io
import pytest

from mlpot import checkpoint, commands

from robustness_helpers import make_config, perturbed_ethanol, tiny_potential, tmp_files, write_sgdml_npz, write_yaml

MODEL = Path(__file__).resolve().parents[2] / "deploy" / "ethanol-schnet.pt"
LIMIT_BYTES = 16 * 1024


def limited(limit_bytes):
    def start():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return start


def mlpot(args, preexec=None):
    return subprocess.run([sys.executable, "-m", "mlpot", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=preexec, timeout=300)


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


PROGRESS_BAR = re.compile(r"^[\w ]+: +\d+%\|")  # tqdm's lines on stderr, not part of the error


def assert_one_line(done, *expected):
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.strip().splitlines() if line.strip() and not PROGRESS_BAR.match(line)]
    assert len(lines) == 1 and all(e in lines[0] for e in expected), done.stderr[-2000:]


@pytest.mark.skipif(not MODEL.is_file(), reason=f"needs the shipped {MODEL.name}")
def test_md_overwrite_on_a_full_disk_keeps_the_earlier_results(tmp_path):
    structure = tmp_path / "ethanol.xyz"
    ase.io.write(structure, perturbed_ethanol(seed=3))
    out = tmp_path / "md"
    args = ["md", str(MODEL), str(structure), "--time", "5fs", "--no-harmonic", "--quiet", "--output", str(out)]
    commands.run(args)
    before = snapshot(out)
    done = mlpot([*args, "--overwrite", "--seed", "9"], limited(LIMIT_BYTES))
    assert_one_line(done, "mlpot md: error: ", "File too large", "nothing already written was changed")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ethanol.xyz", "md"], "the half-done new run was left"


def test_deploy_over_an_existing_file_on_a_full_disk_keeps_it(tmp_path):
    source = tmp_path / "model.ckpt"
    checkpoint.save_potential(tiny_potential("schnet"), source, epoch=1)
    output = tmp_path / "model.pt"
    commands.run(["deploy", str(source), "-o", str(output)])
    blob = output.read_bytes()
    done = mlpot(["deploy", str(source), "-o", str(output), "--overwrite", "--dtype", "float32"], limited(LIMIT_BYTES))
    assert_one_line(done, "mlpot deploy: error: ", "File too large")
    assert output.read_bytes() == blob
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt", "model.pt"]
    with pytest.raises(ValueError, match="model.pt exists; pass --overwrite"):
        commands.run(["deploy", str(source), "-o", str(output)])


SETPRIV = shutil.which("setpriv")


def without_permission_override():
    """The command prefix that makes a read-only folder stop root too: no CAP_DAC_OVERRIDE (util-linux's setpriv)."""
    if os.geteuid() != 0:
        return []
    return [SETPRIV, "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.skipif(os.geteuid() == 0 and SETPRIV is None, reason="root without setpriv writes into read-only folders")
@pytest.mark.parametrize("workflow", ["deploy", "train", "md", "relax", "predict"])
def test_read_only_output_folder_is_one_line_and_untouched(tmp_path, workflow):
    source = tmp_path / "model.ckpt"
    checkpoint.save_potential(tiny_potential("schnet"), source, epoch=1)
    commands.run(["deploy", str(source), "-o", str(tmp_path / "model.pt")])
    structure = tmp_path / "ethanol.xyz"
    ase.io.write(structure, perturbed_ethanol(seed=3))
    train_file = write_sgdml_npz(tmp_path / "train.npz", 14, 0)
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "earlier.txt").write_text("earlier results\n")
    config = write_yaml(tmp_path / "config.yaml", make_config(train_file, train_file, folder, epochs=1))
    model = str(tmp_path / "model.pt")
    args = {"deploy": ["deploy", str(source), "-o", str(folder / "model.pt")],
            "train": ["train", str(config), "--quiet"],
            "md": ["md", model, str(structure), "--time", "2fs", "--no-harmonic", "--quiet", "--output", str(folder / "md")],
            "relax": ["relax", model, str(structure), "--output", str(folder / "relax")],
            "predict": ["eval", model, str(structure), "--predict", str(folder / "predicted.extxyz")]}[workflow]
    folder.chmod(0o555)
    try:
        done = subprocess.run([*without_permission_override(), sys.executable, "-m", "mlpot", *args],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        folder.chmod(0o755)
    command = "eval" if workflow == "predict" else workflow
    assert_one_line(done, f"mlpot {command}: error: ", "Permission denied")
    assert sorted(p.name for p in folder.iterdir()) == ["earlier.txt"]


def test_training_on_a_full_disk_stops_in_one_line_and_resumes(tmp_path):
    """A checkpoint write that hits the limit: one line, exit 2, the last whole checkpoint kept and resumable."""
    train_file, test_file = write_sgdml_npz(tmp_path / "train.npz", 14, 0), write_sgdml_npz(tmp_path / "test.npz", 4, 1)
    run_dir = tmp_path / "run"
    config = write_yaml(tmp_path / "config.yaml", make_config(train_file, test_file, run_dir, epochs=2))
    done = mlpot(["train", str(config), "--quiet"])
    assert done.returncode == 0, done.stderr[-2000:]
    before = snapshot(run_dir)
    limit = min(len(before["last.pt"]), len(before["best.pt"])) - 1  # every new checkpoint is too large
    done = mlpot(["train", "--resume", str(run_dir), "--set", "train.epochs=4", "--quiet"], limited(limit))
    assert_one_line(done, "mlpot train: error: ", "File too large")
    after = snapshot(run_dir)
    for name in ("last.pt", "best.pt"):
        assert after[name] == before[name], f"{name} was changed by the failed run"
    assert tmp_files(run_dir) == []
    done = mlpot(["train", "--resume", str(run_dir), "--set", "train.epochs=4", "--quiet"])
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.skipif(not MODEL.is_file(), reason=f"needs the shipped {MODEL.name}")
@pytest.mark.parametrize("workflow", ["relax", "vibrations", "predict"])
def test_workflow_overwrite_on_a_full_disk_keeps_the_earlier_results(tmp_path, workflow):
    structure = tmp_path / "ethanol.xyz"
    ase.io.write(structure, perturbed_ethanol(seed=3, amplitude=0.02))
    out = tmp_path / "out"
    args = {"relax": ["relax", str(MODEL), str(structure), "--output", str(out)],
            "vibrations": ["vibrations", str(MODEL), str(structure), "--fmax", "1e-2", "--output", str(out)],
            "predict": ["eval", str(MODEL), str(structure), "--predict", str(out / "predicted.extxyz")]}[workflow]
    out.mkdir()
    done = mlpot(args)
    assert done.returncode == 0, done.stderr[-2000:]
    before = snapshot(out)
    done = mlpot([*args, "--overwrite"], limited(min(len(b) for b in before.values()) // 2))
    assert_one_line(done, f"mlpot {'eval' if workflow == 'predict' else workflow}: error: ", "File too large")
    assert snapshot(out) == before
    assert tmp_files(tmp_path) == []
