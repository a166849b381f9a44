"""Swap a model's Linear / Conv2d layers for LoD layers, find them, and merge them back."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .kernels import dense_is_cheaper
from .layers import LoDConv2d, LoDLayer, LoDLinear

__all__ = ["factorize", "layers", "to_dense"]


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _covered(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _to_lod(name: str, module: nn.Module) -> LoDLayer:
    bias = module.bias.detach() if module.bias is not None else None
    if isinstance(module, nn.Linear):
        lod = LoDLinear(module.in_features, module.out_features, bias=bias is not None,
                        weight=module.weight, bias_init=bias)
    else:
        if module.groups != 1:
            raise ValueError(f"factorize: {name} is a grouped conv (groups={module.groups}); LoDConv2d supports "
                             f"groups=1 only. Add {name!r} to skip=... to keep it dense.")
        if module.padding_mode != "zeros":
            raise ValueError(f"factorize: {name} uses padding_mode={module.padding_mode!r}; LoDConv2d supports "
                             f"'zeros' only. Add {name!r} to skip=... to keep it dense.")
        lod = LoDConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                        module.padding, module.dilation, bias=bias is not None, weight=module.weight,
                        bias_init=bias)
    return lod.to(device=module.weight.device)


def factorize(model: nn.Module, skip: Iterable[str] = ()) -> nn.Module:
    """Replace every nn.Linear / nn.Conv2d (outside ``skip``) by an LoD layer, in place.

    Initialised by the SVD of the current weights (U = U~ sqrt(S), V = V~ sqrt(S)), at full rank,
    so the factorized model computes what the dense one did. ``skip`` holds module names; a name
    also covers the modules below it (``"layer1"`` skips the whole block).
    """
    skip = tuple(skip)
    names = {name for name, _ in model.named_modules()}
    unknown = [s for s in skip if s not in names]
    if unknown:
        raise ValueError(f"factorize: skip names {unknown} match no module of {type(model).__name__}; "
                         f"module names look like {sorted(n for n in names if n)[:8]}")
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) in (nn.Linear, nn.Conv2d) and not _covered(name, skip)]
    if not targets:
        raise ValueError(f"factorize: {type(model).__name__} has no nn.Linear or nn.Conv2d outside skip={list(skip)}; "
                         "nothing to factorize (to train the dense model, set model.factorize=false)")
    replacements = [(name, _to_lod(name, module)) for name, module in targets]  # all checks before any swap
    for name, module in replacements:
        _set_child(model, name, module)
    return model


def layers(model: nn.Module) -> list[tuple[str, LoDLayer]]:
    """The LoD layers of ``model`` in module order, with their names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoDLayer)]


def _dense(layer: LoDLayer) -> nn.Module:
    weight = layer.dense_weight(layer.rank).detach()
    has_bias = layer.bias is not None
    if isinstance(layer, LoDLinear):
        dense = nn.Linear(layer.in_features, layer.out_features, bias=has_bias)
    else:
        dense = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                          layer.padding, layer.dilation, bias=has_bias)
    dense = dense.to(device=weight.device, dtype=weight.dtype)
    dense.weight.data.copy_(weight)
    if has_bias:
        dense.bias.data.copy_(layer.bias.detach())
    return dense


def to_dense(model: nn.Module) -> nn.Module:
    """Merge, in place, every LoD layer for which r (m + n) >= m n back to a dense layer (App. D.4)."""
    sampled = [f"{name} ({layer.active_rank} of {layer.rank})" for name, layer in layers(model)
               if layer.active_rank is not None and layer.active_rank < layer.rank]
    if sampled:
        raise ValueError(f"to_dense: active ranks are set on {', '.join(sampled)}; a merged layer would hold all "
                         f"its columns: cut the model first (lod.truncate) or clear them (layer.active_rank = None)")
    for name, layer in layers(model):
        if dense_is_cheaper(layer.rank, layer.out_dim, layer.fan_in):
            _set_child(model, name, _dense(layer))
    return model
