"""The paper's dense architectures (App. D.2); ``lod.factorize`` decomposes them.

``PARTIAL_SKIP[name]`` holds the module names that the paper keeps dense in its partial
decomposition (pass them as ``lod.factorize(model, skip=...)``, or ``model.skip`` in the config).
ResNet-50 (Tables 4 and 15, "Not decomposing first four blocks and last layer"): the first four of
Table 7's five blocks, conv1 and conv2_x .. conv4_x (torchvision's ``conv1``, ``layer1`` .. ``layer3``,
with their downsample convs), and the classifier ``fc``; only conv5_x (``layer4``) is decomposed.
This is the reading that gives Table 4's Pufferfish baseline of the same group its 15.2M parameters
(``layer4`` at Pufferfish's rank/4, everything else dense: 15.20M), and that allows Table 15's gaps
between partial and full decomposition at one lambda (3.9M parameters at 4e-6): keeping only the
stem and the first bottlenecks dense would bound those gaps by 2.7M.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .lenet import LeNet5
from .resnet import resnet18, resnet50
from .transformer import Transformer
from .vgg import VGG19

__all__ = ["build", "MODELS", "CLASSIFIER", "PARTIAL_SKIP"]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet": LeNet5,
    "resnet18": resnet18,
    "vgg19": VGG19,
    "resnet50": resnet50,
    "transformer": Transformer,
}

# The output layer (classifier) of each model, kept dense by ``model.skip_last``. The Transformer has none
# to keep: its output projection is tied to the embeddings (a parameter-free module, never factorized).
CLASSIFIER: dict[str, str] = {"lenet": "fc3", "resnet18": "fc", "vgg19": "classifier", "resnet50": "fc"}

PARTIAL_SKIP: dict[str, list[str]] = {
    "resnet50": ["conv1", "layer1", "layer2", "layer3", "fc"],
}


def build(name: str, **kwargs) -> nn.Module:
    """The dense model ``name`` (see MODELS), built with ``kwargs``."""
    if name not in MODELS:
        raise ValueError(f"models.build: unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)
