"""Molecular-dynamics engines other than ASE running mlpot models, one module per engine.

Each module imports its engine (an optional dependency) at the top, so import only the one you use:
:mod:`~mlpot.engines.openmm` (OpenMM through openmmml's ``ase`` potential), :mod:`~mlpot.engines.ipi`
(i-PI path-integral MD through ASE's socket client) and :mod:`~mlpot.engines.torchsim` (TorchSim's
batched model interface). They reach models only through :mod:`mlpot.calculators` or :mod:`mlpot.export`.
"""
