"""Unit conversion factors: the only place in mlpot where they are written."""

from ase import units as _ase_units

_JOULE_PER_KCAL = 4184.0  # thermochemical calorie, exact
_AVOGADRO = 6.02214076e23  # 1/mol, exact (SI 2019)
_ELEMENTARY_CHARGE = 1.602176634e-19  # C, exact (SI 2019)

KCAL_PER_MOL_TO_EV = _JOULE_PER_KCAL / _AVOGADRO / _ELEMENTARY_CHARGE
EV_TO_MEV = 1000.0
HARTREE_TO_EV = float(_ase_units.Hartree)
EV_PER_A3_TO_GPA = _ELEMENTARY_CHARGE * 1e30 / 1e9  # 1 eV/Å^3 = 160.2 GPa
