from __future__ import annotations

import pytest
import torch
from conftest import make_classification, make_mlp
from torch import nn

from isample import GradNormScorer, LossScorer, UpperBoundScorer, score_dataset


def autograd_output_norms(model, loss_fn, x, y):
    out = model(x).detach()
    norms = []
    for i in range(x.shape[0]):
        z = out[i : i + 1].clone().requires_grad_(True)
        loss = loss_fn(z, y[i : i + 1]).sum()
        (g,) = torch.autograd.grad(loss, z)
        norms.append(g.norm())
    return torch.stack(norms)


def autograd_param_norms(model, loss_fn, x, y):
    norms = []
    for i in range(x.shape[0]):
        model.zero_grad()
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).sum().backward()
        norms.append(torch.sqrt(sum((p.grad**2).sum() for p in model.parameters())))
    model.zero_grad()
    return torch.stack(norms)


@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(reduction="none"),
        nn.CrossEntropyLoss(reduction="none", label_smoothing=0.1),
    ],
)
def test_upper_bound_cross_entropy_matches_autograd(loss_fn):
    x, y = make_classification(20)
    model = make_mlp()
    got = UpperBoundScorer(loss_fn)(model, x, y)
    want = autograd_output_norms(model, loss_fn, x, y)
    assert got.dtype == torch.float32 and got.shape == (20,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert float(got.max()) <= 2**0.5 + 1e-6


def test_upper_bound_probability_targets_and_ignore_index():
    x, y = make_classification(12)
    model = make_mlp()
    probs = torch.softmax(torch.randn(12, 3, generator=torch.Generator().manual_seed(3)), 1)
    loss_fn = nn.CrossEntropyLoss(reduction="none", label_smoothing=0.05)
    torch.testing.assert_close(
        UpperBoundScorer(loss_fn)(model, x, probs),
        autograd_output_norms(model, loss_fn, x, probs),
        rtol=1e-5,
        atol=1e-6,
    )
    ce = nn.CrossEntropyLoss(reduction="none", ignore_index=-100)
    y2 = y.clone()
    y2[:3] = -100
    got = UpperBoundScorer(ce)(model, x, y2)
    assert torch.all(got[:3] == 0)
    torch.testing.assert_close(got[3:], autograd_output_norms(model, ce, x[3:], y[3:]), rtol=1e-5, atol=1e-6)


def test_upper_bound_mse_and_generic_loss():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 5, generator=g)
    y = torch.randn(10, 3, generator=g)
    model = make_mlp()
    mse = nn.MSELoss(reduction="none")

    def per_example_mse(out, t):
        return mse(out, t).mean(1)

    want = autograd_output_norms(model, per_example_mse, x, y)
    torch.testing.assert_close(UpperBoundScorer(mse)(model, x, y), want, rtol=1e-5, atol=1e-6)
    # closed form 2 ||z - y|| / D
    torch.testing.assert_close(want, 2 * (model(x) - y).norm(dim=1).detach() / 3, rtol=1e-5, atol=1e-6)

    def huber(out, t):  # no closed form: generic backward path
        return nn.functional.huber_loss(out, t, reduction="none", delta=0.3).sum(1)

    torch.testing.assert_close(
        UpperBoundScorer(huber)(model, x, y), autograd_output_norms(model, huber, x, y), rtol=1e-5, atol=1e-6
    )
    # forcing the generic path on CE gives the closed form's answer
    xc, yc = make_classification(10)
    ce = nn.CrossEntropyLoss(reduction="none")
    torch.testing.assert_close(
        UpperBoundScorer(ce, closed_form=False)(model, xc, yc),
        UpperBoundScorer(ce)(model, xc, yc),
        rtol=1e-5,
        atol=1e-6,
    )


def test_grad_norm_matches_autograd_loop_and_chunks():
    x, y = make_classification(11)
    model = make_mlp()
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    want = autograd_param_norms(model, loss_fn, x, y)
    for chunk in (1, 4, 32):
        torch.testing.assert_close(
            GradNormScorer(loss_fn, chunk_size=chunk)(model, x, y), want, rtol=1e-5, atol=1e-6
        )
    assert all(p.grad is None or torch.all(p.grad == 0) for p in model.parameters())


def test_loss_scorer_and_no_graph():
    x, y = make_classification(8)
    model = make_mlp()
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    s = LossScorer(loss_fn)(model, x, y)
    torch.testing.assert_close(s, loss_fn(model(x), y).detach())
    assert not s.requires_grad and s.grad_fn is None


def test_scoring_uses_eval_mode_and_restores_it():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 3))
    model.train()
    model[2].eval()  # a submodule in a different mode must be restored as it was
    x = torch.randn(32, 5, generator=g)
    y = torch.randint(0, 3, (32,), generator=g)
    running = model[1].running_mean.clone()
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    for scorer in (LossScorer(loss_fn), UpperBoundScorer(loss_fn), GradNormScorer(loss_fn)):
        a = scorer(model, x, y)
        b = scorer(model, x, y)
        torch.testing.assert_close(a, b)  # dropout off: deterministic
    torch.testing.assert_close(model[1].running_mean, running)  # BatchNorm stats untouched
    assert model.training and model[0].training and not model[2].training


def test_reduced_loss_is_rejected_early():
    with pytest.raises(ValueError, match="reduction='none'"):
        UpperBoundScorer(nn.CrossEntropyLoss())
    x, y = make_classification(4)

    def mean_loss(out, t):
        return nn.functional.cross_entropy(out, t)

    with pytest.raises(ValueError, match="scalar"):
        LossScorer(mean_loss)(make_mlp(), x, y)
    with pytest.raises(TypeError, match="loss_fn"):
        LossScorer("not a function")


def test_target_shape_mismatch_is_named():
    model = make_mlp()
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="MSELoss targets of shape"):
        UpperBoundScorer(nn.MSELoss(reduction="none"))(model, x, torch.randn(4, 1))
    with pytest.raises(ValueError, match="CrossEntropyLoss targets"):
        UpperBoundScorer(nn.CrossEntropyLoss(reduction="none"))(model, x, torch.randn(4, 7))


def test_fused_softmax_warns():
    model = nn.Sequential(nn.Linear(5, 3), nn.Softmax(dim=1))
    x, y = make_classification(4)
    with pytest.warns(UserWarning, match="ends with Softmax"):
        UpperBoundScorer(nn.CrossEntropyLoss(reduction="none"))(model, x, y)


def test_score_dataset(classification, mlp):
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    scores = score_dataset(mlp, classification, UpperBoundScorer(loss_fn), batch_size=10)
    x, y = classification.tensors
    torch.testing.assert_close(scores, UpperBoundScorer(loss_fn)(mlp, x, y))
    assert scores.device.type == "cpu" and scores.shape == (64,)
    with pytest.raises(ValueError, match="empty"):
        score_dataset(
            mlp, torch.utils.data.TensorDataset(torch.empty(0, 5), torch.empty(0)), LossScorer(loss_fn)
        )
    with pytest.raises(ValueError, match="batch_size"):
        score_dataset(mlp, classification, LossScorer(loss_fn), batch_size=0)
