"""ResNet-18 for CIFAR-10 and ResNet-50 for ImageNet (App. D.2, Table 7), in torchvision's layout.

Both use torchvision's module names and shapes (``conv1``, ``bn1``, ``layer1`` .. ``layer4`` of
blocks with ``conv1``/``bn1``/.../``downsample``, ``fc``), so a torchvision state dict loads into
``resnet50`` unchanged; no weights are ever downloaded here.

* ``resnet18``: the CIFAR variant of Table 7, a 3 x 3 stride-1 stem and no max-pool; on 32 x 32:
  11,173,962 parameters and 555,422,720 MACs (paper: 11.17M / 0.56 GMACs, Tables 12 and 16).
* ``resnet50``: torchvision's ResNet-50 (v1.5: the stride sits on the 3 x 3 conv of a bottleneck),
  7 x 7 stride-2 stem with padding 3 (Table 7's "padding 1" is not torchvision's and would change
  every spatial size) and a 3 x 3 max-pool; on 224 x 224: 25,557,032 parameters and 4,089,184,256
  MACs. The paper's 4.12 GMACs (Table 15) also counts batch norm, ReLU, pooling and the residual
  additions (what ptflops reports for this network); ``footprint.measure`` counts only the layers
  that multiply weights, 0.75 % fewer.
"""

from __future__ import annotations

from torch import nn

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet50"]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    """The projection shortcut (1 x 1 conv + BN) where the block changes shape, else None (identity)."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(_conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """Two 3 x 3 convs with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, width, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1 x 1 reduce, 3 x 3 (carrying the stride, torchvision's v1.5), 1 x 1 expand by 4 (ResNet-50)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = _conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_channels, out_channels, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A stem, four stages of residual blocks (widths 64, 128, 256, 512; stride 2 from stage 2 on),
    global average pooling and a linear classifier ``fc``.

    ``stem="cifar"``: 3 x 3 stride-1 conv, no max-pool (32 x 32 inputs); ``stem="imagenet"``:
    7 x 7 stride-2 conv and a 3 x 3 stride-2 max-pool (224 x 224 inputs).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], depths: tuple[int, int, int, int],
                 num_classes: int, in_channels: int = 3, stem: str = "cifar"):
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"ResNet: stem must be 'cifar' or 'imagenet', got {stem!r}")
        if stem == "cifar":
            self.conv1 = _conv3x3(in_channels, 64)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        channels = 64
        for stage, (width, depth) in enumerate(zip((64, 128, 256, 512), depths), start=1):
            blocks = []
            for i in range(depth):
                blocks.append(block(channels, width, stride=2 if stage > 1 and i == 0 else 1))
                channels = width * block.expansion
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (N, 64, H, W), H = 32 (cifar) or 56 (imagenet)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (N, 512 * expansion, H / 8, W / 8)
        x = self.avgpool(x).flatten(1)  # (N, 512 * expansion)
        return self.fc(x)


def resnet18(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-18 for 32 x 32 inputs (CIFAR): 3 x 3 stem, no max-pool."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, stem="cifar")


def resnet50(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """ResNet-50 for 224 x 224 inputs (ImageNet), torchvision's ``resnet50(weights=None)`` layout."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, stem="imagenet")
