"""An mlpot model as the force field of an OpenMM System (``pip install openmm openmmml``).

openmmml's ``ase`` potential wraps an ASE calculator in an ``openmm.PythonForce``: OpenMM hands it the
positions in nm and takes back the energy in kJ/mol and the forces in kJ/mol/nm, converted with ASE's
``kJ/mol`` (:data:`EV_TO_KJ_PER_MOL`). The model runs in Python on the CPU (or the calculator's device),
so any OpenMM platform works; ``openmmtorch`` is not needed.
"""

import ase.units
import openmm
from openmm import app, unit
from openmmml import MLPotential

from mlpot.calculators import MLPotCalculator

# kJ/mol per eV as openmmml's ase potential converts (ASE's CODATA 2014 constants: 96.4853329...; the
# SI 2019 value 96.4853321... differs by 8e-9 relative)
EV_TO_KJ_PER_MOL = ase.units.mol / ase.units.kJ


def topology_of(atoms) -> app.Topology:
    """An OpenMM Topology of a molecule: one chain, one residue, one OpenMM atom per ASE atom, same order."""
    if atoms.pbc.any():
        raise ValueError(f"topology_of builds molecules, but the atoms have pbc={atoms.pbc.tolist()}; set atoms.pbc = False")
    topology = app.Topology()
    residue = topology.addResidue("MOL", topology.addChain())
    for k, z in enumerate(atoms.numbers):
        topology.addAtom(f"{atoms[k].symbol}{k}", app.Element.getByAtomicNumber(int(z)), residue)
    return topology


def openmm_system(atoms, model, remove_cm_motion: bool = False, **calculator_kwargs):
    """(Topology, System, positions) of the molecule ``atoms`` with a deployed mlpot ``model`` as its force field.

    ``model`` is a deployed file's path (an :class:`~mlpot.calculators.MLPotCalculator` is made with
    ``calculator_kwargs``, e.g. ``dtype="float64"``) or an ASE calculator. Masses are OpenMM's element
    masses; positions come back as an OpenMM Quantity in nm. ``remove_cm_motion`` adds OpenMM's
    CMMotionRemover (off by default, so that a Verlet run conserves energy exactly).
    """
    calculator = model if hasattr(model, "get_potential_energy") else MLPotCalculator(str(model), **calculator_kwargs)
    topology = topology_of(atoms)
    system = MLPotential("ase").createSystem(topology, calculator=calculator, removeCMMotion=remove_cm_motion)
    positions = unit.Quantity(atoms.positions / 10.0, unit.nanometer)
    return topology, system, positions


def energy_and_forces(context: openmm.Context):
    """(energy in eV, forces (N, 3) in eV/Å) of an OpenMM Context, for comparing with ASE."""
    state = context.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / EV_TO_KJ_PER_MOL
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer) / (10.0 * EV_TO_KJ_PER_MOL)
    return energy, forces


__all__ = ["EV_TO_KJ_PER_MOL", "energy_and_forces", "openmm_system", "topology_of"]
