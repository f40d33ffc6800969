"""A Lightning callback that drives an isample loader from ``Trainer.fit``.

Use an isample loader as the training dataloader and add the callback; ``training_step``
returns the weighted loss and the per-example losses::

    import lightning as L
    from isample.integrations.lightning import ImportanceSamplingCallback

    class Module(L.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y, w = batch
            losses = loss_fn(self(x), y)                  # reduction="none"
            return {"loss": (w * losses).mean(), "losses": losses.detach()}

        def train_dataloader(self):
            return isample.DataLoader(train_set, batch_size=64, scheme="history-is",
                                      model=self, loss_fn=loss_fn)

    L.Trainer(callbacks=[ImportanceSamplingCallback()]).fit(Module())

The callback

* feeds the per-example losses (``outputs["losses"]``) back to the loader after each
  step, with the batch's own indices (``loader.feedback`` when the loader has it, else
  ``loader.update``); a model-output entry (``outputs["outputs"]``, detached) is passed on
  for schemes that score from the training outputs;
* wraps forward + backward in ``loader.step_context(batch)`` under automatic optimization
  (entered before ``training_step``, left after the backward), so schemes that record the
  training backward (``history-gradnorm``) work unchanged;
* logs ``isample/ess``, ``isample/max_weight`` and, for switched pool schemes,
  ``isample/is_on`` and ``isample/tau`` through the module's logger.

Mid-epoch resume: Lightning saves the loader's ``state_dict`` in the checkpoint (the
loader is a ``Stateful`` object) and restores it before the epoch resumes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - exercised without lightning installed
    raise ImportError(
        "isample.integrations.lightning needs Lightning: pip install 'isample[lightning]'."
    ) from error

from .._validation import check_int, param_error
from ._stats import batch_statistics

__all__ = ["ImportanceSamplingCallback"]


class ImportanceSamplingCallback(pl.Callback):
    """Feed per-example losses back to the isample training loader and log its statistics.

    Args:
        losses_key: key of the per-example losses (Tensor of shape (b,)) in the dict that
            ``training_step`` returns (default ``"losses"``).
        outputs_key: key of the detached model outputs in that dict, passed to
            ``loader.feedback`` (default ``"outputs"``; optional).
        log_every_n_steps: log the batch statistics every this many steps (0 = never).
        prefix: prefix of the logged names.

    Raises:
        RuntimeError: at the first batch, when the training dataloader is not an isample
            loader (no ``update``), or ``training_step`` did not return the per-example
            losses.
    """

    def __init__(
        self,
        losses_key: str = "losses",
        outputs_key: str = "outputs",
        log_every_n_steps: int = 1,
        prefix: str = "isample/",
    ) -> None:
        owner = "ImportanceSamplingCallback"
        for name, value in (("losses_key", losses_key), ("outputs_key", outputs_key), ("prefix", prefix)):
            if not isinstance(value, str):
                raise param_error(name, owner, "a str", value, TypeError)
        self.losses_key = losses_key
        self.outputs_key = outputs_key
        self.log_every_n_steps = check_int(log_every_n_steps, "log_every_n_steps", owner, minimum=0)
        self.prefix = prefix
        self._context: contextlib.ExitStack | None = None

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def loader(trainer: pl.Trainer) -> Any:
        """The isample loader Lightning trains on (the object ``train_dataloader`` returned)."""
        loader = trainer.train_dataloader
        if isinstance(loader, (list, tuple)) and len(loader) == 1:
            loader = loader[0]
        if isinstance(loader, Mapping) and len(loader) == 1:
            loader = next(iter(loader.values()))
        if not hasattr(loader, "update"):
            raise RuntimeError(
                "ImportanceSamplingCallback needs an isample loader as the training dataloader "
                f"(an object with update(), e.g. isample.DataLoader(...)); got {type(loader).__name__}."
            )
        return loader

    def _close(self) -> None:
        if self._context is not None:
            context, self._context = self._context, None
            context.close()

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = self.loader(trainer)
        if hasattr(loader, "auto_step_context"):  # isample.DataLoader: this callback wraps each step
            loader.auto_step_context = False

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._close()
        loader = self.loader(trainer)
        step_context = getattr(loader, "step_context", None)
        if step_context is not None and pl_module.automatic_optimization:
            stack = contextlib.ExitStack()
            stack.enter_context(step_context(batch))
            self._context = stack

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()  # the recorded backward is complete

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._close()
        if not isinstance(outputs, Mapping) or self.losses_key not in outputs:
            raise RuntimeError(
                f"ImportanceSamplingCallback: training_step must return a dict with the per-example "
                f"losses under {self.losses_key!r}, e.g. {{'loss': (w * losses).mean(), "
                f"'{self.losses_key}': losses.detach()}}. Got {type(outputs).__name__}"
                + (f" with keys {sorted(outputs)}." if isinstance(outputs, Mapping) else ".")
            )
        loader = self.loader(trainer)
        losses = torch.as_tensor(outputs[self.losses_key]).detach()
        model_outputs = outputs.get(self.outputs_key)
        if hasattr(loader, "feedback"):
            loader.feedback(batch, model_outputs, losses)
        else:
            loader.update(batch.indices, losses)
        if self.log_every_n_steps and trainer.global_step % self.log_every_n_steps == 0:
            stats = batch_statistics(batch.weights, loader)
            pl_module.log_dict(
                {self.prefix + k: v for k, v in stats.items()},
                on_step=True,
                on_epoch=False,
                batch_size=len(batch.weights),
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close()
