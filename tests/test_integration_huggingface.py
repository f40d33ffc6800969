"""The Hugging Face Trainer integration trains a tiny BERT built from a config on dict batches."""

from __future__ import annotations

import warnings

import pytest
import torch

import isample

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from isample.integrations.huggingface import (  # noqa: E402
    INDICES_KEY,
    WEIGHTS_KEY,
    ImportanceTrainer,
    per_example_cross_entropy,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"
)


class Tokens(torch.utils.data.Dataset):
    """Random sequences whose label is given by their first token (1 or 2): learnable by a tiny BERT."""

    def __init__(self, n: int = 128, length: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 20, (n, length), generator=g)
        self.labels = (torch.rand(n, generator=g) < 0.5).long()
        self.ids[:, 0] = 1 + self.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


def tiny_bert():
    config = transformers.BertConfig(
        vocab_size=24,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    torch.manual_seed(0)  # the model's own initialisation (transformers uses the global RNG)
    return transformers.BertForSequenceClassification(config)


def make_trainer(tmp_path, model, ds, **kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        learning_rate=1e-2,
        max_steps=80,
        lr_scheduler_type="constant",
        logging_steps=10,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return ImportanceTrainer(model=model, args=args, train_dataset=ds, **kwargs)


def test_trains_a_tiny_bert_with_a_falling_loss(tmp_path):
    ds = Tokens()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # a fixed mixing level, so that the draws are non-uniform as soon as scores arrive
        # (the default, mixing="auto", stays uniform until the table is shown to beat it)
        sampler = isample.TableSampler(len(ds), 16, seed=0, mixing=0.1)
        trainer = make_trainer(tmp_path, tiny_bert(), ds, sampler=sampler)
        loader = trainer.get_train_dataloader()
        batch = next(iter(loader))
        trainer.train()
    assert {WEIGHTS_KEY, INDICES_KEY, "input_ids", "labels"} <= set(batch)
    assert type(loader).__module__.startswith("accelerate")  # accelerate's preparation is kept
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) >= 5
    assert losses[-1] < 0.6 * losses[0], losses
    sampler = trainer.isample_sampler
    assert int(torch.isfinite(sampler.scores()).sum()) > len(ds) // 2  # the table was fed
    assert not torch.allclose(
        sampler.probabilities(), torch.full((len(ds),), 1 / len(ds), dtype=torch.float64)
    )


def test_weighted_loss_is_the_weighted_mean_of_per_example_losses(tmp_path):
    ds = Tokens(n=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer(tmp_path, tiny_bert(), ds)
        batch = next(iter(trainer.get_train_dataloader()))
        model = trainer.model.eval()
        loss = trainer.compute_loss(model, dict(batch))
    inputs = {k: v for k, v in batch.items() if k not in (WEIGHTS_KEY, INDICES_KEY, "labels")}
    expected = (
        batch[WEIGHTS_KEY] * per_example_cross_entropy(model(**inputs).logits, batch["labels"])
    ).mean()
    torch.testing.assert_close(loss, expected)


def test_per_example_cross_entropy_tokens_ignore_index():
    logits = torch.randn(3, 4, 5)
    labels = torch.tensor([[1, 2, -100, -100], [0, 0, 0, 0], [-100, -100, -100, -100]])
    out = per_example_cross_entropy(logits, labels)
    full = torch.nn.functional.cross_entropy(logits[0, :2], labels[0, :2])
    torch.testing.assert_close(out[0], full)
    assert out[2] == 0
    with pytest.raises(ValueError, match="loss_fn"):
        per_example_cross_entropy(torch.randn(3, 5), torch.zeros(3, 2, dtype=torch.long))


def test_bad_sampler_argument(tmp_path):
    with pytest.raises(TypeError, match="'sampler' parameter of ImportanceTrainer"):
        make_trainer(tmp_path, tiny_bert(), Tokens(n=16), sampler="history-is")
