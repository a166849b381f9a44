"""Low-rank ordered decomposition (LoD) layers: W = U V^T, computed through the factors.

Storage: the factors are kept with the rank on the first axis, ``u`` (rank, out) = U^T and
``v`` (rank, fan_in) = V^T (for a conv, ``v`` is (rank, in, kh, kw), the k x k conv's own
weight). A rank-b prefix ``u[:b]``, ``v[:b]`` is then a contiguous view: the forward pass at
active rank b costs rank-b MACs with no gather or copy of weights, and shrinking is a row cut.
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels import prefix_conv2d, prefix_linear

__all__ = ["LoDLayer", "LoDLinear", "LoDConv2d", "svd_factors", "replace_data"]


def svd_factors(weight2d: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced SVD factors of a (out, fan_in) matrix: U~ sqrt(S), V~ sqrt(S), first ``rank``.

    Returns ``u`` (rank, out) and ``v`` (rank, fan_in) in this module's storage layout.
    """
    w = weight2d.detach().to(torch.float64)
    if w.shape[0] < w.shape[1]:
        # LAPACK sees a row-major tensor as its transpose; it runs several times faster on a tall
        # matrix than on a wide one (512 x 4608: 0.37 s instead of 1.3 s), so decompose W^T = B S A^T
        # and read W = A S B^T off it: the same singular triplets.
        right, sing, left_t = torch.linalg.svd(w.T, full_matrices=False)  # (fan_in, k), (k,), (k, out)
        left, right_t = left_t.T, right.T
    else:
        left, sing, right_t = torch.linalg.svd(w, full_matrices=False)  # (out, k), (k,), (k, fan_in)
    root = sing[:rank].sqrt()
    u = (left[:, :rank] * root).T  # (rank, out)
    v = right_t[:rank] * root[:, None]  # (rank, fan_in)
    return u.to(weight2d.dtype).contiguous(), v.to(weight2d.dtype).contiguous()


def replace_data(param: nn.Parameter, data: torch.Tensor) -> None:
    """``param.data = data`` for data of another shape, safe while older autograd graphs are alive.

    Autograd keeps one gradient accumulator per leaf and reuses it while any graph that used the
    leaf is alive (e.g. the previous step's ``loss``); it remembers the leaf's old shape, so the next
    backward fails with "invalid gradient ... expected shape compatible with [old]". Assigning data
    of another dtype first makes autograd drop that accumulator (``VariableHooks::set_data``), and
    the next graph gets a fresh one of the new shape. The Parameter object itself is kept, so
    optimizers and other holders of it stay valid.
    """
    other = torch.float32 if param.dtype == torch.float64 else torch.float64
    with torch.no_grad():
        param.data = torch.empty(0, dtype=other, device=param.device)
        param.data = data


class LoDLayer(nn.Module):
    """Shared behaviour of the LoD layers: rank bookkeeping, factors, checkpoint resizing."""

    u: nn.Parameter  # (rank, out)
    v: nn.Parameter  # (rank, fan_in) or (rank, in, kh, kw)
    bias: nn.Parameter | None
    out_dim: int
    fan_in: int

    def _init_factors(self, dense_weight: torch.Tensor, bias: torch.Tensor | None, rank: int | None):
        max_rank = min(self.out_dim, self.fan_in)
        if rank is None:
            rank = max_rank
        if not 0 <= rank <= max_rank:
            raise ValueError(
                f"{type(self).__name__}: rank must be in [0, min(out, fan_in)] = [0, {max_rank}] "
                f"for a {self.out_dim} x {self.fan_in} weight, got rank={rank}"
            )
        u, v = svd_factors(dense_weight.reshape(self.out_dim, self.fan_in), rank)
        self.u = nn.Parameter(u)
        self.v = nn.Parameter(v.reshape(rank, *self.v_shape_tail))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self._active_rank: int | None = None

    @property
    def v_shape_tail(self) -> tuple[int, ...]:
        return (self.fan_in,)

    @property
    def rank(self) -> int:
        """Current maximal rank r_i (the number of stored columns); shrinking lowers it."""
        return self.u.shape[0]

    @property
    def max_rank(self) -> int:
        return min(self.out_dim, self.fan_in)

    @property
    def active_rank(self) -> int | None:
        """None: forward with all ``rank`` columns; int b: forward with the first b only."""
        return self._active_rank

    @active_rank.setter
    def active_rank(self, b: int | None) -> None:
        if b is not None and not 0 <= b <= self.rank:
            raise ValueError(
                f"{type(self).__name__}: active_rank must be None or in [0, rank] = [0, {self.rank}], got {b}"
            )
        self._active_rank = None if b is None else int(b)

    def _effective_rank(self) -> int:
        return self.rank if self._active_rank is None else self._active_rank

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) in the paper's orientation: U (out, rank), V (fan_in, rank); views of the parameters."""
        return self.u.T, self.v.reshape(self.rank, self.fan_in).T

    def dense_weight(self, rank: int | None = None) -> torch.Tensor:
        """U[:, :b] V[:, :b]^T in the dense layer's weight shape; b = rank, else the active rank."""
        b = self._effective_rank() if rank is None else rank
        w = self.u[:b].T @ self.v[:b].reshape(b, self.fan_in)  # (out, fan_in)
        return w.reshape(self.out_dim, *self.v_shape_tail)

    def resize_(self, rank: int) -> None:
        """Re-allocate the factors at ``rank`` (contents undefined); keeps the Parameter objects."""
        replace_data(self.u, self.u.new_empty(rank, self.out_dim))
        replace_data(self.v, self.v.new_empty(rank, *self.v_shape_tail))
        self.u.grad = self.v.grad = None
        if self._active_rank is not None and self._active_rank > rank:
            self._active_rank = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Ranks are part of the state: a checkpoint taken after shrinking reloads at its ranks.
        saved = state_dict.get(prefix + "u")
        if saved is not None and saved.ndim == 2 and saved.shape[1] == self.out_dim and saved.shape[0] != self.rank:
            if saved.shape[0] > self.max_rank:
                raise ValueError(
                    f"{prefix}u: a checkpoint rank of {saved.shape[0]} exceeds min(out, fan_in) = {self.max_rank}"
                )
            self.resize_(saved.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, active_rank={self._active_rank}"


class LoDLinear(LoDLayer):
    """y = x V U^T + b, with only the first ``active_rank`` columns of U and V."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int | None = None,
                 *, weight: torch.Tensor | None = None, bias_init: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.out_dim, self.fan_in = out_features, in_features
        if weight is None:  # nn.Linear's default initialisation, then SVD
            dense = nn.Linear(in_features, out_features, bias=bias)
            weight, bias_init = dense.weight, dense.bias
        elif bias and bias_init is None:
            bias_init = torch.zeros(out_features, dtype=weight.dtype, device=weight.device)
        self._init_factors(weight, bias_init if bias else None, rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._effective_rank()
        if b == 0:
            out = x.new_zeros(*x.shape[:-1], self.out_features)
            return out if self.bias is None else out + self.bias
        return prefix_linear(x, self.u, self.v, self.bias, b)  # x v[:b]^T u[:b] + bias: (..., out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}" + \
            LoDLayer.extra_repr(self)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class LoDConv2d(LoDLayer):
    """A k x k conv to ``active_rank`` channels (V) followed by a 1 x 1 conv to the outputs (U)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, rank: int | None = None, *, weight: torch.Tensor | None = None,
                 bias_init: torch.Tensor | None = None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        if isinstance(self.padding, str) and self.padding not in ("same", "valid"):
            raise ValueError(f"LoDConv2d: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
        if self.padding == "same" and self.stride != (1, 1):
            raise ValueError(f"LoDConv2d: padding='same' needs stride 1 (as nn.Conv2d), got stride {stride!r}; "
                             f"give the padding as numbers")
        self.out_dim = out_channels
        self.fan_in = in_channels * self.kernel_size[0] * self.kernel_size[1]
        if weight is None:  # nn.Conv2d's default initialisation, then SVD
            dense = nn.Conv2d(in_channels, out_channels, kernel_size, bias=bias)
            weight, bias_init = dense.weight, dense.bias
        elif bias and bias_init is None:
            bias_init = torch.zeros(out_channels, dtype=weight.dtype, device=weight.device)
        self._init_factors(weight, bias_init if bias else None, rank)

    @property
    def v_shape_tail(self) -> tuple[int, ...]:
        return (self.in_channels, *self.kernel_size)

    def _out_size(self, size: int, axis: int) -> int:
        if self.padding == "same":
            return size
        pad = 0 if self.padding == "valid" else self.padding[axis]
        span = self.dilation[axis] * (self.kernel_size[axis] - 1) + 1
        return (size + 2 * pad - span) // self.stride[axis] + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._effective_rank()
        if b == 0:
            h, w = self._out_size(x.shape[-2], 0), self._out_size(x.shape[-1], 1)
            out = x.new_zeros(*x.shape[:-3], self.out_channels, h, w)
            return out if self.bias is None else out + self.bias[:, None, None]
        # k x k conv to b channels with v[:b], then the 1 x 1 conv with u[:b]^T: (N, out, H', W')
        return prefix_conv2d(x, self.u, self.v, self.bias, b, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}"
                + LoDLayer.extra_repr(self))

