"""The Lightning callback: same batches as the plain loop, exact mid-epoch resume, logged statistics."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_classification, make_mlp
from torch import nn

import isample

L = pytest.importorskip("lightning.pytorch")
from isample.integrations.lightning import ImportanceSamplingCallback  # noqa: E402

LOSS = nn.CrossEntropyLoss(reduction="none")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def dataset(n: int = 96):
    x, y = make_classification(n=n)
    return torch.utils.data.TensorDataset(x, y)


def build(scheme: str, model: nn.Module, ds, optimizer=None):
    return isample.DataLoader(
        ds, batch_size=16, scheme=scheme, model=model, loss_fn=LOSS, optimizer=optimizer, epochs=4, seed=3
    )


class Module(L.LightningModule):
    def __init__(self, scheme: str, ds) -> None:
        super().__init__()
        self.net = make_mlp()
        self.scheme = scheme
        self.ds = ds
        self.seen: list[tuple[list[int], list[float]]] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, w = batch
        self.seen.append((batch.indices.tolist(), w.tolist()))
        losses = LOSS(self(x), y)
        return {"loss": (w * losses).mean(), "losses": losses.detach()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        opt = self.trainer.optimizers[0] if self.scheme == "history-gradnorm" else None
        return build(self.scheme, self, self.ds, optimizer=opt)


def trainer(tmp_path, **kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ImportanceSamplingCallback()],
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def plain_loop(scheme: str, ds, epochs: int) -> list[tuple[list[int], list[float]]]:
    """The documented drop-in loop (isample.DataLoader opens history-gradnorm's recording itself)."""
    module = Module(scheme, ds)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    loader = build(scheme, module, ds, optimizer=opt if scheme == "history-gradnorm" else None)
    seen = []
    for _ in range(epochs):
        for batch in loader:
            x, y, w = batch
            seen.append((batch.indices.tolist(), w.tolist()))
            losses = LOSS(module(x), y)
            (w * losses).mean().backward()
            opt.step()
            opt.zero_grad()
            loader.update(losses.detach())
    return seen


@pytest.mark.parametrize("scheme", ["history-is", "history-gradnorm", "kf"])
def test_callback_gives_the_plain_loops_batches(tmp_path, scheme):
    ds = dataset()
    expected = plain_loop(scheme, ds, epochs=2)
    module = Module(scheme, ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, max_epochs=2).fit(module)
    assert module.seen == expected


def test_mid_epoch_resume_is_exact(tmp_path):
    ds = dataset()  # 6 batches per epoch
    full = Module("history-is", ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path / "full", max_steps=14).fit(full)

        first = Module("history-is", ds)
        t1 = trainer(tmp_path / "a", max_steps=9)
        t1.fit(first)
        ckpt = tmp_path / "mid.ckpt"
        t1.save_checkpoint(ckpt)
        second = Module("history-is", ds)
        trainer(tmp_path / "b", max_steps=14).fit(second, ckpt_path=ckpt)
    assert len(first.seen) == 9
    assert first.seen + second.seen == full.seen


def test_statistics_are_logged(tmp_path):
    ds = dataset()
    logged: list[dict] = []

    class Recorder(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    module = Module("kf", ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, max_steps=3, callbacks=[ImportanceSamplingCallback(), Recorder()]).fit(module)
    assert {"isample/ess", "isample/max_weight"} <= set(logged[-1])
    assert 0 < logged[-1]["isample/ess"] <= 1


def test_missing_losses_is_a_clear_error(tmp_path):
    class Bad(Module):
        def training_step(self, batch, batch_idx):
            x, y, w = batch
            return (w * LOSS(self(x), y)).mean()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="per-example"):
            trainer(tmp_path, max_steps=2).fit(Bad("history-is", dataset()))


class SpawnModule(Module):
    """Writes what its rank saw and its final score table to ``out_dir``."""

    def __init__(self, scheme, ds, out_dir) -> None:
        super().__init__(scheme, ds)
        self.out_dir = str(out_dir)

    def on_train_end(self) -> None:
        loader = self.trainer.train_dataloader
        table = loader.loader.sampler.state_dict()["table"]
        torch.save({"seen": self.seen, "table": table}, f"{self.out_dir}/rank{self.global_rank}.pt")


@pytest.mark.slow
def test_two_processes_share_one_table(tmp_path):
    ds = dataset(n=128)
    module = SpawnModule("history-is", ds, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, max_steps=6, strategy="ddp_spawn", devices=2, num_nodes=1).fit(module)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 6
    assert ranks[0]["seen"] != ranks[1]["seen"]  # each rank trains on its own shard
    assert torch.equal(ranks[0]["table"], ranks[1]["table"])  # the gathered updates keep the tables identical
    fed = torch.isfinite(ranks[0]["table"]) & (ranks[0]["table"] > 0)
    assert int(fed.sum()) > 16
