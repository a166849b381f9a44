"""LeNet-5 with ReLU (App. D.2, Table 6): 44,426 parameters and 281,640 MACs on 28x28 inputs.

Table 6 lists padding 1 and a stride-1 first pool, but its own fc1 width (256 = 16 x 4 x 4) and the
counts of Table 11 only hold for the classic layout (no padding, 2x2 pools of stride 2) used here.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def _quadrants(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four strided views of x's 2 x 2 windows, in max_pool2d's scan order (odd sizes floored)."""
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    return x[..., 0:h:2, 0:w:2], x[..., 0:h:2, 1:w:2], x[..., 1:h:2, 0:w:2], x[..., 1:h:2, 1:w:2]


class _MaxPool2x2(torch.autograd.Function):
    """max_pool2d(x, 2) with its indices from elementwise maxima and comparisons over strided views, and
    ATen's own backward from those indices. The strict comparisons keep the first maximum of a window in
    scan order, as ATen does, so ties (a zero background convolved to its bias) route the gradient to
    the same element. Only a NaN window may route it elsewhere."""

    @staticmethod
    def forward(ctx, x):
        a, b, c, d = _quadrants(x)
        top, bottom = torch.maximum(a, b), torch.maximum(c, d)
        lower = bottom > top
        right = (lower & (d > c)) | (~lower & (b > a))
        width = x.shape[-1]
        rows, cols = torch.arange(0, a.shape[-2] * 2, 2), torch.arange(0, a.shape[-1] * 2, 2)
        window = rows[:, None] * width + cols  # flat index of each window's top-left element
        indices = lower.long().mul_(width).add_(right).add_(window)
        ctx.save_for_backward(x, indices)
        return torch.maximum(top, bottom)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, indices = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [2, 2], [2, 2], [0, 0], [1, 1], False, indices)


class MaxPool2x2(nn.Module):
    """2x2 max-pooling of stride 2: ``nn.MaxPool2d(2, 2)``'s values and gradients exactly, several times
    faster on CPU at LeNet's few channels (ATen's forward costs about 1 ms a step on conv1's output, more
    than the whole rank-1 layer). Without autograd it is three elementwise maxima over strided views;
    with autograd the same plus the indices for ATen's backward. Other devices use ``max_pool2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return F.max_pool2d(x, 2)
        if x.requires_grad and torch.is_grad_enabled():
            return _MaxPool2x2.apply(x)
        a, b, c, d = _quadrants(x)
        return torch.maximum(torch.maximum(a, b), torch.maximum(c, d))


class LeNet5(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)  # (N, 6, 24, 24)
        self.conv2 = nn.Conv2d(6, 16, 5)  # (N, 16, 8, 8)
        self.pool = MaxPool2x2()
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.act = nn.ReLU()

    def forward(self, x):
        # relu(max(x)) = max(relu(x)), on a quarter of the elements
        x = self.act(self.pool(self.conv1(x)))  # (N, 6, 12, 12)
        x = self.act(self.pool(self.conv2(x)))  # (N, 16, 4, 4)
        x = x.flatten(1)  # (N, 256)
        x = self.act(self.fc1(x))
        x = self.act(self.fc2(x))
        return self.fc3(x)
