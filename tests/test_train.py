"""The training step shared by the centralized mode and the clients (fedmaestro/train.py).

Everything runs on small random batches with LeNet-5 (factorized: 5 LoD layers, total rank 236) on
one CPU thread; the whole file takes a few seconds.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmaestro import lod
from fedmaestro import train as train_module
from fedmaestro.config import Config, DatasetConfig, ModelConfig, TrainConfig
from fedmaestro.footprint import measure
from fedmaestro.train import (RankCost, build_model, evaluate, make_optimizer, make_scheduler, recalibrate_batchnorm,
                              resolve_device, task_for, train_epoch)

CPU = torch.device("cpu")
EXAMPLE = (torch.zeros(1, 1, 28, 28),)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def batches(n: int = 6, size: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 28, 28, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def lenet(factorize: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = Config()
    cfg.model.factorize = factorize
    return build_model(cfg)


def test_weight_decay_only_on_weights_and_the_paper_optimizers():
    model = lenet()
    opt = make_optimizer(model, TrainConfig(weight_decay=1e-4, momentum=0.9))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 1e-4 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    assert isinstance(opt, torch.optim.SGD) and decayed["momentum"] == 0.9
    adam = make_optimizer(model, TrainConfig(optimizer="adam", lr=1e-3, betas=[0.9, 0.98]))
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["betas"] == (0.9, 0.98)


def lr_curve(train: TrainConfig, epochs: int) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=train.lr)
    sched = make_scheduler(opt, train)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_multistep_schedule_decays_at_the_milestones():
    lrs = lr_curve(TrainConfig(lr=0.01, milestones=[2, 4], gamma=0.1), 6)
    assert lrs == pytest.approx([0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4])


def test_inverse_sqrt_schedule_warms_up_then_decays():
    lrs = lr_curve(TrainConfig(lr=1.0, warmup_epochs=4, lr_schedule="inverse_sqrt"), 16)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear rise to the peak at the warm-up's end
    assert lrs[15] == pytest.approx(math.sqrt(4 / 16))  # then lr sqrt(W / epoch)
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))


def test_bad_schedule_name_is_refused_by_the_config():
    with pytest.raises(ValueError, match="train.lr_schedule"):
        TrainConfig(lr_schedule="cosine")


def test_rank_cost_counts_the_sampled_submodel_exactly():
    model = lenet()
    lod.truncate(model, {"fc1": 50, "fc2": 40})  # not at full rank: the coefficients must follow the ranks
    cost = RankCost(model, EXAMPLE)
    full = measure(model, example=EXAMPLE)
    sampler = lod.RankSampler(model, "per_layer", seed=1)
    expected_macs = expected_params = 0
    for _ in range(25):
        sampler.step()
        now = measure(model, example=EXAMPLE)  # measure honours the active ranks
        cost.add_step(8)
        expected_macs += 8 * now.macs
        expected_params += now.params
    assert cost.macs == expected_macs and cost.params == expected_params
    assert cost.stored_params == 25 * full.params  # held and updated: every layer at its current rank
    cost.add_step(8, full_pass=True)  # the "w/ full-training" ablation pays a full-rank pass on top
    assert cost.macs == expected_macs + 8 * (measure(model, example=EXAMPLE).macs + full.macs)


def test_rank_cost_counts_a_layer_called_twice_in_a_forward_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(10, 10), nn.Linear(10, 2)

        def forward(self, x):
            return self.out(self.fc(self.fc(x)))

    model, example = lod.factorize(Twice()), (torch.zeros(1, 10),)
    cost = RankCost(model, example)
    dict(lod.layers(model))["fc"].active_rank = 3
    cost.add_step(1)
    assert cost.macs == measure(model, example=example).macs == 144  # 284 when the second call overwrote the first


def test_training_cost_at_full_rank_matches_table_11_params():
    # Table 11, lambda = 0: 1.49x parameters in training = the full-rank factorized LeNet over the dense one.
    cost = RankCost(lenet(), EXAMPLE)
    cost.add_step(1)
    assert cost.stored_params / measure(lenet(False), (1, 28, 28)).params == pytest.approx(66274 / 44426)


@pytest.mark.parametrize("clip, fix", [(None, "set train.grad_clip"), (0.5, r"lower train.grad_clip \(now 0.5\)")])
def test_a_diverged_epoch_names_the_learning_rate_and_the_clip_to_lower(clip, fix):
    model = lenet()
    t = TrainConfig(lr=1e9, momentum=0.0, grad_clip=clip, sampler="none")
    with pytest.raises(FloatingPointError, match=rf"training loss is (nan|inf); lower train.lr \(now 1e\+09\) or {fix}$"):
        train_epoch(model, batches(4), make_optimizer(model, t), t, task_for("fashion_mnist"), CPU)


def test_subgradient_penalty_changes_the_step():
    data = batches(3)
    plain, penalized = lenet(), lenet()
    for model, lam in ((plain, 0.0), (penalized, 1e-2)):
        t = TrainConfig(lambda_gl=lam, sampler="none")
        train_epoch(model, data, make_optimizer(model, t), t, task_for("fashion_mnist"), CPU)
    # same data, same init: the only difference is lambda * grad(HGL), which pulls every factor to zero
    diff = [(a - b).abs().max().item() for a, b in zip(plain.parameters(), penalized.parameters())]
    assert max(diff) > 1e-4
    assert lod.hgl_penalty(penalized) < lod.hgl_penalty(plain)


def test_proximal_mode_zeroes_tails_exactly_and_subgradient_does_not():
    data = batches(6)
    zeros = {}
    for mode in ("proximal", "subgradient"):
        model = lenet()
        t = TrainConfig(lambda_gl=2.0, hgl_mode=mode, lr=0.01)
        train_epoch(model, data, make_optimizer(model, t), t, task_for("fashion_mnist"), CPU,
                    sampler=lod.RankSampler(model, "per_layer", seed=0))
        zeros[mode] = 0
        for _, layer in lod.layers(model):
            zero = (layer.u.detach().abs().sum(1) == 0).tolist()  # (rank,) columns of U that are exactly 0
            zeros[mode] += sum(zero)
            if mode == "proximal":  # nested groups: what the prox zeroes is a tail, never a hole
                assert zero == sorted(zero), zero
    # threshold lr * lambda = 0.02 per step against fc tail columns of norm ~0.4 (SVD init): over 6 steps
    # the nested soft-thresholds zero ~90 columns (measured); a subgradient step never lands on 0.0
    assert zeros["proximal"] > 50, zeros
    assert zeros["subgradient"] == 0, zeros


def test_train_epoch_resets_active_ranks_and_reports():
    model = lenet()
    t = TrainConfig(lambda_gl=1e-4)
    stats = train_epoch(model, batches(4), make_optimizer(model, t), t, task_for("fashion_mnist"), CPU,
                        sampler=lod.RankSampler(model, "per_layer", seed=0), on_step=lambda n: steps.append(n))
    assert all(layer.active_rank is None for _, layer in lod.layers(model))
    assert stats["steps"] == 4 and stats["num_examples"] == 128 and math.isfinite(stats["loss"])


steps: list[int] = []


def test_on_step_is_called_after_every_step():
    steps.clear()
    model = lenet()
    t = TrainConfig()
    train_epoch(model, batches(3), make_optimizer(model, t), t, task_for("fashion_mnist"), CPU, on_step=steps.append)
    assert steps == [1, 2, 3]


def test_full_pass_self_distillation_trains_the_full_rank_model_too():
    data = batches(4)
    t_plain, t_full = TrainConfig(sampler="per_layer"), TrainConfig(sampler="per_layer", full_pass=True)
    results = {}
    for name, t in (("plain", t_plain), ("full", t_full)):
        model = lenet()
        cost = RankCost(model, EXAMPLE)
        train_epoch(model, data, make_optimizer(model, t), t, task_for("fashion_mnist"), CPU,
                    sampler=lod.RankSampler(model, "per_layer", seed=0), cost=cost)
        results[name] = (cost.macs, evaluate(model, [data[0]], task_for("fashion_mnist"), CPU)["loss"])
    # the full pass costs one full-rank forward per example more (~the paper's 2x in Table 5)
    assert results["full"][0] > 1.8 * results["plain"][0]
    assert results["full"][1] != results["plain"][1]
    # without rank sampling the full pass would be the same network as the trained one: it is skipped
    for mode in (None, "fixed"):
        outcome = []
        for t in (TrainConfig(sampler="per_layer"), TrainConfig(sampler="per_layer", full_pass=True)):
            model = lenet()
            cost = RankCost(model, EXAMPLE)
            sampler = lod.RankSampler(model, mode, seed=0) if mode else None
            train_epoch(model, data, make_optimizer(model, t), t, task_for("fashion_mnist"), CPU, sampler=sampler,
                        cost=cost)
            outcome.append((cost.macs, evaluate(model, [data[0]], task_for("fashion_mnist"), CPU)["loss"]))
        assert outcome[0] == outcome[1]


@pytest.mark.parametrize("distill_weight", [1.0, 0.0, 2.5])
def test_full_pass_step_is_the_gradient_of_both_losses_and_the_distillation(distill_weight):
    """One step of train_epoch with full_pass equals SGD on CE(sampled) + CE(full rank) + w KL(full || sampled),
    written out by hand here (the full-rank logits are the teacher: no gradient through them in the KL)."""
    batch = batches(1)[0]
    t = TrainConfig(sampler="per_layer", full_pass=True, distill_weight=distill_weight, momentum=0.0, lr=0.1,
                    weight_decay=0.0, lambda_gl=0.0)
    model, reference = lenet(), lenet()
    train_epoch(model, [batch], make_optimizer(model, t), t, task_for("fashion_mnist"), CPU,
                sampler=lod.RankSampler(model, "per_layer", seed=3))
    sampler = lod.RankSampler(reference, "per_layer", seed=3)
    sampler.step()  # the same draw as inside train_epoch
    active = {n: layer.active_rank for n, layer in lod.layers(reference)}
    assert any(b is not None and b < layer.rank for (_, layer), b in zip(lod.layers(reference), active.values()))
    x, y = batch
    reference.train()
    with lod.full_rank(reference):
        teacher = reference(x)
    student = reference(x)
    kl = F.kl_div(F.log_softmax(student, -1), F.softmax(teacher.detach(), -1), reduction="batchmean")
    objective = F.cross_entropy(student, y) + F.cross_entropy(teacher, y) + distill_weight * kl
    grads = torch.autograd.grad(objective, list(reference.parameters()))
    with torch.no_grad():
        for p, g in zip(reference.parameters(), grads):
            p -= t.lr * g
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_nan_loss_raises_with_a_fix():
    model = lenet()
    t = TrainConfig(lr=1e30)  # diverges within a few steps
    with pytest.raises(FloatingPointError, match="lower train.lr"):
        train_epoch(model, batches(6), make_optimizer(model, t), t, task_for("fashion_mnist"), CPU)


def test_evaluate_uses_all_columns_whatever_the_active_ranks():
    model, data = lenet(), batches(2)
    reference = evaluate(model, data, task_for("fashion_mnist"), CPU)
    for _, layer in lod.layers(model):
        layer.active_rank = 1
    assert evaluate(model, data, task_for("fashion_mnist"), CPU) == reference
    assert all(layer.active_rank == 1 for _, layer in lod.layers(model))  # restored afterwards


def test_batchnorm_recalibration_matches_the_data_statistics():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    lod.factorize(model)
    data = [(x * 3 + 2, y) for x, y in batches(4)]
    assert recalibrate_batchnorm(model, data, task_for("fashion_mnist"), CPU)
    with torch.no_grad():
        z = model[0](torch.cat([x for x, _ in data]))  # (N, 4, 26, 26): what BN sees
    # cumulative average of per-batch means over 4 equal batches = the mean over all of them
    torch.testing.assert_close(model[1].running_mean, z.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert model[1].momentum == 0.1  # restored
    assert not recalibrate_batchnorm(lenet(), data, task_for("fashion_mnist"), CPU)  # no BN: nothing to do


def test_resolve_device():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device=auto or device=cpu"):
            resolve_device("cuda")


def test_skip_last_keeps_the_output_layer_dense_or_says_there_is_none():
    model = build_model(Config(model=ModelConfig(name="lenet", skip_last=True)))
    assert [n for n, _ in lod.layers(model)] == ["conv1", "conv2", "fc1", "fc2"]
    assert type(model.fc3) is nn.Linear
    with pytest.raises(ValueError, match="model.skip_last=true but transformer has no output layer to keep dense"):
        build_model(Config(model=ModelConfig(name="transformer", skip_last=True),
                           dataset=DatasetConfig(name="multi30k", input_shape=[])))


@pytest.mark.parametrize("model, dataset, shape, classes, message", [
    ("lenet", "cifar10", [3, 32, 32], 10, r"model.name=lenet does not fit dataset=cifar10: it cannot take the data "
                                          r"set's examples of shape \[3, 32, 32\] .*pick a model for this data set"),
    ("transformer", "fashion_mnist", [1, 28, 28], 10, r"the transformer translates \(dataset=multi30k\)"),
    ("resnet18", "multi30k", [], 0, r"model.name=resnet18 does not fit dataset=multi30k"),
    ("lenet", "synthetic", [6], 0, r"dataset=synthetic is the linear-regression data of the theory experiments "
                                   r"\(mode=theory\) and of the library"),
])
def test_a_model_that_does_not_fit_the_data_set_is_refused_when_built(model, dataset, shape, classes, message):
    cfg = Config(model=ModelConfig(name=model), dataset=DatasetConfig(name=dataset, input_shape=shape,
                                                                      num_classes=classes))
    with pytest.raises(ValueError, match=message):
        build_model(cfg)


def test_the_fit_check_leaves_batchnorm_statistics_and_the_training_mode_alone():
    cfg = Config(model=ModelConfig(name="resnet18", factorize=False),
                 dataset=DatasetConfig(name="cifar10", input_shape=[3, 32, 32], num_classes=10))
    train_module._FITTING.clear()  # checked afresh, not skipped as already seen in this process
    model = build_model(cfg)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert model.training and all(int(m.num_batches_tracked) == 0 and not m.running_mean.any() for m in norms)


def test_translation_evaluation_reports_the_perplexity_of_the_target_tokens():
    """Perplexity (the paper's Transformer metric): exp of the mean NLL per non-padding target token, without
    label smoothing. A model that puts probability 1/2 on the right token and spreads the rest evenly over the
    other 7 of 8 tokens has NLL ln 2 per token: perplexity 2, whatever the smoothing and the padding."""
    from fedmaestro.models.transformer import PAD_INDEX

    vocab = 8

    tgt = torch.tensor([[2, 3, 4, 5, 6], [2, 5, 7, PAD_INDEX, PAD_INDEX]])  # padding is never scored
    right = tgt[:, 1:].clamp(max=vocab - 1)  # the token each position must predict

    class Half(nn.Module):
        def forward(self, src, tgt_in):
            logits = torch.full((*tgt_in.shape, vocab), math.log(0.5 / (vocab - 1)))
            return logits.scatter(-1, right.unsqueeze(-1), math.log(0.5))

    batch = (torch.zeros(2, 3, dtype=torch.long), tgt)
    for smoothing in (0.0, 0.1):
        out = evaluate(Half(), [batch], task_for("multi30k", smoothing), CPU)
        assert out["perplexity"] == pytest.approx(2.0, rel=1e-6) and out["scored"] == 4 + 2
    assert "perplexity" not in evaluate(lenet(), batches(1), task_for("fashion_mnist"), CPU)


def test_the_translation_training_loss_is_the_mean_over_target_tokens_as_the_test_loss_is():
    """Batch 1: one sentence of 4 target tokens at probability 1/2 (NLL ln 2 each); batch 2: one of 1 token at
    1/8 (ln 8). Per token: (4 ln 2 + 3 ln 2) / 5; weighting each batch's mean by its sentences gave 2 ln 2."""
    vocab = 8

    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = nn.Parameter(torch.zeros(()))  # the optimizer needs a parameter; its gradient is 0

        def forward(self, src, tgt_in):
            logits = torch.zeros(*tgt_in.shape, vocab) + 0 * self.unused  # uniform: 1/8
            if tgt_in.shape[1] == 4:
                logits[0, torch.arange(4), torch.tensor([3, 4, 5, 6])] = math.log(7.0)  # 7 / (7 + 7) = 1/2
            return logits

    model, t = Fixed(), TrainConfig(sampler="none", lambda_gl=0.0)
    batches_ = [(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[2, 3, 4, 5, 6]])),
                (torch.zeros(1, 3, dtype=torch.long), torch.tensor([[2, 5]]))]
    stats = train_epoch(model, batches_, make_optimizer(model, t), t, task_for("multi30k"), CPU)
    assert stats["loss"] == pytest.approx(7 / 5 * math.log(2), rel=1e-6) and stats["num_examples"] == 2


def test_a_step_the_grad_scaler_skips_skips_the_proximal_step_too():
    class SkippingScaler:  # what GradScaler does on inf/NaN gradients: no optimizer step, a lower scale
        def __init__(self):
            self.scale_value = 2.0 ** 16

        def scale(self, loss):
            return loss

        def unscale_(self, optimizer):
            pass

        def step(self, optimizer):
            pass

        def update(self):
            self.scale_value /= 2

        def get_scale(self):
            return self.scale_value

    model = lenet()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = TrainConfig(lambda_gl=10.0, hgl_mode="proximal", lr=0.1)  # a prox this strong would zero whole tails
    train_epoch(model, batches(2), make_optimizer(model, t), t, task_for("fashion_mnist"), CPU,
                sampler=lod.RankSampler(model, "per_layer", seed=0), scaler=SkippingScaler())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_multistep_warms_up_linearly_then_decays_at_the_milestones():
    lrs = lr_curve(TrainConfig(lr=0.1, warmup_epochs=4, milestones=[6], gamma=0.1), 8)
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.01, 0.01])


def test_inverse_sqrt_without_warm_up_decays_from_the_first_epoch():
    lrs = lr_curve(TrainConfig(lr=1.0, warmup_epochs=0, lr_schedule="inverse_sqrt"), 4)
    assert lrs == pytest.approx([1.0, 1 / math.sqrt(2), 1 / math.sqrt(3), 0.5])


def test_the_lasso_stops_when_the_model_reaches_the_stop_size_exactly():
    t = TrainConfig(lambda_gl=0.1, lambda_stop_params=0.5, sampler="per_layer")
    assert train_module.lasso_schedule(t, 0.5, 0) == (0.0, "per_layer")
    assert train_module.lasso_schedule(t, 0.5001, 0) == (0.1, "per_layer")
    t.finetune_after_stop = True
    assert train_module.lasso_schedule(t, 0.5, 0) == (0.0, "fixed")


def test_the_lasso_starts_after_its_warm_up_epochs_and_the_stop_still_ends_it():
    t = TrainConfig(lambda_gl=0.1, lambda_warmup=2, sampler="per_layer")
    assert [train_module.lasso_schedule(t, None, e) for e in range(4)] == \
        [(0.0, "per_layer"), (0.0, "per_layer"), (0.1, "per_layer"), (0.1, "per_layer")]  # ranks sampled throughout
    t = TrainConfig(lambda_gl=0.1, lambda_warmup=2, lambda_stop_params=0.5, finetune_after_stop=True)
    assert train_module.lasso_schedule(t, 0.6, 1) == (0.0, "per_layer")  # warming up: lambda 0, still sampling
    assert train_module.lasso_schedule(t, 0.6, 2) == (0.1, "per_layer")
    assert train_module.lasso_schedule(t, 0.5, 1) == (0.0, "fixed")  # at the target already: the fine-tuning
    assert train_module.lasso_schedule(TrainConfig(lambda_gl=0.1), None, 0) == (0.1, "per_layer")  # no warm-up


def test_losses_smooth_the_labels_and_skip_padding():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(8, 10, generator=g), torch.randint(0, 10, (8,), generator=g)
    smoothed = train_module.Task("classification", 0.1).loss(logits, labels)
    assert smoothed == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.1).item())
    assert smoothed != pytest.approx(F.cross_entropy(logits, labels).item())
    # translation: the padding positions of the targets count for nothing
    out, tgt = torch.randn(2, 5, 7, generator=g), torch.randint(1, 7, (2, 5), generator=g)
    tgt[0, 3:] = train_module.PAD_INDEX
    keep = tgt != train_module.PAD_INDEX
    expected = F.cross_entropy(out[keep], tgt[keep])
    assert train_module.Task("translation").loss(out, tgt).item() == pytest.approx(expected.item())


class TinyTranslator(nn.Module):
    def __init__(self, vocab: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, 4)
        self.proj = lod.LoDLinear(4, vocab)

    def forward(self, src, tgt_in):
        return self.proj(self.emb(tgt_in))


def translation_batch():
    tgt = torch.tensor([[2, 3, 4, 5, 6], [2, 5, 7, train_module.PAD_INDEX, train_module.PAD_INDEX]])  # 4 + 2 tokens
    return torch.zeros(2, 3, dtype=torch.long), tgt


def test_a_summed_loss_weighs_the_lasso_against_every_target_token():
    """loss_reduction=sum (the paper's Transformer code): one SGD step is the gradient of the label-smoothed
    cross-entropy summed over the non-padding target tokens + lambda HGL, written out by hand here; the
    reported loss stays the mean per token."""
    Tiny = TinyTranslator
    torch.manual_seed(0)
    model = Tiny()
    reference = Tiny()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    reference.load_state_dict(init)
    batch = translation_batch()
    tgt = batch[1]
    t = TrainConfig(loss_reduction="sum", lambda_gl=0.05, label_smoothing=0.1, momentum=0.0, lr=0.1,
                    weight_decay=0.0)
    stats = train_epoch(model, [batch], make_optimizer(model, t), t, task_for("multi30k", 0.1), CPU)
    out, y = reference(batch[0], tgt[:, :-1]), tgt[:, 1:]
    keep = y != train_module.PAD_INDEX  # 4 + 2 tokens
    summed = F.cross_entropy(out[keep], y[keep], label_smoothing=0.1, reduction="sum")
    grads = torch.autograd.grad(summed + 0.05 * lod.hgl_penalty(reference), list(reference.parameters()))
    with torch.no_grad():
        for p, g in zip(reference.parameters(), grads):
            p -= t.lr * g
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    assert stats["loss"] == pytest.approx(summed.item() / 6, rel=1e-5)
    mean_model = Tiny()
    mean_model.load_state_dict(init)
    t_mean = TrainConfig(**{**vars(t), "loss_reduction": "mean"})  # the default: the data term's step is 1/6 as long
    train_epoch(mean_model, [batch], make_optimizer(mean_model, t_mean), t_mean, task_for("multi30k", 0.1), CPU)
    assert not torch.allclose(mean_model.emb.weight, model.emb.weight, atol=1e-4)
    with pytest.raises(ValueError, match="train.loss_reduction"):
        TrainConfig(loss_reduction="token")


def test_a_summed_loss_reaches_the_grad_scaler_at_the_size_of_the_mean():
    """Under mixed precision the scaler multiplies what it is given by 2^16: the sum over ~3,000 target tokens
    would overflow float16 gradients and skip steps, so the summed loss's gradient is the mean's (+ lambda / n
    HGL) scaled by n after the backward pass."""
    class RecordingScaler(_SteppingScaler):  # one that notes what it was asked to scale (and scales by 1)
        def __init__(self):
            self.scaled = []

        def scale(self, loss):
            self.scaled.append(float(loss.detach()))
            return loss

    torch.manual_seed(0)
    model, scaler = TinyTranslator(), RecordingScaler()
    x, tgt = translation_batch()
    with torch.no_grad():
        out, y = model(x, tgt[:, :-1]), tgt[:, 1:]
        keep = y != train_module.PAD_INDEX
        mean = F.cross_entropy(out[keep], y[keep]).item() + 0.05 / 6 * lod.hgl_penalty(model).item()
    t = TrainConfig(loss_reduction="sum", lambda_gl=0.05, momentum=0.0, lr=0.1)
    train_epoch(model, [(x, tgt)], make_optimizer(model, t), t, task_for("multi30k"), CPU, scaler=scaler)
    assert scaler.scaled == [pytest.approx(mean, rel=2e-2)]  # (CPU autocast: bfloat16 matmuls)


def test_gradients_are_clipped_to_the_configured_norm():
    data = batches(1)
    t = TrainConfig(lr=1.0, momentum=0.0, weight_decay=0.0, sampler="none", grad_clip=0.1)
    model = lenet()
    raw = lenet()  # the same model, its gradient unclipped
    loss = F.cross_entropy(raw(data[0][0]), data[0][1])
    loss.backward()
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in raw.parameters()])) > 0.2  # 0.33
    before = [p.detach().clone() for p in model.parameters()]
    train_epoch(model, data, make_optimizer(model, t), t, task_for("fashion_mnist"), CPU)
    step = torch.linalg.vector_norm(torch.stack([(p - b).norm() for p, b in zip(model.parameters(), before)]))
    assert step.item() == pytest.approx(0.1, rel=1e-4)  # lr 1: the step is the clipped gradient


class _SteppingScaler:
    """A GradScaler whose step went through: the optimizer steps, the scale stays."""

    def scale(self, loss):
        return loss

    def unscale_(self, optimizer):
        pass

    def step(self, optimizer):
        optimizer.step()

    def update(self):
        pass

    def get_scale(self):
        return 2.0 ** 16


def test_a_step_the_grad_scaler_takes_is_followed_by_the_proximal_step():
    model = lenet()
    t = TrainConfig(lambda_gl=10.0, hgl_mode="proximal", lr=0.1)
    train_epoch(model, batches(1), make_optimizer(model, t), t, task_for("fashion_mnist"), CPU,
                sampler=lod.RankSampler(model, "none", seed=0), scaler=_SteppingScaler())
    assert any(bool((layer.u.detach() == 0).all(dim=0).any()) for _, layer in lod.layers(model))


def test_the_proximal_threshold_follows_the_scheduled_learning_rate():
    model = lenet()
    t = TrainConfig(lambda_gl=10.0, hgl_mode="proximal", lr=0.1)
    opt = make_optimizer(model, t)
    for group in opt.param_groups:  # the schedule's rate this epoch: 0 (no step, so no shrinkage either)
        group["lr"] = 0.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_epoch(model, batches(2), opt, t, task_for("fashion_mnist"), CPU)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_settings_without_effect_are_named():
    from fedmaestro.train import unused_settings
    (notice,) = unused_settings(TrainConfig(amp=True), "cpu")
    assert "train.amp=true: mixed precision is for CUDA; device=cpu trains on the CPU, in float32" in notice
    assert unused_settings(TrainConfig(), "cpu") == []
    assert (unused_settings(TrainConfig(amp=True), "auto") == []) == torch.cuda.is_available()
    assert unused_settings(TrainConfig(optimizer="adam", momentum=0.5), "cpu") == [
        "train.momentum=0.5 is SGD's; Adam uses train.betas=[0.9, 0.98]"]
    assert unused_settings(TrainConfig(betas=[0.8, 0.9]), "cpu") == [
        "train.betas=[0.8, 0.9] are Adam's; SGD uses train.momentum=0.9"]
    assert unused_settings(TrainConfig(optimizer="adam", lr_schedule="inverse_sqrt", gamma=0.5), "cpu") == [
        "train.gamma=0.5 multiplies the LR at train.milestones, and there are none (lr_schedule=inverse_sqrt)"]
    # the paper's recipes set only what their optimizer and schedule read
    assert unused_settings(TrainConfig(optimizer="adam", betas=[0.9, 0.98], lr_schedule="inverse_sqrt"), "cpu") == []
    assert unused_settings(TrainConfig(momentum=0.9, gamma=0.2, milestones=[30, 60]), "cpu") == []


