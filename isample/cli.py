"""Command-line interface: ``isample bench`` (also ``python -m isample bench``).

Example::

    isample bench                                   # default sweep on MNIST-1D (< 5 min of CPU, 1 core)
    isample bench --quick --out /tmp/q             # tiny smoke profile (< 1 min)
    isample study --quick --out /tmp/s              # optimizer study, tiny profile (< 2 min)
    isample study --experiments A,C --optimizers sgd,adam --out study_out
    isample --version
    isample bench --dataset noisy-imbalanced --schemes uniform,kf,laber --optimizers adam \\
        --seeds 5 --budget 30s --out results/

See ``docs/bench.md`` for every option, number and output field.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser", "config_from_args", "study_config_from_args"]

DEFAULT_SCHEMES = "uniform,kf,history-is,infobatch,selective-backprop (+ auto when registered)"


def _csv_list(text: str) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _seeds(text: str) -> tuple[int, ...]:
    """``"3"`` -> (0, 1, 2); ``"0,4,7"`` -> (0, 4, 7)."""
    try:
        if "," in text:
            seeds = tuple(int(s) for s in text.split(",") if s.strip())
        else:
            count = int(text)
            if count < 1:
                raise ValueError
            seeds = tuple(range(count))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a seed count >= 1 (e.g. 3) or a comma-separated list (e.g. 0,4,7), got {text!r}"
        ) from None
    if any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"seeds must be >= 0, got {text!r}")
    return seeds


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
    return value


def _lr_grid(text: str) -> tuple[str, tuple[float, ...]]:
    name, _, values = text.partition("=")
    try:
        grid = tuple(float(v) for v in values.split(",") if v.strip())
    except ValueError:
        grid = ()
    if not name or not grid or any(v <= 0 for v in grid):
        raise argparse.ArgumentTypeError(f"expected OPTIMIZER=LR,LR,... with positive values, got {text!r}")
    return name.strip(), grid


def build_parser() -> argparse.ArgumentParser:
    """The ``isample`` argument parser (sub-commands ``bench`` and ``study``)."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="isample", description="isample: importance sampling for PyTorch.")
    parser.add_argument("--version", action="version", version=f"isample {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    b = sub.add_parser(
        "bench",
        help="benchmark sampling schemes x optimizers on a dataset",
        description="Tune the learning rate of every (scheme, optimizer) on a validation split, then "
        "measure training loss, test accuracy, wall-clock, compute and sampler quality over seeds; "
        "writes report.md, results.json, results.csv and PNG plots.",
    )
    b.add_argument(
        "--dataset",
        default=None,
        help="mnist1d (default), mnist1d-noisy, digits, noisy-imbalanced, or module:function",
    )
    b.add_argument("--model", default=None, help="cnn1d (default), mlp, linear or cnn")
    b.add_argument("--schemes", type=_csv_list, default=None, help=f"comma list (default {DEFAULT_SCHEMES})")
    b.add_argument("--optimizers", type=_csv_list, default=None, help="comma list of sgd, rmsprop, adam")
    b.add_argument("--seeds", type=_seeds, default=None, help="seed count (3) or list (0,4,7)")
    b.add_argument("--budget", default=None, help="per measured run: steps (300) or seconds (30s)")
    b.add_argument("--batch-size", type=_positive_int, default=None, help="training batch size (64)")
    b.add_argument("--eval-every", type=_positive_int, default=None, help="evaluate every k steps (25)")
    b.add_argument(
        "--quality-every",
        type=_non_negative_int,
        default=None,
        help="kappa probe every k steps (100; 0 = off)",
    )
    b.add_argument("--probe-size", type=_positive_int, default=None, help="kappa probe examples (256)")
    b.add_argument(
        "--lr-grid",
        type=_lr_grid,
        action="append",
        default=None,
        metavar="OPT=LR,LR",
        help="override an optimizer's learning-rate grid (repeatable)",
    )
    b.add_argument("--no-tune", action="store_true", help="skip tuning; use the middle of each grid")
    b.add_argument(
        "--tune-fraction",
        type=float,
        default=None,
        help="tuning run length / budget (1: tune on the measured budget and schedule)",
    )
    b.add_argument(
        "--schedule",
        choices=("constant", "cosine", "linear"),
        default=None,
        help="learning-rate schedule of every run, tuning included (cosine)",
    )
    b.add_argument(
        "--max-grid",
        type=_positive_int,
        default=None,
        help="extend a grid whose choice is at an edge up to N (5)",
    )
    b.add_argument(
        "--smooth", type=_positive_int, default=None, help="targets: mean of the last N evaluations (3)"
    )
    b.add_argument(
        "--train-eval-size",
        type=_non_negative_int,
        default=None,
        help="training examples in the training-loss evaluation (2000; 0 = all)",
    )
    b.add_argument(
        "--noise-dataset",
        default=None,
        help="label-noise workload run with the tuned learning rates (mnist1d-noisy; 'none' = skip)",
    )
    b.add_argument(
        "--noise-optimizers", type=_csv_list, default=None, help="optimizers of the label-noise runs (adam)"
    )
    b.add_argument("--device", default=None, help="torch device (cpu)")
    b.add_argument(
        "--threads",
        type=_non_negative_int,
        default=None,
        help="torch.set_num_threads (default 1; 0 = leave torch's default)",
    )
    b.add_argument("--out", default="bench_out", help="output folder (bench_out)")
    b.add_argument("--quick", action="store_true", help="tiny profile for smoke tests")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    s = sub.add_parser(
        "study",
        help="optimizer study: effective batch (A), predicted vs realized speed-up (B), stability (C)",
        description="Run experiments A-C of docs/study.md on the bench harness; writes report.md, "
        "results.json, results.csv and plots/*.png.",
    )
    s.add_argument("--quick", action="store_true", help="tiny profile (about a minute)")
    s.add_argument("--out", default="study_out", help="output folder (study_out)")
    s.add_argument("--experiments", type=_csv_list, default=None, help="comma list of A, B, C (all)")
    s.add_argument("--seeds", type=_seeds, default=None, help="seed count (1) or list (0,4,7)")
    s.add_argument(
        "--workloads",
        type=_csv_list,
        default=None,
        help="comma list of dataset/model for B (mnist1d/cnn1d,digits/mlp); A and C use the last",
    )
    s.add_argument("--optimizers", type=_csv_list, default=None, help="comma list (default: the whole grid)")
    s.add_argument("--steps", type=_positive_int, default=None, help="steps per run of A and B (160)")
    s.add_argument("--device", default=None, help="torch device (cpu)")
    s.add_argument(
        "--threads",
        type=_non_negative_int,
        default=None,
        help="torch.set_num_threads (default 1; 0 = leave torch's default)",
    )
    s.add_argument("--no-progress", action="store_true", help="no progress lines")
    s.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return parser


_PLAIN_FIELDS = (
    "dataset",
    "model",
    "schemes",
    "optimizers",
    "seeds",
    "budget",
    "batch_size",
    "eval_every",
    "quality_every",
    "probe_size",
    "schedule",
    "max_grid",
    "smooth",
    "noise_optimizers",
)


def config_from_args(args: argparse.Namespace) -> object:
    """The :class:`isample.bench.BenchConfig` described by parsed arguments.

    Raises:
        ValueError: a ``--lr-grid`` for an unknown optimizer or for one that is not run.
    """
    from .bench.harness import OPTIMIZERS, BenchConfig, available_optimizers, quick_config

    config = quick_config() if args.quick else BenchConfig()
    for field in _PLAIN_FIELDS:  # options that, when given, replace the profile's value
        value = getattr(args, field)
        if value is not None:
            setattr(config, field, value)
    if args.lr_grid:
        grids = dict(config.lr_grids)
        for name, grid in args.lr_grid:
            if name not in OPTIMIZERS:
                raise ValueError(
                    f"--lr-grid: unknown optimizer {name!r}. Valid optimizers: "
                    f"{', '.join(available_optimizers())}."
                )
            if name not in config.optimizers:
                raise ValueError(
                    f"--lr-grid: optimizer {name!r} is not run (--optimizers {','.join(config.optimizers)}); "
                    "its grid would be ignored."
                )
            grids[name] = grid
        config.lr_grids = grids
    if args.train_eval_size is not None:
        config.train_eval_size = args.train_eval_size or None
    if args.noise_dataset is not None:
        config.noise_dataset = None if args.noise_dataset.lower() in ("none", "") else args.noise_dataset
    if args.no_tune:
        config.tune = False
    if args.tune_fraction is not None:
        config.tune_fraction = args.tune_fraction
    if args.device is not None:
        config.device = args.device
    if args.threads is not None:
        config.threads = args.threads or None
    config.progress = not args.no_progress
    config.plots = not args.no_plots
    return config


def study_config_from_args(args: argparse.Namespace) -> object:
    """The :class:`isample.study.StudyConfig` described by parsed ``isample study`` arguments."""
    from .study.runner import StudyConfig, quick_study_config

    config = quick_study_config() if args.quick else StudyConfig()
    if args.experiments is not None:
        config.experiments = tuple(e.upper() for e in args.experiments)
    for name in ("seeds", "workloads", "optimizers", "steps", "device"):
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    if args.threads is not None:
        config.threads = args.threads or None
    config.progress = not args.no_progress
    config.plots = not args.no_plots
    return config


def _main_study(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import time

    from .study.runner import run_study, validate_study_config

    started = time.perf_counter()
    try:
        config = validate_study_config(study_config_from_args(args))
        results = run_study(config, args.out, command=["isample", *argv])
    except (ValueError, ImportError) as exc:
        print(f"isample study: error: {exc}", file=sys.stderr)
        return 2
    plots = ", " + ", ".join(results["plots"]) if results["plots"] else " (no plots)"
    print(
        f"isample study: wrote {args.out}/report.md, results.json, results.csv{plots} in "
        f"{time.perf_counter() - started:.1f} s wall ({results['cpu_seconds']:.1f} s CPU, "
        f"{results['n_runs']} runs)"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``isample`` console script.

    Returns:
        0 on success, 2 on a usage error (unknown scheme / optimizer / dataset / model,
        bad number); argparse's own errors exit with status 2 as well.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command == "study":
        return _main_study(args, argv)
    if args.command != "bench":
        parser.print_help(sys.stderr)
        return 2
    import torch

    from .bench.sweep import run_bench

    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"isample bench: error: {exc}", file=sys.stderr)
        return 2
    previous_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(int(config.threads))
    try:
        results = run_bench(config, args.out, command=["isample", *argv])
    except (ValueError, ImportError) as exc:
        print(f"isample bench: error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(previous_threads)
    plots = ", " + ", ".join(results["plots"]) if results["plots"] else " (no plots)"
    print(
        f"isample bench: wrote {args.out}/report.md, results.json, results.csv{plots} in "
        f"{results['wall_seconds']:.1f} s wall ({results['cpu_seconds']:.1f} s CPU)"
    )
    return 0
