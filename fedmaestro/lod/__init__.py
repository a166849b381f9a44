"""Low-rank ordered decomposition: layers, factorizing, sampling, HGL, shrinking."""

from .factorize import factorize, layers, to_dense
from .hgl import hgl_penalty, hgl_proximal_step
from .layers import LoDConv2d, LoDLayer, LoDLinear
from .sampler import SAMPLERS, SAMPLING_MODES, RankSampler, full_rank
from .shrink import cut_rank, importance, norm_keeping_scale, shrink, truncate

__all__ = [
    "LoDLayer", "LoDLinear", "LoDConv2d", "factorize", "layers", "to_dense", "hgl_penalty",
    "hgl_proximal_step", "RankSampler", "SAMPLERS", "SAMPLING_MODES", "full_rank", "importance", "shrink",
    "truncate", "cut_rank", "norm_keeping_scale",
]
