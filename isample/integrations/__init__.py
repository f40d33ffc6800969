"""Integrations with training frameworks. They sit on top of the core, never inside it.

* :mod:`isample.integrations.lightning`: a Lightning callback that feeds per-example losses
  back to an isample loader and logs what the sampler does (``pip install 'isample[lightning]'``).
* :mod:`isample.integrations.huggingface`: a ``transformers.Trainer`` subclass that trains on
  importance-weighted batches and keeps accelerate's data preparation
  (``pip install 'isample[huggingface]'``).

Each module imports its framework on import; importing :mod:`isample` never does.
"""

from __future__ import annotations

__all__: list[str] = []
