"""GradNormRecorder: norms from the training step's own backward, against the scorer and brute force."""

from __future__ import annotations

import copy
import runpy
from pathlib import Path

import pytest
import torch
from test_linear_scorer import (
    CE,
    SeqModel,
    all_hooks,
    assert_rel,
    make_batch,
    make_mlp,
    make_seq_batch,
    reference_norms,
    seq_loss,
    train_steps,
)
from torch import nn

from isample._linear_norms import linear_sq_grad_norms
from isample.linear_scorer import LinearGradNormScorer
from isample.recorder import GradNormRecorder

ROOT = Path(__file__).resolve().parents[1]


def weights_for(b, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return 0.2 + 2.0 * torch.rand(b, generator=gen, dtype=torch.float64)


def recorded_step(model, opt, recorder, x, y, w, loss_fn=CE, reduction="mean"):
    with recorder.record(w, reduction=reduction):
        losses = loss_fn(model(x), y)
        weighted = losses if w is None else w * losses
        loss = weighted.mean() if reduction == "mean" else weighted.sum()
        loss.backward()
    norms = recorder.norms()
    opt.step()
    opt.zero_grad()
    return norms


@pytest.mark.parametrize("optimizer", [None, "Adam", "RMSprop"])
def test_recorder_equals_scorer_on_a_real_weighted_step(optimizer):
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    if optimizer == "RMSprop":
        opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    train_steps(model, opt, CE)
    geometry = None if optimizer is None else opt
    x, y = make_batch(seed=21)
    w = weights_for(9)
    expected_scorer = LinearGradNormScorer(CE, optimizer=geometry)(model, x, y)
    expected = reference_norms(model, CE, x, y, optimizer=geometry)  # state before opt.step()
    recorder = GradNormRecorder(model, optimizer=geometry)
    model.train()
    norms = recorded_step(model, opt, recorder, x, y, w)
    assert norms.dtype == torch.float32 and norms.shape == (9,) and not norms.requires_grad
    assert_rel(norms, expected)
    assert_rel(norms, expected_scorer.double())
    assert all_hooks(model) == []


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [True, False])
def test_reductions_and_missing_weights(reduction, weighted):
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = make_batch(seed=22)
    w = weights_for(9, seed=3) if weighted else None
    expected = reference_norms(model, CE, x, y)
    norms = recorded_step(model, opt, GradNormRecorder(model), x, y, w, reduction=reduction)
    assert_rel(norms, expected)


def test_recorder_leaves_the_training_gradients_unchanged():
    model = make_mlp()
    twin = copy.deepcopy(model)
    x, y = make_batch(seed=23)
    w = weights_for(9, seed=4)
    recorder = GradNormRecorder(model)
    with recorder.record(w):
        (w * CE(model(x), y)).mean().backward()
    (w * CE(twin(x), y)).mean().backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_zero_weight_gives_nan_and_others_stay_exact():
    model = make_mlp()
    x, y = make_batch(seed=24)
    w = weights_for(9, seed=5)
    w[3] = 0.0
    recorder = GradNormRecorder(model)
    with recorder.record(w):
        (w * CE(model(x), y)).mean().backward()
    norms = recorder.norms()
    assert torch.isnan(norms[3])
    keep = torch.arange(9) != 3
    assert_rel(norms[keep], reference_norms(model, CE, x, y)[keep])


def test_sequence_model_through_the_recorder():
    model = SeqModel()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, opt, seq_loss, make=lambda s: make_seq_batch(s))
    x, y = make_seq_batch(31)
    w = weights_for(5, seed=6)
    expected = reference_norms(model, seq_loss, x, y, optimizer=opt)
    recorder = GradNormRecorder(model, optimizer=opt, max_elements=40)
    assert_rel(recorded_step(model, opt, recorder, x, y, w, loss_fn=seq_loss), expected)


def test_fallback_warns_once_then_preconditions():
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    recorder = GradNormRecorder(model, optimizer=opt)
    x, y = make_batch(seed=25)
    plain = reference_norms(model, CE, x, y)
    with pytest.warns(UserWarning, match="no state yet"):
        first = recorded_step(model, opt, recorder, x, y, None)
    assert_rel(first, plain)
    expected = reference_norms(model, CE, x, y, optimizer=opt)
    assert_rel(recorded_step(model, opt, recorder, x, y, None), expected)  # no second warning


def test_hooks_only_inside_the_block_and_removed_on_exceptions():
    model = make_mlp()
    recorder = GradNormRecorder(model)
    assert all_hooks(model) == [] and not recorder.recording
    x, y = make_batch()
    with recorder.record():
        assert sum(len(m._forward_hooks) for m in model.modules()) == 3 and recorder.recording
        CE(model(x), y).mean().backward()
    assert all_hooks(model) == [] and not recorder.recording
    with pytest.raises(KeyError):
        with recorder.record():
            model(x)
            raise KeyError("user error")
    assert all_hooks(model) == [] and not recorder.recording
    with pytest.raises(RuntimeError, match="no norms yet"):
        recorder.norms()  # the failed block left no stale norms


def test_attach_detach_pair():
    model = make_mlp()
    x, y = make_batch(seed=26)
    recorder = GradNormRecorder(model)
    recorder.attach()
    with pytest.raises(RuntimeError, match="already recording"):
        recorder.attach()
    CE(model(x), y).mean().backward()
    norms = recorder.detach()
    assert torch.equal(norms, recorder.norms())
    assert_rel(norms, reference_norms(model, CE, x, y))
    with pytest.raises(RuntimeError, match="not recording"):
        recorder.detach()


def test_missing_forward_or_backward_is_a_clear_error():
    model = make_mlp()
    x, y = make_batch()
    recorder = GradNormRecorder(model)
    with pytest.raises(RuntimeError, match="no norms yet"):
        recorder.norms()
    with pytest.raises(RuntimeError, match="loss.backward"):
        with recorder.record():
            model(x)
    with pytest.raises(RuntimeError, match="forward pass"):
        with recorder.record():
            with torch.no_grad():
                model(x)
    assert all_hooks(model) == []


def test_late_backward_after_the_block_is_ignored():
    model = make_mlp()
    x, y = make_batch()
    recorder = GradNormRecorder(model)
    with pytest.raises(RuntimeError, match="loss.backward"):
        with recorder.record():
            out = model(x)
    CE(out, y).mean().backward()  # after the block: the hooks do not record it
    with pytest.raises(RuntimeError, match="no norms yet"):
        recorder.norms()


def test_bad_arguments():
    model = make_mlp()
    x, y = make_batch()
    with pytest.raises(TypeError, match="'model' parameter of GradNormRecorder"):
        GradNormRecorder("model")
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        GradNormRecorder(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="not a submodule"):
        GradNormRecorder(model, layers=["nope"])
    with pytest.raises(ValueError, match="does not manage"):
        GradNormRecorder(model, optimizer=torch.optim.Adam(make_mlp(seed=2).parameters()))
    recorder = GradNormRecorder(model)
    with pytest.raises(ValueError, match="'reduction' parameter"):
        recorder.attach(reduction="max")
    with pytest.raises(TypeError, match="'weights' parameter"):
        recorder.attach(weights=[1.0] * 9)
    with pytest.raises(ValueError, match="'weights' parameter"):
        recorder.attach(weights=torch.ones(9, 1))
    with pytest.raises(ValueError, match="9 rows"):
        with recorder.record(torch.ones(4)):
            CE(model(x), y).mean().backward()
    assert all_hooks(model) == [] and not recorder.recording


def test_flat_fast_path_equals_general_path():
    gen = torch.Generator().manual_seed(12)
    h = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    d = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    a = torch.rand(3, 5, generator=gen, dtype=torch.float64)
    a_c = torch.rand(3, generator=gen, dtype=torch.float64)
    for weight in (True, False):
        for bias in (True, False):
            for scales in ((None, None), (a, a_c), (a, None), (None, a_c)):
                kwargs = dict(weight=weight, bias=bias, weight_scale=scales[0], bias_scale=scales[1])
                flat = linear_sq_grad_norms(h, d, **kwargs)
                general = linear_sq_grad_norms(h[:, None], d[:, None], **kwargs)
                assert torch.allclose(flat, general, rtol=1e-12, atol=0)


def test_benchmark_quick_run(tmp_path):
    pytest.importorskip("sklearn")
    module = runpy.run_path(str(ROOT / "benchmarks" / "bench_recorder.py"))
    report = module["main"](["--quick", "--batch-sizes", "8", "--repeats", "2", "--out", str(tmp_path)])
    ratios = report["results"][0]["ratio_of_medians"]
    assert ratios["step"] == 1.0 and all(r > 0 for r in ratios.values())
    assert (tmp_path / "bench_recorder.md").exists() and (tmp_path / "bench_recorder.json").exists()


# ----------------------------------------------------------------------------- torch.compile


def test_compiled_models_are_refused_with_what_to_do(monkeypatch):
    model = make_mlp()
    message = r"compiled with torch\.compile.*uncompiled model.*_orig_mod"
    with pytest.raises(ValueError, match="GradNormRecorder: the model is " + message):
        GradNormRecorder(torch.compile(model))  # the wrapper: nothing is compiled until called
    outer = nn.Sequential(make_mlp())
    outer[0].compile()  # in place, on a submodule
    with pytest.raises(ValueError, match=r"submodule\(s\) '0' is " + message):
        GradNormRecorder(outer)
    # The scorer: a compiled graph skips the hooks (simulated: they capture nothing), and the
    # scorer says why instead of returning zeros.
    from isample import recorder

    monkeypatch.setattr(recorder.LinearCapture, "start", lambda self: setattr(self, "calls", [[]]))
    x, y = make_batch()
    model.compile(backend="eager")  # dynamo only: no code generation in the test
    with pytest.raises(ValueError, match="LinearGradNormScorer: the model is " + message):
        LinearGradNormScorer(CE, layers=[model[0]])(model, x, y)


def test_no_forward_in_record_mentions_torch_compile():
    model = make_mlp()
    recorder = GradNormRecorder(model)
    with pytest.raises(RuntimeError, match=r"no selected layer ran a forward pass.*torch\.compile'd"):
        with recorder.record():
            pass
    model.compile()  # compiled after the recorder was built: detected when nothing was seen
    with pytest.raises(ValueError, match=r"the model is compiled with torch\.compile"):
        with recorder.record():
            pass


def test_recorder_accepts_the_bayesian_optimizers():
    """history-gradnorm's recorder works in BRMSprop / BAdam geometry (D = s^2 / lr)."""
    import isample
    from isample.optim import BAdam, BRMSprop

    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    for make in (lambda p: BRMSprop(p, lr=1e-2), lambda p: BAdam(p, lr=1e-2)):
        model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
        opt = make(model.parameters())
        loader = isample.DataLoader(
            torch.utils.data.TensorDataset(x, y),
            batch_size=16,
            scheme="history-gradnorm",
            model=model,
            loss_fn=nn.CrossEntropyLoss(reduction="none"),
            optimizer=opt,
            seed=0,
        )
        with pytest.warns(UserWarning, match="no state yet"):  # the first step has no geometry yet
            for xb, yb, w in loader:
                out = model(xb)
                losses = nn.functional.cross_entropy(out, yb, reduction="none")
                (w * losses).mean().backward()
                opt.step()
                opt.zero_grad()
                loader.update(losses.detach())
        scores = torch.as_tensor(loader.loader.sampler.scores())
        scores = scores[~torch.isnan(scores)]  # NaN marks an example not scored yet
        assert scores.numel() > 8 and bool(torch.isfinite(scores).all()) and bool((scores >= 0).all())
        assert float(scores.max()) > float(scores.min())  # the gradient-norm scores reached the table


# ----------------------------------------------------------------------------- fused / compiled norms


def _flat_inputs(dtype, seed=13):
    gen = torch.Generator().manual_seed(seed)
    hs = [torch.randn(11, n, generator=gen, dtype=dtype) for n in (5, 7, 3)]
    ds = [torch.randn(11, n, generator=gen, dtype=dtype) for n in (7, 3, 4)]
    return hs, ds


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [(True, True, True), (False, True, False), (False, False, False)])
def test_stacked_flat_norms_equal_the_per_layer_sum(dtype, bias):
    from isample._linear_norms import stacked_flat_sq_grad_norms

    hs, ds = _flat_inputs(dtype)
    expected = sum(linear_sq_grad_norms(h, d, bias=b) for h, d, b in zip(hs, ds, bias, strict=True))
    got = stacked_flat_sq_grad_norms(hs, ds, bias)
    assert got.dtype == dtype
    assert torch.allclose(got, expected, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weighted", [True, False])
def test_compiled_norms_equal_the_torch_path_with_zero_and_nan_weights(dtype, weighted):
    """The compiled loop (and its plain-Python body) give the recorder's norms: sqrt, 1/|w|, NaN at 0."""
    import numpy as np

    from isample import _linear_norms
    from isample.recorder import _unweighted_norms

    hs, ds = _flat_inputs(dtype)
    bias = (True, False, True)
    w = None
    if weighted:
        w = torch.linspace(-1.0, 2.0, 11, dtype=torch.float64)
        w[4], w[7] = 0.0, float("nan")
    sq = sum(
        linear_sq_grad_norms(h.double(), d.double(), bias=b) for h, d, b in zip(hs, ds, bias, strict=True)
    )
    expected = _unweighted_norms(sq, w, "mean", 11)
    bias_array = np.array([float(b) for b in bias])
    out = np.empty(11, dtype=np.float32)
    _linear_norms._flat_norms_loop(
        tuple(h.numpy() for h in hs),
        tuple(d.numpy() for d in ds),
        bias_array,
        np.zeros(0) if w is None else w.numpy(),
        11.0,
        out,
    )
    candidates = [torch.from_numpy(out)]
    compiled = _linear_norms.compiled_flat_grad_norms(hs, ds, bias_array, w, 11.0)
    if _linear_norms._flat_norms_kernel() is not None:
        candidates.append(compiled)
    else:
        assert compiled is None
    for got in candidates:
        assert got.dtype == torch.float32 and got.shape == (11,)
        assert torch.equal(torch.isnan(got), torch.isnan(expected))
        keep = ~torch.isnan(expected)
        assert torch.allclose(got[keep], expected[keep], rtol=1e-5, atol=0)
    if weighted:
        assert torch.isnan(candidates[0][4]) and torch.isnan(candidates[0][7])


def test_recorder_norm_paths_agree(monkeypatch):
    """The compiled path, the stacked torch path and the per-layer path give the same norms."""
    from isample import recorder

    model = make_mlp()
    x, y = make_batch(seed=27)
    w = weights_for(9, seed=8)
    expected = reference_norms(model, CE, x, y)
    rec = GradNormRecorder(model)
    results = []
    for mode in ("compiled", "stacked", "per-layer"):
        if mode == "stacked":
            monkeypatch.setattr(recorder.LinearCapture, "compiled_norms", lambda self, *a: None)
        if mode == "per-layer":
            monkeypatch.setattr(recorder.LinearCapture, "_flat_pairs", lambda self, rows: None)
        with rec.record(w):
            (w * CE(model(x), y)).mean().backward()
        model.zero_grad()
        results.append(rec.norms())
        assert_rel(results[-1], expected)
    assert torch.allclose(results[0], results[1], rtol=1e-5) and torch.allclose(
        results[1], results[2], rtol=1e-5
    )


def test_expanded_gradients_and_strided_inputs_take_a_correct_path():
    """``out.sum()`` hands the last layer a stride-0 gradient and ``x.t()`` is not contiguous:
    the compiled path declines them and the result still equals per-example autograd."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def per_example(p, xi):
        return functional_call(model, p, (xi[None],)).sum()

    recorder = GradNormRecorder(model)
    for x in (torch.randn(7, 6, dtype=torch.float64), torch.randn(6, 7, dtype=torch.float64).t()):
        grads = vmap(grad(per_example), in_dims=(None, 0))(params, x)
        expected = torch.sqrt(sum((g.reshape(7, -1) ** 2).sum(1) for g in grads.values()))
        with recorder.record(reduction="sum"):
            model(x).sum().backward()
        model.zero_grad()
        assert torch.allclose(recorder.norms().double(), expected, rtol=1e-5, atol=0)
