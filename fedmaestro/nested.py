"""Nested arrays of the federated protocol: rank axes, prefixes, validation and column-wise aggregation.

Pure array code (numpy in, numpy out; no Flower types): strategies/ and clients/ call it, tests
check it against values worked out by hand.

A model's state is a dict ``name -> array``. Every LoD layer's ``u`` (rank, out) and ``v`` (rank,
fan_in) or (rank, in_channels, kh, kw) carry the rank on axis 0; every other array (biases, BatchNorm
statistics, dense layers) has no rank axis. A client with caps ``k_i`` holds the prefix ``u[:k_i]``, ``v[:k_i]``.

``aggregate``: column j of an array with a rank axis is the weighted mean over the replies that
hold column j; columns that no reply holds keep the current global value; arrays without a rank
axis are the weighted mean of all replies. Flower's FedAvg aggregation is not used: it would
broadcast prefixes of different lengths against each other without complaint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import lod

__all__ = ["Layout", "prefix", "beyond_caps_sq", "aggregate", "check_arrays", "state_arrays", "load_arrays",
           "num_bytes", "contiguous", "batchnorm_names", "pool_batchnorm", "load_batchnorm"]


@dataclass(frozen=True)
class Layout:
    """Which arrays of a model's state carry a rank axis, and to which LoD layer they belong."""

    axes: dict[str, int | None]  # array name -> rank axis (0) or None, in state-dict order
    layers: dict[str, tuple[str, ...]]  # LoD layer name -> names of its arrays with a rank axis

    @classmethod
    def of(cls, model: nn.Module) -> "Layout":
        params = {id(p): name for name, p in model.named_parameters()}
        layers = {}
        for name, layer in lod.layers(model):
            layers[name] = tuple(params[id(p)] for p in (layer.u, layer.v))
        ranked = {a for arrays in layers.values() for a in arrays}
        axes = {name: (0 if name in ranked else None) for name in model.state_dict()}
        return cls(axes, layers)

    def ranks(self, state: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Rank of every LoD layer, read from the arrays' shapes (u and v must agree)."""
        ranks = {}
        for layer, names in self.layers.items():
            sizes = {state[n].shape[0] for n in names}
            if len(sizes) != 1:
                raise ValueError(f"{layer}: its factors disagree on the rank: "
                                 f"{ {n: state[n].shape for n in names} }")
            ranks[layer] = sizes.pop()
        return ranks

    def shapes(self, state: Mapping[str, np.ndarray], caps: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        """The shape of every array of ``prefix(state, caps, self)``."""
        out = {name: tuple(a.shape) for name, a in state.items()}
        for layer, names in self.layers.items():
            if layer in caps:
                for n in names:
                    out[n] = (int(caps[layer]),) + out[n][1:]
        return out


def prefix(state: Mapping[str, np.ndarray], caps: Mapping[str, int], layout: Layout) -> dict[str, np.ndarray]:
    """``state`` with every LoD layer cut to its first ``caps[layer]`` rank components (others whole).

    Layers missing from ``caps`` stay whole. Arrays are views where slicing allows (no copy).
    """
    unknown = sorted(set(caps) - set(layout.layers))
    if unknown:
        raise ValueError(f"prefix: caps name {unknown}, which are not LoD layers; LoD layers are "
                         f"{sorted(layout.layers)}")
    out = dict(state)
    for layer, k in caps.items():
        for name in layout.layers[layer]:
            rank = state[name].shape[0]
            if not 0 <= k <= rank:
                raise ValueError(f"prefix: cap {k} for {layer} is outside [0, {rank}] (the rank of {name})")
            out[name] = state[name][:k]
    return out


def beyond_caps_sq(state: Mapping[str, np.ndarray], caps: Mapping[str, int],
                   layout: Layout) -> dict[str, tuple[float, float]]:
    """Per LoD layer in ``caps``: the squared Frobenius norms of u's and of v's rank components from ``caps[layer]``
    on, the part of the global factors a client with those caps does not hold (its HGL groups extend over them:
    ``lod.hgl_penalty``'s ``tails``). Computed in float64."""
    out = {}
    for layer, k in caps.items():
        u, v = (np.asarray(state[name][k:], dtype=np.float64) for name in layout.layers[layer])
        out[layer] = (float(np.square(u).sum()), float(np.square(v).sum()))
    return out


def _check_weights(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"aggregate: weights must be finite and >= 0, got {w.tolist()}")
    if w.sum() <= 0:
        raise ValueError(f"aggregate: the weights sum to {w.sum()}; at least one reply needs a positive weight "
                         "(num-examples > 0)")
    return w


def _cast(mean: np.ndarray, like: np.ndarray) -> np.ndarray:
    if np.issubdtype(like.dtype, np.integer):  # counters (BatchNorm's num_batches_tracked): round, keep the dtype
        return np.rint(mean).astype(like.dtype)
    if like.dtype == np.bool_:
        return mean >= 0.5
    return mean.astype(like.dtype)


def aggregate(current: Mapping[str, np.ndarray], replies: Sequence[tuple[Mapping[str, np.ndarray], float]],
              rank_axes: Mapping[str, int | None]) -> dict[str, np.ndarray]:
    """Column-wise weighted mean of nested prefixes (see the module docstring).

    current: name -> global array; replies: (name -> array cut along its rank axis, weight); rank_axes:
    name -> axis or None. Every reply must hold every name of ``current``, each array of the global
    shape except along the rank axis, where it holds a prefix (length <= the global one). No replies:
    a copy of ``current``. Computed in float64 and cast back to each array's dtype.
    """
    missing_axes = sorted(set(current) - set(rank_axes))
    if missing_axes:
        raise ValueError(f"aggregate: rank_axes has no entry for {missing_axes}; give None for arrays without one")
    if not replies:
        return {name: np.array(a, copy=True) for name, a in current.items()}
    weights = _check_weights([w for _, w in replies])
    for i, (arrays, _) in enumerate(replies):
        problems = check_arrays(arrays, {n: _prefix_shape(a.shape, arrays.get(n), rank_axes[n])
                                         for n, a in current.items()}, finite=False)
        if problems:
            raise ValueError(f"aggregate: reply {i} does not fit the global arrays: " + "; ".join(problems))
    out = {}
    for name, glob in current.items():
        axis = rank_axes[name]
        if axis is None:
            mean = sum(w * np.asarray(arrays[name], dtype=np.float64) for (arrays, _), w in zip(replies, weights))
            out[name] = _cast(mean / weights.sum(), glob)
            continue
        total = np.zeros(glob.shape, dtype=np.float64)
        held = np.zeros(glob.shape[axis], dtype=np.float64)  # sum of the weights of the replies that hold column j
        for (arrays, _), w in zip(replies, weights):
            part = np.asarray(arrays[name], dtype=np.float64)
            k = part.shape[axis]
            index = [slice(None)] * glob.ndim
            index[axis] = slice(0, k)
            total[tuple(index)] += w * part
            held[:k] += w
        shape = [1] * glob.ndim
        shape[axis] = -1
        held_b = held.reshape(shape)  # broadcast along the rank axis
        mean = np.where(held_b > 0, total / np.where(held_b > 0, held_b, 1.0), np.asarray(glob, dtype=np.float64))
        out[name] = _cast(mean, glob)
    return out


def _prefix_shape(global_shape: tuple[int, ...], reply: np.ndarray | None, axis: int | None) -> tuple[int, ...]:
    """The shape a reply's array must have: the global one, with any prefix length <= global on the rank axis."""
    if axis is None or reply is None or np.ndim(reply) != len(global_shape):
        return tuple(global_shape)
    k = np.shape(reply)[axis]
    if k > global_shape[axis]:
        return tuple(global_shape)  # a longer "prefix" is reported as a shape mismatch
    shape = list(global_shape)
    shape[axis] = k
    return tuple(shape)


def check_arrays(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
                 dtypes: Mapping[str, np.dtype] | None = None, finite: bool = True) -> list[str]:
    """Problems of a reply's arrays against the expected names and shapes (empty list = valid).

    Checks: missing names, extra names, shapes, dtypes (when given) and, with ``finite``, NaN/inf values.
    """
    problems = []
    missing = [n for n in expected if n not in arrays]
    extra = [n for n in arrays if n not in expected]
    if missing:
        problems.append(f"missing arrays {missing}")
    if extra:
        problems.append(f"unexpected arrays {extra}")
    for name, shape in expected.items():
        if name not in arrays:
            continue
        a = arrays[name]
        if tuple(np.shape(a)) != tuple(shape):
            problems.append(f"{name} has shape {tuple(np.shape(a))}, expected {tuple(shape)}")
            continue
        if dtypes is not None and name in dtypes and np.asarray(a).dtype != dtypes[name]:
            problems.append(f"{name} has dtype {np.asarray(a).dtype}, expected {dtypes[name]}")
            continue
        if finite and np.issubdtype(np.asarray(a).dtype, np.floating):
            bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
            if bad:
                problems.append(f"{name} has {bad} non-finite values")
    return problems


def state_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state dict as numpy arrays (copies, on the CPU), in state-dict order."""
    return {name: t.detach().cpu().numpy().copy() for name, t in model.state_dict().items()}


def contiguous(a) -> np.ndarray:
    """``np.ascontiguousarray`` that keeps a 0-d array 0-d (it returns 1-d; BatchNorm's num_batches_tracked is 0-d)."""
    return np.ascontiguousarray(a).reshape(np.shape(a))


def load_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> nn.Module:
    """Load numpy arrays into ``model`` (strict); LoD layers resize to the arrays' ranks."""
    state = {name: torch.from_numpy(contiguous(a)) for name, a in arrays.items()}
    model.load_state_dict(state, strict=True)
    return model


def batchnorm_names(model: nn.Module) -> list[str]:
    """The module names of the BatchNorm layers that keep running statistics."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def pool_batchnorm(replies: Sequence[tuple[Mapping[str, np.ndarray], float]], names: Sequence[str]
                   ) -> dict[str, np.ndarray]:
    """BatchNorm statistics of the union of the replies' data: for every layer in ``names``, each reply's
    (``running_mean`` m_i, ``running_var`` v_i) weighted by its example count w_i gives
    mean = sum w_i m_i / W and var = sum w_i (v_i + m_i^2) / W - mean^2 (the law of total variance:
    averaging the variances alone would drop the spread of the clients' means)."""
    w = _check_weights([weight for _, weight in replies])
    w = w / w.sum()
    out = {}
    for name in names:
        means = np.stack([np.asarray(a[f"{name}.running_mean"], np.float64) for a, _ in replies])
        variances = np.stack([np.asarray(a[f"{name}.running_var"], np.float64) for a, _ in replies])
        mean = np.tensordot(w, means, axes=1)
        var = np.maximum(np.tensordot(w, variances + means ** 2, axes=1) - mean ** 2, 0.0)
        like = replies[0][0][f"{name}.running_mean"]
        out[f"{name}.running_mean"], out[f"{name}.running_var"] = mean.astype(like.dtype), var.astype(like.dtype)
    return out


def load_batchnorm(model: nn.Module, stats: Mapping[str, np.ndarray]) -> nn.Module:
    """Copy BatchNorm statistics (``pool_batchnorm``'s) into ``model``'s buffers, in place."""
    with torch.no_grad():
        for name, a in stats.items():
            model.get_buffer(name).copy_(torch.from_numpy(np.asarray(a)))
    return model


def num_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Payload bytes of the arrays: sum of elements x item size (what a message carries, headers aside)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))
