"""Harmonic vibrations (finite differences and autograd Hessian), ab initio references and phonons (cm^-1)."""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes
from ase.vibrations import Vibrations

from mlpot.units import HARTREE_TO_EV
from mlpot import export
from mlpot.calculators import load_calculator
from mlpot.data.registry import MOLECULES
from mlpot.workflows.analysis import load_structure, plot_phonons, plot_spectrum
from mlpot.files import atomic_write, write_json
from mlpot.workflows.outputs import OPTIONS_FILE, output_folder
from mlpot.workflows.relax import relax

# sqrt(eV / Å^2 / amu) -> eV, as in ase.vibrations
_HBAR_OMEGA_EV = units._hbar * 1e10 / np.sqrt(units._e * units._amu)
PYSCF_HINT = "PySCF is not installed: `pip install pyscf` enables the PBE/def2-SVP reference (rMD17 level)"
XTB_HINT = "tblite is not installed: `pip install tblite` enables the GFN2-xTB reference"


IMAGINARY_TOLERANCE_CM = 10.0  # a more imaginary lowest mode means the relaxation stopped on a saddle


class ReferenceUnavailable(RuntimeError):
    """The ab initio reference cannot be computed here (missing package or unaffordable level)."""


@dataclass
class VibrationResult:
    """Harmonic analysis of one relaxed structure; frequencies in cm^-1 (negative = imaginary).

    Attributes:
        atoms: the relaxed structure.
        energy_eV: its energy, eV.
        max_force_eV_A: its largest force, eV/Å.
        fd_cm: (3N-6,) finite-difference frequencies (ase.vibrations).
        hessian_cm: (3N-6,) frequencies of the double-backward Hessian.
        zpe_fd_eV, zpe_hessian_eV: zero-point energies, eV.
        delta: finite-difference displacement, Å.
        nfree: 2 or 4 displacements per degree of freedom.
        reference: a ReferenceFrequencies, when computed.
    """

    atoms: Atoms
    energy_eV: float
    max_force_eV_A: float
    fd_cm: np.ndarray
    hessian_cm: np.ndarray
    zpe_fd_eV: float
    zpe_hessian_eV: float
    delta: float
    nfree: int
    reference: "ReferenceFrequencies | None" = None
    notes: list = field(default_factory=list)
    files: dict = field(default_factory=dict)

    @property
    def max_abs_diff_cm(self) -> float:
        """Largest |finite difference - Hessian| over the modes, cm^-1."""
        return float(np.abs(self.fd_cm - self.hessian_cm).max()) if len(self.fd_cm) else 0.0


@dataclass
class ReferenceFrequencies:
    """The same harmonic analysis with an ab initio calculator (at its own minimum)."""

    method: str
    frequencies_cm: np.ndarray
    zpe_eV: float

    def differences(self, model_cm) -> np.ndarray:
        """Model minus reference per mode (both sorted), cm^-1."""
        return np.asarray(model_cm) - self.frequencies_cm


def rigid_motions(atoms: Atoms, rotations: bool = True):
    """Orthonormal mass-weighted bases: (3N, k) rigid translations (and rotations), (3N, 3N-k) the rest."""
    sqrt_m = np.sqrt(atoms.get_masses())
    vectors = []
    for axis in np.eye(3):
        vectors.append((sqrt_m[:, None] * axis[None, :]).ravel())
    if rotations:
        centred = atoms.positions - atoms.get_center_of_mass()
        for axis in np.eye(3):
            vectors.append((sqrt_m[:, None] * np.cross(axis, centred)).ravel())
    u, s, _ = np.linalg.svd(np.stack(vectors, axis=1), full_matrices=True)
    rank = int((s > 1e-6 * s.max()).sum())  # 5 for a linear molecule
    return u[:, :rank], u[:, rank:]


def normal_modes(atoms: Atoms, hessian, rotations: bool | None = None):
    """Vibrational frequencies and modes of a (3N, 3N) Hessian in eV/Å^2.

    The mass-weighted Hessian is restricted to the space orthogonal to rigid translations and
    rotations (rotations kept for periodic structures), so a molecule gives exactly 3N-6 (3N-5) modes.

    Returns:
        (M,) frequencies in cm^-1, ascending, negative = imaginary; (M, N, 3) Cartesian displacements.
    """
    if rotations is None:
        rotations = not atoms.pbc.any()
    inv_sqrt_m = np.repeat(atoms.get_masses() ** -0.5, 3)
    weighted = np.asarray(hessian) * inv_sqrt_m[:, None] * inv_sqrt_m[None, :]
    _, internal = rigid_motions(atoms, rotations)
    eigenvalues, vectors = np.linalg.eigh(internal.T @ (0.5 * (weighted + weighted.T)) @ internal)
    hbar_omega = _HBAR_OMEGA_EV * np.sign(eigenvalues) * np.sqrt(np.abs(eigenvalues))
    modes = (inv_sqrt_m[:, None] * (internal @ vectors)).T.reshape(len(eigenvalues), len(atoms), 3)
    return hbar_omega / units.invcm, modes


def harmonic_frequencies(atoms: Atoms, hessian, rotations: bool | None = None) -> np.ndarray:
    """Sorted vibrational frequencies (cm^-1, negative = imaginary) of a (3N, 3N) Hessian in eV/Å^2."""
    return normal_modes(atoms, hessian, rotations)[0]


def relax_to_minimum(atoms: Atoms, calc, fmax: float, hessian_of, max_restarts: int = 2, max_steps: int = 2000):
    """Relaxes, and while the result has an imaginary mode (a saddle), steps 0.1 Å down it and relaxes again.

    Args:
        hessian_of: function of the relaxed atoms giving their (3N, 3N) Hessian, eV/Å^2.

    Returns:
        the last RelaxResult and its Hessian.
    """
    relaxed = relax(atoms, calc, fmax=fmax, max_steps=max_steps)
    hessian = hessian_of(relaxed.atoms)
    for _ in range(max_restarts):
        frequencies, modes = normal_modes(relaxed.atoms, hessian)
        if frequencies[0] > -IMAGINARY_TOLERANCE_CM:
            break
        displaced = relaxed.atoms.copy()
        displaced.positions += 0.1 * modes[0] / np.linalg.norm(modes[0], axis=1).max()
        relaxed = relax(displaced, calc, fmax=fmax, max_steps=max_steps)
        hessian = hessian_of(relaxed.atoms)
    return relaxed, hessian


def zero_point_energy(frequencies_cm) -> float:
    """½ Σ ħω over the real modes, eV."""
    frequencies_cm = np.asarray(frequencies_cm)
    return float(0.5 * frequencies_cm[frequencies_cm > 0].sum() * units.invcm)


def finite_difference_hessian(atoms: Atoms, delta: float = 0.005, nfree: int = 2, cache=None) -> np.ndarray:
    """(3N, 3N) Hessian in eV/Å^2 from central differences of ``atoms.calc`` forces (ase.vibrations).

    The displacements' forces are cached in a temporary folder removed afterwards or, with ``cache`` (a
    folder), in ``cache/vib-<key>``, kept: a later call for the same structure (the key is a hash of its
    numbers and positions, bit for bit, and of ``delta`` and ``nfree``) reuses the displacements finished
    (those a kill left half written are done again).
    """
    if cache is None:
        with tempfile.TemporaryDirectory(prefix="mlpot-vib-") as tmp:
            return finite_difference_hessian(atoms, delta, nfree, tmp)
    key = hashlib.sha1(atoms.numbers.tobytes() + atoms.positions.tobytes() + repr((delta, nfree)).encode()).hexdigest()
    folder = Path(cache) / f"vib-{key[:16]}"
    for done in folder.glob("*.json"):
        try:
            json.loads(done.read_text())
        except ValueError:  # half written by a killed run (or a lock left by it)
            done.unlink()
    vib = Vibrations(atoms, name=str(folder), delta=delta, nfree=nfree)
    vib.run()
    return vib.get_vibrations().get_hessian_2d()


def analyse(atoms: Atoms, calc, delta: float = 0.005, nfree: int = 2, fmax: float = 1e-4, cache=None) -> VibrationResult:
    """Relaxes ``atoms`` with ``calc`` (float64) to a minimum; finite-difference and Hessian frequencies there
    (the displacements cached in ``cache``, see :func:`finite_difference_hessian`)."""
    relaxed, hessian = relax_to_minimum(atoms, calc, fmax, calc.get_hessian)
    notes = [] if relaxed.converged else [f"relaxation stopped at max force {relaxed.max_force_eV_A:.1e} eV/Å"]
    fd_cm = harmonic_frequencies(relaxed.atoms, finite_difference_hessian(relaxed.atoms, delta, nfree, cache))
    hessian_cm = harmonic_frequencies(relaxed.atoms, hessian)
    if hessian_cm[0] < -IMAGINARY_TOLERANCE_CM:
        notes.append(f"imaginary mode {hessian_cm[0]:.1f} cm^-1 left: a saddle point, not a minimum")
    return VibrationResult(
        atoms=relaxed.atoms,
        energy_eV=relaxed.energy_eV,
        max_force_eV_A=relaxed.max_force_eV_A,
        fd_cm=fd_cm,
        hessian_cm=hessian_cm,
        zpe_fd_eV=zero_point_energy(fd_cm),
        zpe_hessian_eV=zero_point_energy(hessian_cm),
        delta=delta,
        nfree=nfree,
        notes=notes,
    )


class PySCFCalculator(Calculator):
    """Kohn-Sham DFT energies and forces from PySCF; the default is PBE/def2-SVP, the rMD17 level.

    Args:
        xc: exchange-correlation functional.
        basis: Gaussian basis set.
        grid_level: PySCF integration grid level.
        conv_tol: SCF energy convergence, Hartree.
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, xc: str = "PBE", basis: str = "def2-SVP", grid_level: int = 3, conv_tol: float = 1e-10,
                 **kwargs):
        super().__init__(**kwargs)
        self.xc, self.basis, self.grid_level, self.conv_tol = xc, basis, grid_level, conv_tol
        self._density = None  # previous density matrix: a warm start for nearby geometries

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        from pyscf import dft, gto

        geometry = [(s, tuple(p)) for s, p in zip(self.atoms.get_chemical_symbols(), self.atoms.positions)]
        mol = gto.M(atom=geometry, basis=self.basis, unit="Angstrom", verbose=0)
        scf = dft.RKS(mol)
        scf.xc, scf.conv_tol, scf.grids.level = self.xc, self.conv_tol, self.grid_level
        energy_ha = scf.kernel(dm0=self._density)
        if not scf.converged:
            raise RuntimeError(f"PySCF {self.xc}/{self.basis} SCF did not converge")
        self._density = scf.make_rdm1()
        gradient = scf.nuc_grad_method().kernel()  # Hartree/Bohr
        energy = float(energy_ha) * HARTREE_TO_EV
        self.results = {"energy": energy, "free_energy": energy, "forces": -gradient * HARTREE_TO_EV / units.Bohr}


def reference_method(dataset: str | None) -> str | None:
    """The affordable reference for a training set: "pyscf" (PBE/def2-SVP), "xtb" (GFN2-xTB) or None."""
    dataset = dataset or ""
    if dataset.startswith("rmd17_") or dataset == "ethanol_pbe_def2svp":
        return "pyscf"
    if dataset.endswith("_gfn2xtb"):
        return "xtb"
    return None


def reference_calculator(method: str) -> Calculator:
    """An ASE calculator for ``method`` ("pyscf" or "xtb"); raises ReferenceUnavailable with how to enable it."""
    if method == "pyscf":
        try:
            import pyscf  # noqa: F401
        except ImportError:
            raise ReferenceUnavailable(PYSCF_HINT) from None
        return PySCFCalculator()
    if method == "xtb":
        try:
            from tblite.ase import TBLite
        except ImportError:
            raise ReferenceUnavailable(XTB_HINT) from None
        return TBLite(method="GFN2-xTB", verbosity=0)
    raise ReferenceUnavailable(f"unknown reference {method!r}; use 'pyscf' (PBE/def2-SVP) or 'xtb' (GFN2-xTB)")


def resolve_reference(choice: str, dataset: str | None) -> str:
    """The reference method for ``--reference choice`` ("auto" picks the training data's level)."""
    if choice != "auto":
        return choice
    method = reference_method(dataset)
    if method is None:
        raise ReferenceUnavailable(
            f"no affordable ab initio reference for training data {dataset!r} (CCSD/CCSD(T) or unknown); "
            "pass --reference pyscf or --reference xtb explicitly"
        )
    return method


def reference_frequencies(
    atoms: Atoms, method: str, delta: float = 0.005, nfree: int = 2, fmax: float = 1e-3
) -> ReferenceFrequencies:
    """Relaxes ``atoms`` with the ab initio ``method`` and computes its finite-difference frequencies."""
    calc = reference_calculator(method)
    relaxed, hessian = relax_to_minimum(atoms, calc, fmax, lambda a: finite_difference_hessian(a, delta, nfree),
                                        max_steps=300)
    frequencies = harmonic_frequencies(relaxed.atoms, hessian)
    label = {"pyscf": "PBE/def2-SVP (PySCF)", "xtb": "GFN2-xTB (tblite)"}.get(method, method)
    return ReferenceFrequencies(label, frequencies, zero_point_energy(frequencies))


def format_vibrations(result: VibrationResult) -> str:
    """Per-mode table of both frequency lists, their difference and the zero-point energies."""
    ref = result.reference
    header = f"{'mode':>4} {'FD (cm^-1)':>12} {'Hessian (cm^-1)':>16} {'diff (cm^-1)':>13}"
    if ref is not None:
        header += f" {'reference (cm^-1)':>18} {'model-ref (cm^-1)':>18}"
    lines = [f"relaxed: energy {result.energy_eV:.6f} eV, max force {result.max_force_eV_A:.1e} eV/Å", header]
    for k, (fd, hess) in enumerate(zip(result.fd_cm, result.hessian_cm)):
        line = f"{k + 1:4d} {fd:12.2f} {hess:16.2f} {fd - hess:13.3f}"
        if ref is not None and k < len(ref.frequencies_cm):
            line += f" {ref.frequencies_cm[k]:18.2f} {hess - ref.frequencies_cm[k]:18.2f}"
        lines.append(line)
    lines.append(f"max |FD - Hessian| = {result.max_abs_diff_cm:.3f} cm^-1 over {len(result.fd_cm)} modes "
                 f"(delta {result.delta} Å, nfree {result.nfree})")
    lines.append(f"zero-point energy: FD {result.zpe_fd_eV:.4f} eV, Hessian {result.zpe_hessian_eV:.4f} eV")
    if ref is not None:
        diff = ref.differences(result.hessian_cm)
        lines.append(f"reference {ref.method}: ZPE {ref.zpe_eV:.4f} eV; model - reference: "
                     f"MAE {np.abs(diff).mean():.1f} cm^-1, max |diff| {np.abs(diff).max():.1f} cm^-1")
    return "\n".join(lines + result.notes)


@dataclass
class PhononResult:
    """Phonons of a periodic structure; frequencies in cm^-1 (negative = imaginary).

    Attributes:
        gamma_fd_cm: optical Γ frequencies from ase.phonons (finite differences on the supercell).
        gamma_hessian_cm: optical Γ frequencies from the double-backward Hessian of the unit cell.
        band_path: the special-point path of the band structure.
        figure: path of the band structure + DOS figure.
    """

    gamma_fd_cm: np.ndarray
    gamma_hessian_cm: np.ndarray
    band_path: str
    figure: str | None = None
    files: dict = field(default_factory=dict)

    @property
    def max_abs_diff_cm(self) -> float:
        """Largest |finite difference - Hessian| over the optical Γ modes, cm^-1."""
        diff = np.abs(self.gamma_fd_cm - self.gamma_hessian_cm)
        return float(diff.max()) if len(diff) else 0.0


def phonons(
    atoms: Atoms, calc, supercell=(3, 3, 3), delta: float = 0.01, npoints: int = 100, kpts=(10, 10, 10), figure=None
) -> PhononResult:
    """ase.phonons on a supercell: band structure and DOS, and Γ frequencies against the unit-cell Hessian.

    Args:
        atoms: relaxed periodic structure, with ``calc`` attached or not.
        calc: ASE calculator (float64 model).
        supercell: repetitions of the unit cell for the force constants.
        delta: finite-difference displacement, Å.
        npoints: points on the band path.
        kpts: Monkhorst-Pack grid of the DOS.
        figure: optional path of the band structure + DOS figure.
    """
    from ase.phonons import Phonons

    atoms = atoms.copy()
    atoms.calc = calc
    with tempfile.TemporaryDirectory(prefix="mlpot-phonon-") as tmp:
        ph = Phonons(atoms, calc, supercell=tuple(supercell), delta=delta, name=str(Path(tmp) / "phonon"))
        ph.run()
        ph.read(acoustic=True)
        path = atoms.cell.bandpath(npoints=npoints)
        bands = ph.get_band_structure(path, verbose=False)
        dos = ph.get_dos(kpts=kpts, verbose=False).sample_grid(npts=600, width=1e-3)
        gamma = np.sort(ph.band_structure([[0.0, 0.0, 0.0]], verbose=False)[0] / units.invcm)
    num_acoustic = 3
    gamma_fd = np.sort(gamma[np.argsort(np.abs(gamma))[num_acoustic:]])
    gamma_hessian = harmonic_frequencies(atoms, calc.get_hessian(atoms), rotations=False)
    if figure is not None:
        plot_phonons(path, bands.energies[0] / units.invcm, dos.get_energies() / units.invcm, dos.get_weights(),
                     figure)
    return PhononResult(gamma_fd, gamma_hessian, path.path, str(figure) if figure else None)


def format_phonons(result: PhononResult) -> str:
    """Γ-point table of both methods and the band path."""
    lines = [f"phonons: band path {result.band_path}; optical Γ modes (cm^-1):",
             f"{'mode':>4} {'ase.phonons':>12} {'Hessian':>10} {'diff':>8}"]
    for k, (fd, hess) in enumerate(zip(result.gamma_fd_cm, result.gamma_hessian_cm)):
        lines.append(f"{k + 1:4d} {fd:12.2f} {hess:10.2f} {fd - hess:8.3f}")
    lines.append(f"max |FD - Hessian| at Γ = {result.max_abs_diff_cm:.3f} cm^-1")
    return "\n".join(lines)


def run_vibrations(
    model,
    structure: str,
    delta: float = 0.005,
    nfree: int = 2,
    fmax: float = 1e-4,
    reference: str | None = None,
    output_dir=None,
    data_dir=None,
    device: str = "cpu",
    supercell=(3, 3, 3),
    resume: bool = False,
    overwrite: bool = False,
):
    """``mlpot vibrations``: float64 relaxation, then harmonic analysis (molecules) or phonons (periodic).

    Writes ``relaxed.xyz``, ``spectrum.png`` (or ``phonons.png``) and ``vibrations.json`` into
    ``output_dir`` (default ``mlpot-vibrations-<structure>``), and for a molecule the finite-difference
    displacements' forces into ``displacements/``: ``resume`` (same options) reuses those finished.
    ``overwrite`` replaces the results of an earlier run (kept until the new one has finished).

    Args:
        model: deployed model file.
        structure: "ethanol", "toluene", "aspirin", a dataset name or a structure file.
        delta: finite-difference displacement, Å.
        nfree: 2 or 4 displacements per degree of freedom.
        fmax: relaxation criterion, eV/Å.
        reference: None, "auto" (the training data's level), "pyscf" or "xtb".
        supercell: repetitions for ase.phonons (periodic structures).

    Returns:
        a VibrationResult for a molecule, a PhononResult for a periodic structure.
    """
    label = structure if structure in MOLECULES else Path(structure).stem
    out = Path(output_dir or f"mlpot-vibrations-{label}")
    atoms = load_structure(structure, data_dir)
    calc = load_calculator(model, "float64", device)
    options = {"model": str(model), "structure": structure, "delta": delta, "nfree": nfree, "fmax": fmax,
               "reference": reference, "supercell": list(supercell)}
    with output_folder(out, OPTIONS_FILE, resume, overwrite, options) as work:
        result = _vibrations_into(work, out, atoms, calc, model, label, delta, nfree, fmax, reference, supercell)
    return result


def _vibrations_into(out, final, atoms, calc, model, label, delta, nfree, fmax, reference, supercell):
    """The work of :func:`run_vibrations` in the folder ``out`` (files named as in ``final``)."""
    if atoms.pbc.any():
        relaxed = relax(atoms, calc, fmax=fmax)
        result = phonons(relaxed.atoms, calc, supercell, delta=delta, figure=out / "phonons.png")
        numbers = {"gamma_fd_cm": result.gamma_fd_cm, "gamma_hessian_cm": result.gamma_hessian_cm}
        structure_atoms = relaxed.atoms
        result.files = {"figure": str(out / "phonons.png")}
    else:
        result = analyse(atoms, calc, delta, nfree, fmax, cache=out / "displacements")
        if reference:
            _add_reference(result, model, reference, delta, nfree)
        numbers = _spectrum_outputs(result, out / "spectrum.png", f"{label}: harmonic frequencies")
        structure_atoms = result.atoms
        result.files = {"spectrum": str(out / "spectrum.png")}
    structure_atoms.get_forces()  # the shared calculator's last results may belong to a displaced supercell
    atomic_write(out / "relaxed.xyz", lambda tmp: ase.io.write(tmp, structure_atoms, format="extxyz"))
    write_json(out / "vibrations.json", json.loads(json.dumps(numbers, default=lambda a: np.asarray(a).tolist())))
    result.files.update(structure=str(out / "relaxed.xyz"), numbers=str(out / "vibrations.json"))
    result.files = {name: str(Path(final) / Path(path).name) for name, path in result.files.items()}
    return result


def _spectrum_outputs(result: VibrationResult, figure, title: str) -> dict:
    """Draws the spectrum figure and returns the numbers written to vibrations.json."""
    ref = result.reference
    plot_spectrum(result.fd_cm, result.hessian_cm, figure, ref.frequencies_cm if ref else None,
                  ref.method if ref else "", title=title)
    numbers = {"fd_cm": result.fd_cm, "hessian_cm": result.hessian_cm, "zpe_fd_eV": result.zpe_fd_eV,
               "zpe_hessian_eV": result.zpe_hessian_eV, "max_abs_diff_cm": result.max_abs_diff_cm}
    if ref is not None:
        numbers.update(reference_cm=ref.frequencies_cm, reference_method=ref.method, reference_zpe_eV=ref.zpe_eV)
    return numbers


def _add_reference(result: VibrationResult, model, choice: str, delta: float, nfree: int) -> None:
    """Adds the ab initio reference frequencies, or a note saying why there are none."""
    try:
        method = resolve_reference(choice, export.read_metadata(model).get("dataset"))
        result.reference = reference_frequencies(result.atoms, method, delta, nfree)
    except ReferenceUnavailable as error:
        result.notes.append(f"no reference frequencies: {error}")
