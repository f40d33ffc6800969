"""The ``isample`` command line: argument parsing, typo errors, and the ``python -m`` entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from isample.bench.harness import BenchConfig
from isample.bench.report import SCHEMA_VERSION
from isample.cli import build_parser, config_from_args, main


def _config(*argv: str) -> BenchConfig:
    return config_from_args(build_parser().parse_args(["bench", *argv]))


def test_defaults_and_overrides():
    cfg = _config()
    import isample.schemes as registry

    assert cfg.dataset == "mnist1d" and cfg.model == "cnn1d"
    expected = ("uniform", "kf", "history-is", "infobatch", "selective-backprop")
    expected += ("auto",) if "auto" in registry.available() else ()
    assert cfg.schemes == expected
    assert cfg.noise_dataset == "mnist1d-noisy" and cfg.schedule == "cosine" and cfg.tune_fraction == 1.0
    assert cfg.optimizers == ("sgd", "rmsprop", "adam")
    assert cfg.seeds == (0, 1, 2) and cfg.progress is True and cfg.threads == 1
    cfg = _config(
        "--seeds",
        "0,4,7",
        "--budget",
        "30s",
        "--schemes",
        "uniform, laber",
        "--optimizers",
        "adam",
        "--batch-size",
        "32",
        "--lr-grid",
        "adam=0.001,0.01",
        "--no-tune",
        "--threads",
        "0",
        "--no-progress",
        "--dataset",
        "noisy-imbalanced",
        "--model",
        "cnn",
    )
    assert cfg.seeds == (0, 4, 7) and cfg.budget == "30s" and cfg.schemes == ("uniform", "laber")
    assert cfg.optimizers == ("adam",) and cfg.batch_size == 32 and cfg.lr_grids["adam"] == (0.001, 0.01)
    assert cfg.tune is False and cfg.threads is None and cfg.progress is False
    assert cfg.dataset == "noisy-imbalanced" and cfg.model == "cnn"
    assert _config("--seeds", "2").seeds == (0, 1)


def test_quick_profile_is_small():
    cfg = _config("--quick")
    assert cfg.quick and len(cfg.seeds) == 2 and int(cfg.budget) <= 50


@pytest.mark.parametrize(
    "argv",
    [
        ["--seeds", "0"],
        ["--seeds", "a"],
        ["--batch-size", "0"],
        ["--lr-grid", "adam"],
        ["--lr-grid", "adam=-1"],
    ],
)
def test_bad_numbers_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", *argv])
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--schemes", "uniform,kff", "Valid schemes: "),
        ("--optimizers", "sgd,adamw", "Valid optimizers: adam, rmsprop, sgd"),
        ("--dataset", "mnist", "Valid datasets: digits, mnist1d, mnist1d-noisy, noisy-imbalanced"),
        ("--model", "resnet", "Valid models: cnn, cnn1d, linear, mlp"),
        ("--budget", "ten", "steps (e.g. 500) or seconds (e.g. 30s)"),
    ],
)
def test_typos_list_valid_names(flag, value, expected, capsys, tmp_path):
    code = main(["bench", flag, value, "--out", str(tmp_path / "x"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert expected in err and repr(value.split(",")[-1]) in err
    assert not (tmp_path / "x" / "results.json").exists()


def test_unknown_scheme_message_lists_every_registered_scheme(capsys, tmp_path):
    import isample.schemes as schemes

    assert main(["bench", "--schemes", "kff", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    for name in schemes.available():
        assert name in err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "bench" in capsys.readouterr().err


@pytest.mark.slow
def test_python_dash_m_entry_point(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        "-m",
        "isample",
        "bench",
        "--quick",
        "--budget",
        "10",
        "--optimizers",
        "adam",
        "--no-plots",
        "--quality-every",
        "0",
        "--seeds",
        "1",
        "--lr-grid",
        "adam=0.003",
        "--out",
        str(out),
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["schema_version"] == SCHEMA_VERSION
    assert results["command"].startswith("isample bench --quick")
    assert {r["scheme"] for r in results["runs"]} == {"uniform", "kf"}
    assert (out / "report.md").is_file() and (out / "results.csv").is_file()


def test_version(capsys):
    from isample import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"isample {__version__}"


@pytest.mark.parametrize(
    ("grid", "expected"),
    [
        ("foo=0.1", "unknown optimizer 'foo'. Valid optimizers: adam, rmsprop, sgd"),
        ("Adam=0.5", "unknown optimizer 'Adam'"),
        ("sgd=0.1", "optimizer 'sgd' is not run"),
    ],
)
def test_lr_grid_keys_are_checked_before_any_work(grid, expected, capsys, tmp_path):
    code = main(["bench", "--optimizers", "adam", "--lr-grid", grid, "--out", str(tmp_path), "--no-progress"])
    assert code == 2
    assert expected in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_fails_before_any_work(capsys, tmp_path, monkeypatch):
    from isample.bench import sweep

    def no_work(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(sweep, "load_dataset", no_work)
    assert main(["bench", "--device", "cuda", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_batch_larger_than_the_training_set_is_an_error(capsys, tmp_path, monkeypatch):
    from isample.bench import sweep

    def no_work(*args, **kwargs):
        raise AssertionError("tuning started")

    monkeypatch.setattr(sweep, "tune_learning_rate", no_work)
    argv = [
        "bench",
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--batch-size",
        "5000",
        "--noise-dataset",
        "none",
    ]
    assert main([*argv, "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "'batch_size' setting (5000) is larger than the training set of 'digits'" in err


def test_fair_comparison_options():
    cfg = _config(
        "--schedule",
        "linear",
        "--max-grid",
        "7",
        "--smooth",
        "4",
        "--train-eval-size",
        "0",
        "--noise-dataset",
        "none",
        "--tune-fraction",
        "0.5",
    )
    assert cfg.schedule == "linear" and cfg.max_grid == 7 and cfg.smooth == 4
    assert cfg.train_eval_size is None and cfg.noise_dataset is None and cfg.tune_fraction == 0.5
    with pytest.raises(SystemExit):
        _config("--schedule", "step")


def test_study_subcommand_help_and_usage_errors(capsys, tmp_path):
    """``isample study`` is a sub-command with its own options; argparse errors exit with 2."""
    with pytest.raises(SystemExit) as info:
        main(["study", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    options = ("--quick", "--out", "--experiments", "--seeds", "--workloads", "--optimizers", "--no-plots")
    for option in options:
        assert option in out
    with pytest.raises(SystemExit) as info:
        main(["study", "--seeds", "0"])
    assert info.value.code == 2
    assert main(["study", "--quick", "--experiments", "Q", "--out", str(tmp_path / "x")]) == 2
    assert "Unknown experiment 'Q'" in capsys.readouterr().err
