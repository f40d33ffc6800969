"""Scorer options and fast paths: autocast, inference mode, chunking, NaN handling, batch sizes.

Exactness is checked against autograd references in float32; reduced precision is checked
against a proven bound: the softmax Jacobian ``diag(p) - p p^T`` has spectral norm <= 1/2,
so the upper-bound score ``|| softmax(z) - q ||`` is 1/2-Lipschitz in the logits z, and the
cross-entropy loss is sqrt(2)-Lipschitz (its gradient ``softmax(z) - e_y`` has norm <= sqrt 2).
"""

from __future__ import annotations

import copy
import json
import pickle
import runpy
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_classification, make_mlp
from torch import nn

from isample import GradNormScorer, LossScorer, PoolLoader, UpperBoundScorer, score_dataset
from isample.scorers import scoring_mode, upper_bound_closed_form

ROOT = Path(__file__).resolve().parents[1]
CE = nn.CrossEntropyLoss(reduction="none")


def autograd_output_norms(model, loss_fn, x, y):
    out = model(x).detach()
    norms = []
    for i in range(x.shape[0]):
        z = out[i : i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(z, y[i : i + 1]).sum(), z)
        norms.append(g.norm())
    return torch.stack(norms)


def autograd_param_norms(model, loss_fn, x, y):
    norms = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(
            loss_fn(model(x[i : i + 1]), y[i : i + 1]).sum(), list(model.parameters())
        )
        norms.append(torch.sqrt(sum((g**2).sum() for g in grads)))
    return torch.stack(norms)


# ----------------------------------------------------------------------------- autocast


def test_autocast_argument_validation_and_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for cls in (LossScorer, UpperBoundScorer, GradNormScorer):
        with pytest.raises(TypeError, match="The 'autocast' parameter of " + cls.__name__):
            cls(CE, autocast="yes")
        with pytest.raises(TypeError, match="The 'autocast' parameter"):
            cls(CE, autocast=1)
        with pytest.raises(ValueError, match="The 'autocast_dtype' parameter of " + cls.__name__):
            cls(CE, autocast_dtype=torch.float32)
        with pytest.raises(TypeError, match="The 'autocast_dtype' parameter"):
            cls(CE, autocast_dtype="bfloat16")
        assert cls(CE, autocast=True).autocast_enabled(cpu)
        assert not cls(CE, autocast=False).autocast_enabled(cuda)
        assert not cls(CE).autocast_enabled(cpu)  # None: off on the CPU
        assert cls(CE, autocast_dtype=torch.float16).autocast_dtype == torch.float16
    assert UpperBoundScorer(CE).autocast_enabled(cuda) and LossScorer(CE).autocast_enabled(cuda)
    assert not GradNormScorer(CE).autocast_enabled(cuda)  # the exact reference stays in float32
    # positional arguments keep their meaning
    assert UpperBoundScorer(CE, False).closed_form is False
    assert GradNormScorer(CE, 5).chunk_size == 5


def test_cpu_autocast_bf16_within_lipschitz_bound_of_fp32():
    x, y = make_classification(64, d=5, classes=3, seed=4)
    model = make_mlp(5, 32, 3, seed=1)
    z32 = model(x).detach()
    scorer16 = UpperBoundScorer(CE, autocast=True)
    with torch.inference_mode():
        z16 = scorer16.forward(model, x)
    assert z16.dtype == torch.float32
    dz = (z16 - z32).norm(dim=1)
    assert float(dz.max()) > 0  # bf16 really ran
    s16 = scorer16(model, x, y)
    s32 = UpperBoundScorer(CE, autocast=False)(model, x, y)
    assert s16.dtype == torch.float32 and s32.dtype == torch.float32
    assert torch.all((s16 - s32).abs() <= 0.5 * dz + 1e-5)
    # the bound in float32 from the bf16 logits is exactly the closed form of those logits
    torch.testing.assert_close(s16, upper_bound_closed_form(CE, z16, y))
    l16 = LossScorer(CE, autocast=True)(model, x, y)
    l32 = LossScorer(CE)(model, x, y)
    assert l16.dtype == torch.float32
    assert torch.all((l16 - l32).abs() <= 2**0.5 * dz + 1e-5)


def test_cpu_autocast_grad_norm_close_to_fp32():
    x, y = make_classification(12, d=5, classes=3, seed=2)
    model = make_mlp(5, 16, 3, seed=3)
    g32 = GradNormScorer(CE, chunk_size=5)(model, x, y)
    g16 = GradNormScorer(CE, chunk_size=5, autocast=True)(model, x, y)
    assert g16.dtype == torch.float32 and g16.shape == (12,)
    # bf16 keeps 8 significant bits (relative rounding 2^-9 per op); a few ops deep: within 5%
    torch.testing.assert_close(g16, g32, rtol=0.05, atol=1e-3)


# ----------------------------------------------------------------------------- results and modes


@pytest.mark.parametrize("scorer", [LossScorer(CE), UpperBoundScorer(CE), GradNormScorer(CE)], ids=str)
def test_scores_are_plain_float32_tensors_without_graph(scorer):
    x, y = make_classification(9)
    s = scorer(make_mlp(), x, y)
    assert s.dtype == torch.float32 and s.shape == (9,)
    assert not s.requires_grad and s.grad_fn is None and not s.is_inference()
    s.add_(1.0)  # callers may modify the scores in place


def test_scoring_mode_fast_path_and_train_override():
    calls = []

    class Frozen(nn.Linear):
        def train(self, mode: bool = True):
            calls.append(mode)
            return super().train(mode)

    plain = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.Linear(4, 3))
    plain.train()
    plain[1].eval()
    with scoring_mode(plain):
        assert not any(m.training for m in plain.modules())
    assert plain.training and plain[0].training and not plain[1].training and plain[2].training

    custom = nn.Sequential(Frozen(5, 3))
    custom.train()
    calls.clear()
    with scoring_mode(custom):
        assert not custom.training and not custom[0].training
    assert calls == [False]  # an overridden train() is honoured: model.eval() was called
    assert custom.training and custom[0].training

    calls.clear()
    custom.eval()
    calls.clear()
    with scoring_mode(custom):  # already in eval mode: nothing to switch
        pass
    assert calls == [] and not custom.training


def test_fused_activation_warning_once_per_model_and_pickling():
    x, y = make_classification(4)
    scorer = UpperBoundScorer(CE)
    first = nn.Sequential(nn.Linear(5, 3), nn.Softmax(dim=1))
    with pytest.warns(UserWarning, match="ends with Softmax") as record:
        for _ in range(3):
            scorer(first, x, y)
    assert len([w for w in record if "ends with" in str(w.message)]) == 1
    second = nn.Sequential(nn.Linear(5, 3), nn.LogSoftmax(dim=1))
    with pytest.warns(UserWarning, match="ends with LogSoftmax"):
        scorer(second, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scorer(first, x, y)  # checked already: silent
        scorer(make_mlp(), x, y)  # logits: silent
    for clone in (pickle.loads(pickle.dumps(scorer)), copy.deepcopy(scorer)):
        torch.testing.assert_close(clone(make_mlp(), x, y), scorer(make_mlp(), x, y))


# ----------------------------------------------------------------------------- closed form


def test_closed_form_ignore_index_inside_class_range_and_bad_targets():
    x, y = make_classification(30, seed=5)
    model = make_mlp()
    ce = nn.CrossEntropyLoss(reduction="none", ignore_index=1, label_smoothing=0.2)
    got = UpperBoundScorer(ce)(model, x, y)
    keep = y != 1
    assert bool((~keep).any()) and torch.all(got[~keep] == 0)
    torch.testing.assert_close(
        got[keep], autograd_output_norms(model, ce, x[keep], y[keep]), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\); got min 0, max 3"):
        UpperBoundScorer(CE)(model, x[:3], torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\); got min -1"):
        UpperBoundScorer(CE)(model, x[:3], torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match="do not match outputs"):
        UpperBoundScorer(CE)(model, x[:3], torch.tensor([0, 1]))
    empty = UpperBoundScorer(CE)(model, x[:0], y[:0])
    assert empty.shape == (0,) and empty.dtype == torch.float32


# ----------------------------------------------------------------------------- NaN


@pytest.mark.parametrize(
    "scorer", [LossScorer(CE), UpperBoundScorer(CE), GradNormScorer(CE, chunk_size=2)], ids=str
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores_warn_and_pass_through_as_nan(scorer, bad):
    x, y = make_classification(6)
    x[2, 0] = bad
    model = make_mlp()
    with pytest.warns(RuntimeWarning, match="produced 1 non-finite score"):
        s = scorer(model, x, y)
    assert torch.isnan(s[2])
    keep = torch.arange(6) != 2
    assert torch.isfinite(s[keep]).all()
    torch.testing.assert_close(s[keep], scorer(model, x[keep], y[keep]))


def test_huge_finite_scores_do_not_warn():
    # the sum of the scores overflows to inf while every score is finite: no warning
    def huge(out, t):
        return torch.full((out.shape[0],), 3e38)

    x, y = make_classification(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = LossScorer(huge)(make_mlp(), x, y)
    assert torch.isfinite(s).all()


# ----------------------------------------------------------------------------- chunking


def test_grad_norm_chunked_equals_unchunked_and_autograd():
    x, y = make_classification(23, seed=7)
    model = make_mlp(5, 8, 3, seed=2)
    want = autograd_param_norms(model, CE, x, y)
    whole = GradNormScorer(CE, chunk_size=23)(model, x, y)
    torch.testing.assert_close(whole, want, rtol=1e-5, atol=1e-6)
    for chunk in (1, 2, 5, 22, 100):
        torch.testing.assert_close(
            GradNormScorer(CE, chunk_size=chunk)(model, x, y), whole, rtol=1e-5, atol=1e-6
        )


def test_grad_norm_chunk_size_validation():
    with pytest.raises(
        ValueError, match=r"The 'chunk_size' parameter of GradNormScorer must be an int >= 1\. Got 0"
    ):
        GradNormScorer(CE, chunk_size=0)
    with pytest.raises(TypeError, match="The 'chunk_size' parameter of GradNormScorer"):
        GradNormScorer(CE, chunk_size=True)
    with pytest.raises(TypeError, match="The 'chunk_size' parameter of GradNormScorer"):
        GradNormScorer(CE, chunk_size=4.0)


class DictModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_mlp()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # dict inputs: model(**inputs)
        return self.net(a + b)


def test_grad_norm_chunks_nested_inputs():
    x, y = make_classification(7)
    noise = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    model = DictModel()
    inputs = {"a": x - noise, "b": noise}
    want = autograd_param_norms(model.net, CE, x, y)
    for chunk in (1, 3, 7):
        torch.testing.assert_close(
            GradNormScorer(CE, chunk_size=chunk)(model, inputs, y), want, rtol=1e-4, atol=1e-6
        )


# ----------------------------------------------------------------------------- batch sizes


def test_score_dataset_independent_of_batch_size_and_workers(classification, mlp):
    scorer = UpperBoundScorer(CE)
    x, y = classification.tensors
    want = scorer(mlp, x, y)
    for batch_size in (1, 7, 64, 1000):
        got = score_dataset(mlp, classification, scorer, batch_size=batch_size, pin_memory=False)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got = score_dataset(mlp, classification, scorer, batch_size=16, num_workers=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="The 'num_workers' parameter of score_dataset"):
        score_dataset(mlp, classification, scorer, num_workers=-1)
    with pytest.raises(TypeError, match="The 'scorer' parameter of score_dataset"):
        score_dataset(mlp, classification, "upper_bound")


class SpyScorer:
    def __init__(self, inner) -> None:
        self.inner = inner
        self.loss_fn = inner.loss_fn
        self.sizes: list[int] = []

    def __call__(self, model, inputs, targets):
        self.sizes.append(int(inputs.shape[0]))
        return self.inner(model, inputs, targets)


def test_pool_loader_scoring_batch_size_is_independent_of_training_batch():
    x, y = make_classification(60, seed=3)
    ds = torch.utils.data.TensorDataset(x, y)
    model = make_mlp()
    runs = {}
    for chunk in (None, 7):
        spy = SpyScorer(UpperBoundScorer(CE))
        loader = PoolLoader(
            ds, model, spy, batch_size=6, presample=4.0, always=True, scoring_batch_size=chunk, seed=11
        )
        batches = list(loader)
        runs[chunk] = (spy.sizes[1:], batches)  # sizes[0]: the constructor's 2-example check
    assert set(runs[None][0]) == {24}
    assert max(runs[7][0]) == 7 and sum(runs[7][0]) == 24 * len(runs[7][1])
    for a, b in zip(runs[None][1], runs[7][1], strict=True):
        assert torch.equal(a.indices, b.indices)
        torch.testing.assert_close(a.weights, b.weights, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- benchmarks (smoke)


def test_bench_scoring_quick(tmp_path):
    out = tmp_path / "scoring.json"
    module = runpy.run_path(str(ROOT / "benchmarks" / "bench_scoring.py"))
    result = module["main"](["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["cases"] and saved["cases"][0]["variants"]["forward"]["ratio_wall"] == 1.0
    variants = result["cases"][0]["variants"]
    assert {"forward", "upper_bound", "loss", "grad_norm"} <= set(variants)
    assert all(v["wall_s"] > 0 for v in variants.values())
    assert saved["overlap"]["rows"][0]["num_workers"] == 0


def test_bench_memory_quick(tmp_path):
    out = tmp_path / "memory.json"
    module = runpy.run_path(str(ROOT / "benchmarks" / "bench_memory.py"))
    result = module["main"](["--quick", "--out", str(out)])
    case = json.loads(out.read_text())["cases"][0]
    assert case["kind"] == "grad_norm" and case["predicted_bytes"] == case["chunk"] * case["params"] * 4
    assert result["cases"][0]["peak_bytes"] >= 0
