"""LinearGradNormScorer against per-example autograd (torch.func) in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from isample._linear_norms import (
    concat_calls,
    linear_bias_sq_norms,
    linear_sq_grad_norms,
    linear_weight_sq_norms,
    weight_norm_method,
)
from isample.linear_scorer import LinearGradNormScorer
from isample.scorers import GradNormScorer

RTOL = 1e-5
CE = nn.CrossEntropyLoss(reduction="none")


# --------------------------------------------------------------------------- references


def per_example_grads(model, loss_fn, x, y):
    """Independent reference: vmap(grad) of one example's loss over functional_call."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def one(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0)).sum()

    return vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)


def reference_diag(optimizer, p):
    """D = 1 / (sqrt(v_hat) + eps), recomputed from the optimizer state in float64."""
    group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
    state = optimizer.state[p]
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        _, beta2 = group["betas"]
        step = float(state["step"])
        v_hat = state["exp_avg_sq"].double() / (1.0 - beta2**step)
        return 1.0 / (v_hat.sqrt() + group["eps"])
    if isinstance(optimizer, torch.optim.RMSprop):
        return 1.0 / (state["square_avg"].double().sqrt() + group["eps"])
    raise AssertionError(type(optimizer))


def reference_norms(model, loss_fn, x, y, optimizer=None, names=None):
    grads = per_example_grads(model, loss_fn, x, y)
    named = dict(model.named_parameters())
    total = 0.0
    for name, g in grads.items():
        if names is not None and name.rsplit(".", 1)[0] not in names:
            continue
        g = g.double()
        if optimizer is not None:
            g = g * reference_diag(optimizer, named[name])
        total = total + g.flatten(1).square().sum(1)
    return total.sqrt()


def assert_rel(actual, expected, rtol=RTOL):
    actual = actual.double()
    assert actual.shape == expected.shape
    err = (actual - expected).abs() / expected.abs().clamp_min(1e-300)
    assert float(err.max()) <= rtol, float(err.max())


def make_mlp(seed=0, dtype=torch.float64, inplace=True):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(6, 12), nn.ReLU(inplace=inplace), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4)
    ).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.5)
    return model


def make_batch(seed=1, b=9, dtype=torch.float64, d_in=6, classes=4):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, d_in, generator=gen, dtype=dtype), torch.randint(0, classes, (b,), generator=gen)


def train_steps(model, optimizer, loss_fn, steps=3, seed=5, make=make_batch):
    for k in range(steps):
        x, y = make(seed + k)
        optimizer.zero_grad()
        loss_fn(model(x), y).mean().backward()
        optimizer.step()
    optimizer.zero_grad()


# --------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("shape", [(5, 1, 3, 4), (4, 6, 3, 2), (3, 2, 7, 5), (2, 9, 1, 1)])
def test_weight_and_bias_terms_match_einsum_for_every_method(shape):
    b, t, n_in, n_out = shape
    gen = torch.Generator().manual_seed(sum(shape))
    h = torch.randn(b, t, n_in, generator=gen, dtype=torch.float64)
    d = torch.randn(b, t, n_out, generator=gen, dtype=torch.float64)
    a = torch.rand(n_out, n_in, generator=gen, dtype=torch.float64)
    a_c = torch.rand(n_out, generator=gen, dtype=torch.float64)
    grads = torch.einsum("bto,bti->boi", d, h)
    plain = grads.square().sum((1, 2))
    pre = (grads.square() * a).sum((1, 2))
    methods = ["gram", "materialise"] + (["outer"] if t == 1 else [])
    for method in methods:
        assert_rel(linear_weight_sq_norms(h, d, method=method, max_elements=7), plain, 1e-12)
    for method in ["materialise"] + (["outer"] if t == 1 else []):
        assert_rel(linear_weight_sq_norms(h, d, a, method=method, max_elements=7), pre, 1e-12)
    bias = d.sum(1)
    assert_rel(linear_bias_sq_norms(d), bias.square().sum(1), 1e-12)
    assert_rel(linear_bias_sq_norms(d, a_c), (bias.square() * a_c).sum(1), 1e-12)
    both = linear_sq_grad_norms(h, d, weight_scale=a, bias_scale=a_c)
    assert_rel(both, pre + (bias.square() * a_c).sum(1), 1e-12)


def test_method_choice_follows_cost():
    assert weight_norm_method(1, 100, 100, False) == "outer"
    assert weight_norm_method(1, 100, 100, True) == "outer"
    assert weight_norm_method(10, 100, 100, False) == "gram"  # 10 * 200 <= 10_000
    assert weight_norm_method(200, 100, 100, False) == "materialise"  # 200 * 200 > 10_000
    assert weight_norm_method(10, 100, 100, True) == "materialise"


def test_concat_calls_equals_sum_of_outer_products():
    gen = torch.Generator().manual_seed(3)
    pairs = [
        (
            torch.randn(4, 3, generator=gen, dtype=torch.float64),
            torch.randn(4, 2, generator=gen, dtype=torch.float64),
        ),
        (
            torch.randn(4, 5, 3, generator=gen, dtype=torch.float64),
            torch.randn(4, 5, 2, generator=gen, dtype=torch.float64),
        ),
    ]
    h, d = concat_calls(pairs)
    assert h.shape == (4, 6, 3) and d.shape == (4, 6, 2)
    grads = torch.einsum("bo,bi->boi", pairs[0][1], pairs[0][0]) + torch.einsum(
        "bto,bti->boi", pairs[1][1], pairs[1][0]
    )
    assert_rel(linear_weight_sq_norms(h, d), grads.square().sum((1, 2)), 1e-12)


def test_pure_functions_reject_bad_shapes():
    with pytest.raises(ValueError, match="batch dimension"):
        linear_weight_sq_norms(torch.randn(3), torch.randn(3))
    with pytest.raises(ValueError, match="leading"):
        linear_weight_sq_norms(torch.randn(3, 2, 4), torch.randn(3, 5, 4))
    with pytest.raises(ValueError, match="gram"):
        linear_weight_sq_norms(torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.ones(4, 4), method="gram")
    with pytest.raises(ValueError, match="outer"):
        linear_weight_sq_norms(torch.randn(3, 2, 4), torch.randn(3, 2, 4), method="outer")


# --------------------------------------------------------------------------- the scorer


def test_mlp_equals_full_per_example_gradient_norm():
    model = make_mlp()
    x, y = make_batch()
    scores = LinearGradNormScorer(CE)(model, x, y)
    assert scores.dtype == torch.float32 and scores.shape == (9,) and not scores.requires_grad
    assert_rel(scores, reference_norms(model, CE, x, y))


def test_float32_model_agrees_with_grad_norm_scorer():
    model = make_mlp(dtype=torch.float32)
    x, y = make_batch(dtype=torch.float32)
    fast = LinearGradNormScorer(CE)(model, x, y)
    slow = GradNormScorer(CE)(model, x, y)
    assert torch.allclose(fast, slow, rtol=1e-4, atol=0)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.Adam(p, lr=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
        lambda p: torch.optim.RMSprop(p, lr=1e-3, alpha=0.9, eps=1e-7),
    ],
    ids=["Adam", "AdamW", "RMSprop"],
)
def test_preconditioned_norm_equals_brute_force(make_opt):
    model = make_mlp()
    opt = make_opt(model.parameters())
    train_steps(model, opt, CE)
    x, y = make_batch(seed=11)
    scores = LinearGradNormScorer(CE, optimizer=opt)(model, x, y)
    expected = reference_norms(model, CE, x, y, optimizer=opt)
    assert_rel(scores, expected)
    # the geometry matters: the preconditioned norm is not a multiple of the plain one
    plain = reference_norms(model, CE, x, y)
    ratio = expected / plain
    assert float(ratio.max() / ratio.min()) > 1.01


def test_sgd_is_the_identity_geometry():
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_steps(model, opt, CE)
    x, y = make_batch(seed=11)
    assert_rel(LinearGradNormScorer(CE, optimizer=opt)(model, x, y), reference_norms(model, CE, x, y))


@pytest.mark.parametrize("by_name", [True, False])
def test_subset_of_layers(by_name):
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_steps(model, opt, CE)
    x, y = make_batch(seed=2)
    layers = ["0", "4"] if by_name else [model[0], model[4]]
    plain = LinearGradNormScorer(CE, layers=layers)(model, x, y)
    assert_rel(plain, reference_norms(model, CE, x, y, names={"0", "4"}))
    pre = LinearGradNormScorer(CE, layers=layers, optimizer=opt)(model, x, y)
    assert_rel(pre, reference_norms(model, CE, x, y, optimizer=opt, names={"0", "4"}))
    single = LinearGradNormScorer(CE, layers="2")(model, x, y)
    assert_rel(single, reference_norms(model, CE, x, y, names={"2"}))


def test_frozen_parameters_are_excluded():
    model = make_mlp()
    model[0].weight.requires_grad_(False)
    model[4].bias.requires_grad_(False)
    x, y = make_batch(seed=4)
    assert_rel(LinearGradNormScorer(CE)(model, x, y), reference_norms(model, CE, x, y))


class SeqModel(nn.Module):
    """Token-wise MLP on (b, ..., in): layer 1 takes the Gram route, layer 2 materialises."""

    def __init__(self, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.l1 = nn.Linear(16, 12)
        self.l2 = nn.Linear(12, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
        self.double()

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def seq_loss(out, y):
    return (out - y).square().flatten(1).mean(1)


def make_seq_batch(seed, b=5, middle=(6,)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *middle, 16, generator=gen, dtype=torch.float64)
    y = torch.randn(b, *middle, 2, generator=gen, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize("middle", [(6,), (2, 3)])
def test_sequence_inputs_plain_and_preconditioned(middle):
    assert weight_norm_method(6, 16, 12, False) == "gram"
    assert weight_norm_method(6, 12, 2, False) == "materialise"
    model = SeqModel()
    x, y = make_seq_batch(3, middle=middle)
    assert_rel(LinearGradNormScorer(seq_loss)(model, x, y), reference_norms(model, seq_loss, x, y))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_steps(model, opt, seq_loss, make=lambda s: make_seq_batch(s, middle=middle))
    scorer = LinearGradNormScorer(seq_loss, optimizer=opt, max_elements=50)  # several chunks
    assert_rel(scorer(model, x, y), reference_norms(model, seq_loss, x, y, optimizer=opt))


class Reuse(nn.Module):
    """One square layer applied twice, plus a head."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.shared = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.6)
        self.double()

    def forward(self, x):
        return self.head(torch.relu(self.shared(torch.relu(self.shared(x)))))


def test_layer_called_twice_counts_both_uses():
    model = Reuse()
    x, y = make_batch(seed=8, d_in=5, classes=3)
    assert_rel(LinearGradNormScorer(CE)(model, x, y), reference_norms(model, CE, x, y))
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    train_steps(model, opt, CE, make=lambda s: make_batch(s, d_in=5, classes=3))
    got = LinearGradNormScorer(CE, optimizer=opt)(model, x, y)
    assert_rel(got, reference_norms(model, CE, x, y, optimizer=opt))


def all_hooks(model):
    out = []
    for m in model.modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_forward_hooks_with_kwargs",
        ):
            out.extend(getattr(m, attr, {}).values())
    return out


def test_grads_and_training_mode_untouched_and_hooks_removed():
    model = make_mlp(inplace=False)
    model.train()
    model[1].eval()  # mixed modes survive
    gen = torch.Generator().manual_seed(9)
    before = {}
    for k, (name, p) in enumerate(model.named_parameters()):
        if k % 2 == 0:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            before[name] = p.grad.clone()
    x, y = make_batch()
    LinearGradNormScorer(CE)(model, x, y)
    for name, p in model.named_parameters():
        if name in before:
            assert torch.equal(p.grad, before[name])
        else:
            assert p.grad is None
    assert model.training and model[0].training and not model[1].training
    assert all_hooks(model) == []


def test_hooks_removed_when_the_loss_raises():
    model = make_mlp()

    def bad_loss(out, y):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        LinearGradNormScorer(bad_loss)(model, *make_batch())
    assert all_hooks(model) == []


def test_fallback_warns_once_before_the_first_step():
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    scorer = LinearGradNormScorer(CE, optimizer=opt)
    x, y = make_batch()
    with pytest.warns(UserWarning, match="no state yet"):
        first = scorer(model, x, y)
    assert_rel(first, reference_norms(model, CE, x, y))
    second = scorer(model, x, y)  # no second warning (warnings are errors here)
    assert torch.equal(first, second)
    train_steps(model, opt, CE, steps=1)
    assert_rel(scorer(model, x, y), reference_norms(model, CE, x, y, optimizer=opt))


def test_uncalled_layer_warns_once_and_counts_zero():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = make_mlp()
            self.spare = nn.Linear(4, 4).double()

        def forward(self, x):
            return self.body(x)

    model = WithSpare()
    scorer = LinearGradNormScorer(CE)
    x, y = make_batch()
    with pytest.warns(UserWarning, match="'spare'"):
        got = scorer(model, x, y)
    assert_rel(got, reference_norms(model.body, CE, x, y))
    scorer(model, x, y)


def test_model_without_linear_layer_is_a_clear_error():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten())
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        LinearGradNormScorer(CE)(model, torch.randn(4, 1, 5), torch.zeros(4, dtype=torch.long))


def test_bad_layers_and_optimizer_arguments():
    model = make_mlp()
    x, y = make_batch()
    with pytest.raises(ValueError, match="not a submodule"):
        LinearGradNormScorer(CE, layers=["9"])(model, x, y)
    with pytest.raises(ValueError, match="not a submodule"):
        LinearGradNormScorer(CE, layers=[nn.Linear(6, 12)])(model, x, y)
    with pytest.raises(TypeError, match="nn.Linear"):
        LinearGradNormScorer(CE, layers=["1"])(model, x, y)
    with pytest.raises(TypeError, match="'layers' parameter of LinearGradNormScorer"):
        LinearGradNormScorer(CE, layers=model)
    with pytest.raises(TypeError, match="'layers' parameter"):
        LinearGradNormScorer(CE, layers=[3])
    with pytest.raises(ValueError, match="'layers' parameter"):
        LinearGradNormScorer(CE, layers=[])
    with pytest.raises(TypeError, match="'optimizer' parameter of LinearGradNormScorer"):
        LinearGradNormScorer(CE, optimizer=torch.optim.Adadelta(model.parameters()))
    with pytest.raises(TypeError, match="'optimizer' parameter"):
        LinearGradNormScorer(CE, optimizer="adam")
    with pytest.raises(TypeError, match="max_elements"):
        LinearGradNormScorer(CE, max_elements=True)
    other = torch.optim.Adam(make_mlp(seed=3).parameters())
    with pytest.raises(ValueError, match="does not manage"):
        LinearGradNormScorer(CE, optimizer=other)(model, x, y)


def test_tied_layers_are_rejected():
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).double()
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="share a parameter"):
        LinearGradNormScorer(CE)(
            tied, torch.randn(3, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.long)
        )
