"""The CUDA path of the scorers and loaders (``gpu`` marker: skipped without CUDA), and the
CPU behaviour of ``benchmarks/gpu_check.py``.

Reduced precision is checked against a proven bound: the softmax Jacobian has spectral
norm <= 1/2, so the upper-bound score is 1/2-Lipschitz in the logits, and cross-entropy is
sqrt(2)-Lipschitz.
"""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch
from conftest import make_classification, make_mlp
from torch import nn

from isample import (
    GradNormScorer,
    ImportanceDataLoader,
    LossScorer,
    PoolLoader,
    TableSampler,
    UpperBoundScorer,
    score_dataset,
)

ROOT = Path(__file__).resolve().parents[1]
CE = nn.CrossEntropyLoss(reduction="none")
CUDA = torch.device("cuda")


def _no_tf32():
    """Exact float32 matmuls/convolutions for comparisons with the CPU (restored by the caller)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return saved


@pytest.fixture
def exact_fp32():
    saved = _no_tf32()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.gpu
@pytest.mark.parametrize("pinned", [False, True])
def test_scorers_on_cuda_model_with_cpu_inputs(exact_fp32, pinned):
    x, y = make_classification(40, d=5, classes=3, seed=1)
    if pinned:
        x, y = x.pin_memory(), y.pin_memory()
    cpu_model = make_mlp(5, 16, 3, seed=2)
    gpu_model = make_mlp(5, 16, 3, seed=2).to(CUDA)
    for scorer in (
        LossScorer(CE, autocast=False),
        UpperBoundScorer(CE, autocast=False),
        GradNormScorer(CE, 16),
    ):
        got = scorer(gpu_model, x, y)
        assert got.device.type == "cuda" and got.dtype == torch.float32 and got.shape == (40,)
        assert not got.requires_grad
        torch.testing.assert_close(got.cpu(), scorer(cpu_model, x, y), rtol=1e-4, atol=1e-5)
    assert x.device.type == "cpu"  # the caller's tensors are not moved


@pytest.mark.gpu
def test_cuda_default_autocast_is_bf16_and_within_lipschitz_bound():
    x, y = make_classification(256, d=5, classes=3, seed=3)
    model = make_mlp(5, 64, 3, seed=4).to(CUDA)
    ub = UpperBoundScorer(CE)
    assert ub.autocast_enabled(CUDA) and ub.autocast_dtype == torch.bfloat16
    with torch.inference_mode():
        z16 = ub.forward(model, x.to(CUDA))
        z32 = UpperBoundScorer(CE, autocast=False).forward(model, x.to(CUDA))
    assert z16.dtype == torch.float32
    dz = (z16 - z32).norm(dim=1)
    s16 = ub(model, x, y)
    s32 = UpperBoundScorer(CE, autocast=False)(model, x, y)
    assert s16.dtype == torch.float32
    assert torch.all((s16 - s32).abs() <= 0.5 * dz + 1e-5)
    assert bool(torch.all(dz <= 0.1 * z32.norm(dim=1) + 1e-3))  # bf16: a few significant bits lost, not more
    l16 = LossScorer(CE)(model, x, y)
    l32 = LossScorer(CE, autocast=False)(model, x, y)
    assert torch.all((l16 - l32).abs() <= 2**0.5 * dz + 1e-5)


@pytest.mark.gpu
def test_cuda_bad_targets_raise_before_indexing_and_nan_warns():
    model = make_mlp().to(CUDA)
    x, _ = make_classification(4)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        UpperBoundScorer(CE)(model, x, torch.tensor([0, 1, 2, 3]))
    torch.cuda.synchronize()  # no device-side assert was triggered
    x[1, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="1 non-finite"):
        s = UpperBoundScorer(CE)(model, x, torch.tensor([0, 1, 2, 0]))
    assert torch.isnan(s[1]).item() and torch.isfinite(s[[0, 2, 3]]).all().item()


@pytest.mark.gpu
def test_score_dataset_cuda_model(exact_fp32):
    x, y = make_classification(50, seed=5)
    ds = torch.utils.data.TensorDataset(x, y)
    model = make_mlp(seed=6)
    want = UpperBoundScorer(CE)(model, x, y)
    got = score_dataset(model, ds, UpperBoundScorer(CE, autocast=False), batch_size=16, device="cuda")
    assert got.device.type == "cpu" and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("num_workers", [0, 2])
def test_pool_loader_cuda_model_pin_memory(exact_fp32, num_workers):
    x, y = make_classification(64, seed=7)
    ds = torch.utils.data.TensorDataset(x, y)
    common = dict(batch_size=8, presample=2.0, seed=3, num_batches=4, tau_threshold=1e9)
    # switch held off: uniform draws, identical on both devices
    cpu_batches = list(PoolLoader(ds, make_mlp(seed=1), UpperBoundScorer(CE), **common))
    model = make_mlp(seed=1).to(CUDA)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = PoolLoader(ds, model, UpperBoundScorer(CE), pin_memory=True, num_workers=num_workers, **common)
    for batch, ref in zip(loader, cpu_batches, strict=True):
        assert batch.inputs.device.type == "cuda" and batch.targets.device.type == "cuda"
        assert batch.weights.device.type == "cuda" and batch.indices.device.type == "cpu"
        assert torch.equal(batch.indices, ref.indices)
        losses = CE(model(batch.inputs), batch.targets)
        (batch.weights * losses).mean().backward()
        opt.step()
        opt.zero_grad()
        loader.update(batch.indices, losses.detach())
    # importance sampling on: valid draws, finite positive weights on the device
    loader = PoolLoader(
        ds, model, UpperBoundScorer(CE), batch_size=8, always=True, pin_memory=True, seed=4, num_batches=3
    )
    for batch in loader:
        assert batch.indices.min() >= 0 and batch.indices.max() < 64
        assert batch.weights.device.type == "cuda" and bool(torch.all(batch.weights > 0))
        assert all(h["on"] for h in loader.tau_history)


@pytest.mark.gpu
def test_importance_dataloader_cuda_model_pin_memory():
    x, y = make_classification(64, seed=8)
    ds = torch.utils.data.TensorDataset(x, y)
    model = make_mlp(seed=2).to(CUDA)
    sampler = TableSampler(64, 8, seed=5, num_batches=6)
    loader = ImportanceDataLoader(ds, sampler, pin_memory=True)
    seen = {}
    for batch in loader:
        assert batch.inputs.is_pinned() and batch.weights.is_pinned()
        on_gpu = batch.to(CUDA, non_blocking=True)
        assert on_gpu.indices.device.type == "cpu"
        losses = CE(model(on_gpu.inputs), on_gpu.targets)
        (on_gpu.weights * losses).mean().backward()
        model.zero_grad()
        loader.update(batch.indices, losses.detach())  # CUDA scores are accepted
        for i, s in zip(batch.indices.tolist(), losses.detach().cpu().tolist(), strict=True):
            seen[i] = s  # last write wins
    table = sampler.scores()
    for i, s in seen.items():
        assert table[i] == pytest.approx(s, rel=1e-6)


# ----------------------------------------------------------------------------- gpu_check.py on the CPU


def _gpu_check():
    return runpy.run_path(str(ROOT / "benchmarks" / "gpu_check.py"))


def test_gpu_check_refuses_politely_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would run for real")
    out = tmp_path / "gpu.json"
    assert _gpu_check()["main"](["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "none is available" in err and "--cpu-smoke" in err
    assert not out.exists()


def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    module = _gpu_check()
    assert module["main"](["--cpu-smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["cpu_smoke"] and result["device"] == "cpu" and result["pool"] == 4 * result["batch"]
    variants = result["variants"]
    assert variants["train_step_fp32"]["ratio_vs_train_step_fp32"] == 1.0
    assert {"score_pool_fp32", "score_pool_bf16", "forward_pool_fp32"} <= set(variants)
    assert -1.0 <= result["bf16_vs_fp32"]["spearman"] <= 1.0


def test_resnet18_like_has_resnet18_size():
    model = _gpu_check()["ResNet18Like"]()
    params = sum(p.numel() for p in model.parameters())
    assert 11.0e6 < params < 11.3e6
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
