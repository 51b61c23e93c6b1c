"""``mlpot study learning-curve|lr-search|stats|protocol|vibrations|latent|irreps|symmetry``: the parsers and runners of the study subcommands."""

from __future__ import annotations

import argparse

from mlpot.dtypes import DTYPE_NAMES

MODEL_HELP = "deployed model file (.pt), training checkpoint (best.pt) or run folder"
DATA_HELP = ("molecule (ethanol, toluene, aspirin: rMD17), dataset name or file "
             "(default: the model's training set)")


def _common(p: argparse.ArgumentParser, output_default: str, seed: bool = True,
            seed_help: str = "seed of the data draws and the initialisation") -> None:
    p.add_argument("--output", default=None, help=f"output folder (default: {output_default})")
    p.add_argument("--data-dir", default=None, help="reference data folder (default: $MLPOT_DATA_DIR)")
    if seed:  # learning-curve and lr-search take --seeds and --splits instead
        p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)


def _learning_curve_options(p: argparse.ArgumentParser, lc) -> None:
    """The options learning-curve and lr-search share: data, replicates, budget, run folders."""
    p.add_argument("--molecule", default="ethanol", help="ethanol, toluene or aspirin (rMD17)")
    p.add_argument("--seeds", default="0", help="comma list of initialisation seeds (weights and batch order)")
    p.add_argument("--splits", default="1",
                   help="comma list of data splits: rMD17 split files 1..5 (train frames drawn with data seed split - 1, "
                        "tested on that split's test file); for a file dataset only the data seed")
    p.add_argument("--pairing", default="product", choices=["product", "zip"],
                   help="runs per model and size: every seed on every split (product) or seed i on split i (zip)")
    p.add_argument("--budget", default="steps", choices=list(lc.BUDGETS),
                   help="steps: a fixed number of steps; converged: early stopping on validation with a step cap "
                        "that scales with N; time: --max-time seconds per run")
    p.add_argument("--steps", type=int, default=lc.DEFAULT_STEPS,
                   help=f"steps budget: optimizer steps of {lc.BATCH_SIZE} structures per run, every model and size")
    p.add_argument("--steps-per-frame", type=float, default=40.0,
                   help="converged budget: the step cap is this times N, clipped to [--min-steps, --max-steps]")
    p.add_argument("--min-steps", type=int, default=10000, help="converged budget: smallest step cap")
    p.add_argument("--max-steps", type=int, default=40000, help="converged budget: largest step cap")
    p.add_argument("--patience", type=int, default=None,
                   help="converged budget: epochs without a better validation loss before stopping "
                        "(default: 10 %% of the epoch cap, at least 20)")
    p.add_argument("--max-time", type=float, default=None,
                   help="seconds of training per run: the budget of --budget time, an extra cap otherwise")
    p.add_argument("--dataset", default=None, help="dataset name or file (default: rmd17_<molecule>)")
    p.add_argument("--test-dataset", default=None, help="test file (default: the dataset's test split)")
    p.add_argument("--test-size", type=int, default=None, help="test on a fixed random subset of this many frames (default: all)")
    p.add_argument("--runs-dir", default=None, help="run folders (default: runs/study/<study>-<molecule>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every run, e.g. train.compile=true (repeatable)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap samples of each slope's confidence interval")
    p.add_argument("--progress", action="store_true", help="show the trainer's per-epoch progress")


def add_run_selection(p) -> None:
    """The learning-curve CSVs and the filters of the commands that analyse their runs (protocol, vibrations)."""
    p.add_argument("csv", metavar="CSV", nargs="+",
                   help="learning_curve.csv of mlpot study learning-curve; several (e.g. one per model's folder) are read as one")
    p.add_argument("--models", default=None, help="comma list: only these models (default: all)")
    p.add_argument("--sizes", default=None, help="comma list: only these sizes (default: all)")
    p.add_argument("--budget", default=None, help="only runs of this budget label, e.g. steps4000 (needed when there are several)")


def add_parser(sub) -> argparse.ArgumentParser:
    """The ``study`` subcommand with its own subcommands; returns its parser."""
    from mlpot.study import latent
    from mlpot.study import learning_curve as lc

    study = sub.add_parser("study", help="seed study: learning curves, latent maps, irreps usage, symmetry",
                           description="The invariant-vs-equivariant seed study; see examples/study/README.md.")
    ssub = study.add_subparsers(dest="study_command", required=True, metavar="STUDY", title="studies")

    p = ssub.add_parser("learning-curve", help="train every model at every size under one budget; test MAE, slopes, statistics",
                        description="Train every model at every training-set size, seed and data split under one budget\n"
                                    "rule; test MAE per run, mean and spread per size, log-log slopes with bootstrap CIs.")
    _learning_curve_options(p, lc)
    p.add_argument("--models", default=lc.DEFAULT_MODELS,
                   help="comma list of KIND[-lK][@PARAMS][+energy]: gcn, schnet, egnn, egnn-l1, egnn-l0@150k, gcn+energy")
    p.add_argument("--sizes", default=lc.DEFAULT_SIZES, help="comma list of training configurations N = train + val")
    p.add_argument("--lr", default=None,
                   help="learning rate: one for all, name=rate pairs (a bare kind covers its variants) or an "
                        "lr-search JSON file (default: each recipe's rate)")
    p.add_argument("--compare", action="append", default=[], metavar="A,B",
                   help="paired tests of model B against model A on the shared runs (repeatable)")
    _common(p, "mlpot-study-learning-curve-<molecule>", seed=False)

    p = ssub.add_parser("lr-search", help="the learning-rate search: every model at one size for each rate of a grid",
                        description="Train every model at one size for each learning rate of a grid (learning-curve runs);\n"
                                    "pick each model's rate by its validation error; write lr_search.json.")
    _learning_curve_options(p, lc)
    p.add_argument("--models", default=lc.DEFAULT_MODELS, help="comma list of models, as for learning-curve")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="comma list of learning rates")
    p.add_argument("--size", type=int, default=250, help="training configurations N = train + val of the search")
    _common(p, "mlpot-study-lr-search-<molecule>", seed=False)

    p = ssub.add_parser("stats", help="statistics of a learning-curve CSV: spread, slope CIs, paired tests",
                        description="Mean and spread per model and size, bootstrap confidence intervals of the log-log\n"
                                    "slopes and paired tests between models, from a learning-curve CSV; JSON + markdown.")
    p.add_argument("csv", metavar="CSV", nargs="+",
                   help="learning_curve.csv of mlpot study learning-curve; several (e.g. one per model's folder) are read as one")
    p.add_argument("--compare", action="append", default=[], metavar="A,B",
                   help="paired tests of model B against model A on the shared (N, seed, split) runs (repeatable)")
    p.add_argument("--models", default=None, help="comma list: only these models (default: all)")
    p.add_argument("--budget", default=None, help="only rows of this budget label, e.g. steps4000 (default: each separately)")
    p.add_argument("--sizes", default=None, help="comma list: only these sizes (default: all)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap samples of each slope")
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the slope intervals")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--output", default=None, help="output folder (default: the CSV's folder; for several, their common folder)")

    p = ssub.add_parser("protocol", help="energy-only vs force training: per-epoch curves, ethanol MD histograms",
                        description="The blog's protocol beside force training, from learning-curve runs: per-epoch train\n"
                                    "and validation curves of every model and size (energy-only models beside their\n"
                                    "force-trained twin), and histograms of ethanol's C-C, C-O and C-C-O from a short\n"
                                    "Langevin MD of each model against the reference frames; table + JSON.")
    add_run_selection(p)
    p.add_argument("--no-md", action="store_true", help="skip the MD and the histograms (the curves work for any molecule)")
    p.add_argument("--md-steps", type=int, default=20000, help="MD steps per model (ethanol only)")
    p.add_argument("--md-timestep", type=float, default=0.5, help="MD time step, fs")
    p.add_argument("--temperature", type=float, default=500.0, help="Langevin temperature, K (rMD17 ethanol: 500 K)")
    p.add_argument("--md-seed", type=int, default=0, help="seed of the initial velocities and the Langevin noise")
    p.add_argument("--md-runs", default="first", choices=["first", "all"],
                   help="MD of one run per model and size (the lowest seed and split with a model.pt) or of every run")
    _common(p, "mlpot-study-protocol-<molecule>", seed=False)

    p = ssub.add_parser("vibrations", help="harmonic frequencies of the models at each size against reference ones",
                        description="Harmonic frequencies (autograd Hessian at each model's float64 minimum) of every\n"
                                    "learning-curve run with a model.pt, against reference frequencies: MAE, max |diff|,\n"
                                    "ZPE difference and imaginary modes per run, cached beside the CSV (vibrations/);\n"
                                    "mean ± std per model and size next to the test force MAE, log-log slopes; table + JSON.")
    add_run_selection(p)
    p.add_argument("--reference", default=None,
                   help="vibrations.json with reference_cm, e.g. of mlpot vibrations --reference; a relaxed.xyz beside it "
                        "is the start geometry (default for rmd17_ethanol: the repository's "
                        "deploy/in-use/ethanol-vibrations/vibrations.json, PBE/def2-SVP)")
    p.add_argument("--fmax", type=float, default=1e-4, help="relaxation criterion, eV/Å")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap samples of each slope")
    _common(p, "mlpot-study-vibrations-<molecule>", seed=False)

    p = ssub.add_parser("latent", help="t-SNE of pooled last-layer features; rank correlations and k-NN R^2",
                        description="t-SNE maps of the pooled last-layer features of DATA, with rank correlations\n"
                                    "of latent distances and k-NN regression of energy and geometry, permutation\n"
                                    "p-values, and controls: untrained networks (several seeds) and raw distances.")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("data", metavar="DATA", nargs="?", default=None, help=DATA_HELP)
    p.add_argument("--frames", type=int, default=1000, help="frames drawn from DATA")
    p.add_argument("--split", default="test", choices=["train", "test"], help="split of a named dataset")
    p.add_argument("--pool", default="mean", choices=["mean", "sum"], help="pooling over atoms")
    p.add_argument("--perplexities", default=latent.DEFAULT_PERPLEXITIES,
                   help="comma list of t-SNE perplexities (each > 0); the PCA-initialised map at the first gives "
                        "latent_tsne.png")
    p.add_argument("--tsne-seeds", default=latent.DEFAULT_TSNE_SEEDS,
                   help="comma list of seeds of the randomly initialised t-SNE maps made at every perplexity besides "
                        "the PCA-initialised one (deterministic); the maps' agreement is reported")
    p.add_argument("--pairs", type=int, default=20000, help="random structure pairs for the rank correlations")
    p.add_argument("--k", type=int, default=10, help="neighbours of the k-NN regression")
    p.add_argument("--permutations", type=int, default=latent.DEFAULT_PERMUTATIONS,
                   help="permutations of each target across frames for the p-value of every rank correlation and "
                        "k-NN R^2 (one-sided, p = (1 + count) / (N + 1), seeded by --seed)")
    p.add_argument("--init-seeds", default=latent.DEFAULT_INIT_SEEDS,
                   help="comma list of seeds of the untrained control's weights: each seed's numbers and their "
                        "mean, std, min and max")
    p.add_argument("--no-controls", action="store_true", help="skip the untrained-model and raw-distance controls")
    _common(p, "mlpot-study-latent-<kind>",
            seed_help="seed of the frames drawn, the random pairs, the k-NN folds and the permutations")

    p = ssub.add_parser("irreps", help="EGNN: feature-norm share per l and layer, ablation of each l, optional retrain",
                        description="Which irreps a trained EGNN uses: feature-norm share per l and layer, the test error\n"
                                    "with each l ablated, and optionally a retrain at a lower lmax.")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP + " (an EGNN)")
    p.add_argument("data", metavar="DATA", nargs="?", default=None, help=DATA_HELP)
    p.add_argument("--frames", type=int, default=1000, help="test frames for shares and ablation")
    p.add_argument("--split", default="test", choices=["train", "test"], help="split of a named dataset")
    p.add_argument("--retrain", action="store_true",
                   help="train the architecture at its own lmax and at --retrain-lmax with the learning-curve budget; "
                        "report test MAE and latency of both")
    p.add_argument("--retrain-lmax", type=int, default=None, help="lmax of the reduced model (default: the model's lmax - 1)")
    p.add_argument("--retrain-dataset", default=None, help="training data of the retrain (default: the model's dataset)")
    p.add_argument("--steps", type=int, default=lc.DEFAULT_STEPS, help="retrain budget in optimizer steps")
    p.add_argument("--size", type=int, default=1000, help="retrain training configurations N = train + val")
    p.add_argument("--test-size", type=int, default=None, help="retrain test subset size (default: the whole test split)")
    p.add_argument("--latency-calls", type=int, default=100, help="timed calls per model (the median is reported)")
    p.add_argument("--runs-dir", default=None, help="retrain run folders (default: runs/study/irreps-<model>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to the retrain runs (repeatable)")
    _common(p, "mlpot-study-irreps")

    p = ssub.add_parser("symmetry", help="energy/forces under rotations, reflections, translations; non-symmetric baseline",
                        description="Energy and forces under random rotations, reflections and translations, against a\n"
                                    "non-symmetric Cartesian MLP trained with increasing rotational augmentation.")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--structure", default=None, help="molecule, dataset or file (default: the model's dataset, first frame)")
    p.add_argument("-n", "--num", type=int, default=100, help="random operations of each kind")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float64", help="precision")
    p.add_argument("--no-baseline", action="store_true", help="skip the non-symmetric Cartesian MLP")
    p.add_argument("--copies", default="0,1,4,16,64,inf",
                   help="augmentation levels: rotated copies per frame, inf = fresh each sample")
    p.add_argument("--baseline-steps", type=int, default=10000,
                   help="optimizer steps per augmentation level (with --baseline-epochs: the least)")
    p.add_argument("--baseline-epochs", type=float, default=None,
                   help="scale each level's steps to this many passes over its frames x (1 + copies) samples")
    p.add_argument("--baseline-model", default="mlp",
                   help="non-symmetric baseline: mlp (flattened coordinates) or gnn (message passing on unit vectors)")
    p.add_argument("--baseline-hidden", type=int, default=None,
                   help="width of the baseline's hidden layers (default: 128 for mlp, 64 for gnn)")
    p.add_argument("--baseline-data", default=None, help="dataset of the baseline (default: the model's dataset)")
    p.add_argument("--train-frames", type=int, default=None, help="baseline training frames (default: the whole train split)")
    p.add_argument("--test-frames", type=int, default=500, help="baseline test frames")
    _common(p, "mlpot-study-symmetry-<kind>")
    return study


def run(args):
    """Dispatch ``mlpot study <subcommand>``; returns the study's result dict."""
    if args.study_command == "learning-curve":
        from mlpot.study.learning_curve import run_learning_curve
        from mlpot.study.lr_search import lr_kwargs

        return run_learning_curve(molecule=args.molecule, models=args.models, sizes=args.sizes, output=args.output,
                                  lr=args.lr, compare=args.compare, **lr_kwargs(args))
    if args.study_command == "lr-search":
        from mlpot.study.lr_search import lr_kwargs, run_lr_search

        return run_lr_search(molecule=args.molecule, models=args.models, lrs=args.lrs, size=args.size,
                             output=args.output, **lr_kwargs(args))
    if args.study_command == "stats":
        from mlpot.study.stats import run_stats

        return run_stats(args.csv, args.compare, args.output, args.n_boot, args.seed, args.level, args.models,
                         args.budget, args.sizes)
    if args.study_command == "protocol":
        from mlpot.study.protocol import run_protocol

        return run_protocol(args.csv, args.models, args.sizes, args.budget, args.output, not args.no_md, args.md_steps,
                            args.md_timestep, args.temperature, args.md_seed, args.md_runs, args.data_dir)
    if args.study_command == "vibrations":
        from mlpot.study.vibrations import run_vibrations_study

        return run_vibrations_study(args.csv, args.models, args.sizes, args.budget, args.reference, args.fmax,
                                    args.output, args.data_dir, args.n_boot)
    if args.study_command == "latent":
        from mlpot.study.latent import run_latent

        return run_latent(args.model, args.data, args.frames, args.split, args.pool, perplexities=args.perplexities,
                          pairs=args.pairs, k=args.k, seed=args.seed, output=args.output, data_dir=args.data_dir,
                          controls=not args.no_controls, init_seeds=args.init_seeds, tsne_seeds=args.tsne_seeds,
                          permutations=args.permutations)
    if args.study_command == "irreps":
        from mlpot.study.irreps import run_irreps

        return run_irreps(args.model, args.data, args.frames, args.split, args.seed, args.output, args.data_dir,
                          args.retrain, args.retrain_lmax, args.steps, args.size, args.runs_dir, args.test_size,
                          args.latency_calls, args.threads, args.overrides, args.retrain_dataset)
    if args.study_command == "symmetry":
        from mlpot.study.symmetry import run_symmetry

        return run_symmetry(args.model, args.structure, args.num, args.dtype, args.seed, args.output, args.data_dir,
                            not args.no_baseline, args.copies, args.baseline_steps, args.baseline_data, args.test_frames,
                            args.train_frames, args.baseline_epochs, args.baseline_hidden, args.baseline_model)
    raise ValueError(f"unknown study {args.study_command!r}")
