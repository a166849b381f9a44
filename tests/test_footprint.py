"""footprint.measure: exact parameter and MAC counts of small models, worked out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmaestro import lod
from fedmaestro.footprint import Footprint, measure, register_macs
from fedmaestro.models.transformer import MultiHeadAttention


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),  # 3 x 9 x 9 -> 8 x 5 x 5: floor((9 + 2 - 3) / 2) + 1 = 5
        nn.ReLU(),
        nn.Conv2d(8, 4, (3, 1), padding=(0, 2)),  # 8 x 5 x 5 -> 4 x 3 x 9: rows 5 - 2 = 3, cols 5 + 4 = 9
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4 * 3 * 9, 10),
    )


# conv1: params 8 * 27 + 8 = 224; MACs 8 * 25 outputs * 27 = 5,400
# conv2: params 4 * 24 + 4 = 100; MACs 4 * 27 outputs * 24 = 2,592
# bn: 8 params (weight, bias; buffers are not parameters), no MACs
# linear: params 108 * 10 + 10 = 1,090; MACs 1,080
DENSE = Footprint(params=224 + 100 + 8 + 1090, macs=5400 + 2592 + 1080)


def test_dense_counts():
    assert measure(_small_cnn(), (3, 9, 9)) == DENSE


def test_factorized_counts_at_full_and_active_ranks():
    model = lod.factorize(_small_cnn())
    # full ranks: conv1 min(8, 27) = 8, conv2 min(4, 24) = 4, linear min(10, 108) = 10
    # LoD params r (m + n) + bias; MACs per output position r (m + n)
    conv1 = (8 * (8 + 27) + 8, 25 * 8 * (27 + 8))  # (288, 7,000)
    conv2 = (4 * (4 + 24) + 4, 27 * 4 * (24 + 4))  # (116, 3,024)
    linear = (10 * (108 + 10) + 10, 10 * (108 + 10))  # (1,190, 1,180)
    full = Footprint(conv1[0] + conv2[0] + 8 + linear[0], conv1[1] + conv2[1] + linear[1])
    assert measure(model, (3, 9, 9)) == full
    # active rank 2 on conv1 and 3 on the linear: counted at b, not at the stored rank
    model[0].active_rank, model[5].active_rank = 2, 3
    conv1_b = (2 * 35 + 8, 25 * 2 * 35)
    linear_b = (3 * 118 + 10, 3 * 118)
    assert measure(model, (3, 9, 9)) == Footprint(conv1_b[0] + conv2[0] + 8 + linear_b[0],
                                                  conv1_b[1] + conv2[1] + linear_b[1])
    # the same numbers once physically truncated to those ranks (current ranks)
    model[0].active_rank = model[5].active_rank = None
    lod.truncate(model, {"0": 2, "5": 3})
    assert measure(model, (3, 9, 9)) == Footprint(conv1_b[0] + conv2[0] + 8 + linear_b[0],
                                                  conv1_b[1] + conv2[1] + linear_b[1])
    model[0].active_rank = 0  # rank 0: the bias only, no MACs
    assert measure(model, (3, 9, 9)).macs == conv2[1] + linear_b[1]


def test_to_dense_counts_merged_layers_as_dense():
    model = lod.factorize(_small_cnn())
    lod.truncate(model, {"0": 2, "2": 4, "5": 3})
    lod.to_dense(model)  # conv2: 4 * 28 = 112 >= 96 -> dense again; the others stay factorized
    conv1_b, linear_b = (2 * 35 + 8, 25 * 2 * 35), (3 * 118 + 10, 3 * 118)
    assert measure(model, (3, 9, 9)) == Footprint(conv1_b[0] + 100 + 8 + linear_b[0], conv1_b[1] + 2592 + linear_b[1])


def test_grouped_and_dilated_convs_and_batched_linears():
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False))  # in/groups = 2
    # 4 x 5 x 5 -> 6 x 5 x 5; MACs 150 outputs * 2 * 9; params 6 * 2 * 9 = 108
    assert measure(model, (4, 5, 5)) == Footprint(108, 150 * 18)
    seq = nn.Linear(5, 3)  # a (7, 5) input: 7 rows of 5 -> 3
    assert measure(seq, (7, 5)) == Footprint(18, 7 * 15)
    lod_seq = lod.LoDLinear(5, 3, rank=2)
    assert measure(lod_seq, (7, 5)) == Footprint(2 * 8 + 3, 7 * 2 * 8)


def test_attention_products_are_counted():
    torch.manual_seed(0)
    d, heads, T, S = 8, 2, 3, 5
    attn = MultiHeadAttention(d, heads, dropout=0.0)
    x, memory = torch.randn(1, T, d), torch.randn(1, S, d)
    keep = torch.ones(1, 1, T, S, dtype=torch.bool)
    # projections: Q on T rows, K and V on S rows, O on T rows: (T + S + S + T) d^2
    # products: Q K^T and A V, each T * S * d (heads * d_k = d); LayerNorm: 2 d parameters
    projections = (T + 2 * S + T) * d * d
    products = 2 * T * S * d
    assert measure(attn, example=(x, memory, keep)) == Footprint(4 * d * d + 2 * d, projections + products)
    lod.factorize(attn)
    attn.wq.active_rank = 2  # Q at rank 2: T * 2 (d + d); K, V, O at full rank d: rows * d (d + d)
    expected = T * 2 * (d + d) + (2 * S + T) * d * (d + d) + products
    assert measure(attn, example=(x, memory, keep)).macs == expected


def test_registered_counters_and_shared_parameters():
    class Gram(nn.Module):  # x x^T: B * n * n * d
        def forward(self, x):
            return x @ x.transpose(-2, -1)

    @register_macs(Gram)
    def _gram(m, inputs, output):
        return output.numel() * inputs[0].shape[-1]

    shared = nn.Linear(4, 4, bias=False)
    model = nn.Sequential(shared, shared, Gram())  # the same weight twice: counted once, run twice
    assert measure(model, (3, 4)) == Footprint(16, 2 * (3 * 16) + 3 * 3 * 4)


def test_float64_models_and_subclasses_of_counted_layers():
    # The example takes the parameters' dtype; a subclass of nn.Linear is counted as nn.Linear.
    class MyLinear(nn.Linear):
        pass

    model = lod.factorize(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), MyLinear(3, 2))).double()
    assert measure(model, (4,)) == Footprint(3 * (4 + 3) + 3 + 2 * 3 + 2, 3 * (4 + 3) + 3 * 2)


def test_measure_keeps_the_mode_and_refuses_ambiguous_inputs():
    model = _small_cnn().train()
    measure(model, (3, 9, 9))
    assert model.training and model[3].num_batches_tracked.item() == 0  # ran in eval: no BN update
    with pytest.raises(ValueError, match="exactly one of input_shape"):
        measure(model)
    with pytest.raises(ValueError, match="exactly one of input_shape"):
        measure(model, (3, 9, 9), example=(torch.zeros(1, 3, 9, 9),))
