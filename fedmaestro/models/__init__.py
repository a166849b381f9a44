"""The paper's dense architectures (App. D.2); ``lod.factorize`` decomposes them.

``PARTIAL_SKIP[name]`` holds the module names that the paper keeps dense in its partial
decomposition (pass them as ``lod.factorize(model, skip=...)``, or ``model.skip`` in the config).
ResNet-50 (Table 15, "Not decomposing first four blocks and last layer"): the stem conv, the first
four bottleneck blocks (``layer1.0`` .. ``layer1.2`` and ``layer2.0``, with their downsample
convs) and the classifier ``fc``, in torchvision's names. The stem conv counts as part of the
"first blocks" here: it precedes them, has fan-in 147 (3 x 7 x 7) for 64 outputs, so a rank-r
factorization costs more than the dense conv for any r > 30, and the Pufferfish code the paper
builds on never factorizes it either.
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
    "resnet50": ["conv1", "layer1.0", "layer1.1", "layer1.2", "layer2.0", "fc"],
}


def build(name: str, **kwargs) -> nn.Module:
    """The dense model ``name`` (see MODELS), built with ``kwargs``."""
    if name not in MODELS:
        raise ValueError(f"models.build: unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)
