"""Building blocks shared by the models."""

from mlpot.nn.radial import BesselBasis, CosineCutoff, GaussianBasis, PolynomialCutoff, edge_vectors

__all__ = ["BesselBasis", "CosineCutoff", "GaussianBasis", "PolynomialCutoff", "edge_vectors"]
