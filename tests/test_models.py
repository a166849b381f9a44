"""The model zoo: dense footprints against the paper, exact decomposability, the Transformer's
masks and MAC counter, forward/backward at sampled ranks, and ResNet-50's partial decomposition."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from fedmaestro import lod, models
from fedmaestro.footprint import measure
from fedmaestro.models.transformer import PAD_INDEX

ROOT = Path(__file__).resolve().parents[1]
EPS32 = torch.finfo(torch.float32).eps
SMALL_TRANSFORMER = dict(vocab_size=50, d_model=32, heads=4, ffn=64, layers=2, dropout=0.1, max_len=64)

# name -> (build kwargs, input shape without batch; None = the Transformer's token input)
ZOO = {
    "lenet": ({}, (1, 28, 28)),
    "resnet18": ({}, (3, 32, 32)),
    "vgg19": ({}, (3, 32, 32)),
    "resnet50": ({}, (3, 64, 64)),  # 64 x 64 for speed: same layers, fewer positions
    "transformer": (SMALL_TRANSFORMER, None),
}


def _tokens(vocab: int, batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(PAD_INDEX + 1, vocab, (batch, length), generator=g)  # no padding unless added


def _example(name: str, batch: int = 2, seed: int = 0) -> tuple:
    kwargs, shape = ZOO[name]
    if shape is None:
        src, tgt = _tokens(kwargs["vocab_size"], batch, 9, seed), _tokens(kwargs["vocab_size"], batch, 7, seed + 1)
        src[0, -3:] = PAD_INDEX  # a padded source and target: the masks are exercised too
        tgt[-1, -2:] = PAD_INDEX
        return src, tgt
    return (torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed)),)


def _rel(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / scale.abs().max()).item()


_FACTORIZED: dict[str, tuple[nn.Module, nn.Module]] = {}


def _pair(name: str) -> tuple[nn.Module, nn.Module]:
    """(dense, factorized copy) of a zoo model, built once per session (SVD takes seconds)."""
    if name not in _FACTORIZED:
        torch.manual_seed(0)
        dense = models.build(name, **ZOO[name][0]).eval()
        _FACTORIZED[name] = dense, lod.factorize(copy.deepcopy(dense)).eval()
    return _FACTORIZED[name]


def _lod_footprint(dense: nn.Module, example: tuple, skip=()) -> tuple[int, int]:
    """What a full-rank factorization must cost, from the dense model alone: every nn.Linear /
    nn.Conv2d with an (m, n) weight (n = fan-in) becomes r = min(m, n) columns, r (m + n)
    parameters instead of m n, and r (m + n) MACs instead of m n at each output position."""
    positions: dict[str, int] = {}
    targets = {n: m for n, m in dense.named_modules() if type(m) in (nn.Linear, nn.Conv2d)
               and not any(n == s or n.startswith(s + ".") for s in skip)}

    def hook(name):
        def record(module, inputs, output):
            positions[name] = output.numel() // module.weight.shape[0]
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in targets.items()]
    try:
        base = measure(dense, example=tuple(x[:1] for x in example))
    finally:
        for h in handles:
            h.remove()
    params, macs = base.params, base.macs
    for name, m in targets.items():
        out, fan_in = m.weight.shape[0], m.weight[0].numel()
        delta = min(out, fan_in) * (out + fan_in) - out * fan_in
        params += delta
        macs += positions[name] * delta
    return params, macs


# --- dense footprints against the paper --------------------------------------------------------

# name -> (input shape, our exact params, our exact MACs, paper params, paper MACs, params slack, MACs slack).
# Slack: half a unit of the paper's last printed digit, except ResNet-50's MACs (see the comment).
PAPER = {
    "lenet": ((1, 28, 28), 44_426, 281_640, 44_426, 281_640, 0, 0),  # Table 11: exact
    "resnet18": ((3, 32, 32), 11_173_962, 555_422_720, 11.17e6, 0.56e9, 0.005e6, 0.005e9),  # Tables 12, 16
    "vgg19": ((3, 32, 32), 20_035_018, 398_136_320, 20.0e6, 0.40e9, 0.05e6, 0.005e9),  # Tables 2, 13
    # Table 15: 25.56M / 4.12 GMACs. The paper's MAC counter also adds BN, ReLU, pooling and the
    # residual additions (as ptflops does); ours counts weight multiplies only: 0.75 % fewer, and
    # the issue asks for 1 %.
    "resnet50": ((3, 224, 224), 25_557_032, 4_089_184_256, 25.56e6, 4.12e9, 0.005e6, 0.01 * 4.12e9),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_dense_footprint_matches_paper(name):
    shape, params, macs, paper_params, paper_macs, params_slack, macs_slack = PAPER[name]
    torch.manual_seed(0)
    fp = measure(models.build(name), shape)
    assert (fp.params, fp.macs) == (params, macs)
    assert abs(fp.params - paper_params) <= params_slack
    assert abs(fp.macs - paper_macs) <= macs_slack


def _transformer_macs(S: int, T: int, d: int, f: int, V: int, layers: int, rank=None) -> int:
    """Closed form (transformer.py's docstring). ``rank(m, n)``: each m x n weight's MACs per position."""
    w = rank or (lambda m, n: m * n)
    encoder = layers * (4 * w(d, d) + w(f, d) + w(d, f)) * S
    cross_kv = layers * 2 * w(d, d) * S  # the decoder's W_K, W_V read the S memory positions
    decoder = layers * (6 * w(d, d) + w(f, d) + w(d, f)) * T
    attention = layers * 2 * d * (S * S + T * T + T * S)
    return encoder + cross_kv + decoder + d * V * T + attention


def test_transformer_dense_footprint_matches_paper():
    torch.manual_seed(0)
    model = models.build("transformer")
    S = T = 28
    fp = measure(model, example=(_tokens(9521, 1, S, 0), _tokens(9521, 1, T, 1)))
    assert fp.params == 48_978_432  # Table 2: 48.98M, each shared tensor counted once
    assert sum(p.numel() for p in model.parameters()) == fp.params
    # Table 14's 53.9M is the same count with the 9,521 x 512 shared matrix counted twice.
    assert round((fp.params + 9521 * 512) / 1e6, 1) == 53.9
    assert fp.macs == _transformer_macs(S, T, 512, 2048, 9521, 6) == 1_384_069_120
    linear_only = fp.macs - 6 * 2 * 512 * (S * S + T * T + T * S)
    assert round(linear_only / 1e9, 3) == 1.370  # Table 14's GMACs: the linear layers at S = T = 28


def test_transformer_mac_counter_counts_attention_products():
    """Batch 1, S != T; dense, then factorized at full rank (r (m + n) per position), then rank 1."""
    c = SMALL_TRANSFORMER
    d, f, V, L = c["d_model"], c["ffn"], c["vocab_size"], c["layers"]
    dense, factorized = _pair("transformer")
    src, tgt = _tokens(V, 1, 11, 3), _tokens(V, 1, 5, 4)
    assert measure(dense, example=(src, tgt)).macs == _transformer_macs(11, 5, d, f, V, L)
    full = _transformer_macs(11, 5, d, f, V, L, rank=lambda m, n: min(m, n) * (m + n))
    assert measure(factorized, example=(src, tgt)).macs == full
    try:
        for _, layer in lod.layers(factorized):
            layer.active_rank = 1
        assert measure(factorized, example=(src, tgt)).macs == _transformer_macs(11, 5, d, f, V, L, rank=lambda m, n: m + n)
    finally:
        for _, layer in lod.layers(factorized):
            layer.active_rank = None


# --- factorization: same function, LoD footprint ----------------------------------------------

FAST = ["lenet", "resnet18", "vgg19", "transformer"]
ALL = FAST + [pytest.param("resnet50", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", ALL)
def test_factorized_computes_the_dense_function(name):
    """Eval mode, float32. Tolerance: the factorized model must be as close to an exact (float64)
    evaluation of the dense weights as float32 allows. Its error has the same sources as the
    dense float32 model's own (rounding in sums of up to 4,608 products per layer, compounded over
    the depth) plus rounding U and V to float32 and one more matrix product per layer, so we allow
    10x the dense model's own float32 error (measured here, 1e-7 to 2e-6 of the output scale;
    the factorized models sit at 1.0-2.5x of it). A wrong stride, a lost bias, a broken weight tie
    or a bad SVD would be off by O(1)."""
    dense, factorized = _pair(name)
    example = _example(name)
    with torch.no_grad():
        exact = copy.deepcopy(dense).double()(*(x.double() if x.is_floating_point() else x for x in example))
        dense_err = _rel(dense(*example), exact, exact)
        fact_err = _rel(factorized(*example), exact, exact)
    assert fact_err <= 10 * max(dense_err, EPS32), (fact_err, dense_err)


@pytest.mark.parametrize("name", ALL)
def test_factorized_footprint_at_full_rank(name):
    dense, factorized = _pair(name)
    example = _example(name) if name != "resnet50" else (torch.zeros(1, 3, 224, 224),)
    expected = _lod_footprint(dense, example)
    fp = measure(factorized, example=tuple(x[:1] for x in example))
    assert (fp.params, fp.macs) == expected
    assert all(type(m) not in (nn.Linear, nn.Conv2d) for m in factorized.modules())


# --- training at sampled ranks -----------------------------------------------------------------

def _set_ranks(model: nn.Module, pick) -> dict[str, int]:
    ranks = {}
    for name, layer in lod.layers(model):
        layer.active_rank = ranks[name] = pick(layer)
    return ranks


def _backward_at(model: nn.Module, example: tuple, loss_fn, pick) -> dict[str, int]:
    """Forward and backward in train mode at the ranks ``pick(layer)`` chooses; checks that the
    loss and every gradient are finite and that no column beyond a layer's active rank gets one.
    The gradients stay on the model for the caller to inspect."""
    model.train()
    model.zero_grad(set_to_none=True)
    ranks = _set_ranks(model, pick)
    try:
        loss = loss_fn(model(*example))
        assert torch.isfinite(loss), loss
        loss.backward()
        for p in model.parameters():
            assert p.grad is None or torch.isfinite(p.grad).all()
        for name, layer in lod.layers(model):
            b = ranks[name]
            for factor in (layer.u, layer.v):  # None: rank 0, or cut off (a rank-0 W_O silences W_Q, W_K, W_V)
                if factor.grad is not None:
                    assert not factor.grad[b:].any(), f"{name}: gradient beyond active rank {b}"
    finally:
        _set_ranks(model, lambda layer: None)
        model.eval()
    return ranks


def _classification_loss(logits):
    return nn.functional.cross_entropy(logits, torch.arange(logits.shape[0]) % logits.shape[1])


def _translation_loss(logits):
    target = torch.arange(logits.shape[0] * logits.shape[1]) % logits.shape[-1]
    return nn.functional.cross_entropy(logits.flatten(0, 1), target, ignore_index=PAD_INDEX)


def test_resnet18_trains_factorized_at_random_ranks():
    _, factorized = _pair("resnet18")
    g = torch.Generator().manual_seed(0)
    ranks = _backward_at(factorized, _example("resnet18"), _classification_loss,
                         lambda layer: int(torch.randint(0, layer.rank + 1, (), generator=g)))
    assert len(ranks) == 21  # 17 convs, 3 downsample convs, fc
    assert 0 < sum(ranks.values()) < sum(layer.rank for _, layer in lod.layers(factorized))


@pytest.mark.parametrize("choice", ["random", "one", "two", "zero"])
def test_transformer_trains_factorized_at_any_rank(choice):
    """The paper's attention code crashes once its projections are factorized; ours must run
    forward and backward at random active ranks, at small ones, and with every rank at 0."""
    _, factorized = _pair("transformer")
    g = torch.Generator().manual_seed(1)
    pick = {"random": lambda layer: int(torch.randint(0, layer.rank + 1, (), generator=g)),
            "one": lambda layer: 1, "two": lambda layer: 2, "zero": lambda layer: 0}[choice]
    ranks = _backward_at(factorized, _example("transformer"), _translation_loss, pick)
    assert len(ranks) == 2 * 6 + 2 * 10  # encoder: wq wk wv wo w1 w2; decoder: two attentions + w1 w2
    assert factorized.embedding.weight.grad.abs().sum() > 0  # the shared embedding learns at any rank
    grads = {name: (layer.u.grad, layer.v.grad) for name, layer in lod.layers(factorized)}
    if choice == "zero":  # nothing to learn in the factors, but no crash, no NaN
        assert all(u is None and v is None for u, v in grads.values())
    elif choice in ("one", "two"):  # every layer is on a path to the loss: all its active columns learn
        assert all(u[:ranks[n]].abs().sum(1).gt(0).all() and v[:ranks[n]].abs().sum(1).gt(0).all()
                   for n, (u, v) in grads.items())
    else:
        assert sum(u is not None and bool(u.any()) for u, _ in grads.values()) > len(grads) // 2
    factorized.zero_grad(set_to_none=True)


def test_active_rank_changes_the_transformer_output():
    """Sampled ranks are really used: rank-2 attention and feed-forward give other logits."""
    _, factorized = _pair("transformer")
    example = _example("transformer")
    with torch.no_grad():
        full = factorized(*example)
        _set_ranks(factorized, lambda layer: 2)
        try:
            low = factorized(*example)
        finally:
            _set_ranks(factorized, lambda layer: None)
    assert torch.isfinite(low).all()
    assert (full - low).abs().max() > 1e-3 * full.abs().max()


# --- the Transformer's interface, masks and weight sharing ---------------------------------------

def test_transformer_interface_and_tied_embedding():
    dense, factorized = _pair("transformer")
    src, tgt = _example("transformer")
    assert dense(src, tgt).shape == (2, 7, SMALL_TRANSFORMER["vocab_size"])
    for model in (dense, factorized):
        assert model.embedding.padding_idx == PAD_INDEX == 1
        assert not model.embedding.weight[PAD_INDEX].any()
        assert isinstance(model.embedding, nn.Embedding)  # factorize leaves the shared matrix alone
        assert list(model.projection.parameters()) == []  # the output projection reuses it
    # The projection is h E^T / sqrt(d): perturbing E changes the logits of a fixed hidden state.
    h = torch.randn(1, 1, SMALL_TRANSFORMER["d_model"])
    logits = dense.projection(h, dense.embedding.weight)
    torch.testing.assert_close(logits, h @ dense.embedding.weight.T / math.sqrt(SMALL_TRANSFORMER["d_model"]))
    with pytest.raises(ValueError, match="max_len"):
        dense(src, _tokens(SMALL_TRANSFORMER["vocab_size"], 2, SMALL_TRANSFORMER["max_len"] + 1, 0))


def test_transformer_masks():
    """Eval mode. Causal: changing target token t changes no logit before t. Key padding:
    appending padding to the source or the target changes no logit of the real tokens (masked
    keys get weight exp(min - max) = 0 exactly; 1e-6 absorbs the reordered float32 sums)."""
    dense, _ = _pair("transformer")
    V = SMALL_TRANSFORMER["vocab_size"]
    src, tgt = _tokens(V, 2, 6, 10), _tokens(V, 2, 5, 11)
    with torch.no_grad():
        base = dense(src, tgt)
        changed = tgt.clone()
        changed[:, 3] = torch.where(changed[:, 3] == V - 1, PAD_INDEX + 1, changed[:, 3] + 1)  # never the pad
        after = dense(src, changed)
        torch.testing.assert_close(after[:, :3], base[:, :3], rtol=0, atol=1e-6)
        assert (after[:, 3:] - base[:, 3:]).abs().max() > 1e-4
        pad = torch.full((2, 3), PAD_INDEX)
        torch.testing.assert_close(dense(torch.cat([src, pad], 1), tgt), base, rtol=0, atol=1e-6)
        torch.testing.assert_close(dense(src, torch.cat([tgt, pad], 1))[:, :5], base, rtol=0, atol=1e-6)
        # The source really is attended to: another source gives other logits.
        assert (dense(_tokens(V, 2, 6, 12), tgt) - base).abs().max() > 1e-4
        # An all-padding source (every key masked) stays finite.
        assert torch.isfinite(dense(torch.full((2, 4), PAD_INDEX), tgt)).all()


@pytest.mark.slow
def test_full_transformer_factorizes_and_trains():
    """The paper's sizes: 96 LoD layers, the LoD footprint at full rank, the dense function, and a
    backward pass at random active ranks."""
    torch.manual_seed(0)
    dense = models.build("transformer").eval()
    src, tgt = _tokens(9521, 2, 12, 0), _tokens(9521, 2, 10, 1)
    src[0, -4:] = PAD_INDEX
    expected = _lod_footprint(dense, (src, tgt))
    with torch.no_grad():
        exact = copy.deepcopy(dense).double()(src, tgt)
        dense_err = _rel(dense(src, tgt), exact, exact)
    factorized = lod.factorize(copy.deepcopy(dense)).eval()
    assert len(lod.layers(factorized)) == 6 * 6 + 6 * 10
    fp = measure(factorized, example=(src[:1], tgt[:1]))
    assert (fp.params, fp.macs) == expected
    with torch.no_grad():
        assert _rel(factorized(src, tgt), exact, exact) <= 10 * max(dense_err, EPS32)  # as in the test above
    g = torch.Generator().manual_seed(2)
    _backward_at(factorized, (src, tgt), _translation_loss,
                 lambda layer: int(torch.randint(0, layer.rank + 1, (), generator=g)))


# --- ResNet-50: torchvision's layout, partial decomposition --------------------------------------

def test_resnet50_is_torchvisions():
    """Same names and shapes as torchvision.models.resnet50(weights=None) (random init, nothing
    downloaded); with torchvision's weights loaded, the same function (same ops in the same
    order: bit for bit)."""
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None).eval()
    ours = models.build("resnet50").eval()
    theirs = reference.state_dict()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.items()}
    ours.load_state_dict(theirs)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x))


def test_resnet50_partial_skip_keeps_exactly_those_dense():
    skip = models.PARTIAL_SKIP["resnet50"]
    assert OmegaConf.load(ROOT / "conf/model/resnet50_partial.yaml") == OmegaConf.create(
        {"name": "resnet50", "factorize": True, "skip": skip})
    torch.manual_seed(0)
    model = lod.factorize(models.build("resnet50"), skip=skip)
    dense = {n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}
    assert {n.split(".")[0] for n in dense} == {"conv1", "layer1", "layer2", "layer3", "fc"}
    assert {n for n, _ in lod.layers(model)} == {f"layer4.{b}.{c}" for b in range(3) for c in ("conv1", "conv2", "conv3")} \
        | {"layer4.0.downsample.0"}  # conv5_x alone: 10 of the 54 layers
    # Table 4's Pufferfish of this group, 15.2M: layer4 at a quarter of the block's width (512 / 4), the
    # downsample conv at a quarter of its input (1024 / 4), everything else dense
    lod.truncate(model, {n: 256 if "downsample" in n else 128 for n, _ in lod.layers(model)})
    assert round(measure(model, (3, 224, 224)).params / 1e6, 1) == 15.2


# --- construction --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lenet", "resnet18", "vgg19", "resnet50"])
def test_in_channels_and_num_classes(name):
    model = models.build(name, in_channels=1, num_classes=7).eval()
    size = 28 if name == "lenet" else 32
    with torch.no_grad():
        assert model(torch.randn(2, 1, size, size)).shape == (2, 7)


def test_default_class_counts_and_layouts():
    assert models.build("resnet18").fc.out_features == 10
    assert models.build("vgg19").classifier.out_features == 10
    assert models.build("resnet50").fc.out_features == 1000
    vgg = models.build("vgg19")
    convs = [m for m in vgg.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 16 and all(m.kernel_size == (3, 3) and m.bias is None for m in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in vgg.modules()) == 16
    assert vgg.classifier.in_features == 512
    r18 = models.build("resnet18")
    assert r18.conv1.kernel_size == (3, 3) and r18.conv1.stride == (1, 1) and isinstance(r18.maxpool, nn.Identity)


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="resnet50"):
        models.build("resnet51")


def test_lenet_pool_equals_max_pool2d_with_and_without_autograd():
    from fedmaestro.models.lenet import MaxPool2x2

    pool = MaxPool2x2()
    for shape in [(3, 6, 24, 24), (2, 16, 8, 8), (2, 4, 7, 9)]:  # odd sizes floor as max_pool2d does
        x = torch.randn(*shape)
        x[0, 0, :4, :4] = 0.5  # ties: every window's gradient goes to its first maximum, as ATen's
        x[1, 0, :4, :4] = torch.tensor([[1.0, 1, 2, 3], [1, 1, 3, 3], [0, 2, 5, 1], [2, 2, 5, 5]])
        with torch.no_grad():
            assert torch.equal(pool(x), torch.nn.functional.max_pool2d(x, 2))
        xg = x.clone().requires_grad_()
        pool(xg).square().sum().backward()
        ref = x.clone().requires_grad_()
        torch.nn.functional.max_pool2d(ref, 2).square().sum().backward()
        assert torch.equal(xg.grad, ref.grad)
