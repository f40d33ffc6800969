"""Benchmark models, initialised from a seed without touching the global RNG.

* ``mlp`` (default): ``d -> 128 -> 128 -> C`` with ReLU (64-128-128-10 on digits).
* ``linear``: multinomial logistic regression ``d -> C``.
* ``cnn``: for square single-channel images given as flat vectors (8x8 digits):
  ``conv3x3(16) -> ReLU -> maxpool2 -> conv3x3(32) -> ReLU -> maxpool2 -> linear``.
* ``cnn1d``: for 1-D signals given as flat vectors (MNIST-1D, 40 points): ``conv1d(32, k5,
  s1) -> ReLU -> conv1d(64, k5, s2) -> ReLU -> conv1d(64, k3, s2) -> ReLU -> linear``
  (the MNIST-1D paper's CNN shape; 40 points give 64 x 7 features before the linear layer).

Parameters are created on the ``meta`` device and then filled on the target device from a
``torch.Generator``: every weight and bias is ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
(PyTorch's default scale for Linear and Conv layers), so model ``k`` of seed ``s`` is the
same in every scheme's run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["MODELS", "available_models", "build_model", "init_parameters"]


def init_parameters(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Fill every parameter with ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` drawn from ``generator``.

    ``fan_in`` is the number of inputs of the layer owning the parameter (for a bias, the
    fan-in of its weight). Returns the model (modified in place).
    """
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            continue
        bound = 1.0 / math.sqrt(weight[0].numel())
        with torch.no_grad():
            for p in module.parameters(recurse=False):
                values = (torch.rand(p.shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
                p.copy_(values.to(p.device, p.dtype))
    return model


def _mlp(in_features: int, num_classes: int, image_shape: tuple[int, int, int] | None) -> nn.Module:
    hidden = 128
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden, device="meta"),
        nn.ReLU(),
        nn.Linear(hidden, hidden, device="meta"),
        nn.ReLU(),
        nn.Linear(hidden, num_classes, device="meta"),
    )


def _linear(in_features: int, num_classes: int, image_shape: tuple[int, int, int] | None) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes, device="meta"))


def _cnn(in_features: int, num_classes: int, image_shape: tuple[int, int, int] | None) -> nn.Module:
    if image_shape is None:
        side = math.isqrt(in_features)
        if side * side != in_features:
            raise ValueError(
                f"The 'cnn' model needs square single-channel images; {in_features} features are not "
                "a square. Use --model mlp or linear."
            )
        image_shape = (1, side, side)
    c, h, w = image_shape
    if c * h * w != in_features:
        raise ValueError(f"The 'cnn' model: image shape {image_shape} does not match {in_features} features.")
    flat = 32 * (h // 4) * (w // 4)
    if flat == 0:
        raise ValueError(f"The 'cnn' model needs images of at least 4x4 pixels. Got {h}x{w}.")
    return nn.Sequential(
        nn.Unflatten(1, image_shape),
        nn.Conv2d(c, 16, 3, padding=1, device="meta"),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, device="meta"),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, num_classes, device="meta"),
    )


def _cnn1d(in_features: int, num_classes: int, image_shape: tuple[int, int, int] | None) -> nn.Module:
    length = in_features
    for kernel, stride in ((5, 1), (5, 2), (3, 2)):
        length = (length - kernel) // stride + 1
    if length < 1:
        raise ValueError(f"The 'cnn1d' model needs signals of at least 17 points. Got {in_features}.")
    return nn.Sequential(
        nn.Unflatten(1, (1, in_features)),
        nn.Conv1d(1, 32, 5, stride=1, device="meta"),
        nn.ReLU(),
        nn.Conv1d(32, 64, 5, stride=2, device="meta"),
        nn.ReLU(),
        nn.Conv1d(64, 64, 3, stride=2, device="meta"),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * length, num_classes, device="meta"),
    )


#: Model builders by name: ``f(in_features, num_classes, image_shape) -> nn.Module`` (on meta).
MODELS: dict[str, Callable[[int, int, tuple[int, int, int] | None], nn.Module]] = {
    "mlp": _mlp,
    "linear": _linear,
    "cnn": _cnn,
    "cnn1d": _cnn1d,
}


def available_models() -> list[str]:
    """Names of the built-in models."""
    return sorted(MODELS)


def build_model(
    name: str,
    in_features: int,
    num_classes: int,
    seed: int,
    device: torch.device | str = "cpu",
    image_shape: tuple[int, int, int] | None = None,
) -> nn.Module:
    """Build and initialise a benchmark model.

    Args:
        name: one of :func:`available_models`.
        in_features: flattened input dimension d.
        num_classes: number of classes C (the model outputs logits of shape (b, C)).
        seed: initialisation seed.
        device: where the parameters live.
        image_shape: (channels, height, width) of the inputs for ``cnn`` (default: square,
            one channel).

    Returns:
        ``nn.Module`` mapping inputs of shape (b, d) to logits of shape (b, C).

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}. Valid models: {', '.join(available_models())}.")
    model = MODELS[name](int(in_features), int(num_classes), image_shape)
    model = model.to_empty(device=device)
    generator = torch.Generator().manual_seed(int(seed))
    return init_parameters(model, generator)
