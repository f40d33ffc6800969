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
    with pytest.raises(ValueError, match="digits, mnist1d, mnist1d-noisy, noisy-imbalanced"):
        load_dataset("digitz")
    with pytest.raises(ValueError, match="no callable"):
        load_dataset("test_bench:nope")
    assert available_datasets() == ["digits", "mnist1d", "mnist1d-noisy", "noisy-imbalanced"]


@pytest.mark.parametrize("name", ["mlp", "linear", "cnn", "cnn1d"])
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
    with pytest.raises(ValueError, match="cnn, cnn1d, linear, mlp"):
        build_model("mpl", 64, 10, seed=0)
    assert available_models() == ["cnn", "cnn1d", "linear", "mlp"]
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
    assert len(rows) == sum(len(r["curve"]) for r in results["runs"] + results["noise_runs"])
    assert {r["scheme"] for r in rows} == set(config_schemes)
    assert any(r["kappa"] for r in rows if r["scheme"] != "uniform")
    # tuning ran on the measured runs' budget and schedule (the harness's own record of both)
    for opt in optimizers:
        for name in config_schemes:
            t = results["tuning"][opt][name]
            measured = [r for r in results["runs"] if r["optimizer"] == opt and r["scheme"] == name]
            assert all(r["plan"] == t["plan"] for r in measured)
            assert all(
                n == r["steps"]
                for n, d in zip(t["steps"], t["diverged"], strict=True)
                if not d
                for r in measured
            )
    assert results["costs"]["backward_cost"] > 0 and results["costs"]["forward_seconds"] > 0
    assert results["noise_runs"] and set(results["noise_summary"]) <= set(optimizers)
    assert all(r["dataset"] == "mnist1d-noisy" for r in results["noise_runs"])
    report = (out / "report.md").read_text()
    assert report.index("**Verdict**") < report.index("## Headline")
    assert "## Label noise: mnist1d-noisy" in report and "Measured cost model" in report
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
    cfg = BenchConfig(model="mlp", budget="0.05s", eval_every=5, quality_every=0, progress=False)
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


# --------------------------------------------------------------------------- MNIST-1D workload


def test_mnist1d_is_deterministic_per_seed_and_needs_no_network(monkeypatch):
    import socket

    from isample.bench.mnist1d import make_mnist1d

    def no_network(*args, **kwargs):
        raise AssertionError("MNIST-1D generation tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    np_state = np.random.get_state()
    torch_state = torch.random.get_rng_state()
    a = make_mnist1d(seed=3, n_train=200, n_val=50, n_test=50)
    b = make_mnist1d(seed=3, n_train=200, n_val=50, n_test=50)
    c = make_mnist1d(seed=4, n_train=200, n_val=50, n_test=50)
    assert np.array_equal(np.random.get_state()[1], np_state[1])  # no global NumPy RNG
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.x_train, c.x_train)
    assert a.x_train.shape == (200, 40) and a.x_train.dtype == torch.float32
    assert a.x_test.shape == (50, 40) and a.num_classes == 10
    # balanced classes over the whole generated set, standardised with the training moments
    y_all = torch.cat([a.y_train, a.y_val, a.y_test])
    assert torch.bincount(y_all, minlength=10).tolist() == [30] * 10
    assert abs(float(a.x_train.mean())) < 1e-4 and abs(float(a.x_train.std()) - 1) < 1e-2


def test_mnist1d_recipe_steps():
    from isample.bench.mnist1d import _resample, make_mnist1d_arrays, mnist1d_templates

    t = mnist1d_templates()
    assert t.shape == (10, 12)
    assert np.allclose(t[:, 0], 0.0)  # every template starts at 0
    assert np.allclose(t.std(axis=1), 1 / 6)  # whitened, then divided by 6
    # linear resampling of a ramp is exact
    ramp = np.tile(np.arange(10.0), (2, 1))
    out = _resample(ramp, np.array([10, 5]), 19)
    assert np.allclose(out[0], np.linspace(0, 9, 19)) and np.allclose(out[1], np.linspace(0, 4, 19))
    x, y = make_mnist1d_arrays(100, np.random.default_rng(0))
    assert x.shape == (100, 40) and set(y.tolist()) == set(range(10)) and np.isfinite(x).all()
    with pytest.raises(ValueError, match="'n' parameter of make_mnist1d_arrays"):
        make_mnist1d_arrays(5, np.random.default_rng(0))


def test_mnist1d_noisy_flips_only_training_labels():
    clean = load_dataset("mnist1d", seed=0)
    noisy = load_dataset("mnist1d-noisy", seed=0)
    assert torch.equal(clean.x_train, noisy.x_train) and torch.equal(clean.y_test, noisy.y_test)
    assert torch.equal(clean.y_val, noisy.y_val)
    flipped = float((clean.y_train != noisy.y_train).float().mean())
    assert noisy.info["label_noise"] == 0.15 and abs(flipped - 0.15) < 0.02
    assert noisy.info["flipped_train_labels"] == int((clean.y_train != noisy.y_train).sum())


def test_cnn1d_matches_the_mnist1d_shape():
    model = build_model("cnn1d", 40, 10, seed=0)
    convs = [m for m in model if isinstance(m, torch.nn.Conv1d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [
        (32, 5, 1),
        (64, 5, 2),
        (64, 3, 2),
    ]
    assert model[-1].in_features == 64 * 7
    assert model(torch.randn(4, 40)).shape == (4, 10)
    with pytest.raises(ValueError, match="at least 17 points"):
        build_model("cnn1d", 12, 10, seed=0)


# --------------------------------------------------------------------------- fair comparison


def test_tuning_and_measured_runs_share_budget_and_schedule():
    from isample.bench.harness import run_plan

    for schedule in ("constant", "cosine", "linear"):
        for budget in ("240", "3s"):
            cfg = BenchConfig(schedule=schedule, budget=budget)
            assert cfg.tune_fraction == 1.0  # the default: tune on the measured budget
            assert run_plan(cfg, tuning=True) == run_plan(cfg, tuning=False)
    cfg = BenchConfig(schedule="linear", budget="200", tune_fraction=0.5)
    tune, measure = run_plan(cfg, tuning=True), run_plan(cfg, tuning=False)
    assert tune["max_steps"] == 100 and measure["max_steps"] == 200
    assert tune["schedule"] == measure["schedule"] == "linear"
    with pytest.raises(ValueError, match="Valid schedules: constant, cosine, linear"):
        run_plan(BenchConfig(schedule="step"))


def test_schedule_factor_known_values():
    from isample.bench.curves import schedule_factor

    assert schedule_factor("constant", 0.7) == 1.0
    assert schedule_factor("cosine", 0.0) == 1.0 and schedule_factor("cosine", 1.0) == pytest.approx(0.0)
    assert schedule_factor("cosine", 0.5) == pytest.approx(0.5)
    assert schedule_factor("linear", 0.25) == 0.75 and schedule_factor("linear", 2.0) == 0.0


def test_train_run_follows_the_schedule(monkeypatch):
    from isample.bench import harness

    seen = []
    real = harness.make_optimizer

    def spy(name, params, lr):
        opt = real(name, params, lr)
        original = opt.step

        def step(*a, **k):
            seen.append(opt.param_groups[0]["lr"])
            return original(*a, **k)

        opt.step = step
        return opt

    monkeypatch.setattr(harness, "make_optimizer", spy)
    data = load_dataset("digits")
    cfg = BenchConfig(model="linear", budget="10", eval_every=5, quality_every=0, schedule="linear", smooth=2)
    for tuning in (False, True):
        seen.clear()
        run = harness.train_run(data, cfg, "uniform", "sgd", 0.5, 0, tuning=tuning)
        assert run["steps"] == 10 and run["plan"]["schedule"] == "linear"
        assert seen == pytest.approx([0.5 * (1 - k / 10) for k in range(10)])
    # the tuning run evaluates validation loss at its last `smooth` evaluation points only
    assert [p["step"] for p in run["curve"]] == [5, 10] and "val_loss" in run["curve"][0]


def test_grid_extends_until_the_choice_is_inside(monkeypatch):
    from isample.bench import tuning

    def fake_run(data, config, scheme, optimizer, lr, seed, **kwargs):
        val = 1.0 + (math.log10(lr) - math.log10(0.3)) ** 2  # best at 0.3, far above the grid
        return {
            "diverged": False,
            "curve": [{"val_loss": val, "val_accuracy": 0.5}] * 3,
            "steps": 1,
            "train_seconds": 0.0,
        }

    monkeypatch.setattr(tuning, "train_run", fake_run)
    cfg = BenchConfig(lr_grids={"adam": (0.01, 0.03, 0.1)}, max_grid=8)
    t = tuning.tune_learning_rate(None, cfg, "uniform", "adam")
    # 0.1^2 / 0.03 = 0.333 (3 significant digits), then 0.333^2 / 0.1 = 1.11: 0.333 is inside
    assert t["extended"] == pytest.approx([0.333, 1.11])
    assert t["chosen"] == pytest.approx(0.333) and not t["at_edge"]
    assert t["grid"] == sorted(t["grid"]) and len(t["grid"]) == 5
    capped = tuning.tune_learning_rate(
        None, BenchConfig(lr_grids={"adam": (0.01, 0.03, 0.1)}, max_grid=4), "uniform", "adam"
    )
    assert capped["at_edge"] and len(capped["grid"]) == 4 and capped["chosen"] == pytest.approx(0.333)


def test_extend_grid_rules():
    from isample.bench.curves import extend_grid

    assert extend_grid([0.1, 0.3, 1.0], 0) == pytest.approx(0.1 / 3)
    assert extend_grid([0.1, 0.3, 1.0], 2) == pytest.approx(1.0 / 0.3)
    assert extend_grid([0.1, 0.3, 1.0], 1) is None
    assert extend_grid([0.1, 0.3, 1.0], 2, limit=3) is None
    with pytest.raises(ValueError, match="ascending"):
        extend_grid([0.3, 0.1], 0)


def test_smoothing_and_time_to_target_on_synthetic_curves():
    from isample.bench.curves import smooth, smoothed_final, time_to_accuracy

    y = [4.0, 2.0, 6.0, 1.0, 3.0]
    assert smooth(y, 1).tolist() == y
    assert smooth(y, 2).tolist() == [4.0, 3.0, 4.0, 3.5, 2.0]
    assert smooth(y, 3).tolist() == pytest.approx([4.0, 3.0, 4.0, 3.0, 10 / 3])
    assert smoothed_final(y, 3) == pytest.approx(10 / 3)
    assert smooth([1.0, float("nan"), 1.0, 1.0], 2).tolist() == [1.0, math.inf, math.inf, 1.0]
    with pytest.raises(ValueError, match="'window' parameter of smooth"):
        smooth(y, 0)
    # one lucky low evaluation: the raw curve "reaches" 0.5 at x=2, the smoothed one never does
    x = [0.0, 1.0, 2.0, 3.0, 4.0]
    noisy = [1.0, 0.9, 0.4, 0.9, 0.8]
    assert time_to_target(x, noisy, 0.5) < 2.0
    assert time_to_target(x, smooth(noisy, 3), 0.5) == math.inf
    # accuracy 0.5 + 0.1 x crosses 0.75 at x = 2.5 (linear)
    acc = [0.5 + 0.1 * v for v in x]
    assert time_to_accuracy(x, acc, 0.75) == pytest.approx(2.5)
    assert time_to_accuracy(x, acc, 0.95) == math.inf
    assert time_to_accuracy(x, [0.5, float("nan"), 0.9, 0.9, 0.9], 0.8) == pytest.approx(2.0)


def test_summarize_test_accuracy_target_and_smoothed_loss_target():
    runs = []
    for k in range(3):
        for name, slope in (("uniform", 0.001), ("is", 0.002)):
            run = _synthetic_run(name, k, 0.01, 1e-3, 1.0)
            for p in run["curve"]:
                p["test_accuracy"] = 0.5 + slope * p["step"]
                p["test_loss"] = 1.0 - slope * p["step"]
            runs.append(run)
    s = summarize(runs, {}, smooth=2)["sgd"]
    # uniform's accuracy at the last two evaluations (80, 100): 0.58 and 0.6 -> mean 0.59
    assert s["target_test_accuracy"] == pytest.approx(0.59)
    assert s["target_loss"] == pytest.approx((math.exp(-0.8) + math.exp(-1.0)) / 2)
    e = s["schemes"]["is"]
    # "is" reaches a trailing mean (window 2) of 0.59 where 0.5 + 0.002 (x - 10) = 0.59: x = 55
    assert e["steps_to_test_accuracy"]["median"] == pytest.approx(55.0)
    assert e["test_accuracy_at_steps"]["median"] == pytest.approx(0.7)
    assert s["schemes"]["uniform"]["steps_to_test_accuracy"]["median"] == pytest.approx(100.0)


def test_measured_cost_model_on_a_fake_clock():
    from isample.bench.harness import measure_step_costs

    now = [0.0]

    class SlowBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            now[0] += 0.03  # a backward "takes" 30 ms
            return grad

    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            now[0] += 0.01  # a forward "takes" 10 ms
            return SlowBackward.apply(self.lin(x))

    model = Fake()
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    costs = measure_step_costs(
        model, loss, torch.randn(8, 4), torch.randint(0, 3, (8,)), clock=lambda: now[0]
    )
    assert costs["forward_seconds"] == pytest.approx(0.01) and costs["backward_seconds"] == pytest.approx(
        0.03
    )
    assert costs["backward_cost"] == pytest.approx(3.0) and costs["batch_size"] == 8
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert compute_units(100, 50, costs["backward_cost"]) == pytest.approx(250.0)
    with pytest.raises(ValueError, match="'repeats' parameter"):
        measure_step_costs(model, loss, torch.randn(2, 4), torch.zeros(2, dtype=torch.long), repeats=0)


def test_is_on_history_reads_every_exposure():
    from types import SimpleNamespace

    from isample.bench.harness import is_on_history

    on = [{"on": True}, {"on": False}, {"on": True}]
    assert is_on_history(SimpleNamespace(tau_history=on)) == [True, False, True]
    assert is_on_history(SimpleNamespace(pool=SimpleNamespace(tau_history=on))) == [True, False, True]

    class Described:
        def describe(self):
            return {"on_history": [0, 1, 1, 1]}

    assert is_on_history(Described()) == [False, True, True, True]
    assert is_on_history(SimpleNamespace()) == []


def _verdict_summary(ratio, lo, hi, diverged=0):
    def entry(r, rng, div):
        return {
            "diverged": div,
            "ratio_at_cpu_seconds": r,
            "ratio_at_cpu_seconds_range": rng,
            "test_accuracy_at_cpu_seconds": {"median": 0.9, "min": 0.9, "max": 0.9, "n": 3},
            "speedup_test_accuracy_cpu_seconds": 1.5,
        }

    return {
        "adam": {"schemes": {"uniform": entry(1.0, [0.9, 1.1], 0), "kf": entry(ratio, [lo, hi], diverged)}}
    }


def test_verdict_sentences():
    from isample.bench.report import verdicts

    won = verdicts(_verdict_summary(1.4, 1.2, 1.6))["adam"]
    assert "**kf** won at equal CPU time" in won and "1.40x" in won and "1.50x sooner" in won
    mixed = verdicts(_verdict_summary(1.1, 0.9, 1.3))["adam"]
    assert "no clear winner" in mixed and "not on every seed" in mixed
    assert "no scheme beat uniform" in verdicts(_verdict_summary(1.004, 0.99, 1.1))["adam"]
    lost = verdicts(_verdict_summary(0.8, 0.7, 0.9))["adam"]
    assert "no scheme beat uniform" in lost and "kf" in lost
    assert "a run diverged" in verdicts(_verdict_summary(1.4, 1.2, 1.6, diverged=1))["adam"]
