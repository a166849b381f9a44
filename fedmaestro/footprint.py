"""Exact parameter and MAC counts of a model at its current (and active) ranks.

MACs come from one forward pass of a single example with hooks on the layers that multiply:
Conv2d (output size x in/groups x kh x kw), Linear, the LoD layers at their active rank (the k x k
conv to b channels then the 1 x 1 conv, or x V then (.) U^T), and any module type registered with
``register_macs`` (attention's Q K^T and A V products). Normalisation, pooling and activations
are not counted, as in the paper's tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .lod.layers import LoDConv2d, LoDLayer, LoDLinear

__all__ = ["Footprint", "measure", "register_macs", "params_at_active_rank"]

MacCounter = Callable[[nn.Module, tuple, torch.Tensor], int]
_COUNTERS: dict[type, MacCounter] = {}


@dataclass(frozen=True)
class Footprint:
    params: int
    macs: int


def register_macs(cls: type) -> Callable[[MacCounter], MacCounter]:
    """Register a MAC counter (module, inputs, output) -> int for a module type."""
    def wrap(fn: MacCounter) -> MacCounter:
        _COUNTERS[cls] = fn
        return fn
    return wrap


def _counter(cls: type) -> MacCounter | None:
    """The counter of ``cls`` or of its nearest registered base class (a subclass of nn.Linear multiplies too)."""
    return next((_COUNTERS[c] for c in cls.__mro__ if c in _COUNTERS), None)


def _leading(output: torch.Tensor) -> int:
    return output.numel() // output.shape[-1]


@register_macs(nn.Linear)
def _linear(m: nn.Linear, inputs, output) -> int:
    return _leading(output) * m.in_features * m.out_features


@register_macs(nn.Conv2d)
def _conv(m: nn.Conv2d, inputs, output) -> int:
    kh, kw = m.kernel_size
    return output.numel() * (m.in_channels // m.groups) * kh * kw


@register_macs(LoDLinear)
def _lod_linear(m: LoDLinear, inputs, output) -> int:
    return _leading(output) * m._effective_rank() * (m.in_features + m.out_features)


@register_macs(LoDConv2d)
def _lod_conv(m: LoDConv2d, inputs, output) -> int:
    pixels = output.numel() // m.out_channels
    return pixels * m._effective_rank() * (m.fan_in + m.out_channels)


def params_at_active_rank(model: nn.Module) -> int:
    """Parameter count with every LoD layer counted at its active rank b: b (m + n) + bias."""
    total = 0
    lod_params = set()
    for module in model.modules():
        if isinstance(module, LoDLayer):
            lod_params.update({id(module.u), id(module.v)})
            total += module._effective_rank() * (module.out_dim + module.fan_in)
    seen = set()
    for p in model.parameters():
        if id(p) not in lod_params and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@torch.no_grad()
def measure(model: nn.Module, input_shape: tuple[int, ...] | None = None, *, example: tuple | None = None) -> Footprint:
    """Footprint(params, macs) of one example: ``input_shape`` excludes the batch dimension.

    Counted at the ranks a forward pass runs: every LoD layer's active rank where one is set (the sub-model
    a rank sampler or a deployment search selected), else its rank. ``with lod.full_rank(model):`` measures
    the whole model as held.

    Models whose input is not one float tensor (the Transformer) pass ``example`` instead: the
    positional arguments of one forward call, batch size 1.
    """
    if (input_shape is None) == (example is None):
        raise ValueError("measure: give exactly one of input_shape (without the batch dimension) or example=(...)")
    if example is None:
        param = next(model.parameters(), None)
        example = (torch.zeros(1, *input_shape) if param is None
                   else torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype),)
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        total += int(_counter(type(module))(module, inputs, output))

    handles = [m.register_forward_hook(hook) for m in model.modules() if _counter(type(m)) is not None]
    was_training = model.training
    model.eval()
    try:
        model(*example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return Footprint(params=params_at_active_rank(model), macs=total)
