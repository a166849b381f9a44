"""VGG-19 with batch norm for CIFAR-10 (App. D.2, Table 8).

Sixteen 3 x 3 convs (``layer1`` .. ``layer16``, each conv -> BatchNorm -> ReLU), 2 x 2 max-pools
after layers 2, 4, 8 and 12, a global average pool after layer 16 (Table 8's 2 x 2 average pool:
32 x 32 inputs are 2 x 2 there; the adaptive pool also takes other input sizes), and a single
512 -> num_classes ``classifier``. The convs have no bias (Table 8 lists none; the batch
norm that follows makes it redundant), as in the Pufferfish code the paper builds on. On 32 x 32:
20,035,018 parameters and 398,136,320 MACs (paper: 20.0M / 0.40 GMACs, Tables 2 and 13).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

__all__ = ["VGG19", "WIDTHS", "POOL_AFTER"]

WIDTHS = (64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512)
POOL_AFTER = frozenset({2, 4, 8, 12})  # 1-based layer numbers followed by a 2 x 2 max-pool


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        bn=nn.BatchNorm2d(out_channels),
        relu=nn.ReLU(inplace=True),
    ))


class VGG19(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        channels = in_channels
        for i, width in enumerate(WIDTHS, start=1):
            setattr(self, f"layer{i}", _conv_bn_relu(channels, width))
            channels = width
        self.pool = nn.MaxPool2d(2, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.modules():  # torchvision's VGG initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        for i in range(1, len(WIDTHS) + 1):
            x = getattr(self, f"layer{i}")(x)
            if i in POOL_AFTER:
                x = self.pool(x)  # 32 -> 16 -> 8 -> 4 -> 2
        x = self.avgpool(x)  # (N, 512, 1, 1)
        return self.classifier(x.flatten(1))  # (N, num_classes)
