"""describe() / status() on the entry point, and the sampling plot (issue 14, visibility)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_classification, make_mlp
from torch import nn
from torch.utils.data import TensorDataset

import isample

pytest.importorskip("matplotlib")
import isample.plotting  # noqa: E402

CE = nn.CrossEntropyLoss(reduction="none")


def train(scheme, steps=12):
    x, y = make_classification(96)
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    loader = isample.DataLoader(
        TensorDataset(x, y), batch_size=16, scheme=scheme, model=model, loss_fn=CE, seed=0
    )
    weights = []
    while len(weights) < steps:
        for x_, y_, w in loader:
            losses = CE(model(x_), y_)
            (w * losses).mean().backward()
            opt.step()
            opt.zero_grad()
            loader.update(losses.detach())
            weights.append(w.detach())
            if len(weights) == steps:
                break
    return loader, weights


def test_table_scheme_describe_status_and_plot(tmp_path):
    loader, weights = train(isample.schemes.HistoryIS(mixing=0.1))
    d = loader.describe()
    assert d["scheme"] == "history-is" and d["is_on"] is True and d["mixing_level"] == pytest.approx(0.1)
    assert loader.status().startswith("IS on | mixing 0.10")
    fig = isample.plotting.plot_sampling(loader, weights, path=tmp_path / "table.png")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 3 and "batch weights" in titles[2]
    assert (tmp_path / "table.png").stat().st_size > 1000


def test_auto_mixing_reports_its_level_and_gain():
    loader, _ = train("history-is", steps=20)
    d = loader.describe()
    assert 0.0 < d["mixing_level"] <= 1.0 and d["is_on"] == (d["mixing_level"] < 1.0)
    gain = d["estimated_gain"]
    assert gain is None or gain > 0 or gain != gain  # NaN before the first observation


def test_pool_scheme_plots_its_switch(tmp_path):
    loader, weights = train(isample.schemes.KatharopoulosFleuret(tau_threshold=1.0), steps=10)
    d = loader.describe()
    assert {"is_on", "tau", "tau_ema", "threshold", "on_share"} <= set(d)
    assert "tau" in loader.status()
    fig = isample.plotting.plot_sampling(loader, weights)
    assert any(ax.get_title().startswith("switch: IS on") for ax in fig.axes)


def test_uniform_is_not_switched_and_nothing_to_plot_is_an_error():
    loader, _ = train("uniform", steps=2)
    assert loader.describe()["is_on"] is None
    with pytest.raises(ValueError, match="nothing to plot"):
        isample.plotting.plot_sampling(loader)
