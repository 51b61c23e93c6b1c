"""Path-integral MD with i-PI (``pip install ipi``) driving an mlpot ASE calculator through a unix socket.

i-PI is the server: it holds the beads, the integrator and the thermostat, and sends each bead's
positions to ASE's :class:`~ase.calculators.socketio.SocketClient`, which answers with the calculator's
energy and forces (atomic units on the wire; ASE and i-PI convert). :func:`run_path_integral` writes the
input, starts ``i-pi`` in a subprocess, runs the client in this process until i-PI says the run is over,
and cleans up the server and its socket on any failure.
"""

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
from ase.calculators.socketio import SocketClient, actualunixsocketname

from mlpot.files import write_text

# what run_path_integral records every step, with i-PI's unit for each (the columns of PREFIX.out)
PROPERTIES = ("step", "time{femtosecond}", "conserved{electronvolt}", "temperature{kelvin}",
              "potential{electronvolt}", "kinetic_cv{electronvolt}")

INPUT = """<simulation verbosity="low" safe_stride="{steps}">
  <output prefix="{prefix}">
    <properties stride="1" filename="out" flush="1"> [ {properties} ] </properties>
    <trajectory stride="{stride}" filename="pos" format="xyz" cell_units="angstrom"> positions{{angstrom}} </trajectory>
  </output>
  <total_steps>{steps}</total_steps>
  <prng><seed>{seed}</seed></prng>
  <ffsocket name="mlpot" mode="unix" pbc="false">
    <address>{address}</address>
  </ffsocket>
  <system>
    <initialize nbeads="{beads}">
      <file mode="xyz" units="angstrom">{xyz}</file>
      <velocities mode="thermal" units="kelvin">{temperature}</velocities>
    </initialize>
    <forces><force forcefield="mlpot"/></forces>
    <motion mode="dynamics">
      <dynamics mode="nvt">
        <timestep units="femtosecond">{timestep}</timestep>
        <thermostat mode="pile_l"><tau units="femtosecond">{tau}</tau></thermostat>
      </dynamics>
    </motion>
    <ensemble><temperature units="kelvin">{temperature}</temperature></ensemble>
  </system>
</simulation>
"""


def i_pi_command() -> list:
    """The command that starts i-PI with this Python (its script sits beside the interpreter, or on PATH)."""
    script = Path(sys.executable).with_name("i-pi")
    found = str(script) if script.is_file() else shutil.which("i-pi")
    if found is None:
        raise RuntimeError("i-PI is not installed: pip install ipi")
    return [sys.executable, found]


def run_path_integral(atoms, calculator, folder, beads: int = 4, steps: int = 20, timestep_fs: float = 0.5,
                      temperature_K: float = 300.0, tau_fs: float = 100.0, seed: int = 31415,
                      prefix: str = "ipi", timeout: float = 300.0) -> dict:
    """Path-integral NVT (PILE-L thermostat) of a molecule in i-PI, forces from ``calculator``.

    Writes ``init.xyz``, ``input.xml`` and i-PI's outputs (``PREFIX.out``, ``PREFIX.pos_*.xyz``, ``i-pi.log``)
    into ``folder``. Returns i-PI's properties, one array (steps + 1 rows, step 0 first) per name of
    :data:`PROPERTIES` without its unit (``"potential"`` is the bead average in eV). Raises RuntimeError when
    i-PI fails or the run takes longer than ``timeout`` seconds (the server is stopped either way).
    """
    if atoms.pbc.any():
        raise ValueError(f"run_path_integral runs molecules, but the atoms have pbc={atoms.pbc.tolist()}; set atoms.pbc = False")
    if beads < 1 or steps < 1:
        raise ValueError(f"run_path_integral needs beads >= 1 and steps >= 1, got beads={beads}, steps={steps}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atoms = atoms.copy()
    atoms.calc = calculator
    box = 2 * (np.ptp(atoms.positions, axis=0).max() + 10.0)  # i-PI wants a cell; nothing is periodic
    lines = [str(len(atoms)), f"# CELL(abcABC): {box:.4f} {box:.4f} {box:.4f} 90.0 90.0 90.0 positions{{angstrom}}"]
    lines += [f"{s} {x:.10f} {y:.10f} {z:.10f}" for s, (x, y, z) in zip(atoms.get_chemical_symbols(), atoms.positions)]
    write_text(folder / "init.xyz", "\n".join(lines) + "\n")  # i-PI's xyz dialect: the cell in the comment line
    address = f"mlpot-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    write_text(folder / "input.xml", INPUT.format(
        steps=steps, prefix=prefix, properties=", ".join(PROPERTIES), stride=max(1, steps // 10), seed=seed,
        address=address, beads=beads, xyz="init.xyz", temperature=temperature_K, timestep=timestep_fs, tau=tau_fs))
    socket = Path(actualunixsocketname(address))
    with open(folder / "i-pi.log", "w") as log:
        server = subprocess.Popen(i_pi_command() + ["input.xml"], cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not socket.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"i-PI did not open its socket {socket}; see {folder / 'i-pi.log'}")
            time.sleep(0.05)
        client = SocketClient(unixsocket=address, timeout=timeout)
        try:
            client.run(atoms)
        finally:
            client.close()
        server.wait(timeout=max(1.0, deadline - time.monotonic()))
        if server.returncode != 0:
            raise RuntimeError(f"i-PI exited with status {server.returncode}; see {folder / 'i-pi.log'}")
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"i-PI did not finish within {timeout:.0f} s; see {folder / 'i-pi.log'}") from None
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        socket.unlink(missing_ok=True)
    table = np.atleast_2d(np.loadtxt(folder / f"{prefix}.out"))
    return {name.split("{")[0]: table[:, k] for k, name in enumerate(PROPERTIES)}


__all__ = ["PROPERTIES", "run_path_integral"]
