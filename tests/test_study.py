"""``isample study``: the experiment glue on synthetic inputs, the config checks, and --quick end to end."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from isample.bench import harness
from isample.cli import main
from isample.study import (
    FAMILIES,
    StudyConfig,
    checkpoint_points,
    effective_batch_verdict,
    family_spearman,
    optimizer_family,
    quick_study_config,
    run_kappa,
    validate_study_config,
)
from isample.study.experiments import resolve_scheme
from isample.study.report import CSV_COLUMNS, PLOT_FILES

# --------------------------------------------------------------------------- experiment A glue


@pytest.mark.parametrize(
    ("d_rule", "d_control", "ratio", "expected"),
    [
        (0.01, 0.30, 2.0, "holds"),
        (0.20, 0.30, 2.0, "closer than control"),
        (0.30, 0.01, 2.0, "fails"),
        (0.01, 0.30, 1.05, "untestable (kappa ~ 1)"),
        (0.01, 0.30, 1 / 1.05, "untestable (kappa ~ 1)"),
        (0.01, 0.30, 0.5, "holds"),  # kappa < 1: a smaller uniform batch
        (math.nan, 0.30, 2.0, "n/a"),
    ],
)
def test_effective_batch_verdict(d_rule, d_control, ratio, expected):
    assert effective_batch_verdict(d_rule, d_control, ratio, threshold=0.05) == expected


def test_verdict_from_synthetic_curves():
    """A coupled curve equal to IS up to 1 % holds; a control a factor 2 off does not."""
    from isample.study import curve_match

    steps = np.arange(0, 201, 20.0)
    is_curve = 2.3 * np.exp(-steps / 60)
    coupled = is_curve * 1.01
    control = 2.3 * np.exp(-steps / 120)
    d_rule = curve_match(steps, is_curve, steps, coupled, start=20).median_abs_log_ratio
    d_control = curve_match(steps, is_curve, steps, control, start=20).median_abs_log_ratio
    assert d_rule == pytest.approx(math.log(1.01))
    assert effective_batch_verdict(d_rule, d_control, 2.0) == "holds"
    assert effective_batch_verdict(d_control, d_rule, 2.0) == "fails"


def test_run_kappa_uses_optimizer_geometry_and_skips_step_zero():
    rows = [
        {"step": 0, "geometry": "identity", "kappa": 100.0},
        {"step": 10, "geometry": "identity", "kappa": 5.0},
        {"step": 10, "geometry": "adam", "kappa": 2.0},
        {"step": 20, "geometry": "identity", "kappa": 7.0},
        {"step": 20, "geometry": "adam", "kappa": 4.0},
        {"step": 30, "geometry": "adam", "kappa": math.nan},
    ]
    assert run_kappa(rows) == pytest.approx(3.0)  # median of 2, 4 (adam rows)
    assert run_kappa(rows, up_to=10) == pytest.approx(2.0)
    identity_only = [r for r in rows if r["geometry"] == "identity"]
    assert run_kappa(identity_only) == pytest.approx(6.0)  # step 0 left out
    assert math.isnan(run_kappa([]))


# --------------------------------------------------------------------------- experiment B glue


def _run(steps, losses, cpu, quality=()):
    curve = [
        {"step": int(s), "cpu_seconds": float(c), "train_loss": float(v)}
        for s, v, c in zip(steps, losses, cpu, strict=True)
    ]
    return {"curve": curve, "quality": list(quality)}


def test_checkpoint_points_known_speed_up():
    """IS decays 2.5x faster per step and costs 2x the CPU per step: speed-up 2.5 in steps, 1.25 in CPU."""
    steps = np.arange(0, 401, 10)
    uniform = _run(steps, np.exp(-steps / 25), 0.01 * steps)
    quality = [{"step": t, "geometry": "identity", "kappa": float(t), "q_log": 0.5} for t in (0, 40, 80)]
    is_run = _run(steps[:17], np.exp(-steps[:17] / 10), 0.02 * steps[:17], quality)
    points = checkpoint_points(is_run, uniform, tau2=[(s, 4.0) for s in range(0, 81)])
    assert [p["step"] for p in points] == [40, 80]
    for p in points:
        assert p["realized_steps"] == pytest.approx(2.5, rel=1e-9)
        assert p["realized_cpu"] == pytest.approx(1.25, rel=1e-9)
        assert not p["censored"]
        assert p["tau2"] == pytest.approx(4.0)
    assert points[0]["kappa"] == pytest.approx(40.0)  # mean over probes 0 < step <= 40
    assert points[1]["kappa"] == pytest.approx(60.0)


def test_checkpoint_points_censored_when_uniform_never_reaches():
    steps = np.arange(0, 101, 10)
    uniform = _run(steps, np.exp(-steps / 100), 0.01 * steps + 0.001)
    quality = [{"step": 50, "geometry": "identity", "kappa": 2.0, "q_log": 0.1}]
    is_run = _run(steps, np.exp(-steps / 10), 0.01 * steps + 0.001, quality)
    (point,) = checkpoint_points(is_run, uniform)
    assert point["censored"]
    assert point["realized_steps"] == pytest.approx(100 / 50)  # lower bound: uniform's last step / t
    assert math.isnan(point["tau2"])


def test_family_grouping_and_spearman():
    assert optimizer_family("nesterov") == "sgd-like"
    assert optimizer_family("adam-b1=b2") == "adam-like"
    assert optimizer_family("badam") == "bayesian"
    assert optimizer_family("rmsprop") == "rmsprop-like"
    assert optimizer_family("lion") == "other"
    assert set(FAMILIES) == {"sgd-like", "rmsprop-like", "adam-like", "bayesian"}
    rng = np.random.default_rng(0)
    points = []
    for k in range(12):  # sgd-like: realized increasing in kappa; adam-like: decreasing
        points.append(
            {"family": "sgd-like", "kappa": 1.0 + k, "realized_steps": 2.0 * k + 1, "censored": False}
        )
        points.append(
            {"family": "adam-like", "kappa": 1.0 + k, "realized_steps": 30.0 - k, "censored": False}
        )
    points.append({"family": "sgd-like", "kappa": 100.0, "realized_steps": 0.01, "censored": True})
    points.append({"family": "rmsprop-like", "kappa": 2.0, "realized_steps": 1.0, "censored": False})
    out = family_spearman(points, predictors=("kappa",), targets=("realized_steps",), n_boot=200)
    key = "kappa~realized_steps"
    assert out["sgd-like"][key]["rho"] == pytest.approx(1.0)  # the censored outlier is left out
    assert out["sgd-like"][key]["n"] == 12
    assert out["adam-like"][key]["rho"] == pytest.approx(-1.0)
    assert out["adam-like"][key]["low"] == pytest.approx(-1.0)
    assert math.isnan(out["rmsprop-like"][key]["rho"]) and out["rmsprop-like"][key]["n"] == 1
    assert out["all"][key]["n"] == 25
    kept = family_spearman(
        points, predictors=("kappa",), targets=("realized_steps",), n_boot=50, exclude_censored=False
    )
    assert kept["sgd-like"][key]["n"] == 13 and kept["sgd-like"][key]["rho"] < 1.0
    del rng


# --------------------------------------------------------------------------- config and harness


def test_resolve_scheme():
    import isample.schemes as schemes

    assert resolve_scheme("kf-always", schemes) == ("kf", {"always": True})
    assert resolve_scheme("history-is", schemes) == ("history-is", {})
    with pytest.raises(ValueError, match="Unknown scheme 'nope'.*kf-always"):
        resolve_scheme("nope", schemes)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"experiments": ("A", "D")}, "Unknown experiment 'D'"),
        ({"workloads": ("mnist1d",)}, "dataset/model"),
        ({"workloads": ("nope/mlp",)}, "Unknown dataset 'nope'"),
        ({"workloads": ("digits/resnet",)}, "Unknown model 'resnet'"),
        ({"optimizers": ("sgd", "lion")}, "Unknown optimizer 'lion'"),
        ({"seeds": ()}, "'seeds' list is empty"),
        ({"steps": 0}, "'steps' setting"),
        ({"quality_every": 15}, "multiple of 'eval_every'"),
        ({"b_schemes": ("nope",)}, "Unknown scheme 'nope'"),
        ({"c_variants": ("is-max",)}, "Unknown stability variant"),
        ({"c_search": "random"}, "'c_search' setting"),
        ({"c_lr_factors": (1.0, 1.0)}, "c_lr_factors"),
        ({"lrs": {"sgd": -1.0, "adam": 1e-3}}, "learning rate for optimizer 'sgd'"),
    ],
)
def test_validate_study_config_errors(change, message):
    config = quick_study_config(**change)
    with pytest.raises(ValueError, match=message):
        validate_study_config(config)


def test_quick_config_and_default_optimizer_grid():
    config = validate_study_config(quick_study_config())
    assert config.quick and config.a_workload == "digits/mlp" and config.c_workload == "digits/mlp"
    with pytest.raises(ValueError, match="Unknown StudyConfig setting"):
        quick_study_config(nope=1)
    grid = StudyConfig().optimizers
    for name in (
        "sgd",
        "sgd-momentum",
        "nesterov",
        "rmsprop",
        "adam",
        "adam-b1-0",
        "adam-b1-0.99",
        "adam-b1=b2",
        "adamw",
    ):
        assert name in grid and name in harness.available_study_optimizers()


def test_bench_optimizers_unchanged():
    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = harness.make_optimizer("sgd", params, 0.1)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0
    adam = harness.make_optimizer("adam", params, 0.1)
    assert type(adam) is torch.optim.Adam and adam.defaults["betas"] == (0.9, 0.999)
    assert harness.make_optimizer("nesterov", params, 0.1).defaults["nesterov"] is True
    assert harness.make_optimizer("adam-b1=b2", params, 0.1).defaults["betas"] == (0.99, 0.99)
    assert set(harness.DEFAULT_LR_GRIDS) == {"sgd", "rmsprop", "adam"}
    assert set(harness.OPTIMIZERS) == {"sgd", "rmsprop", "adam"}  # isample bench offers only these


def _tiny_bench(**kw):
    from isample.bench.datasets import load_dataset

    data = load_dataset("digits")
    cfg = harness.BenchConfig(
        model="mlp",
        dataset="digits",
        budget="6",
        eval_every=3,
        quality_every=3,
        probe_size=16,
        train_eval_size=64,
        schedule="constant",
        progress=False,
        **kw,
    )
    return data, cfg


def test_train_run_study_hooks():
    torch.set_num_threads(1)
    data, cfg = _tiny_bench()

    def hook(opt):
        for group in opt.param_groups:
            group["lr"] = 0.05

    run = harness.train_run(
        data, cfg, "kf", "sgd", 0.3, 0, optimizer_hook=hook, scheme_options={"always": True}, record_tau=True
    )
    assert run["lr"] == 0.05
    assert run["is_on_share"] == 1.0  # the switch forced on
    assert len(run["tau_history"]) == 6 and all(h["tau"] >= 1.0 - 1e-9 for h in run["tau_history"])
    plain = harness.train_run(data, cfg, "uniform", "sgd", 0.3, 0)
    assert "tau_history" not in plain and plain["lr"] == 0.3
    mean = harness.train_run(
        data, cfg, "kf", "sgd", 0.3, 0, scheme_options={"always": True}, weight_normalize="mean"
    )
    assert all(math.isfinite(p["train_loss"]) for p in mean["curve"])
    with pytest.raises(ValueError, match="weight_normalize"):
        harness.train_run(data, cfg, "uniform", "sgd", 0.3, 0, weight_normalize="median")


# --------------------------------------------------------------------------- end to end


def _finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_outputs(out, experiments=("A", "B", "C"), plots=True):
    for name in ("report.md", "results.json", "results.csv"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    for key, kind in (
        ("schema_version", int),
        ("config", dict),
        ("machine", dict),
        ("wall_seconds", float),
        ("cpu_seconds", float),
        ("n_runs", int),
        ("phase_seconds", dict),
        ("plots", list),
    ):
        assert isinstance(results[key], kind), key
    assert _finite(results["wall_seconds"]) and results["wall_seconds"] > 0
    assert set(results["phase_seconds"]) == set(experiments)
    verdicts = {"holds", "closer than control", "fails", "untestable (kappa ~ 1)", "n/a"}
    if "A" in experiments:
        a = results["A"]
        assert set(a["verdicts"]) == set(results["config"]["optimizers"])
        for v in a["verdicts"].values():
            assert v["verdict"] in verdicts and v["verdict_matched"] in verdicts
            assert _finite(v["kappa"]) and v["kappa"] > 0
            assert _finite(v["d_control"]) and v["d_control"] >= 0
        for row in a["rows"]:
            assert isinstance(row["coupled_batch_size"], int) and row["coupled_batch_size"] >= 1
    if "B" in experiments:
        b = results["B"]
        assert b["points"]
        for p in b["points"]:
            assert isinstance(p["step"], int) and p["step"] > 0
            assert _finite(p["kappa"]) and _finite(p["realized_steps"]) and _finite(p["realized_cpu"])
            assert isinstance(p["censored"], bool)
        assert any(p["final"] for p in b["points"])
        fams = {**b["spearman"], **{f"{k} final": v for k, v in b["spearman_final"].items()}}
        assert "all" in fams and "all final" in fams
        for entries in fams.values():
            for e in entries.values():
                assert isinstance(e["n"], int)
                if e["rho"] != "nan":
                    assert -1 <= e["rho"] <= 1 and e["low"] <= e["high"]
    if "C" in experiments:
        for row in results["C"]["table"].values():
            for entry in row.values():
                assert entry["lr"] is None or (_finite(entry["lr"]) and entry["lr"] > 0)
                assert isinstance(entry["at_edge"], bool) and isinstance(entry["monotone"], bool)
    with open(out / "results.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    assert {r["experiment"] for r in rows} == set(experiments)
    for r in rows:
        if r["experiment"] == "B":
            assert math.isfinite(float(r["kappa"])) and math.isfinite(float(r["realized_steps"]))
    report = (out / "report.md").read_text()
    for e in experiments:
        assert f"## {e}." in report
    if plots:
        assert sorted(results["plots"]) == sorted(PLOT_FILES[e] for e in experiments)
        for p in results["plots"]:
            assert (out / p).stat().st_size > 1000
    return results


def test_study_quick_cli_end_to_end(tmp_path, capsys):
    """The real ``isample study --quick``: every output exists with a valid schema."""
    from isample.bench.plots import matplotlib_available

    out = tmp_path / "q"
    assert main(["study", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert "isample study: wrote" in capsys.readouterr().out
    results = _check_outputs(out, plots=matplotlib_available())
    if not matplotlib_available():
        assert results["plots"] == []
    assert results["config"]["quick"] is True
    assert results["wall_seconds"] < 120  # the --quick budget (measured about 15 s on 2 cores)


def test_study_cli_subset_without_plots(tmp_path):
    out = tmp_path / "c"
    args = [
        "study",
        "--quick",
        "--experiments",
        "c",
        "--optimizers",
        "sgd",
        "--no-plots",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    results = _check_outputs(out, experiments=("C",), plots=False)
    assert results["plots"] == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--experiments", "A,Z"], "Unknown experiment 'Z'"),
        (["--optimizers", "sgd,lion"], "Unknown optimizer 'lion'"),
        (["--workloads", "digits"], "dataset/model"),
    ],
)
def test_study_cli_errors(tmp_path, capsys, args, message):
    assert main(["study", "--quick", "--out", str(tmp_path / "x"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
