"""Closed-form upper bounds: per-token cross-entropy, masks, the small-class softmax path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from isample import LossScorer, UpperBoundScorer
from isample.scorers import (
    SMALL_CLASSES,
    fast_cross_entropy,
    output_gradient_norms,
    upper_bound_closed_form,
)


def reference_bound(logits, targets, eps=0.0, ignore=-100, mask=None):
    """float64 reference: (1/T) sqrt(sum_t m_t^2 [y_t != ignore] ||softmax(z_t) - q_t||^2)."""
    z = logits.double()
    b, c = z.shape[:2]
    z = z.reshape(b, c, -1)
    positions = z.shape[2]
    probs = torch.softmax(z, dim=1)
    if targets.is_floating_point():
        t = targets.double().reshape(b, c, -1)
        t = (1 - eps) * t + eps / c
        diff = probs * t.sum(1, keepdim=True) - t
        valid = torch.ones(b, positions, dtype=torch.float64)
    else:
        y = targets.reshape(b, -1)
        valid = (y != ignore).double()
        q = torch.nn.functional.one_hot(torch.where(y == ignore, 0, y), c).double().transpose(1, 2)
        diff = probs - ((1 - eps) * q + eps / c)
    sq = diff.square().sum(1) * valid
    if mask is not None:
        sq = sq * mask.double().reshape(b, -1).square()
    return (sq.sum(1).sqrt() / positions).float()


def _data(shape, classes, seed, soft=False):
    gen = torch.Generator().manual_seed(seed)
    b, *rest = shape
    logits = 3 * torch.randn(b, classes, *rest, generator=gen)
    if soft:
        targets = torch.softmax(torch.randn(b, classes, *rest, generator=gen), dim=1)
    else:
        targets = torch.randint(0, classes, (b, *rest), generator=gen)
    return logits, targets, gen


@pytest.mark.parametrize("classes", [2, 4, 10, 15, 16, 17, 100])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_flat_bound_matches_float64_reference_on_both_softmax_paths(classes, eps):
    logits, targets, _ = _data((37,), classes, seed=classes)
    ce = nn.CrossEntropyLoss(reduction="none", label_smoothing=eps)
    got = upper_bound_closed_form(ce, logits, targets)
    torch.testing.assert_close(got, reference_bound(logits, targets, eps), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, output_gradient_norms(ce, logits, targets, "t"), rtol=1e-5, atol=1e-6)
    targets[[2, 5]] = -100  # ignored rows score 0
    got = upper_bound_closed_form(ce, logits, targets)
    assert got[2] == 0 and got[5] == 0
    torch.testing.assert_close(got, reference_bound(logits, targets, eps), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("classes", [6, 40])
@pytest.mark.parametrize("layout", ["bct", "btc_view", "two_dims"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_per_token_bound_equals_autograd_and_reference(classes, layout, eps):
    shape = (5, 3, 4) if layout == "two_dims" else (5, 7)
    logits, targets, gen = _data(shape, classes, seed=classes + len(layout))
    if layout == "btc_view":  # a (b, T, C) head output seen as (b, C, T): class dim contiguous
        logits = logits.transpose(1, 2).contiguous().transpose(1, 2)
        assert not logits.is_contiguous()
    targets.view(-1)[::4] = -100
    ce = nn.CrossEntropyLoss(reduction="none", label_smoothing=eps)
    got = upper_bound_closed_form(ce, logits, targets)
    torch.testing.assert_close(got, output_gradient_norms(ce, logits, targets, "t"), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got, reference_bound(logits, targets, eps), rtol=1e-5, atol=1e-7)
    mask = (torch.rand(shape, generator=gen) > 0.3).float() * torch.rand(shape, generator=gen)
    got = upper_bound_closed_form(ce, logits, targets, mask)
    torch.testing.assert_close(got, reference_bound(logits, targets, eps, mask=mask), rtol=1e-5, atol=1e-7)


def test_per_token_soft_targets():
    for classes, shape in ((5, (4, 6)), (30, (4, 2, 3))):
        logits, targets, _ = _data(shape, classes, seed=7, soft=True)
        ce = nn.CrossEntropyLoss(reduction="none", label_smoothing=0.1)
        got = upper_bound_closed_form(ce, logits, targets)
        torch.testing.assert_close(got, output_gradient_norms(ce, logits, targets, "t"), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got, reference_bound(logits, targets, 0.1), rtol=1e-5, atol=1e-7)


class TokenModel(nn.Module):
    """Returns per-token logits (b, C, T) as a transposed view of a (b, T, C) head output."""

    def __init__(self, vocab: int = 30, classes: int = 9) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(vocab, 6)
        self.head = nn.Linear(6, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, input_ids, attention_mask):
        return self.head(self.embed(input_ids) * attention_mask.unsqueeze(-1)).transpose(1, 2)


def test_scorer_mask_key_and_callable_match_masked_autograd():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 30, (6, 8), generator=gen)
    attention = torch.ones(6, 8)
    attention[:3, 5:] = 0
    labels = torch.randint(0, 9, (6, 8), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": attention}
    ce = nn.CrossEntropyLoss(reduction="none")
    model = TokenModel()
    closed = UpperBoundScorer(ce, mask="attention_mask")(model, inputs, labels)
    autograd = UpperBoundScorer(ce, closed_form=False, mask="attention_mask")(model, inputs, labels)
    torch.testing.assert_close(closed, autograd, rtol=1e-5, atol=1e-7)
    by_callable = UpperBoundScorer(ce, mask=lambda i, t: i["attention_mask"])(model, inputs, labels)
    torch.testing.assert_close(by_callable, closed)
    # masking equals ignoring those positions
    ignored = labels.masked_fill(attention == 0, -100)
    torch.testing.assert_close(UpperBoundScorer(ce)(model, inputs, ignored), closed, rtol=1e-6, atol=1e-7)
    unmasked = UpperBoundScorer(ce)(model, inputs, labels)
    assert torch.equal(unmasked[3:], closed[3:]) and (unmasked[:3] != closed[:3]).all()
    with pytest.raises(ValueError, match=r"The 'mask' parameter of UpperBoundScorer names the input 'pad'"):
        UpperBoundScorer(ce, mask="pad")(model, inputs, labels)
    with pytest.raises(ValueError, match=r"token mask of shape \(6, 7\)"):
        UpperBoundScorer(ce, mask=lambda i, t: attention[:, :7])(model, inputs, labels)
    with pytest.raises(ValueError, match=r"token mask of shape \(6, 7\)"):
        UpperBoundScorer(ce, closed_form=False, mask=lambda i, t: attention[:, :7])(model, inputs, labels)


def test_out_of_range_targets_raise_on_every_path():
    for shape in ((8,), (8, 3)):
        logits, targets, _ = _data(shape, 5, seed=1)
        targets.view(-1)[1] = 5
        ce = nn.CrossEntropyLoss(reduction="none")
        with pytest.raises(ValueError, match=r"Class-index targets must lie in \[0, 5\); got min \d+, max 5"):
            upper_bound_closed_form(ce, logits, targets)
        targets.view(-1)[1] = -3
        with pytest.raises(ValueError, match=r"must lie in \[0, 5\); got min -3"):
            upper_bound_closed_form(ce, logits, targets)
    logits, targets, _ = _data((4, 3), 5, seed=1)
    with pytest.raises(ValueError, match=r"expected class indices of shape \(4, 3\)"):
        upper_bound_closed_form(nn.CrossEntropyLoss(reduction="none"), logits, targets[:, :2])


def test_subclass_with_own_forward_is_not_taken_for_plain_cross_entropy():
    class Doubled(nn.CrossEntropyLoss):
        def forward(self, z, y):
            return 2 * super().forward(z, y)

    logits, targets, _ = _data((9,), 4, seed=2)
    loss = Doubled(reduction="none")
    assert upper_bound_closed_form(loss, logits, targets) is None
    assert fast_cross_entropy(loss, logits, targets) is None
    got = UpperBoundScorer(loss)(nn.Identity(), logits, targets)
    want = 2 * upper_bound_closed_form(nn.CrossEntropyLoss(reduction="none"), logits, targets)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("classes", [3, SMALL_CLASSES - 1, SMALL_CLASSES, 50])
@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_loss_scorer_small_class_path_equals_the_loss(classes, eps):
    logits, targets, _ = _data((41,), classes, seed=classes)
    ce = nn.CrossEntropyLoss(reduction="none", label_smoothing=eps)
    fast = fast_cross_entropy(ce, logits, targets)
    assert (fast is None) == (classes >= SMALL_CLASSES)
    want = ce(logits, targets)
    if fast is not None:
        torch.testing.assert_close(fast, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(LossScorer(ce)(nn.Identity(), logits, targets), want, rtol=1e-6, atol=1e-6)
    targets[0] = -100  # ignored: the fast path steps aside, the loss gives 0
    assert fast_cross_entropy(ce, logits, targets) is None
    got = LossScorer(ce)(nn.Identity(), logits, targets)
    assert got[0] == 0
    torch.testing.assert_close(got, ce(logits, targets), rtol=1e-6, atol=1e-6)
    targets[0] = classes  # invalid: the loss's own error
    with pytest.raises((IndexError, RuntimeError)):
        LossScorer(ce)(nn.Identity(), logits, targets)


@pytest.mark.parametrize("classes", [5, 40])
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_loss_scorer_per_token_fast_path_equals_the_loss(classes, eps, ignore_index):
    logits, targets, _ = _data((6, 7), classes, seed=classes)
    logits = logits.transpose(1, 2).contiguous().transpose(1, 2)  # (b, T, C) memory, seen as (b, C, T)
    targets[:, 5:] = ignore_index
    ce = nn.CrossEntropyLoss(reduction="none", label_smoothing=eps, ignore_index=ignore_index)
    want = ce(logits, targets).mean(1)
    fast = fast_cross_entropy(ce, logits, targets)
    assert fast is not None
    torch.testing.assert_close(fast, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(LossScorer(ce)(nn.Identity(), logits, targets), want, rtol=1e-6, atol=1e-6)
    assert fast_cross_entropy(ce, logits.contiguous(), targets) is None  # (b, C, T) memory: the loss's own
    targets[0, 0] = classes
    assert fast_cross_entropy(ce, logits, targets) is None
    with pytest.raises((IndexError, RuntimeError)):
        LossScorer(ce)(nn.Identity(), logits, targets)
