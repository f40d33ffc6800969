"""The quickstart example runs and trains both samplers."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_runs(capsys):
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    losses = module.main(["--steps", "60"])
    assert set(losses) == {"uniform", "upper-bound IS"}
    assert all(math.isfinite(v) and v < 2.3 for v in losses.values())  # below chance-level CE (ln 10)
    assert "upper-bound IS" in capsys.readouterr().out
