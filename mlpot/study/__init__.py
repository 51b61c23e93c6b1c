"""The seed study (``mlpot study ...``): learning curves, latent-space maps, irreps usage and symmetry checks.

* :mod:`mlpot.study.learning_curve` - every model at every training-set size under one budget rule.
* :mod:`mlpot.study.vibrations` - harmonic frequencies of the learning-curve models against reference ones.
* :mod:`mlpot.study.latent` - t-SNE of pooled last-layer features; rank correlations and k-NN R^2 with
  permutation p-values, against untrained networks of several seeds and raw distances.
* :mod:`mlpot.study.irreps` - EGNN feature-norm share per l, ablation of each l, retrain without one.
* :mod:`mlpot.study.symmetry` - rotations/reflections/translations, and a non-symmetric baseline.

Results and their write-up: ``examples/study/README.md``.
"""
