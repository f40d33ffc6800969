"""One model-calling convention for every scorer: dict inputs, tuple/dict/.logits outputs, hooks."""

from __future__ import annotations

import pathlib
import re
import warnings
from dataclasses import dataclass

import pytest
import torch
from conftest import make_classification, make_mlp
from torch import nn

from isample import GradNormScorer, LinearGradNormScorer, LossScorer, PoolLoader, UpperBoundScorer
from isample.metrics import per_example_gradients
from isample.scorers import ModelCall

ROOT = pathlib.Path(__file__).resolve().parents[1]
CE = nn.CrossEntropyLoss(reduction="none")


def _ce_lambda(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy that no closed form recognises (forces the autograd fallback)."""
    return nn.functional.cross_entropy(z, y, reduction="none")


@dataclass
class Output:
    hidden: torch.Tensor
    logits: torch.Tensor


class PlainModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DictInDataclassOut(PlainModel):
    """Hugging Face style: keyword inputs, an output object with ``.logits``."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> Output:  # type: ignore[override]
        x = a + b
        return Output(hidden=x * 2, logits=self.net(x))


class TupleOut(PlainModel):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return self.net(x), x.sum(1)


class DictOut(PlainModel):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {"hidden": x, "logits": self.net(x)}


def batch(n: int = 9):
    x, y = make_classification(n, d=5, classes=3, seed=4)
    noise = torch.randn(n, 5, generator=torch.Generator().manual_seed(1))
    return x, y, {"a": x - noise, "b": noise}


SCORERS = {
    "loss": lambda: LossScorer(CE),
    "upper_bound": lambda: UpperBoundScorer(CE),
    "upper_bound_autograd": lambda: UpperBoundScorer(CE, closed_form=False),
    "upper_bound_custom_loss": lambda: UpperBoundScorer(_ce_lambda),
    "grad_norm": lambda: GradNormScorer(CE, chunk_size=4),
    "linear_grad_norm": lambda: LinearGradNormScorer(CE),
}


@pytest.mark.parametrize("kind", ["dataclass", "tuple", "dict"])
@pytest.mark.parametrize("scorer_name", list(SCORERS))
def test_every_scorer_reads_tuple_dict_and_object_outputs(kind, scorer_name):
    x, y, inputs = batch()
    plain = PlainModel()
    model = {"dataclass": DictInDataclassOut, "tuple": TupleOut, "dict": DictOut}[kind]()
    model_inputs = inputs if kind == "dataclass" else x
    want = SCORERS[scorer_name]()(plain, x, y)
    got = SCORERS[scorer_name]()(model, model_inputs, y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got.shape == (9,) and got.dtype == torch.float32 and not got.requires_grad


def test_logits_hook_key_index_attribute_and_callable():
    x, y, inputs = batch()
    want = UpperBoundScorer(CE)(PlainModel(), x, y)

    class Swapped(PlainModel):
        def forward(self, x):  # logits second, under another name
            return (x, self.net(x))

    class Named(PlainModel):
        def forward(self, x):
            return {"scores": self.net(x), "logits": x[:, :3] * 0}

    cases = [
        (Swapped(), {"logits": 1}),
        (Swapped(), {"logits": lambda out: out[1]}),
        (Named(), {"logits": "scores"}),
        (DictInDataclassOut(), {"logits": "logits"}),
    ]
    for model, hook in cases:
        data = inputs if isinstance(model, DictInDataclassOut) else x
        for make in (UpperBoundScorer, LossScorer, GradNormScorer):
            got = make(CE, **hook)(model, data, y)
            ref = make(CE)(PlainModel(), x, y)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(UpperBoundScorer(CE, logits="scores")(Named(), x, y), want)


def test_forward_hook_runs_models_with_other_signatures():
    x, y, _ = batch()

    class TwoArgs(PlainModel):
        def forward(self, x, scale):
            return self.net(x * scale)

    def forward(model, inputs):
        return model(inputs, scale=1.0)

    for make in (UpperBoundScorer, LossScorer, GradNormScorer, LinearGradNormScorer):
        got = make(CE, forward=forward)(TwoArgs(), x, y)
        torch.testing.assert_close(got, make(CE)(PlainModel(), x, y), rtol=1e-5, atol=1e-6)
    # a model that takes the dict as one argument
    _, _, inputs = batch()

    class OneDict(PlainModel):
        def forward(self, batch):
            return self.net(batch["a"] + batch["b"])

    with pytest.raises(
        TypeError, match=r"model\(\*\*inputs\).*forward=lambda model, inputs: model\(inputs\)"
    ):
        UpperBoundScorer(CE)(OneDict(), inputs, y)
    got = UpperBoundScorer(CE, forward=lambda m, b: m(b))(OneDict(), inputs, y)
    torch.testing.assert_close(got, UpperBoundScorer(CE)(PlainModel(), x, y), rtol=1e-5, atol=1e-6)


def test_unreadable_outputs_name_the_hooks():
    x, y, _ = batch()

    class Opaque(PlainModel):
        def forward(self, x):
            return {"hidden": self.net(x)}

    class Text(PlainModel):
        def forward(self, x):
            return "not a tensor"

    for model in (Opaque(), Text()):
        for make in (UpperBoundScorer, LossScorer, GradNormScorer):
            with pytest.raises(
                TypeError, match=rf"{make.__name__} cannot read the logits.*logits=.*forward="
            ):
                make(CE)(model, x, y)
    with pytest.raises(TypeError, match=r"The 'logits' hook of UpperBoundScorer \('scores'\)"):
        UpperBoundScorer(CE, logits="scores")(Opaque(), x, y)
    with pytest.raises(TypeError, match=r"The 'logits' hook of LossScorer \(5\)"):
        LossScorer(CE, logits=5)(TupleOut(), x, y)
    # the upper bound needs one tensor of logits, whatever the loss accepts
    with pytest.raises(TypeError, match=r"UpperBoundScorer differentiates.*must be one tensor.*logits="):
        UpperBoundScorer(lambda out, t: CE(out[0], t), logits=lambda out: out)(TupleOut(), x, y)
    # LossScorer hands the raw outputs to a loss that wants them
    losses = LossScorer(lambda out, t: CE(out[0], t) + 0 * out[1], logits=lambda out: out)(TupleOut(), x, y)
    torch.testing.assert_close(losses, LossScorer(CE)(PlainModel(), x, y))


def test_hook_arguments_are_validated():
    for bad in (3.5, True, ["logits"]):
        with pytest.raises(
            TypeError, match=r"The 'logits' parameter of UpperBoundScorer must be None, a key"
        ):
            UpperBoundScorer(CE, logits=bad)
    with pytest.raises(TypeError, match=r"The 'forward' parameter of LossScorer must be None or a callable"):
        LossScorer(CE, forward="model")
    with pytest.raises(TypeError, match=r"The 'mask' parameter of UpperBoundScorer"):
        UpperBoundScorer(CE, mask=3)
    assert "logits='x'" in repr(UpperBoundScorer(CE, logits="x"))


def test_model_call_object():
    x, _, inputs = batch()
    plain = PlainModel()
    call = ModelCall()
    torch.testing.assert_close(call(DictInDataclassOut(), inputs), plain(x))
    assert isinstance(call.run(DictInDataclassOut(), inputs), Output)
    assert ModelCall().is_default and not ModelCall(logits=0).is_default


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.x, self.y, self.inputs = batch(n)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"a": self.inputs["a"][i], "b": self.inputs["b"][i], "labels": self.y[i]}


def test_pool_loader_with_dict_inputs_and_an_output_object():
    data = DictDataset(24)
    model = DictInDataclassOut()
    loader = PoolLoader(data, model, UpperBoundScorer(CE), batch_size=4, presample=2.0, always=True, seed=0)
    seen = 0
    for b in loader:
        assert set(b.inputs) == {"a", "b"} and b.targets.shape == (4,)
        out = model(**b.inputs)
        (b.weights * CE(out.logits, b.targets)).mean().backward()
        seen += len(b)
    assert seen == 24
    # a model the scorer cannot read fails at construction, with the hook named
    with pytest.raises(TypeError, match="logits="):

        class Opaque(DictInDataclassOut):
            def forward(self, a, b):
                return {"hidden": a + b}

        PoolLoader(data, Opaque(), UpperBoundScorer(CE), batch_size=4, presample=2.0, seed=0)


def test_per_example_gradients_with_dict_inputs_and_hooks():
    x, y, inputs = batch(6)
    want = per_example_gradients(PlainModel(), CE, x, y, chunk_size=4)
    got = per_example_gradients(DictInDataclassOut(), CE, inputs, y, chunk_size=4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got = per_example_gradients(TupleOut(), CE, x, y, chunk_size=5, params=["net.2.weight"])
    named = [k for k, _ in PlainModel().named_parameters()]
    start = sum(p.numel() for k, p in PlainModel().named_parameters() if named.index(k) < 2)
    torch.testing.assert_close(got, want[:, start : start + 24], rtol=1e-5, atol=1e-6)
    got = per_example_gradients(TupleOut(), CE, x, y, logits=lambda out: out[0], forward=lambda m, v: m(v))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class Encoder(nn.Module):
    def __init__(self, nested: bool) -> None:
        super().__init__()
        with torch.random.fork_rng():  # seeded initialisation, global RNG state left as it was
            torch.manual_seed(0)
            self.embed = nn.Embedding(20, 8)
            layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns about norm_first / nested tensors
                self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=nested)
            self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embed(tokens), src_key_padding_mask=tokens == 0)
        return self.head(hidden.mean(1))


def test_transformer_encoder_nested_tensor_error_has_the_hint():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 20, (4, 6), generator=gen)
    tokens[:, 4:] = 0  # padding: the encoder's fast path builds a nested tensor in eval mode
    y = torch.randint(0, 3, (4,), generator=gen)
    for run in (
        lambda m: GradNormScorer(CE)(m, tokens, y),
        lambda m: per_example_gradients(m, CE, tokens, y),
    ):
        with pytest.raises(RuntimeError, match=r"enable_nested_tensor=False"):
            run(Encoder(nested=True))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*performance drop.*", category=UserWarning)
            out = run(Encoder(nested=False))
        assert out.shape[0] == 4 and torch.isfinite(out).all()


def test_docs_model_io_snippet_runs():
    text = (ROOT / "docs" / "concepts.md").read_text()
    section = text.split("## Models, inputs and outputs", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the section's example is missing"
    for block in blocks:
        exec(compile(block, "docs/concepts.md", "exec"), {"__name__": "docs_concepts"})
