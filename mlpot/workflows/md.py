"""Molecular dynamics with ASE, a stability watch (Fu et al. 2023) and comparison with MD17 references."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io.trajectory import Trajectory
from ase.md import MDLogger
from ase.md.langevin import Langevin
from ase.md.nose_hoover_chain import IsotropicMTKNPT, NoseHooverChainNVT
from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta
from ase.md.verlet import VelocityVerlet
from tqdm.auto import tqdm

from mlpot.calculators import load_calculator
from mlpot.data.datasets import known_datasets
from mlpot.data.registry import MOLECULES
from mlpot.dtypes import name_of
from mlpot.files import atomic_path, write_bytes, write_json
from mlpot.workflows import analysis
from mlpot.workflows.outputs import output_folder

ENSEMBLES = ("nve", "langevin", "nose-hoover", "npt")
_TIME_UNITS_FS = {"fs": 1.0, "ps": 1000.0, "ns": 1e6}


def parse_time(text) -> float:
    """A duration in fs from ``"10ps"``, ``"500fs"``, ``"0.5 fs"`` or a plain number (fs)."""
    match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*(fs|ps|ns)?\s*", str(text))
    if not match:
        raise ValueError(f"cannot read {text!r} as a time; use e.g. 10ps, 500fs, 0.5fs or a number of fs")
    value = float(match.group(1)) * _TIME_UNITS_FS[match.group(2) or "fs"]
    if value <= 0:
        raise ValueError(f"time {text!r} must be positive")
    return value


@dataclass
class MDRun:
    """What a run produced, sampled every ``sample_interval`` steps.

    Attributes:
        numbers, masses: (N,) atomic numbers and masses (amu).
        timestep_fs: integration step, fs.
        sample_interval: steps between samples.
        steps: steps done (fewer than asked when the run collapsed).
        positions: (F, N, 3) Å; velocities: (F, N, 3) Å/fs.
        times_ps, total_energy_eV, temperature_K: (F,) per sample.
        collapse_step: step at which the run collapsed, or None if it stayed stable.
        collapse_reason: what happened then.
        wall_time_s: wall time of the dynamics loop, s.
        forces_std_max: (F,) largest per-atom force spread of a committee calculator, eV/Å (empty otherwise).
    """

    numbers: np.ndarray
    masses: np.ndarray
    timestep_fs: float
    sample_interval: int
    steps: int
    positions: np.ndarray
    velocities: np.ndarray
    times_ps: np.ndarray
    total_energy_eV: np.ndarray
    temperature_K: np.ndarray
    collapse_step: int | None
    collapse_reason: str
    wall_time_s: float
    forces_std_max: np.ndarray = field(default_factory=lambda: np.zeros(0))


def check_ensemble(atoms, ensemble) -> None:
    """ValueError (one line) when ``ensemble`` needs a cell that ``atoms`` does not have."""
    if ensemble == "npt" and not atoms.pbc.all():
        raise ValueError(
            f"--ensemble npt needs a structure periodic in all three directions (pbc={atoms.pbc.tolist()}); "
            f"use nve, langevin or nose-hoover for a molecule or slab"
        )


def make_dynamics(atoms, ensemble, timestep_fs, temperature_K, friction_per_fs=0.01, tdamp_fs=None, seed=0,
                  pressure_bar=1.0, **kwargs):
    """An ASE integrator: "nve" (velocity Verlet), "langevin", "nose-hoover" (chain, tdamp 100 steps) or
    "npt" (ASE's isotropic MTK barostat with Nose-Hoover chains, tdamp 100 and pdamp 1000 steps, at
    ``pressure_bar``; needs a 3D cell and a calculator with stress)."""
    check_ensemble(atoms, ensemble)
    dt = timestep_fs * units.fs
    if ensemble == "nve":
        return VelocityVerlet(atoms, timestep=dt, **kwargs)
    if ensemble == "langevin":
        return Langevin(atoms, timestep=dt, temperature_K=temperature_K, friction=friction_per_fs / units.fs,
                        fixcm=False, rng=np.random.default_rng(seed), **kwargs)
    if ensemble == "nose-hoover":
        tdamp = (tdamp_fs or 100 * timestep_fs) * units.fs
        return NoseHooverChainNVT(atoms, timestep=dt, temperature_K=temperature_K, tdamp=tdamp, **kwargs)
    if ensemble == "npt":
        tdamp = (tdamp_fs or 100 * timestep_fs) * units.fs
        return IsotropicMTKNPT(atoms, timestep=dt, temperature_K=temperature_K, pressure_au=pressure_bar * units.bar,
                               tdamp=tdamp, pdamp=1000 * timestep_fs * units.fs, **kwargs)
    raise ValueError(f"unknown ensemble {ensemble!r}; choose one of {', '.join(ENSEMBLES)}")


# the run's resumable state, rewritten atomically every ``checkpoint_interval`` steps and at the end
STATE_FILE = "md-state.pkl"


def _count_frames(path: Path) -> int:
    if not path.is_file():
        return 0
    if path.suffix == ".traj":
        with Trajectory(str(path)) as traj:
            return len(traj)
    return len(ase.io.read(path, index=":", format="extxyz"))


def _append_frames(path: Path, frames, keep: int | None = None) -> None:
    """Appends ``frames`` to the trajectory ``path`` (.traj, else extxyz) atomically: a copy of the file
    (its first ``keep`` frames, default all) plus the new frames is renamed onto it."""
    with atomic_path(path) as tmp:
        if keep is not None and keep < _count_frames(path):
            old = ase.io.read(path, index=f":{keep}", format="traj" if path.suffix == ".traj" else "extxyz")
            frames = [*old, *frames]
        elif path.is_file():
            shutil.copyfile(path, tmp)
        if path.suffix == ".traj":
            with Trajectory(str(tmp), "a") as traj:
                for frame in frames:
                    traj.write(frame)
        elif frames:
            ase.io.write(tmp, frames, format="extxyz", append=True)


def _frame(atoms: Atoms) -> Atoms:
    """A copy of the current frame with its energy and forces."""
    frame = atoms.copy()
    frame.calc = SinglePointCalculator(frame, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
    return frame


# the barostat's state in ASE's IsotropicMTKNPT: the cell is cell0 exp(eps), its momentum p_eps
_BAROSTAT_STATE = ("_eps", "_p_eps", "_cell0", "_volume0")


def _thermostat_state(dyn) -> dict:
    """The integrator's own state beyond positions and momenta (random generator, chains, barostat)."""
    if isinstance(dyn, Langevin):
        return {"rng": dyn.rng.bit_generator.state}
    state = {}
    if isinstance(dyn, (NoseHooverChainNVT, IsotropicMTKNPT)):
        state.update(eta=dyn._thermostat._eta.copy(), p_eta=dyn._thermostat._p_eta.copy())
    if isinstance(dyn, IsotropicMTKNPT):
        state.update(xi=dyn._barostat._xi.copy(), p_xi=dyn._barostat._p_xi.copy(),
                     **{name: np.copy(getattr(dyn, name)) for name in _BAROSTAT_STATE})
    return state


def _restore_thermostat(dyn, state: dict) -> None:
    if isinstance(dyn, Langevin):
        dyn.rng.bit_generator.state = state["rng"]
        return
    if isinstance(dyn, (NoseHooverChainNVT, IsotropicMTKNPT)):
        dyn._thermostat._eta[:] = state["eta"]
        dyn._thermostat._p_eta[:] = state["p_eta"]
    if isinstance(dyn, IsotropicMTKNPT):
        dyn._barostat._xi[:] = state["xi"]
        dyn._barostat._p_xi[:] = state["p_xi"]
        for name in _BAROSTAT_STATE:
            value = state[name]
            setattr(dyn, name, value.copy() if value.ndim else float(value))


def read_state(path) -> dict:
    """The checkpoint of an MD run (see :func:`run_md`)."""
    with open(path, "rb") as fh:
        return pickle.load(fh)


def _temperature(atoms) -> float:
    return float(atoms.get_kinetic_energy() / (1.5 * units.kB * len(atoms)))


def run_md(
    atoms: Atoms,
    calc,
    temperature_K: float = 500.0,
    time_fs: float = 1000.0,
    timestep_fs: float = 0.5,
    ensemble: str = "langevin",
    bonds=None,
    bond_reference=None,
    threshold: float = analysis.COLLAPSE_THRESHOLD,
    trajectory=None,
    logfile=None,
    traj_interval: int = 10,
    log_interval: int = 20,
    sample_interval: int | None = None,
    friction_per_fs: float = 0.01,
    seed: int = 0,
    progress: bool = True,
    pressure_bar: float = 1.0,
    checkpoint=None,
    checkpoint_interval: int = 200,
    resume: bool = False,
) -> MDRun:
    """Runs MD from a copy of ``atoms`` with velocities drawn at ``temperature_K``; stops when it collapses.

    The run collapses when a bond in ``bonds`` ((B, 2) indices) departs more than ``threshold`` Å from
    ``bond_reference`` ((B,) Å), or when the model refuses the structure (atoms too close, NaN).

    With ``checkpoint`` (a path), every ``checkpoint_interval`` steps the trajectory gets the frames since
    the last checkpoint (appended atomically), then the checkpoint is rewritten atomically: step, positions,
    cell, momenta, thermostat state (Langevin's random generator, Nose-Hoover's chains, the barostat's
    strain and its chain), samples, and the sizes of
    the trajectory and log. ``resume=True`` continues from it: the log is cut back and the trajectory to
    what the checkpoint counted, and the run goes on bit for bit as if never stopped (the calculator's
    neighbour list is rebuilt at every checkpoint in both cases, so no number depends on where it stopped).

    Args:
        atoms: starting structure.
        calc: ASE calculator.
        temperature_K: initial (and thermostat) temperature, K.
        time_fs: simulated time, fs.
        timestep_fs: integration step, fs.
        ensemble: "nve", "langevin", "nose-hoover" or "npt" (periodic structures only).
        bonds, bond_reference: the watched bonds and their reference lengths; default: the starting ones.
        threshold: collapse threshold, Å.
        trajectory: .traj or .xyz/.extxyz path written every ``traj_interval`` steps.
        logfile: ASE MD log written every ``log_interval`` steps.
        sample_interval: steps between in-memory samples (default ~1 fs).
        friction_per_fs: Langevin friction, 1/fs.
        seed: seed of the initial velocities and the Langevin noise.
        progress: show a tqdm progress bar.
        pressure_bar: the barostat's pressure for "npt", bar.
        checkpoint, checkpoint_interval, resume: see above.
    """
    check_ensemble(atoms, ensemble)
    if checkpoint_interval < 1:
        raise ValueError(f"--checkpoint-interval {checkpoint_interval} must be a positive number of steps")
    atoms = atoms.copy()
    atoms.calc = calc
    if bonds is None:
        bonds = analysis.find_bonds(atoms.numbers, atoms.positions)
    if bond_reference is None:
        bond_reference = analysis.bond_lengths(atoms.positions, bonds)
    steps = max(1, int(round(time_fs / timestep_fs)))
    sample_interval = sample_interval or max(1, int(round(1.0 / timestep_fs)))
    trajectory = Path(trajectory) if trajectory else None
    logfile = Path(logfile) if logfile else None
    state = read_state(checkpoint) if resume else None
    if state is None:
        rng = np.random.default_rng(seed)
        thermalize_momenta(atoms, temperature_K, rng=rng)
        Stationary(atoms)
        ZeroRotation(atoms)
        samples = {k: [] for k in _SAMPLE_KEYS}
        collapse_step, reason, wall_before, frames_written, start_step = None, "stable", 0.0, 0, 0
        for path in (trajectory, logfile):
            if path is not None and path.exists():
                path.unlink()
    else:
        if state.get("cell") is not None:
            atoms.set_cell(state["cell"], scale_atoms=False)
        atoms.set_positions(state["positions"], apply_constraint=False)
        atoms.set_momenta(state["momenta"], apply_constraint=False)
        samples = {k: list(v) for k, v in state["samples"].items()}
        collapse_step, reason, wall_before = state["collapse_step"], state["collapse_reason"], state["wall_time_s"]
        frames_written, start_step = state["frames"], state["step"]
        if logfile is not None:
            with open(logfile, "ab") as fh:
                fh.truncate(state["log_bytes"])  # lines logged after the checkpoint are logged again
        if trajectory is not None and _count_frames(trajectory) != frames_written:
            _append_frames(trajectory, [], keep=frames_written)  # frames past the checkpoint are written again
    dyn = make_dynamics(atoms, ensemble, timestep_fs, temperature_K, friction_per_fs, seed=seed + 1,
                        pressure_bar=pressure_bar)
    dyn.nsteps = start_step
    if state is not None:
        _restore_thermostat(dyn, state["thermostat"])
        _rebuild_neighbors(calc)
    log_handle = open(logfile, "a") if logfile else None
    if log_handle is not None:
        dyn.attach(MDLogger(dyn, atoms, log_handle, header=state is None), interval=log_interval)
    pending = []  # trajectory frames since the last checkpoint

    def save_state(finished: bool) -> None:
        nonlocal frames_written
        if trajectory is not None and (pending or not trajectory.exists()):
            _append_frames(trajectory, pending)
            frames_written += len(pending)
            pending.clear()
        if checkpoint is None:
            return
        if log_handle is not None:
            log_handle.flush()
        wall = wall_before + time.perf_counter() - start
        done = {"step": dyn.nsteps, "positions": atoms.positions.copy(), "cell": atoms.cell.array.copy(),
                "momenta": atoms.get_momenta(),
                "thermostat": _thermostat_state(dyn), "samples": {k: list(v) for k, v in samples.items()},
                "frames": frames_written, "log_bytes": logfile.stat().st_size if logfile else 0,
                "collapse_step": collapse_step, "collapse_reason": reason, "wall_time_s": wall, "finished": finished}
        write_bytes(checkpoint, pickle.dumps(done))

    finished = bool(state and state["finished"])
    bar = tqdm(total=steps, initial=min(start_step, steps), unit="step", disable=not progress or finished,
               mininterval=1.0, desc=f"MD {ensemble} {temperature_K:g} K")
    start = time.perf_counter()
    try:
        for _ in ([] if finished else dyn.irun(steps - start_step)):
            if dyn.nsteps == start_step and state is not None:
                continue  # the step the checkpoint was taken at: already watched, sampled and written
            if _collapsed(atoms, bonds, bond_reference, threshold):
                collapse_step, reason = dyn.nsteps, f"a bond departed more than {threshold} Å from its reference length"
                break
            if dyn.nsteps % sample_interval == 0:
                _sample(samples, atoms, dyn.nsteps * timestep_fs / 1000.0)
            if trajectory is not None and dyn.nsteps % traj_interval == 0:
                pending.append(_frame(atoms))
            if dyn.nsteps and dyn.nsteps % 100 == 0:
                bar.update(100)
                bar.set_postfix(T=f"{_temperature(atoms):.0f} K", refresh=False)
            if checkpoint is not None and dyn.nsteps % checkpoint_interval == 0 and 0 < dyn.nsteps < steps:
                save_state(finished=False)
                _rebuild_neighbors(calc)
    except ValueError as error:  # the calculator refuses the structure: atoms on top of each other, NaN
        collapse_step, reason = dyn.nsteps + 1, f"the model failed: {error}"
    finally:
        bar.update(bar.total - bar.n if collapse_step is None else 0)
        bar.close()
    try:
        if not finished:
            save_state(finished=True)
            wall_before = wall_before + time.perf_counter() - start
    finally:
        if log_handle is not None:
            log_handle.close()
        dyn.close()
    if finished:
        wall_before = state["wall_time_s"]
    done = collapse_step if collapse_step is not None else dyn.nsteps
    arrays = {k: np.asarray(v) for k, v in samples.items()}
    return MDRun(atoms.numbers.copy(), atoms.get_masses(), timestep_fs, sample_interval, done,
                 collapse_step=collapse_step, collapse_reason=reason, wall_time_s=wall_before, **arrays)


def _rebuild_neighbors(calc) -> None:
    """The next call of ``calc`` computes afresh, with a new neighbour list (as a resumed run does)."""
    for member in getattr(calc, "members", [calc]):
        rebuild = getattr(member, "rebuild_neighbors", None)
        if rebuild is not None:
            rebuild()
    calc.reset()


_SAMPLE_KEYS = ("positions", "velocities", "times_ps", "total_energy_eV", "temperature_K", "forces_std_max")


def _collapsed(atoms: Atoms, bonds, bond_reference, threshold: float) -> bool:
    """Whether a bond is more than ``threshold`` Å off its reference length (or positions are not finite)."""
    if not np.isfinite(atoms.positions).all():
        return True
    return analysis.max_bond_deviation(atoms.positions, bonds, bond_reference) > threshold


def _sample(samples: dict, atoms: Atoms, time_ps: float) -> None:
    """Appends the current positions, velocities (Å/fs), time, total energy and temperature."""
    samples["positions"].append(atoms.positions.copy())
    samples["velocities"].append(atoms.get_velocities() * units.fs)
    samples["times_ps"].append(time_ps)
    samples["total_energy_eV"].append(atoms.get_potential_energy() + atoms.get_kinetic_energy())
    samples["temperature_K"].append(_temperature(atoms))
    spread = atoms.calc.results.get("forces_std") if atoms.calc is not None else None
    if spread is not None:  # a committee: log the force uncertainty along the trajectory
        samples["forces_std_max"].append(float(np.linalg.norm(spread, axis=1).max()))


@dataclass
class MDReport:
    """The numbers of a simulation against its reference (Å, eV, fs, ps, K, cm^-1)."""

    molecule: str
    ensemble: str
    temperature_K: float
    timestep_fs: float
    dtype: str
    requested_ps: float
    simulated_ps: float
    steps: int
    stable: bool
    collapse_time_ps: float | None
    collapse_reason: str
    wall_time_s: float
    ms_per_step: float
    mean_temperature_K: float
    hr_mae: float | None = None
    hr_mae_reference_halves: float | None = None  # first vs second half of the reference: its noise floor
    energy_drift_meV_atom_ps: float | None = None
    forces_std_max_eV_per_A: float | None = None  # committee only: largest force spread along the run
    forces_std_mean_eV_per_A: float | None = None
    internals_mae: dict = field(default_factory=dict)
    harmonic_cm: list = field(default_factory=list)
    reference: str | None = None
    files: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def reference_bonds(reference: analysis.Ensemble, atoms: Atoms):
    """Bonds of the reference's first frame and their mean lengths over the ensemble (Å).

    Raises:
        ValueError: if ``atoms`` is not the reference molecule with the same atom order.
    """
    bonds = analysis.find_bonds(reference.numbers, reference.positions[0])
    same_atoms = np.array_equal(atoms.numbers, reference.numbers)
    if not same_atoms or not np.array_equal(analysis.find_bonds(atoms.numbers, atoms.positions), bonds):
        raise ValueError(f"the structure is not the reference {reference.name!r} molecule with the same atom order "
                         "(its elements or bonds differ atom by atom)")
    return bonds, analysis.bond_lengths(reference.positions, bonds).mean(axis=0)


def _harmonic_cm(atoms, model, device) -> list:
    """Hessian frequencies (cm^-1) at the model's float64 minimum near ``atoms``."""
    from mlpot.workflows.vibrations import harmonic_frequencies, relax_to_minimum

    if isinstance(model, (list, tuple)):
        model = model[0]  # a committee's frequencies: those of its first member
    calc = load_calculator(model, "float64", device)
    relaxed, hessian = relax_to_minimum(atoms, calc, 1e-3, calc.get_hessian, max_steps=500)
    return harmonic_frequencies(relaxed.atoms, hessian).tolist()


def _molecule_label(molecule: str) -> str:
    return molecule if molecule in MOLECULES else Path(molecule).stem


def simulate(
    model,
    molecule: str,
    temperature_K: float = 500.0,
    time="10ps",
    timestep="0.5fs",
    ensemble: str = "langevin",
    output_dir=None,
    dtype: str | None = None,
    device: str = "cpu",
    data_dir=None,
    reference_data: str | None = None,
    traj_format: str = "traj",
    friction_per_fs: float = 0.01,
    seed: int = 0,
    harmonic: bool = True,
    progress: bool = True,
    pressure_bar: float = 1.0,
    resume: bool = False,
    overwrite: bool = False,
    checkpoint_interval: int = 200,
    compile: bool = False,
) -> MDReport:
    """``mlpot md``: MD of a molecule from its reference geometry, compared with its reference ensemble.

    Writes ``md.traj`` (or ``md.xyz``), ``md.log``, ``hr.png``, ``power_spectrum.png``, for ethanol
    ``ethanol_internals.png``, and ``summary.json`` into ``output_dir`` (default ``mlpot-md-<molecule>``).

    Args:
        model: deployed model file.
        molecule: "ethanol", "toluene", "aspirin", a dataset name or a structure file ASE reads.
        temperature_K: temperature, K.
        time, timestep: durations such as "10ps", "0.5fs" or numbers of fs.
        ensemble: "nve", "langevin", "nose-hoover" or "npt" (periodic structures only, at ``pressure_bar``).
        dtype: model precision ("float32"/"float64"); default the file's own.
        data_dir: folder of the reference data (default $MLPOT_DATA_DIR).
        reference_data: dataset name or file of the reference ensemble (default: the molecule's).
        traj_format: "traj" (ASE) or "extxyz".
        harmonic: also draw the Hessian frequencies of the relaxed structure on the power spectrum.
        resume: continue the killed or stopped run in ``output_dir`` (same options), bit for bit.
        overwrite: replace the results already in ``output_dir`` (kept until the new run has finished).
        checkpoint_interval: steps between checkpoints (see :func:`run_md`).
        compile: run the dynamics on the AOTInductor build of a TorchScript file (about 3x faster per step,
            compiled on first use and cached; :func:`mlpot.export.compiled_copy`); the Hessian frequencies
            still come from the TorchScript file, in float64.

    Raises:
        ValueError: the model cannot take the starting structure (e.g. elements it does not know);
            checked before anything is written.
    """
    if checkpoint_interval < 1:
        raise ValueError(f"--checkpoint-interval {checkpoint_interval} must be a positive number of steps")
    label = _molecule_label(molecule)
    atoms = analysis.load_structure(molecule, data_dir)
    check_ensemble(atoms, ensemble)
    named = molecule in MOLECULES or molecule in known_datasets()
    reference_spec = reference_data or (molecule if named else None)
    reference = analysis.load_ensemble(reference_spec, data_dir) if reference_spec else None
    bonds, lengths = reference_bonds(reference, atoms) if reference else (None, None)
    calc = load_calculator(model, dtype, device, compile=compile)
    try:  # a start the model refuses (unknown elements, ...) is a wrong input, not a collapse of the dynamics
        calc.get_potential_energy(atoms)
    except ValueError as error:
        raise ValueError(f"{molecule}: {error}") from None
    out = Path(output_dir or f"mlpot-md-{label}")
    params = {"model": model, "structure": molecule, "temperature_K": temperature_K, "time": str(time),
              "timestep": str(timestep), "ensemble": ensemble, "dtype": name_of(calc.dtype), "seed": seed,
              "friction_per_fs": friction_per_fs, "pressure_bar": pressure_bar, "traj_format": traj_format,
              **({"compile": True} if compile else {})}  # absent when off: runs from before the option resume
    with output_folder(out, STATE_FILE, resume, overwrite, params) as work:
        traj_path = work / ("md.traj" if traj_format == "traj" else "md.xyz")
        run = run_md(atoms, calc, temperature_K, parse_time(time), parse_time(timestep), ensemble, bonds, lengths,
                     trajectory=traj_path, logfile=work / "md.log", friction_per_fs=friction_per_fs, seed=seed,
                     progress=progress, pressure_bar=pressure_bar,
                     checkpoint=work / STATE_FILE, resume=resume,
                     checkpoint_interval=checkpoint_interval)
        return _analyse(run, label, ensemble, temperature_K, time, calc, reference, work, out, harmonic, atoms, model,
                        device)


def _analyse(run, label, ensemble, temperature_K, time, calc, reference, out, final, harmonic, atoms, model, device):
    """The report of a run, its figures and summary.json in ``out`` (named as in ``final``, the folder they
    end up in)."""
    traj_path = out / ("md.traj" if (out / "md.traj").exists() else "md.xyz")
    report = _report(run, label, ensemble, temperature_K, parse_time(time), name_of(calc.dtype))
    report.reference = reference.name if reference else None
    report.files = {"trajectory": str(traj_path), "log": str(out / "md.log")}
    _compare(run, reference, report, out)
    if harmonic:
        try:
            report.harmonic_cm = _harmonic_cm(atoms, model, device)
        except Exception as error:  # an untrained or broken model may not relax; the MD numbers still stand
            report.notes.append(f"no harmonic frequencies: {type(error).__name__}: {error}")
    _power_spectrum(run, report, out)
    report.files["summary"] = str(out / "summary.json")
    report.files = {name: str(Path(final) / Path(path).name) for name, path in report.files.items()}
    write_json(out / "summary.json", json.loads(json.dumps(asdict(report), default=float)))
    return report


def _report(run: MDRun, label, ensemble, temperature_K, time_fs, dtype) -> MDReport:
    """The run's own numbers: stability, timing, temperature and (NVE) energy drift."""
    stable = run.collapse_step is None
    report = MDReport(
        molecule=label, ensemble=ensemble, temperature_K=temperature_K, timestep_fs=run.timestep_fs, dtype=dtype,
        requested_ps=time_fs / 1000.0, simulated_ps=run.steps * run.timestep_fs / 1000.0, steps=run.steps,
        stable=stable, collapse_time_ps=None if stable else run.collapse_step * run.timestep_fs / 1000.0,
        collapse_reason=run.collapse_reason, wall_time_s=run.wall_time_s,
        ms_per_step=1000.0 * run.wall_time_s / max(run.steps, 1),
        mean_temperature_K=float(run.temperature_K.mean()) if len(run.temperature_K) else float("nan"),
    )
    if len(run.forces_std_max):
        report.forces_std_max_eV_per_A = float(run.forces_std_max.max())
        report.forces_std_mean_eV_per_A = float(run.forces_std_max.mean())
    if ensemble == "nve" and len(run.times_ps) > 2:
        report.energy_drift_meV_atom_ps = analysis.energy_drift(run.times_ps, run.total_energy_eV, len(run.numbers))
    return report


def _compare(run: MDRun, reference, report: MDReport, out: Path) -> None:
    """h(r) (and ethanol's internal coordinates) of the run against the reference ensemble, with figures."""
    if len(run.positions) == 0:
        return
    r, h = analysis.distance_histogram(run.positions)
    h_ref = analysis.distance_histogram(reference.positions)[1] if reference else None
    if h_ref is not None:
        report.hr_mae = analysis.hr_mae(h, h_ref)
        half = len(reference.positions) // 2
        h_first, h_second = (analysis.distance_histogram(p)[1] for p in np.split(reference.positions, [half]))
        report.hr_mae_reference_halves = analysis.hr_mae(h_first, h_second)
    title = f"{report.molecule}, {report.ensemble} {report.temperature_K:g} K, {report.simulated_ps:.2f} ps"
    analysis.plot_hr(r, h, h_ref, out / "hr.png", title)
    report.files["hr"] = str(out / "hr.png")
    if reference is not None and analysis.is_ethanol(run.numbers):
        internals = analysis.ethanol_internals(run.numbers, run.positions)
        ref_internals = analysis.ethanol_internals(reference.numbers, reference.positions)
        report.internals_mae = {k: analysis.distribution_mae(v, ref_internals[k]) for k, v in internals.items()}
        analysis.plot_internals(internals, ref_internals, out / "ethanol_internals.png", title)
        report.files["internals"] = str(out / "ethanol_internals.png")


def _power_spectrum(run: MDRun, report: MDReport, out: Path) -> None:
    """Power spectrum of the run's velocities, with the harmonic frequencies drawn on it."""
    if len(run.velocities) < 8:
        return
    wavenumbers, spectrum = analysis.power_spectrum(run.velocities, run.masses, run.sample_interval * run.timestep_fs)
    title = f"{report.molecule}: VACF power spectrum ({report.ensemble} {report.temperature_K:g} K)"
    analysis.plot_power_spectrum(wavenumbers, spectrum, out / "power_spectrum.png", report.harmonic_cm, title)
    report.files["power_spectrum"] = str(out / "power_spectrum.png")


def format_md(report: MDReport) -> str:
    """A human-readable summary with units."""
    if report.stable:
        stability = f"stable for {report.simulated_ps:.3f} ps"
    else:
        stability = f"COLLAPSED at {report.collapse_time_ps:.3f} ps ({report.collapse_reason})"
    lines = [
        f"{report.molecule}: {report.ensemble} MD at {report.temperature_K:g} K, step {report.timestep_fs:g} fs, "
        f"{report.dtype}; {report.steps} steps = {report.simulated_ps:.3f} ps of {report.requested_ps:.3f} ps asked",
        f"stability (bonds within 0.5 Å of their reference mean): {stability}",
        f"wall time {report.wall_time_s:.1f} s = {report.ms_per_step:.2f} ms/step; "
        f"mean temperature {report.mean_temperature_K:.1f} K",
    ]
    if report.hr_mae is not None:
        lines.append(f"h(r) MAE against {report.reference}: {report.hr_mae:.4f} (∫|h - h_ref| dr, 0-10 Å, 500 bins; "
                     f"the reference's two halves differ by {report.hr_mae_reference_halves:.4f})")
    for name, value in report.internals_mae.items():
        lines.append(f"{name} distribution MAE against the reference: {value:.4f}")
    if report.energy_drift_meV_atom_ps is not None:
        lines.append(f"NVE total-energy drift: {report.energy_drift_meV_atom_ps:+.4f} meV/atom/ps")
    if report.forces_std_max_eV_per_A is not None:
        lines.append(f"committee force uncertainty (largest per-atom std): mean {report.forces_std_mean_eV_per_A:.4f}, "
                     f"max {report.forces_std_max_eV_per_A:.4f} eV/Å")
    lines += [f"note: {note}" for note in report.notes]
    lines += [f"wrote {path}" for path in report.files.values()]
    return "\n".join(lines)
