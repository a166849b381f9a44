"""The paper's dense architectures (App. D.2); ``lod.factorize`` decomposes them."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .lenet import LeNet5

__all__ = ["build", "MODELS"]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet": LeNet5,
}


def build(name: str, **kwargs) -> nn.Module:
    """The dense model ``name`` (see MODELS), built with ``kwargs``."""
    if name not in MODELS:
        raise ValueError(f"models.build: unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)
