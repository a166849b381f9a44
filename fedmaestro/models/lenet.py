"""LeNet-5 with ReLU (App. D.2, Table 6): 44,426 parameters and 281,640 MACs on 28x28 inputs.

Table 6 lists padding 1 and a stride-1 first pool, but its own fc1 width (256 = 16 x 4 x 4) and the
counts of Table 11 only hold for the classic layout (no padding, 2x2 pools of stride 2) used here.
"""

import torch
import torch.nn.functional as F
from torch import nn


class MaxPool2x2(nn.Module):
    """2x2 max-pooling of stride 2 (``nn.MaxPool2d(2, 2)``'s values exactly).

    Without autograd (evaluation) it is three elementwise maxima over strided views, several times
    faster on CPU than ``max_pool2d`` at LeNet's few channels; with autograd it is ``max_pool2d``,
    whose backward is the fast one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return F.max_pool2d(x, 2)
        x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]  # floor odd sizes, as max_pool2d does
        top = torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2])
        return torch.maximum(top, torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]))


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
