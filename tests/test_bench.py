"""Tests of isample.bench: curve maths on synthetic curves with known answers, datasets,
models, the summary, and a quick sweep whose every output is checked against its schema."""

from __future__ import annotations

import csv
import json
import math
import sys

import numpy as np
import pytest
import torch

from isample.bench import curves
from isample.bench.curves import (
    compute_units,
    interpolate,
    select_learning_rate,
    spread,
    time_to_target,
)
from isample.bench.datasets import available_datasets, load_dataset, make_noisy_imbalanced
from isample.bench.harness import BenchConfig, parse_budget, quick_config
from isample.bench.models import available_models, build_model
from isample.bench.report import CSV_COLUMNS, SCHEMA_VERSION, ratio, summarize

# --------------------------------------------------------------------------- interpolation


def test_interpolate_log_linear_is_exact_for_exponential_decay():
    # y = 3 exp(-0.2 x) is linear in log space: the interpolant is exact everywhere.
    x = np.array([0.0, 10.0, 25.0, 40.0])
    y = 3.0 * np.exp(-0.2 * x)
    for a in (0.0, 3.0, 10.0, 17.5, 39.0, 40.0):
        assert interpolate(x, y, a) == pytest.approx(3.0 * math.exp(-0.2 * a), rel=1e-12)


def test_interpolate_linear_mode_and_out_of_range():
    x, y = [0.0, 2.0], [1.0, 5.0]
    assert interpolate(x, y, 0.5, log=False) == pytest.approx(2.0)
    # geometric mean at the midpoint in log mode
    assert interpolate(x, y, 1.0) == pytest.approx(math.sqrt(5.0))
    assert math.isnan(interpolate(x, y, -0.1))
    assert math.isnan(interpolate(x, y, 2.1))


def test_interpolate_repeated_x_uses_last_point_and_inf_propagates():
    assert interpolate([0, 1, 1, 2], [4.0, 3.0, 2.0, 1.0], 1.0) == 2.0
    assert interpolate([0, 1, 2], [1.0, float("nan"), 1.0], 0.5) == math.inf


def test_interpolate_rejects_bad_curves():
    with pytest.raises(ValueError, match="non-decreasing"):
        interpolate([0, 2, 1], [1, 1, 1], 0.5)
    with pytest.raises(ValueError, match="same length"):
        interpolate([0, 1], [1.0], 0.5)
    with pytest.raises(ValueError, match="> 0"):
        interpolate([0, 1], [1.0, 0.0], 0.5)


# --------------------------------------------------------------------------- time to target


def test_time_to_target_exponential_known_answer():
    # y = exp(-x / 100) sampled every 25: the target exp(-1.37) is crossed at x = 137 exactly.
    x = np.arange(0, 301, 25, dtype=float)
    y = np.exp(-x / 100.0)
    assert time_to_target(x, y, math.exp(-1.37)) == pytest.approx(137.0, rel=1e-12)


def test_time_to_target_edges():
    x, y = [0.0, 10.0, 20.0], [2.0, 1.0, 0.5]
    assert time_to_target(x, y, 5.0) == 0.0  # starts below
    assert time_to_target(x, y, 1.0) == 10.0  # lands on a point
    assert time_to_target(x, y, 0.1) == math.inf  # never
    # linear mode: 2 -> 1 over [0, 10], target 1.5 at x = 5
    assert time_to_target(x, y, 1.5, log=False) == pytest.approx(5.0)
    # a non-monotone curve: the *first* crossing counts
    assert time_to_target([0, 1, 2, 3], [4.0, 1.0, 8.0, 0.5], 1.0) == 1.0


def test_time_to_target_diverged_curve_never_reaches():
    assert time_to_target([0, 1, 2], [1.0, float("inf"), float("nan")], 0.5) == math.inf


def test_equal_compute_interpolation_known_answer():
    # Two schemes with loss exp(-k * step); the IS scheme costs 3x compute per step
    # (pool of 3b forwards + b forward + 2b backward = 6b vs 3b) but decays 2x faster.
    b = 64
    steps = np.arange(0, 201, 20, dtype=float)
    uni_c = steps * compute_units(b, b)
    is_c = steps * compute_units(b + 3 * b, b)
    uni = np.exp(-0.01 * steps)
    isl = np.exp(-0.02 * steps)
    c = uni_c[-1]  # equal compute = uniform's total
    # IS at compute c made c / (6b) = 100 steps: loss exp(-2) ; uniform: exp(-2) too (tie)
    assert interpolate(is_c, isl, c) == pytest.approx(math.exp(-0.02 * c / (6 * b)), rel=1e-12)
    assert interpolate(uni_c, uni, c) == pytest.approx(math.exp(-2.0), rel=1e-12)
    assert ratio(interpolate(uni_c, uni, c), interpolate(is_c, isl, c)) == pytest.approx(1.0)
    # at equal steps the IS scheme wins by exp(2)
    assert ratio(uni[-1], isl[-1]) == pytest.approx(math.exp(2.0))


def test_compute_units():
    assert compute_units(100, 30) == 160.0
    assert curves.BACKWARD_COST == 2.0


# --------------------------------------------------------------------------- spread, ratio


def test_spread_median_min_max():
    s = spread([3.0, 1.0, 2.0])
    assert s == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    s = spread([1.0, float("nan"), float("inf")])
    assert s["median"] == math.inf and s["n"] == 2
    assert spread([float("nan")])["n"] == 0


def test_ratio_conventions():
    assert ratio(2.0, 1.0) == 2.0
    assert ratio(1.0, math.inf) == 0.0
    assert ratio(math.inf, 1.0) == math.inf
    assert math.isnan(ratio(math.inf, math.inf))
    assert math.isnan(ratio(math.nan, 1.0))


# --------------------------------------------------------------------------- learning-rate selection


def test_select_learning_rate_lowest_validation_loss():
    lrs = [0.01, 0.03, 0.1, 0.3]
    assert select_learning_rate(lrs, [0.9, 0.5, 0.4, 0.7]) == (0.1, 2)


def test_select_learning_rate_tie_goes_to_smaller_lr():
    lrs = [0.3, 0.1, 0.03]  # any order
    # 0.1 and 0.3 within rtol 1e-3 of the best: the smaller (0.1) wins
    assert select_learning_rate(lrs, [0.40000, 0.40030, 0.9]) == (0.1, 1)
    # outside the tolerance the strictly best wins
    assert select_learning_rate(lrs, [0.40000, 0.41, 0.9]) == (0.3, 0)
    # exact ties with rtol = 0
    assert select_learning_rate([1.0, 0.5], [0.2, 0.2], rtol=0.0) == (0.5, 1)


def test_select_learning_rate_diverged_excluded_and_all_diverged():
    assert select_learning_rate([0.1, 1.0], [float("inf"), 0.5]) == (1.0, 1)
    assert select_learning_rate([0.1, 1.0], [0.9, float("nan")]) == (0.1, 0)
    assert select_learning_rate([0.3, 0.1], [float("nan"), float("inf")]) == (0.1, 1)
    with pytest.raises(ValueError, match="rtol"):
        select_learning_rate([0.1], [1.0], rtol=-1.0)
    with pytest.raises(ValueError, match="equal"):
        select_learning_rate([0.1, 0.2], [1.0])


# --------------------------------------------------------------------------- budget, datasets, models


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500", ("steps", 500)),
        (300, ("steps", 300)),
        ("30s", ("seconds", 30.0)),
        ("2.5 sec", ("seconds", 2.5)),
        ("40 steps", ("steps", 40)),
    ],
)
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["0", "abc", "10m", "-3", "1.5", "0s", True])
def test_parse_budget_rejects(text):
    with pytest.raises(ValueError, match="budget"):
        parse_budget(text)


def test_digits_split_sizes_standardised_and_deterministic():
    data = load_dataset("digits")
    assert (data.x_train.shape[0], data.x_val.shape[0], data.x_test.shape[0]) == (1078, 360, 359)
    assert data.num_classes == 10 and data.input_shape == (64,)
    mean = data.x_train.double().mean(0)
    assert mean.abs().max() < 1e-5
    again = load_dataset("digits")
    assert torch.equal(again.x_train, data.x_train) and torch.equal(again.y_test, data.y_test)


def test_noisy_imbalanced_has_noise_and_imbalance():
    data = make_noisy_imbalanced(seed=3)
    counts = np.asarray(data.info["class_counts"])
    assert counts.max() / counts.min() > 4  # prior ratio 10
    n_train = data.x_train.shape[0]
    flipped = data.info["flipped_train_labels"]
    # binomial(n_train, 0.15): within 5 standard deviations
    sd = math.sqrt(n_train * 0.15 * 0.85)
    assert abs(flipped - 0.15 * n_train) < 5 * sd
    same = make_noisy_imbalanced(seed=3)
    assert torch.equal(same.y_train, data.y_train)
    assert not torch.equal(make_noisy_imbalanced(seed=4).x_train, data.x_train)


def _user_data():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(50, 4, generator=g),
        torch.arange(50) % 3,
        torch.randn(20, 4, generator=g),
        torch.arange(20) % 3,
    )


def _user_datasets():
    x, y, xt, yt = _user_data()
    return torch.utils.data.TensorDataset(x, y), torch.utils.data.TensorDataset(xt, yt)


def test_user_dataset_hook():
    data = load_dataset("test_bench:_user_data")
    assert data.x_train.shape[0] + data.x_val.shape[0] == 50
    assert data.x_test.shape == (20, 4) and data.num_classes == 3
    data2 = load_dataset("test_bench:_user_datasets")
    assert torch.equal(data2.x_train, data.x_train)


def test_dataset_typos_list_valid_names():
    with pytest.raises(ValueError, match="digits, noisy-imbalanced"):
        load_dataset("digitz")
    with pytest.raises(ValueError, match="no callable"):
        load_dataset("test_bench:nope")
    assert available_datasets() == ["digits", "noisy-imbalanced"]


@pytest.mark.parametrize("name", ["mlp", "linear", "cnn"])
def test_models_are_seeded_and_do_not_touch_global_rng(name):
    state = torch.random.get_rng_state()
    a = build_model(name, 64, 10, seed=5)
    b = build_model(name, 64, 10, seed=5)
    c = build_model(name, 64, 10, seed=6)
    assert torch.equal(torch.random.get_rng_state(), state)
    x = torch.randn(3, 64)
    assert a(x).shape == (3, 10)
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))


def test_model_typo_and_cnn_shape():
    with pytest.raises(ValueError, match="cnn, linear, mlp"):
        build_model("mpl", 64, 10, seed=0)
    assert available_models() == ["cnn", "linear", "mlp"]
    with pytest.raises(ValueError, match="square"):
        build_model("cnn", 63, 10, seed=0)


# --------------------------------------------------------------------------- summary on synthetic runs


def _synthetic_run(scheme, seed, rate, sec_per_step, compute_per_step, steps=100, every=20, diverged=False):
    curve = []
    for s in range(0, steps + 1, every):
        curve.append(
            {
                "step": s,
                "seconds": s * sec_per_step,
                "cpu_seconds": s * sec_per_step / 2,
                "forward_examples": 0,
                "backward_examples": 0,
                "compute": s * compute_per_step,
                "train_loss": math.exp(-rate * s),
                "train_accuracy": 1.0,
                "test_loss": 1.0,
                "test_accuracy": 0.9,
            }
        )
    return {
        "scheme": scheme,
        "optimizer": "sgd",
        "seed": seed,
        "lr": 0.1,
        "diverged": diverged,
        "steps": steps,
        "train_seconds": steps * sec_per_step,
        "train_cpu_seconds": steps * sec_per_step / 2,
        "loader_seconds": 0.1 * steps * sec_per_step,
        "feedback_seconds": 0.0,
        "overhead_share": 0.1,
        "compute": steps * compute_per_step,
        "curve": curve,
        "quality": [
            {
                "step": 20,
                "geometry": "identity",
                "kappa": 2.0,
                "kappa_opt": 4.0,
                "q_lin": 0.5,
                "q_log": 0.5,
                "corr_grad_norm": 0.9,
                "ess": 0.8,
            }
        ],
    }


def test_summarize_known_ratios():
    # uniform: loss exp(-0.01 s), 1 ms / step, 192 compute / step.
    # is:      loss exp(-0.02 s), 2 ms / step, 384 compute / step.
    runs = [_synthetic_run("uniform", k, 0.01, 1e-3, 192.0) for k in range(3)]
    runs += [_synthetic_run("is", k, 0.02, 2e-3, 384.0) for k in range(3)]
    s = summarize(runs, {"sgd": {"uniform": {"chosen": 0.1}, "is": {"chosen": 0.3}}})["sgd"]
    assert s["target_loss"] == pytest.approx(math.exp(-1.0))
    assert s["reference"] == {
        "steps": 100.0,
        "seconds": pytest.approx(0.1),
        "cpu_seconds": pytest.approx(0.05),
        "compute": 19200.0,
    }
    e = s["schemes"]["is"]
    assert e["lr"] == 0.3
    assert e["ratio_at_steps"] == pytest.approx(math.exp(1.0))  # e^-1 / e^-2
    assert e["ratio_at_seconds"] == pytest.approx(1.0)  # IS did 50 steps in 0.1 s: e^-1 both
    assert e["ratio_at_compute"] == pytest.approx(1.0)
    assert e["steps_to_target"]["median"] == pytest.approx(50.0)
    assert e["speedup_steps"] == pytest.approx(2.0)
    assert e["speedup_seconds"] == pytest.approx(1.0)
    assert e["ratio_at_cpu_seconds"] == pytest.approx(1.0)
    assert e["relative_seconds_per_step"] == pytest.approx(2.0)
    assert e["kappa"]["median"] == 2.0
    assert s["schemes"]["uniform"]["ratio_at_steps"] == 1.0


def test_summarize_diverged_scheme_counts_as_inf():
    runs = [_synthetic_run("uniform", k, 0.01, 1e-3, 1.0) for k in range(3)]
    bad = _synthetic_run("is", 0, 0.02, 1e-3, 1.0, steps=40)
    bad["diverged"] = True
    bad["curve"][-1]["train_loss"] = float("nan")
    runs.append(bad)
    s = summarize(runs, {})["sgd"]
    assert s["reference"]["steps"] == 40.0  # the fewest steps of any run
    e = s["schemes"]["is"]
    assert e["diverged"] == 1 and e["final_train_loss"]["median"] == math.inf


# --------------------------------------------------------------------------- quick sweep (needs the registry)

schemes = pytest.importorskip("isample.schemes")


def _check_results(out, config_schemes, optimizers, seeds):
    results = json.loads((out / "results.json").read_text())
    assert results["schema_version"] == SCHEMA_VERSION
    for key in (
        "isample_version",
        "created",
        "command",
        "wall_seconds",
        "config",
        "budget",
        "machine",
        "dataset",
        "schemes",
        "tuning",
        "runs",
        "summary",
        "plots",
        "notes",
    ):
        assert key in results, key
    for key in ("cpu", "logical_cores", "torch", "device"):
        assert key in results["machine"]
    assert list(results["summary"]) == list(optimizers)
    assert len(results["runs"]) == len(config_schemes) * len(optimizers) * len(seeds)
    for opt in optimizers:
        assert set(results["tuning"][opt]) == set(config_schemes)
        t = results["tuning"][opt]["uniform"]
        assert t["chosen"] in t["grid"] and len(t["val_loss"]) == len(t["grid"])
        for name in config_schemes:
            e = results["summary"][opt]["schemes"][name]
            for key in (
                "lr",
                "final_train_loss",
                "final_test_accuracy",
                "loss_at_steps",
                "loss_at_seconds",
                "loss_at_compute",
                "ratio_at_steps",
                "ratio_at_seconds",
                "ratio_at_compute",
                "steps_to_target",
                "seconds_to_target",
                "compute_to_target",
                "speedup_steps",
                "overhead_share",
                "kappa",
                "q_log",
            ):
                assert key in e, key
    for run in results["runs"]:
        if run["scheme"] == "kf":  # pool schemes report how often the tau switch had IS on
            assert 0.0 <= run["is_on_share"] <= 1.0
        assert run["steps"] == int(results["budget"]["amount"])
        assert run["curve"][0]["step"] == 0 and run["curve"][-1]["step"] == run["steps"]
        assert run["forward_examples"] >= run["trained_examples"] == run["backward_examples"]
        assert 0 < run["overhead_share"] < 1
        assert all(0 <= p["test_accuracy"] <= 1 for p in run["curve"])
        if run["scheme"] != "uniform":
            assert run["quality"], run["scheme"]
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == sum(len(r["curve"]) for r in results["runs"])
    assert {r["scheme"] for r in rows} == set(config_schemes)
    assert any(r["kappa"] for r in rows if r["scheme"] != "uniform")
    report = (out / "report.md").read_text()
    for opt in optimizers:
        assert f"### {opt}" in report
    for heading in ("## Machine", "## Headline", "## Tuned learning rates", "loss ratio @ equal steps"):
        assert heading in report
    return results, report


@pytest.mark.slow
def test_quick_cli_in_process_writes_every_output(tmp_path):
    from isample.cli import main

    out = tmp_path / "q"
    assert main(["bench", "--quick", "--budget", "20", "--out", str(out), "--no-progress"]) == 0
    cfg = quick_config()
    results, report = _check_results(out, cfg.schemes, cfg.optimizers, cfg.seeds)
    from isample.bench.plots import PLOT_FILES

    assert results["plots"] == list(PLOT_FILES)
    for name in PLOT_FILES:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
        assert f"]({name})" in report


@pytest.mark.slow
def test_quick_without_matplotlib_notes_and_skips_plots(tmp_path, monkeypatch):
    from isample.bench.sweep import run_bench

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    cfg = quick_config(optimizers=("adam",), seeds=(0,), budget="10", progress=False, quality_every=5)
    cfg.lr_grids = {"adam": (1e-3,)}
    results = run_bench(cfg, tmp_path)
    assert results["plots"] == []
    assert not list(tmp_path.glob("*.png"))
    report = (tmp_path / "report.md").read_text()
    assert "matplotlib is not installed" in report


def test_unknown_scheme_lists_valid_names(tmp_path):
    from isample.bench.sweep import run_bench

    cfg = quick_config(schemes=("uniform", "kff"), progress=False)
    with pytest.raises(ValueError, match="Unknown scheme 'kff'. Valid schemes: .*uniform"):
        run_bench(cfg, tmp_path)
    assert not (tmp_path / "results.json").exists()


def test_seconds_budget_stops_on_wall_clock():
    from isample.bench.harness import train_run

    data = load_dataset("digits")
    cfg = BenchConfig(budget="0.05s", eval_every=5, quality_every=0, progress=False)
    run = train_run(data, cfg, "uniform", "sgd", 0.1, 0)
    assert run["train_seconds"] >= 0.05
    assert run["train_seconds"] < 0.05 + 0.5  # stops within a step (plus a slow machine's margin)
    assert run["curve"][-1]["step"] == run["steps"]


def test_probe_quality_matches_sampler_quality():
    # ProbeQuality (norms -> quality_from_norms, float32 gradients) against the metrics
    # tracker (full float64 gradient matrix), identity and Adam geometry.
    from torch import nn

    from isample.bench.harness import ProbeQuality
    from isample.metrics import SamplerQuality
    from isample.scorers import UpperBoundScorer

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g)
    model = build_model("mlp", 6, 3, seed=1)
    ce = nn.CrossEntropyLoss(reduction="none")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        ce(model(x), y).mean().backward()
        opt.step()
        opt.zero_grad()
    scorer = UpperBoundScorer(ce)

    def probabilities(m, inputs, targets):
        s = scorer(m, inputs, targets).double()
        return s / s.sum()

    mine = ProbeQuality(x, y, ce, probabilities, opt).measure(model, 7)
    ref = SamplerQuality(x, y, ce, scorers={"s": scorer}, optimizer=opt, every=1).measure(model, 7)
    assert [r["geometry"] for r in mine] == [r["geometry"] for r in ref] == ["identity", "adam"]
    for a, b in zip(mine, ref, strict=True):
        for key in ("kappa", "kappa_opt", "q_lin", "q_log", "corr_grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert mine[0]["kappa"] > 1.0


@pytest.mark.slow
def test_digits_reader_equals_load_digits():
    from sklearn.datasets import load_digits

    from isample.bench.datasets import _digits_arrays

    x, y = _digits_arrays()
    raw = load_digits()
    assert np.array_equal(x, raw.data) and np.array_equal(y, raw.target)
