"""LeNet-5 with ReLU (App. D.2, Table 6): 44,426 parameters and 281,640 MACs on 28x28 inputs.

Table 6 lists padding 1 and a stride-1 first pool, but its own fc1 width (256 = 16 x 4 x 4) and the
counts of Table 11 only hold for the classic layout (no padding, 2x2 pools of stride 2) used here.
"""

from torch import nn


class LeNet5(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)  # (N, 6, 24, 24)
        self.conv2 = nn.Conv2d(6, 16, 5)  # (N, 16, 8, 8)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.pool(self.act(self.conv1(x)))  # (N, 6, 12, 12)
        x = self.pool(self.act(self.conv2(x)))  # (N, 16, 4, 4)
        x = x.flatten(1)  # (N, 256)
        x = self.act(self.fc1(x))
        x = self.act(self.fc2(x))
        return self.fc3(x)
