"""Every script in ``examples/`` runs in its short form (``MLPOT_EXAMPLE_QUICK=1``) and prints the numbers it should.

Each runs in a fresh process, as a user would start it, with the shipped ``deploy/ethanol.pt`` and the
rMD17 ethanol file from the reference data folder.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import ase.build
import ase.io
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SHIPPED = ROOT / "deploy" / "ethanol.pt"
NUMBER = r"(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"

pytestmark = pytest.mark.skipif(not SHIPPED.is_file(), reason="the examples use the shipped deploy/ethanol.pt")


def run_example(name, cwd, data_dir, *args) -> str:
    """Runs ``examples/<name>`` quick in ``cwd`` (it writes its files there); returns its stdout."""
    env = {**os.environ, "MLPOT_EXAMPLE_QUICK": "1", "MLPOT_DATA_DIR": str(data_dir),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr[-3000:]}"
    return done.stdout


def numbers_after(label, text):
    """The numbers that follow ``label`` on each line it starts (after leading spaces)."""
    return [float(m) for m in re.findall(rf"^\s*{re.escape(label)}\s*{NUMBER}", text, flags=re.M)]


def test_every_example_is_tested():
    tested = {"md_ethanol.py", "md_analysis.py", "relax.py", "vibrations.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_md_ethanol(tmp_path, data_dir):
    from mlpot.calculators import EGNNCalculator

    out = run_example("md_ethanol.py", tmp_path, data_dir)
    rows = re.findall(rf"^\s*{NUMBER} fs\s+Epot\s+{NUMBER} eV\s+T\s+{NUMBER} K$", out, flags=re.M)
    times, epot, temperature = np.array(rows, dtype=float).T
    np.testing.assert_allclose(times, np.arange(11) * 1.0)  # 20 steps of 0.5 fs, reported every 2 steps
    atoms = ase.build.molecule("CH3CH2OH")
    atoms.calc = EGNNCalculator(str(SHIPPED))
    assert epot[0] == pytest.approx(atoms.get_potential_energy(), abs=1e-4)  # printed to 4 decimals
    assert np.abs(epot - epot[0]).max() < 1.0 and (temperature > 0).all()  # 10 fs at 500 K: no blow-up
    assert re.search(r"^20 steps \(0\.01 ps\) in [\d.]+ s: [\d.]+ ms/step$", out, flags=re.M), out


def test_md_analysis(tmp_path, data_dir):
    out = run_example("md_analysis.py", tmp_path, data_dir)
    assert re.search(r"^40 steps, stable, [\d.]+ ms/step$", out, flags=re.M), out
    (mae,) = numbers_after("h(r) MAE against rMD17:", out)
    assert 0.0 < mae < 0.8  # 20 fs from one start: 0.50 measured (another molecule's h(r) would be near 2)
    assert (tmp_path / "ethanol-hr.png").stat().st_size > 0
    assert (tmp_path / "ethanol-power-spectrum.png").stat().st_size > 0


def test_relax(tmp_path, data_dir):
    out = run_example("relax.py", tmp_path, data_dir)
    (start,) = numbers_after("start: energy", out)
    (final,) = numbers_after("final energy", out)
    (max_force,) = numbers_after("max force", out)
    assert "relaxation converged in" in out and final < start and max_force <= 1e-2
    bonds = dict(re.findall(rf"^\s+(C-C|C-O|O-H)\s+\d+-\d+\s+{NUMBER} Å$", out, flags=re.M))
    assert len(re.findall(r"^\s+C-H\s", out, flags=re.M)) == 5
    # ethanol's bonds (Å), within what an ML potential at fmax 0.01 eV/Å gives
    for label, length in {"C-C": 1.52, "C-O": 1.42, "O-H": 0.97}.items():
        assert float(bonds[label]) == pytest.approx(length, abs=0.03), label
    relaxed = ase.io.read(tmp_path / "relaxed-ethanol.xyz")
    assert relaxed.get_chemical_formula() == "C2H6O"


def test_vibrations(tmp_path, data_dir):
    out = run_example("vibrations.py", tmp_path, data_dir)
    match = re.search(rf"max \|FD - Hessian\| = {NUMBER} cm\^-1 over (\d+) modes", out)
    assert match, out
    assert float(match[1]) < 1.0 and int(match[2]) == 3 * 9 - 6
    modes = re.findall(rf"^\s*(\d+)\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}$", out, flags=re.M)
    fd, hessian = (np.array([float(m[k]) for m in modes]) for k in (1, 2))
    assert len(modes) == 21 and np.all(np.diff(hessian) >= 0)
    np.testing.assert_allclose(fd, hessian, atol=1.0)
    assert 3500 < hessian[-1] < 3900  # the O-H stretch (rMD17 PBE: about 3700 cm^-1)
    zpe = re.search(rf"zero-point energy: FD {NUMBER} eV, Hessian {NUMBER} eV", out)
    assert zpe and float(zpe[1]) == pytest.approx(float(zpe[2]), abs=1e-3)
    assert float(zpe[2]) == pytest.approx(hessian.sum() / 2 * 1.23984e-4, abs=1e-3)  # ZPE = Σ hc·ν/2, 1 cm^-1 = 1.24e-4 eV
    assert (tmp_path / "ethanol-spectrum.png").stat().st_size > 0
