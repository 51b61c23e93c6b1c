"""mlpot: machine-learned interatomic potentials (GCN, SchNet, equivariant EGNN) for ASE."""

from mlpot.version import __version__  # noqa: E402

from mlpot.calculators import CommitteeCalculator, EGNNCalculator, GNNCalculator, MLPotCalculator  # noqa: E402
from mlpot.models import MODELS, Potential, build_potential  # noqa: E402

__all__ = ["CommitteeCalculator", "EGNNCalculator", "GNNCalculator", "MLPotCalculator", "MODELS", "Potential", "build_potential", "__version__"]
