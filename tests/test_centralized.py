"""The centralized mode (fedmaestro/centralized.py): records, shrinking, the dense baseline, resume,
checkpoints, and one run through the real Hydra config.

Most tests train LeNet-5 on a tiny in-memory data set (10 classes, each a fixed random 28x28 pattern
plus noise: learnable in a few steps) on one CPU thread; the Hydra test reads 256 Fashion-MNIST
images. Apart from the tests marked slow (subprocesses, ResNet-18), the file takes under a minute.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmaestro import centralized, checkpoint, data, lod
from fedmaestro.centralized import TIME_FIELDS, Trainer, load_model
from fedmaestro.data import unaugmented
from fedmaestro.config import Config, DataConfig, DatasetConfig, ModelConfig, TrainConfig, to_dict
from fedmaestro.data.memory import NORMALIZATION
from fedmaestro.train import evaluate, recalibrate_batchnorm

DENSE_LENET_PARAMS = 44_426  # Table 11
DESIGN_FIELDS = ("epoch", "accuracy", "loss", "params", "macs", "ranks", "wall_s")  # DESIGN.md, a record


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def patterns(n: int, seed: int, train: bool = True, augment: bool = False) -> data.InMemoryDataset:
    """n images of 10 classes: class c is a fixed random black/white pattern (the same for every seed) + noise."""
    protos = 255.0 * (torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(123)) > 0.5)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = (protos[y] + 30 * torch.randn(n, 1, 28, 28, generator=g)).clamp(0, 255).to(torch.uint8)
    return data.InMemoryDataset(x, y, train=train, name="fashion_mnist", norm=NORMALIZATION["fashion_mnist"],
                                augment=augment)


DATASETS = (patterns(256, 0), patterns(128, 1, train=False))


def tiny(**train) -> Config:
    t = dict(epochs=3, batch_size=32, lr=0.05, lambda_gl=1e-3, eps_ps=1e-4, sampler="per_layer")
    t.update(train)
    return Config(mode="centralized", device="cpu", progress=False, model=ModelConfig(name="lenet"),
                  dataset=DatasetConfig(name="fashion_mnist", input_shape=[1, 28, 28], num_classes=10),
                  train=TrainConfig(**t))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_times(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in records]


def test_records_follow_the_design_schema_and_match_metrics_jsonl(tmp_path):
    trainer = Trainer(tiny(lambda_gl=3e-2, eps_ps=3e-2), tmp_path, DATASETS)  # a lasso that shrinks in 3 epochs
    ranks_after = []  # every layer's rank at the end of each epoch (after its shrink)
    records = trainer.fit(show_progress=False, on_epoch=lambda r: ranks_after.append(
        {n: layer.rank for n, layer in lod.layers(trainer.model)}) or False)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert read_jsonl(tmp_path / "metrics.jsonl") == records
    assert [r["ranks"] for r in records] == ranks_after and ranks_after[0] != ranks_after[-1]  # it shrank
    for r in records:
        assert set(DESIGN_FIELDS) <= set(r)
        assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["loss"]) and r["wall_s"] > 0
        assert r["total_rank"] == sum(r["ranks"].values())
        assert r["params_deployed"] <= r["params"]  # merging to dense is only done where cheaper
        assert r["params_rel"] == pytest.approx(r["params_deployed"] / DENSE_LENET_PARAMS)
    assert [r["wall_s"] for r in records] == sorted(r["wall_s"] for r in records)
    # LeNet-5 sits on a plateau for its first ~100 steps at this rate: the loss falls, accuracy may not yet
    assert records[-1]["train_loss"] < records[0]["train_loss"] < math.log(10) + 0.1
    # the first epoch at full rank costs 66,274 / 44,426 = 1.49x parameters (Table 11, lambda = 0)
    assert records[0]["train_params_rel"] == pytest.approx(66_274 / DENSE_LENET_PARAMS)


def test_shrinking_cuts_parameters_and_keeps_the_optimizer_state(tmp_path, monkeypatch):
    real_shrink, seen = lod.shrink, []

    def spy(model, eps, optimizer=None):
        assert optimizer is trainer.optimizer, "the trainer must hand its optimizer to lod.shrink"
        before = {id(p): optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()
                  if p in optimizer.state}
        ranks = real_shrink(model, eps, optimizer)
        for name, layer in lod.layers(model):
            for p in (layer.u, layer.v):
                buf = optimizer.state[p]["momentum_buffer"]
                assert buf.shape == p.shape  # cut with the parameter ...
                assert torch.equal(buf, before[id(p)][: p.shape[0]])  # ... and kept, not reset
        seen.append(ranks)
        return ranks

    monkeypatch.setattr(lod, "shrink", spy)
    # the exact proximal step zeroes tails, so a few steps are enough to shrink
    trainer = Trainer(tiny(epochs=2, hgl_mode="proximal", lambda_gl=2.0, eps_ps=1e-6), tmp_path, DATASETS)
    full = trainer.footprint_record()
    records = trainer.fit(show_progress=False)
    assert len(seen) == 2
    assert records[-1]["total_rank"] < full["total_rank"]
    assert records[-1]["params"] < full["params"] and records[0]["params"] < full["params"]
    assert records[-1]["ranks"] == seen[-1]


def test_no_shrinking_when_disabled(tmp_path):
    trainer = Trainer(tiny(epochs=1, hgl_mode="proximal", lambda_gl=2.0, eps_ps=1e-6, shrink=False), tmp_path,
                      DATASETS)
    record = trainer.fit(show_progress=False)[-1]
    assert record["total_rank"] == 236 and record["params"] == 66_274


def test_lambda_stops_once_the_params_target_is_reached(tmp_path):
    # a strong lasso brings the deployed params below 0.995x dense after epoch 2; from then on lambda is 0
    stop = Trainer(tiny(lambda_gl=0.2, eps_ps=0.05, lambda_stop_params=0.995), tmp_path / "stop",
                   DATASETS).fit(show_progress=False)
    assert [r["lambda_gl"] for r in stop] == [0.2, 0.2, 0.0]
    assert stop[0]["params_rel"] > 0.995 >= stop[1]["params_rel"]
    going = Trainer(tiny(lambda_gl=0.2, eps_ps=0.05), tmp_path / "on", DATASETS).fit(show_progress=False)
    assert [r["lambda_gl"] for r in going] == [0.2] * 3
    assert without_times(going[:2]) == without_times(stop[:2])
    assert going[-1]["params"] < stop[-1]["params"]  # the lasso kept cutting where it was not stopped
    with pytest.raises(ValueError, match=r"train.lambda_stop_params=1.5 is invalid"):
        tiny(lambda_stop_params=1.5)


def test_the_lasso_waits_for_its_warm_up_epochs(tmp_path):
    warm = Trainer(tiny(lambda_gl=0.2, eps_ps=0.05, lambda_warmup=1), tmp_path / "warm",
                   DATASETS).fit(show_progress=False)
    assert [(r["lambda_gl"], r["sampler"]) for r in warm] == [(0.0, "per_layer"), (0.2, "per_layer"), (0.2, "per_layer")]
    plain = Trainer(tiny(lambda_gl=0.0, eps_ps=0.05), tmp_path / "plain", DATASETS).fit(show_progress=False)
    assert without_times(warm[:1]) == without_times(plain[:1])  # the first epoch: no lasso at all
    assert warm[1]["params"] < plain[1]["params"]  # then the lasso cuts
    with pytest.raises(ValueError, match=r"train.lambda_warmup=3 is invalid: leaves no epoch with the lasso "
                                         r"\(train.epochs=3\): lower it below train.epochs"):
        tiny(lambda_warmup=3)
    with pytest.raises(ValueError, match=r"train.lambda_warmup=-1 is invalid: must be an int >= 0"):
        tiny(lambda_warmup=-1)


def test_finetuning_after_the_lasso_stops_trains_without_rank_sampling(tmp_path, monkeypatch):
    cfg = tiny(lambda_gl=0.2, eps_ps=0.05, lambda_stop_params=0.995, finetune_after_stop=True)
    trainer = Trainer(cfg, tmp_path / "ft", DATASETS)
    steps = []
    sample = trainer.sampler.step
    monkeypatch.setattr(trainer.sampler, "step", lambda: (steps.append(trainer.epoch), sample()))
    cut = set()  # (epoch, layer) of every training forward pass that ran a layer below its rank
    for name, layer in lod.layers(trainer.model):
        layer.register_forward_pre_hook(
            lambda m, _, name=name: cut.add((trainer.epoch, name)) if m.training and m.active_rank else None)
    ft = trainer.fit(show_progress=False)
    assert [(r["lambda_gl"], r["sampler"]) for r in ft] == [(0.2, "per_layer"), (0.2, "per_layer"), (0.0, "fixed")]
    per_epoch = [steps.count(e) for e in range(3)]
    assert per_epoch[0] == per_epoch[1] > 0 == per_epoch[2]  # the third epoch never sampled ranks
    assert {e for e, _ in cut} == {0, 1}  # ... and trained every layer at all of its columns
    stop = Trainer(tiny(lambda_gl=0.2, eps_ps=0.05, lambda_stop_params=0.995), tmp_path / "stop",
                   DATASETS).fit(show_progress=False)
    assert [r["sampler"] for r in stop] == ["per_layer"] * 3
    assert without_times(ft[:2]) == without_times(stop[:2]) and ft[2]["train_loss"] != stop[2]["train_loss"]
    with pytest.raises(ValueError, match=r"train.finetune_after_stop=True is invalid: needs train.lambda_stop_params"):
        tiny(finetune_after_stop=True)


def test_dense_baseline_trains_through_the_same_loop(tmp_path):
    cfg = tiny(lambda_gl=0.0)
    cfg.model.factorize = False
    trainer = Trainer(cfg, tmp_path, DATASETS)
    assert not lod.layers(trainer.model) and trainer.sampler is None
    records = trainer.fit(show_progress=False)
    last = records[-1]
    assert last["ranks"] == {} and last["total_rank"] == 0
    assert last["params"] == last["params_deployed"] == DENSE_LENET_PARAMS and last["params_rel"] == 1.0
    assert last["train_macs_rel"] == pytest.approx(1.0) and last["train_loss"] < records[0]["train_loss"]
    assert "  dense  params 44,426 (1.000x)" in centralized._summary(last)  # its epoch line: no "rank 0"
    assert "  rank 5  " in centralized._summary({**last, "ranks": {"a": 2, "b": 3}, "total_rank": 5})
    cfg.train.lambda_gl = 1e-3
    with pytest.raises(ValueError, match="train.lambda_gl"):
        Trainer(cfg, tmp_path / "bad", DATASETS)


class Killed(Exception):
    pass


def test_resume_after_an_interruption_reaches_the_same_final_metrics(tmp_path, monkeypatch):
    cfg = tiny(epochs=4, lambda_gl=3e-2, eps_ps=3e-2)
    whole = Trainer(cfg, tmp_path / "whole", DATASETS)
    expected = whole.fit(show_progress=False)
    # shrinking happened before the interruption: resume must resize the model and its cost model
    assert 236 > expected[0]["total_rank"] > expected[1]["total_rank"] > expected[-1]["total_rank"]

    # the second run dies in the middle of epoch 3, after training a few steps of it
    real_train_epoch, calls = centralized.train_epoch, []

    def dying(model, loader, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            real_train_epoch(model, list(loader)[:2], *args, **kwargs)
            raise Killed
        return real_train_epoch(model, loader, *args, **kwargs)

    monkeypatch.setattr(centralized, "train_epoch", dying)
    with pytest.raises(Killed):
        Trainer(cfg, tmp_path / "cut", DATASETS).fit(show_progress=False)
    monkeypatch.setattr(centralized, "train_epoch", real_train_epoch)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl")] == [1, 2]

    cfg.resume = True
    resumed = Trainer(cfg, tmp_path / "cut", DATASETS)
    assert resumed.resume() and resumed.epoch == 2
    records = resumed.fit(show_progress=False)
    assert without_times(records) == without_times(expected)
    assert without_times(read_jsonl(tmp_path / "cut" / "metrics.jsonl")) == without_times(expected)
    final, reference = resumed.model.state_dict(), whole.model.state_dict()
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in final)
    # checkpoint= may name the run directory, as deploy's does: its checkpoint.pt
    cfg.checkpoint = str(tmp_path / "cut")
    elsewhere = Trainer(cfg, tmp_path / "elsewhere", DATASETS)
    assert elsewhere.resume() and elsewhere.epoch == 4


def test_resume_with_another_config_lists_the_keys_that_differ(tmp_path, caplog):
    Trainer(tiny(epochs=1), tmp_path, DATASETS).fit(show_progress=False)
    changed = tiny(epochs=5, lr=0.1, sampler="across_layers")  # more epochs is allowed: it extends the run
    changed.resume, changed.device = True, "cpu"
    with pytest.raises(ValueError) as info:
        Trainer(changed, tmp_path, DATASETS).resume()
    message = str(info.value)
    assert "train.lr: 0.05 -> 0.1" in message and "train.sampler: 'per_layer' -> 'across_layers'" in message
    assert "train.epochs" not in message and "train.lambda_gl" not in message
    extended = tiny(epochs=2, num_workers=2)  # loader workers change nothing for in-memory data
    extended.resume, extended.device = True, "auto"
    trainer = Trainer(extended, tmp_path, DATASETS)
    with caplog.at_level(logging.WARNING, logger="fedmaestro.checkpoint"):
        assert trainer.resume()
    # another device may round floats differently: allowed, with a warning that names it
    assert "device: 'cpu' -> 'auto'" in caplog.text and "digit for digit" in caplog.text
    assert [r["epoch"] for r in trainer.fit(show_progress=False)] == [1, 2]


def test_a_checkpoint_from_before_a_config_key_existed_resumes_at_that_keys_default(tmp_path):
    Trainer(tiny(epochs=1, lambda_stop_params=0.5), tmp_path, DATASETS).fit(show_progress=False)
    path = tmp_path / "checkpoint.pt"
    state = checkpoint.load(path)
    del state["config"]["train"]["finetune_after_stop"]  # as written before the key was added
    checkpoint.save(path, state)
    other = tiny(epochs=2, lambda_stop_params=0.5, finetune_after_stop=True)
    other.resume = True
    with pytest.raises(ValueError, match=r"train.finetune_after_stop: False -> True"):
        Trainer(other, tmp_path, DATASETS).resume()
    same = tiny(epochs=2, lambda_stop_params=0.5)
    same.resume = True
    trainer = Trainer(same, tmp_path, DATASETS)
    assert trainer.resume() and trainer.epoch == 1


def test_a_vocabulary_size_filled_in_from_the_data_does_not_block_a_resume():
    """The Transformer's checkpoint holds model.kwargs.vocab_size (from its data); the command line that resumes it
    does not name it. Any other difference is still listed, and a vocabulary size given differently too."""
    saved = to_dict(tiny())
    saved["model"]["kwargs"] = {"vocab_size": 9000}
    assert checkpoint.config_diff(saved, to_dict(tiny())) == []
    other = to_dict(tiny(lr=0.5))
    assert checkpoint.config_diff(saved, other) == ["train.lr: 0.05 -> 0.5"]
    other["model"]["kwargs"] = {"vocab_size": 100}
    assert "model.kwargs.vocab_size: 9000 -> 100" in checkpoint.config_diff(saved, other)
    with pytest.raises(ValueError, match="different config"):  # given on the command line: not the data's doing
        checkpoint.check_resumable(saved, other)
    # the vocabulary's fingerprint: unknown on one side (a file written before runs kept it; a command line) is no
    # difference; two fingerprints that differ are another data set, and the refusal says so
    fingerprinted = to_dict(tiny())
    fingerprinted["dataset"]["vocabulary"] = "aaaa"
    assert checkpoint.config_diff(saved, fingerprinted) == checkpoint.config_diff(fingerprinted, to_dict(tiny())) == []
    elsewhere = to_dict(tiny())
    elsewhere["dataset"]["vocabulary"] = "bbbb"
    with pytest.raises(ValueError, match=r"data set is not the one the checkpoint was trained on .*"
                                         r"dataset.vocabulary: 'aaaa' -> 'bbbb'.*give data.root"):
        checkpoint.check_resumable(fingerprinted, elsewhere)


def multi30k_copies(root: Path) -> tuple[Path, Path]:
    """Two Multi30k folders whose vocabularies have the same size and other words ('man' -> 'boy')."""
    from test_data import MULTI30K, make_multi30k
    ours = make_multi30k(root / "ours" / "multi30k").parent
    other = make_multi30k(root / "other" / "multi30k").parent
    for path in (other / "multi30k").iterdir():
        path.write_text(path.read_text(encoding="utf-8").replace("man", "boy"), encoding="utf-8")
    assert MULTI30K  # the files make_multi30k writes
    return ours, other


def test_a_transformer_keeps_its_vocabulary_and_refuses_a_data_copy_whose_ids_mean_other_words(tmp_path):
    """A Transformer run records its data set's vocabulary fingerprint (and size) in every config it writes; a
    resume or deployment on a Multi30k copy with another vocabulary of the same size is refused (it used to run
    on remapped token ids without a word), and one with more tokens than the embedding holds too."""
    from fedmaestro import deploy
    from fedmaestro.config import DeployConfig
    ours, other = multi30k_copies(tmp_path)
    vocab, theirs = (data.load("multi30k", root, train=True).vocab for root in (ours, other))
    assert len(vocab) == len(theirs) and vocab.fingerprint != theirs.fingerprint
    cfg = Config(mode="centralized", device="cpu", progress=False, seed=0,
                 model=ModelConfig(name="transformer", kwargs=dict(d_model=16, heads=2, ffn=32, layers=1)),
                 dataset=DatasetConfig(name="multi30k", input_shape=[], num_classes=0),
                 data=DataConfig(root=str(ours)), train=TrainConfig(epochs=1, batch_size=2, optimizer="adam", lr=1e-3))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    centralized.run(cfg, run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["dataset"]["vocabulary"] == vocab.fingerprint and saved["model"]["kwargs"]["vocab_size"] == len(vocab)
    assert load_model(run_dir)[1].dataset.vocabulary == vocab.fingerprint
    # the same data resumes; another copy does not, before anything is loaded into the model
    again = Config(**{**cfg.__dict__, "resume": True, "train": TrainConfig(epochs=2, batch_size=2, optimizer="adam",
                                                                           lr=1e-3)})
    assert Trainer(again, run_dir).resume()
    moved = Config(**{**again.__dict__, "data": DataConfig(root=str(other))})
    with pytest.raises(ValueError, match=r"data set is not the one the checkpoint was trained on .*"
                                         rf"dataset.vocabulary: '{vocab.fingerprint}' -> '{theirs.fingerprint}'"):
        Trainer(moved, run_dir).resume()
    # deploy on the other copy: refused, naming both fingerprints; on its own copy it runs
    dcfg = Config(mode="deploy", device="cpu", progress=False, checkpoint=str(run_dir), data=DataConfig(root=str(other)),
                  deploy=DeployConfig(batch_size=4, target_macs=[], stop_macs=0.9))
    (tmp_path / "deploy").mkdir()
    with pytest.raises(ValueError, match=rf"under data.root={other} have another vocabulary \({len(theirs)} tokens, "
                                         rf"fingerprint {theirs.fingerprint}\) than the one the model was built on "
                                         rf"\(fingerprint {vocab.fingerprint}, {len(vocab)} tokens\)"):
        deploy.run(dcfg, tmp_path / "deploy")
    # a data set with more tokens than the embedding: named, not an IndexError deep in F.embedding
    small = Config(**{**cfg.__dict__, "model": ModelConfig(name="transformer", kwargs=dict(
        d_model=16, heads=2, ffn=32, layers=1, vocab_size=len(vocab) - 1))})
    with pytest.raises(ValueError, match=rf"model.kwargs.vocab_size={len(vocab) - 1} is smaller than the vocabulary"):
        Trainer(small, tmp_path / "small")


def test_a_vocabulary_of_the_special_tokens_alone_is_refused_by_name(tmp_path):
    folder = tmp_path / "multi30k"
    folder.mkdir()
    for stem in ("train", "test_2016_flickr"):  # no word twice: every one is under the minimum frequency
        (folder / f"{stem}.en").write_text("a b c\nd e f\n", encoding="utf-8")
        (folder / f"{stem}.de").write_text("g h i\nj k l\n", encoding="utf-8")
    cfg = Config(mode="centralized", device="cpu", progress=False,
                 model=ModelConfig(name="transformer", kwargs=dict(d_model=16, heads=2, ffn=32, layers=1)),
                 dataset=DatasetConfig(name="multi30k", input_shape=[], num_classes=0),
                 data=DataConfig(root=str(tmp_path)), train=TrainConfig(epochs=1, batch_size=2, optimizer="adam"))
    with pytest.raises(ValueError, match=r"give a vocabulary of the special tokens .* alone: no word occurs 2 times"):
        Trainer(cfg, tmp_path / "run")  # an IndexError in F.embedding, from the footprint's example tokens


def test_resume_from_a_model_file_says_it_needs_the_checkpoint(tmp_path):
    first = Trainer(tiny(epochs=1), tmp_path, DATASETS)
    first.fit(show_progress=False)
    first.save_model(tmp_path / "model.pt")
    again = tiny(epochs=2)
    again.resume, again.checkpoint = True, str(tmp_path / "model.pt")
    trainer = Trainer(again, tmp_path, DATASETS)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"not a training checkpoint .*give the run's checkpoint.pt"):
        trainer.resume()
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in before.items())  # nothing was loaded


def test_a_model_file_cannot_make_its_loader_read_the_environment(tmp_path, monkeypatch):
    trainer = Trainer(tiny(epochs=0), tmp_path, DATASETS)
    trainer.save_model(tmp_path / "model.pt")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    state["config"]["data"]["root"] = "${oc.env:FEDMAESTRO_SECRET}"
    torch.save(state, tmp_path / "doctored.pt")
    monkeypatch.setenv("FEDMAESTRO_SECRET", "leaked")
    with pytest.raises(ValueError, match=r"interpolations.*data.root='\$\{oc.env:FEDMAESTRO_SECRET\}'"):
        load_model(tmp_path / "doctored.pt")
    assert load_model(tmp_path / "model.pt")[1].data.root is None  # the genuine file loads


@pytest.mark.parametrize("key, value, rule", [
    ("grad_clip", -1.0, "null for no clipping"), ("gamma", -0.1, "must be > 0"), ("weight_decay", -0.1, ">= 0"),
    ("warmup_epochs", -1, ">= 0"), ("betas", [0.9], "two numbers in"), ("momentum", 1.0, r"\[0, 1\)"),
    ("milestones", [0, 5], "epoch > 0"), ("distill_weight", -1.0, ">= 0"), ("label_smoothing", 1.0, r"\[0, 1\)")])
def test_training_settings_that_would_train_wrongly_are_refused(key, value, rule):
    with pytest.raises(ValueError, match=rf"train.{key}=.* is invalid: .*{rule}"):
        TrainConfig(**{key: value})


def test_milestones_under_the_inverse_sqrt_schedule_are_refused():
    with pytest.raises(ValueError, match=r"train.milestones=\[5\] is invalid: .*inverse_sqrt ignores them"):
        TrainConfig(lr_schedule="inverse_sqrt", milestones=[5])


@pytest.mark.parametrize("make, match", [
    (lambda: Config(device="gpu"), r"device='gpu' is invalid: must be auto, cpu, cuda, cuda:N or mps"),
    (lambda: DataConfig(test_subset=-5), r"data.test_subset=-5 is invalid: must be a positive int or null")])
def test_a_bad_device_or_test_subset_is_refused_naming_the_key(make, match):
    with pytest.raises(ValueError, match=match):
        make()


ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path = ROOT, **kwargs) -> subprocess.CompletedProcess:
    """``python -m fedmaestro <args>`` as a user runs it (from the checkout unless ``cwd``); its output."""
    return subprocess.run([sys.executable, "-m", "fedmaestro", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, **kwargs)


@pytest.mark.parametrize("override, message", [
    ("+train.lrr=0.1", "unknown keys (not in the schema, fedmaestro/config.py): train.lrr (did you mean train.lr?)"),
    ("device=gpu", "device='gpu' is invalid: must be auto, cpu, cuda, cuda:N or mps")])
def test_the_command_line_prints_a_bad_config_as_one_error_line(tmp_path, override, message):
    done = cli("mode=centralized", override, f"hydra.run.dir={tmp_path}")
    assert done.returncode == 2 and f"error: config: {message}" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_a_run_that_fails_on_a_bad_value_leaves_no_directory_behind(tmp_path):
    """Hydra makes the run directory (and outputs/<mode>/) before the config is checked: a run refused there
    leaves nothing, where it used to leave outputs/<mode>/<time>/ with .hydra/ and an empty log."""
    done = cli("mode=centralized", "train.sampler=perlayer", cwd=tmp_path)  # the default outputs/<mode>/<time>/
    assert done.returncode == 2 and "error: config: train.sampler='perlayer'" in done.stderr, done.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
    done = cli("mode=centralized", "train.sampler=perlayer", f"hydra.run.dir={tmp_path / 'a' / 'b'}")
    assert done.returncode == 2 and list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()  # a directory that was there before stays, and so does anything that is not Hydra's
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("kept")
    for kept in ("mine", "theirs"):
        done = cli("mode=centralized", "train.sampler=perlayer", f"hydra.run.dir={tmp_path / kept}")
        assert done.returncode == 2 and (tmp_path / kept / ".hydra").is_dir()
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "kept"


@pytest.mark.parametrize("override, message", [
    # what Hydra refuses while composing the command line: one error, exit 2 (1 is a search without a model)
    ("train.lrr=0.1", "error: config: unknown keys (not in the schema, fedmaestro/config.py): train.lrr (did you mean "
                      "train.lr?)"),
    ("train.epochs=abc", "error: config: train.epochs: Value 'abc' of type 'str' could not be converted to Integer"),
    ("devices=three_tier", "error: In 'config': Could not find 'devices/three_tier'\nAvailable options in 'devices':"),
    ("train.lr=[", "error: train.lr=[: no viable alternative at input '['")])
def test_a_command_line_hydra_cannot_compose_is_one_error_with_exit_status_2(tmp_path, override, message):
    done = cli("mode=centralized", override, f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 2 and done.stderr.startswith(message), done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "search path" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_a_resumed_sweep_job_without_a_run_beside_jobs_with_one_says_how_an_older_sweep_resumes(
        tmp_path, monkeypatch, capsys):
    from omegaconf import OmegaConf

    from fedmaestro.__main__ import run_mode

    Trainer(tiny(epochs=1), tmp_path / "0_train.epochs=1,train.lambda_gl=0.001", DATASETS).fit(show_progress=False)
    started = []
    monkeypatch.setattr(centralized, "run", lambda cfg, run_dir: started.append(run_dir))
    job = tmp_path / "0_train.lambda_gl=0.001"  # the same job, named as sweeps are named since 2026-12-02
    run_mode(OmegaConf.structured(tiny(epochs=2)), job, sweep=True)  # not resumed: no notice
    assert "holds no run" not in capsys.readouterr().out
    resumed = tiny(epochs=2)
    resumed.resume = True
    run_mode(OmegaConf.structured(resumed), job, sweep=True)
    out = " ".join(capsys.readouterr().out.split())
    assert "resume=true: 0_train.lambda_gl=0.001 holds no run, but another job 0 of this sweep does " \
           "(0_train.epochs=1,train.lambda_gl=0.001); this job starts fresh" in out
    assert "'hydra.job.config.override_dirname.exclude_keys=[resume,progress,device,experiment]' added" in out
    assert started == [job, job]
    # job 1 of an interrupted sweep, not started when job 0 was: no notice
    run_mode(OmegaConf.structured(resumed), tmp_path / "1_train.lambda_gl=0.002", sweep=True)
    assert "holds no run" not in capsys.readouterr().out


def test_an_empty_run_directory_is_refused_before_anything_is_written(tmp_path):
    done = cli("mode=centralized", "resume=true", "hydra.run.dir=", cwd=tmp_path,
               env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and done.stderr.startswith("error: hydra.run.dir is empty"), done.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # nothing in the working directory


def test_a_run_with_hydra_logging_switched_off_still_runs_and_prints_its_errors_in_one_line(tmp_path):
    for job_logging in ("disabled", "stdout"):  # no file handler for fedmaestro.log to route to
        done = cli("mode=centralized", f"hydra/job_logging={job_logging}", "train.lr=-1",
                   f"hydra.run.dir={tmp_path / job_logging}")
        assert done.returncode == 2 and done.stderr.startswith("error: config: train.lr=-1.0 is invalid"), done.stderr


def test_a_new_sweep_into_a_sweep_with_runs_is_refused_unless_resume_or_mode_is_swept(tmp_path, capsys):
    from omegaconf import OmegaConf

    from fedmaestro.__main__ import RunDirGuard

    job = tmp_path / "0_train.lambda_gl=0.001"
    Trainer(tiny(epochs=1), job, DATASETS).fit(show_progress=False)

    def sweep(*task):
        return OmegaConf.create({"mode": "centralized", "resume": False,
                                 "hydra": {"sweep": {"dir": str(tmp_path)}, "overrides": {"task": list(task)}}})

    with pytest.raises(SystemExit) as exit_info:
        RunDirGuard().on_multirun_start(sweep("train.lambda_gl=1e-3,2e-3"))
    assert exit_info.value.code == 2
    assert f"holds the runs of an earlier sweep ({job.name}); continue that sweep with resume=true" in \
        capsys.readouterr().err
    # the config Hydra hands over holds a swept key's default: each job checks its own directory instead
    RunDirGuard().on_multirun_start(sweep("train.lambda_gl=1e-3", "resume=true,false"))
    RunDirGuard().on_multirun_start(sweep("mode=centralized,hpo"))


def test_an_omegaconf_error_inside_a_run_is_a_bug_and_keeps_its_traceback(tmp_path, monkeypatch):
    import fedmaestro.__main__ as cli
    from omegaconf.errors import ConfigKeyError

    def broken(cfg, run_dir, sweep=False):
        raise ConfigKeyError("a bug in the run")

    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # main() sets it for Hydra; monkeypatch puts it back
    monkeypatch.setattr(cli, "run_mode", broken)
    monkeypatch.setattr(sys, "argv", ["fedmaestro", "mode=theory", f"hydra.run.dir={tmp_path}"])
    with pytest.raises(ConfigKeyError, match="a bug in the run"):  # not "error: ..." and exit 2
        cli.main()
    assert os.environ["HYDRA_FULL_ERROR"] == "0"  # put back as it was


def test_the_command_line_refuses_a_resume_with_another_config_before_writing_or_loading_anything(tmp_path):
    Trainer(tiny(epochs=1), tmp_path, DATASETS).fit(show_progress=False)
    before = sorted(p.name for p in tmp_path.iterdir())
    done = cli("mode=centralized", "resume=true", "model=vgg19", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 2 and "error: resume: the checkpoint was written with a different config" in done.stderr
    assert "model.name: 'lenet' -> 'vgg19'" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # Hydra wrote nothing (no .hydra/, no log)


def _interrupted(args: list[str], ready, pause: float = 0.1) -> tuple[int, str]:
    """Run ``python -m fedmaestro *args``, send it Ctrl-C once ``ready()`` holds (or it ended, or 120 s passed);
    its exit status and stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "fedmaestro", *args], cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(pause)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume_without_a_traceback(tmp_path):
    run_dir = tmp_path / "run"
    returncode, err = _interrupted(["mode=centralized", "data.subset=2000", "data.test_subset=200", "train.epochs=500",
                                    "progress=false", f"hydra.run.dir={run_dir}"],
                                   ready=(run_dir / "checkpoint.pt").is_file)
    assert returncode == 130 and "Traceback" not in err, err[-2000:]
    assert f"interrupted: {run_dir} keeps what was done; continue with the same command + resume=true" in err


@pytest.mark.slow
def test_ctrl_c_of_a_run_continued_from_another_runs_checkpoint_says_to_drop_checkpoint(tmp_path):
    # once the new directory holds its own checkpoint, resume=true with checkpoint= as well is refused there
    overrides = ["mode=centralized", "data.subset=2000", "data.test_subset=200", "progress=false"]
    Trainer(compose(overrides + ["train.epochs=1", f"hydra.run.dir={tmp_path / 'a'}"])[0],
            tmp_path / "a").fit(show_progress=False)
    run_dir = tmp_path / "b"
    returncode, err = _interrupted([*overrides, "train.epochs=500", "resume=true", f"checkpoint={tmp_path / 'a'}",
                                    f"hydra.run.dir={run_dir}"], ready=(run_dir / "checkpoint.pt").is_file)
    assert returncode == 130 and "Traceback" not in err, err[-2000:]
    assert (f"continue with the same command without checkpoint= + resume=true hydra.run.dir={run_dir}"
            in err), err[-2000:]
    checkpoint.refuse_overwrite(run_dir, True, "centralized")  # what the hint says is not refused


@pytest.mark.slow
def test_ctrl_c_before_the_first_checkpoint_says_there_is_nothing_to_resume(tmp_path):
    run_dir = tmp_path / "run"
    # a whole epoch of Fashion-MNIST: many seconds; config.json: the data is loaded and training starts
    returncode, err = _interrupted(["mode=centralized", "train.epochs=5", "progress=false", f"hydra.run.dir={run_dir}"],
                                   ready=(run_dir / "config.json").is_file, pause=0.05)
    assert returncode == 130 and "Traceback" not in err, err[-2000:]
    assert not (run_dir / "checkpoint.pt").is_file()
    assert f"interrupted before the run's first checkpoint: nothing to resume in {run_dir}; start it again" in err
    assert "keeps what was done" not in err


@pytest.mark.slow
def test_ctrl_c_in_a_sweep_says_how_to_continue_the_sweep_and_that_command_continues_it(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # a preset under paper/: its name holds a '/', which must not nest the job directories
    command = ["--multirun", "+experiment=paper/lenet_fmnist_smoke", "data.subset=2000", "data.test_subset=200",
               "train.epochs=500", "progress=false", "train.lambda_gl=1e-3", f"hydra.sweep.dir={sweep_dir}"]
    returncode, err = _interrupted(command, ready=lambda: bool(list(sweep_dir.glob("0_*/checkpoint.pt"))))
    assert returncode == 130, err[-2000:]
    hint = f"continue with the same command (with --multirun) + resume=true hydra.sweep.dir={sweep_dir}"
    assert hint in err, err[-2000:]
    [job] = sweep_dir.glob("0_*")
    done = len((job / "metrics.jsonl").read_text().splitlines())
    # the hint's command continues the same job: its records grow
    _interrupted(command + ["resume=true"], ready=lambda: len((job / "metrics.jsonl").read_text().splitlines()) > done)
    assert [p.name for p in sweep_dir.glob("0_*")] == [job.name]
    assert len((job / "metrics.jsonl").read_text().splitlines()) > done


def test_a_sweep_job_with_a_bad_value_fails_in_one_line_and_the_sweep_goes_on(tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = ["--multirun", "+experiment=paper/lenet_fmnist_smoke", "data.subset=300", "data.test_subset=100",
               "train.epochs=1", "progress=false", "train.lambda_gl=-1,1e-3", f"hydra.sweep.dir={sweep_dir}"]
    done = cli(*command)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    [bad] = sweep_dir.glob("0_*")
    [good] = sweep_dir.glob("1_*")
    assert f"error: job {bad.name}: config: train.lambda_gl=-1.0 is invalid" in done.stderr, done.stderr[-2000:]
    assert done.stderr.rstrip().endswith(f"error: 1 job(s) of the sweep failed (each said why above): {bad.name}")
    assert not (bad / "metrics.jsonl").exists() and (good / "metrics.jsonl").is_file()  # the next job ran
    # what the job printed is in its log file too, once on the terminal
    assert "][fedmaestro.run_log][INFO] - epoch 1/1  loss" in (good / "fedmaestro.log").read_text()
    assert done.stdout.count("epoch 1/1  loss") == 1, done.stdout[-2000:]
    files = sorted(p for p in sweep_dir.rglob("*") if p.is_file())
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    again = cli(*command)
    # the same sweep again is refused in one line before Hydra writes a job's .hydra/ or multirun.yaml
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr[-2000:]
    assert f"error: hydra.sweep.dir={sweep_dir} holds the runs of an earlier sweep ({good.name}); continue that " \
           f"sweep with resume=true" in again.stderr
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before
    assert sorted(p for p in sweep_dir.rglob("*") if p.is_file()) == files
    # resume=true with more epochs continues every job in its own directory (train.epochs names no directory)
    longer = [a.replace("train.epochs=1", "train.epochs=2") for a in command] + ["resume=true"]
    resumed = cli(*longer)
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr, resumed.stderr[-2000:]
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == [bad.name, good.name]
    assert [json.loads(line)["epoch"] for line in (good / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # a resume with another config: every job refused, and the files that describe the sweep and its jobs are
    # theirs again (Hydra rewrites a job's .hydra/ before the job can refuse; fedmaestro.plot reads them)
    described = sorted([sweep_dir / "multirun.yaml", *sweep_dir.glob("*/.hydra/*.yaml")])
    before = {p: p.read_bytes() for p in described}
    other = cli(*[a.replace("lenet_fmnist_smoke", "lenet_mnist") for a in longer])  # the preset names no dir
    assert other.returncode == 2 and f"error: job {good.name}: " in other.stderr, other.stderr[-2000:]
    assert {p: p.read_bytes() for p in described} == before


def test_the_resume_hint_quotes_a_directory_hydra_would_misread():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from fedmaestro.__main__ import _override

    assert _override("hydra.run.dir", "/tmp/run-1/a_b") == "hydra.run.dir=/tmp/run-1/a_b"
    job = "/tmp/sw/0_data.subset=2000,train.lambda_gl=0.001"
    [pasted] = shlex.split(_override("hydra.run.dir", job))  # what the shell hands to Hydra
    assert OverridesParser.create().parse_override(pasted).value() == job


def test_a_checkpoint_write_cut_short_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    from fedmaestro import checkpoint

    checkpoint.save(tmp_path / "checkpoint.pt", {"config": {}, "model": {"weights": torch.arange(4.0)}, "epoch": 1})
    real_save = torch.save

    def killed_while_writing(state, f):
        real_save(state, f)
        Path(f).write_bytes(Path(f).read_bytes()[:50])  # half a file, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path / "checkpoint.pt", {"config": {}, "model": {"weights": torch.zeros(4)}, "epoch": 2})
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 1 and torch.equal(state["model"]["weights"], torch.arange(4.0))


def test_checkpoints_and_models_load_with_weights_only(tmp_path):
    trainer = Trainer(tiny(epochs=2, lambda_gl=3e-3, eps_ps=1e-3), tmp_path, DATASETS)
    trainer.fit(show_progress=False)
    trainer.save_model(tmp_path / "model.pt")
    for name in ("checkpoint.pt", "model.pt"):
        state = torch.load(tmp_path / name, weights_only=True)  # no pickled objects, only plain data
        assert "config" in state and "model" in state
    model, cfg = load_model(tmp_path)  # the run directory's model.pt, rebuilt from its config alone
    assert cfg.train.lambda_gl == 3e-3
    assert {n: layer.rank for n, layer in lod.layers(model)} == trainer.records[-1]["ranks"]
    x = DATASETS[1].batch(torch.arange(16))[0]
    model.eval(), trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), trainer.model(x), rtol=0, atol=0)


def test_batchnorm_recalibration_reads_the_training_split_without_augmentation(tmp_path):
    augmented = patterns(64, 0, augment=True)
    assert unaugmented(augmented).train is False and augmented.train is True  # a copy; the original trains
    trainer = Trainer(tiny(epochs=1), tmp_path, (augmented, DATASETS[1]))
    assert trainer.train_loader.dataset.train and not trainer.calib_loader.dataset.train


@pytest.mark.slow
@pytest.mark.parametrize("factorize", [True, False])
def test_batchnorm_is_recalibrated_at_the_models_ranks_before_every_evaluation(tmp_path, factorize):
    """Training samples sub-models, so the running statistics BatchNorm gathers mix them; an evaluated
    epoch (here without any shrinking) re-estimates them at the model's ranks first. A dense model's too, so
    that dense and factorized runs are scored alike."""
    cfg = tiny(epochs=2, eval_every=2, shrink=False, lambda_gl=0.0)
    cfg.model.name, cfg.model.factorize = "resnet18", factorize
    trainer = Trainer(cfg, tmp_path, (patterns(64, 0), patterns(32, 1, train=False)))
    running = lambda: {k: v.clone() for k, v in trainer.model.state_dict().items() if "running" in k}  # noqa: E731
    trainer.run_epoch()  # not evaluated: the statistics are training's
    trained = running()
    trainer.calib_loader.set_epoch(0)
    recalibrate_batchnorm(trainer.model, trainer.calib_loader, trainer.task, trainer.device)
    assert any(not torch.equal(trained[k], v) for k, v in running().items())
    record = trainer.run_epoch()
    after = running()
    trainer.calib_loader.set_epoch(1)
    recalibrate_batchnorm(trainer.model, trainer.calib_loader, trainer.task, trainer.device)
    assert all(torch.equal(after[k], v) for k, v in running().items())
    assert record["accuracy"] == evaluate(trainer.model, trainer.test_loader, trainer.task, trainer.device)["accuracy"]


def test_held_out_validation_examples_are_not_trained_on_and_are_scored_when_evaluated(tmp_path):
    held = np.arange(0, 256, 4)
    trainer = Trainer(tiny(epochs=1), tmp_path, DATASETS, validation=held)
    trained = set(trainer.train_loader.indices.tolist())
    assert len(trained) == 192 and trained.isdisjoint(held.tolist())
    assert set(trainer.calib_loader.indices.tolist()) == trained
    assert trainer.val_loader.indices.tolist() == held.tolist() and not trainer.val_loader.dataset.train
    record = trainer.fit(show_progress=False)[-1]
    assert record["val_accuracy"] == evaluate(trainer.model, trainer.val_loader, trainer.task, trainer.device)["accuracy"]
    assert "val_accuracy" not in Trainer(tiny(epochs=1), tmp_path / "plain", DATASETS).fit(show_progress=False)[-1]


def compose(overrides: list[str]) -> tuple[Config, Path]:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from fedmaestro.__main__ import CONF_DIR
    from fedmaestro.config import resolve

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        raw = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
    run_dir = Path(str(OmegaConf.select(raw, "hydra.run.dir")))
    with open_dict(raw):
        del raw["hydra"]
    return resolve(raw), run_dir


def test_the_paper_preset_runs_end_to_end_on_fashion_mnist(tmp_path, capsys):
    cfg, run_dir = compose(["+experiment=paper/lenet_fmnist", "train.lambda_gl=1e-3", "train.epochs=2",
                            "data.subset=256", "data.test_subset=256", "progress=false",
                            f"hydra.run.dir={tmp_path}"])
    assert (cfg.mode, cfg.model.name, cfg.dataset.name, cfg.train.batch_size, cfg.train.lr) == (
        "centralized", "lenet", "fashion_mnist", 64, 0.01)
    centralized.run(cfg, run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2] and all(set(DESIGN_FIELDS) <= set(r) for r in records)
    for name in ("config.json", "checkpoint.pt", "model.pt", "training.png", "total_rank.png",
                 "ranks_per_layer.png"):
        assert (run_dir / name).stat().st_size > 0, name
    assert json.loads((run_dir / "config.json").read_text())["train"]["lambda_gl"] == 1e-3
    # a resume that asks for no more epochs than were done trains nothing and leaves every file as it was
    files = {p: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    shorter, _ = compose(["+experiment=paper/lenet_fmnist", "train.lambda_gl=1e-3", "train.epochs=1", "resume=true",
                          "data.subset=256", "data.test_subset=256", "progress=false", f"hydra.run.dir={tmp_path}"])
    centralized.run(shorter, run_dir)
    assert {p: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == files
    assert "the run has done all train.epochs=1 epochs (its checkpoint is at epoch 2)" in capsys.readouterr().out
    # interrupted after its last checkpoint, before model.pt was written: the resume writes it (and the plots)
    (run_dir / "model.pt").unlink()
    centralized.run(shorter, run_dir)
    model, _ = load_model(run_dir)
    (run_dir / "model.pt").rename(run_dir / "resumed.pt")
    (run_dir / "model.pt").write_bytes(files[run_dir / "model.pt"])
    for (name, a), (_, b) in zip(model.state_dict().items(), load_model(run_dir)[0].state_dict().items()):
        assert torch.equal(a, b), name  # the model the uninterrupted run wrote
    assert (run_dir / "config.json").read_bytes() == files[run_dir / "config.json"]  # still the 2-epoch run's


def test_printed_paths_keep_a_sweep_job_directory_name_with_a_list_in_it(tmp_path, capsys):
    # a sweep over 'model.skip=[conv1,conv2]' names its job directories so; rich would read the list as markup
    cfg, _ = compose(["+experiment=paper/lenet_fmnist", "train.epochs=1", "data.subset=256", "data.test_subset=256",
                      "progress=false", f"hydra.run.dir={tmp_path}"])
    run_dir = tmp_path / "0_model.skip=[conv1,conv2]"
    run_dir.mkdir()
    centralized.run(cfg, run_dir)
    out = capsys.readouterr().out.replace("\n", "")
    assert f"run dir {run_dir}" in out and f"plot: {run_dir / 'training.png'}" in out
    accuracy = read_jsonl(run_dir / "metrics.jsonl")[-1]["accuracy"]
    assert f"done: accuracy {accuracy:.4f}, params" in out  # rounded, as in the epoch lines


# the paper's lambda grids (Tables 11-15; LeNet's plus 512e-5, the last point of the released code's curve);
# a preset may sweep more values than its table (the Transformer's starts at 0.01)
PRESET_GRIDS = {
    "lenet_mnist": [0.0, 8e-5, 1.6e-4, 3.2e-4, 6.4e-4, 1.28e-3, 2.56e-3],
    "lenet_fmnist": [0.0, 8e-5, 1.6e-4, 3.2e-4, 6.4e-4, 1.28e-3, 2.56e-3, 5.12e-3],
    "resnet18_cifar10": [0.0, 4e-6, 8e-6, 1.6e-5, 3.2e-5, 6.4e-5, 1.28e-4, 2.56e-4, 5.12e-4, 1.024e-3],
    "vgg19_cifar10": [0.0, 4e-6, 8e-6, 1.6e-5, 3.2e-5, 6.4e-5, 1.28e-4, 2.56e-4, 5.12e-4],
    "resnet50_imagenet": [0.0, 1e-6, 2e-6, 4e-6, 8e-6],
    "resnet50_partial_imagenet": [2e-6, 4e-6, 8e-6],
    "transformer_multi30k": [0.32, 0.64, 1.28, 2.56, 5.12],
}


@pytest.mark.parametrize("name", sorted(PRESET_GRIDS) + ["lenet_fmnist_smoke"])
def test_every_paper_preset_composes_into_a_valid_centralized_config(name, tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from fedmaestro.__main__ import CONF_DIR

    cfg, _ = compose([f"+experiment=paper/{name}", f"hydra.run.dir={tmp_path}"])
    assert cfg.mode == "centralized"
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        raw = hydra_compose(config_name="config", overrides=[f"+experiment=paper/{name}"], return_hydra_config=True)
    grid = [float(v) for v in str(raw.hydra.sweeper.params["train.lambda_gl"]).split(",")]
    paper = PRESET_GRIDS.get(name, PRESET_GRIDS["lenet_fmnist"])
    assert {round(v, 12) for v in paper} <= {round(v, 12) for v in grid}, (paper, grid)
    assert grid == sorted(grid)
    recipe = {  # App. D.3
        "lenet": dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=0.0, epochs=20),
        "resnet18": dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, milestones=[150, 250]),
        "vgg19": dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, milestones=[150, 250]),
        "resnet50": dict(optimizer="sgd", weight_decay=1e-4),
        "resnet50_partial": dict(optimizer="sgd", weight_decay=1e-4),
        "transformer": dict(optimizer="adam", grad_clip=0.25, label_smoothing=0.1, warmup_epochs=10,
                            loss_reduction="sum"),
    }[cfg.model.name]
    if name == "lenet_fmnist_smoke":
        recipe.pop("epochs")
    assert {k: getattr(cfg.train, k) for k in recipe} == recipe


def test_sweep_table_and_figures_from_run_directories(tmp_path, capsys):
    from fedmaestro import plot
    from fedmaestro.config import to_dict

    for name, lam, factorize, seed in (("dense", 0.0, False, 0), ("l0", 0.0, True, 0), ("l0s1", 0.0, True, 1),
                                       ("big", 0.3, True, 0)):
        cfg = tiny(epochs=2, lambda_gl=lam, hgl_mode="proximal")
        cfg.model.factorize, cfg.seed = factorize, seed
        trainer = Trainer(cfg, tmp_path / "sweep" / name, DATASETS)
        trainer.fit(show_progress=False)
        (tmp_path / "sweep" / name / "config.json").write_text(json.dumps(to_dict(cfg)))
    assert plot.main([str(tmp_path / "sweep")]) == 0
    table = (tmp_path / "sweep" / "sweep.md").read_text().splitlines()
    assert table[2].startswith("| Non-Factorized |") and table[2].endswith("| 1 |")
    assert table[3].startswith("| Maestro (λ=0") and table[3].endswith("| 2 |")  # two seeds averaged
    assert " ± " in table[3] and table[4].startswith("| Maestro (λ=0.3")
    assert len(table) == 5
    for name in ("sweep_accuracy.png", "sweep_total_rank.png", "sweep_ranks.png", "sweep.csv"):
        assert (tmp_path / "sweep" / name).stat().st_size > 0, name
    assert "Non-Factorized" in capsys.readouterr().out


def test_values_that_would_run_nothing_or_fail_late_are_refused_up_front(tmp_path):
    from fedmaestro.config import FLConfig

    with pytest.raises(ValueError, match=r"seed=-3 is invalid: must be >= 0"):
        Config(seed=-3)
    with pytest.raises(ValueError, match=r"fl.rounds=0 is invalid: must be >= 1"):
        FLConfig(rounds=0)
    with pytest.raises(ValueError, match=r"train.epochs=0 trains nothing; set train.epochs >= 1"):
        centralized.run(tiny(epochs=0), tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl is not a checkpoint or model file written by fedmaestro"):
        load_model(tmp_path / "metrics.jsonl")


def test_milestones_past_the_last_epoch_are_reported(tmp_path, capsys):
    Trainer(tiny(epochs=2, milestones=[1, 2, 5]), tmp_path, DATASETS)
    out = " ".join(capsys.readouterr().out.split())
    assert "train.milestones [2, 5] >= train.epochs=2: those LR decays never happen in this run" in out


def test_a_sweep_over_presets_names_each_row_by_its_preset(tmp_path, capsys):
    from fedmaestro import plot
    from fedmaestro.config import to_dict

    sweep = tmp_path / "sweep"
    jobs = [("fl_fedavg", 0, dict(factorize=False)), ("fl_fedavg", 1, dict(factorize=False)),
            ("fl_fjord", 0, dict(lambda_gl=0.0)), ("fl_maestro", 0, dict(lambda_gl=3e-3)),
            ("fl_maestro", 1, dict(lambda_gl=3e-3))]
    for i, (preset, seed, what) in enumerate(jobs):
        cfg = tiny(lambda_gl=what.get("lambda_gl", 0.0))
        cfg.mode, cfg.seed, cfg.model.factorize = "federated", seed, what.get("factorize", True)
        job = sweep / f"{i}_seed={seed}"  # the preset is left out of job directory names
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- seed={seed}\n- +experiment={preset}\n")
        (job / "config.json").write_text(json.dumps(to_dict(cfg)))
        (job / "metrics.jsonl").write_text(json.dumps({
            "round": 3, "accuracy": 0.5 + 0.1 * i, "loss": 1.0, "params_deployed": 100, "params_rel": 1.0,
            "macs_deployed": 1000, "macs_rel": 1.0, "total_rank": 10, "ranks": {"fc1": 10}, "wall_s": 1.0,
            "bytes_down": 1_000_000, "bytes_up": 1_000_000}) + "\n")
    assert plot.main([str(sweep)]) == 0
    variants = [line.split(" | ")[0].lstrip("| ").rstrip(" *") for line in (sweep / "sweep.md").read_text().splitlines()[2:]
                if line.startswith("| ")]
    assert variants == ["fl_fedavg", "fl_fjord", "fl_maestro"]  # seeds averaged within each preset
    # a dense reference run started without a preset, plotted beside the sweep: "Non-Factorized", not "None"
    reference = tmp_path / "dense"
    (reference / ".hydra").mkdir(parents=True)
    (reference / ".hydra" / "overrides.yaml").write_text("- model.factorize=false\n")
    dense = json.loads((sweep / "0_seed=0" / "config.json").read_text())
    (reference / "config.json").write_text(json.dumps(dense))
    (reference / "metrics.jsonl").write_text((sweep / "0_seed=0" / "metrics.jsonl").read_text())
    assert plot.main([str(sweep), str(reference), "--out", str(tmp_path / "both")]) == 0
    variants = [line.split(" | ")[0].lstrip("| ").rstrip(" *")
                for line in (tmp_path / "both" / "sweep.md").read_text().splitlines()[2:] if line.startswith("| ")]
    assert "None" not in variants and variants[0] == "Non-Factorized"
    rows = list(csv.DictReader((sweep / "sweep.csv").open()))
    assert [int(r["runs"]) for r in rows] == [2, 1, 2]
    # the figures draw one line per preset (they joined every factorized row into one "Maestro" line)
    import matplotlib.axes

    drawn = []
    original = matplotlib.axes.Axes.errorbar

    def recording(self, x, y, *args, **kwargs):
        drawn.append((kwargs.get("label"), list(x)))
        return original(self, x, y, *args, **kwargs)

    matplotlib.axes.Axes.errorbar = recording
    try:
        assert plot.main([str(sweep), "--out", str(tmp_path / "again")]) == 0
    finally:
        matplotlib.axes.Axes.errorbar = original
    assert sorted({label for label, _ in drawn}) == ["fl_fjord", "fl_maestro"]


def test_a_sweep_over_a_device_key_keeps_its_rows_apart():
    from fedmaestro.plots import Run, _flatten, sweep_table
    from fedmaestro.config import to_dict

    runs = []
    for budget in (0.25, 0.5):
        cfg = to_dict(tiny())
        cfg["mode"] = "federated"  # (a centralized run does not read devices: its label leaves them out)
        cfg["devices"]["tiers"][0]["budget"] = budget
        record = {"round": 1, "accuracy": budget, "params_deployed": 100, "params_rel": 1.0, "macs_deployed": 1000,
                  "macs_rel": 1.0, "total_rank": 10, "wall_s": 1.0, "bytes_down": 1, "bytes_up": 1}
        runs.append(Run(Path(f"/x/{budget}"), cfg, [record], _flatten(cfg)))
    rows = sweep_table(runs)  # "device" is left out of labels, "devices.tiers" is not
    assert [r["runs"] for r in rows] == [1, 1] and sorted(r["acc"] for r in rows) == [0.25, 0.5]
    assert len({r["variant"] for r in rows}) == 2 and all("tiers=" in r["variant"] for r in rows)


def test_a_sweep_of_two_models_compares_each_ones_time_with_its_own_dense_run():
    from fedmaestro.plots import Run, _flatten, sweep_table
    from fedmaestro.config import to_dict

    runs = []
    for model, factorize, wall in (("lenet", False, 10.0), ("lenet", True, 15.0), ("resnet18", True, 600.0)):
        cfg = to_dict(tiny())
        cfg["model"]["name"], cfg["model"]["factorize"] = model, factorize
        record = {"epoch": 2, "accuracy": 0.5, "params_deployed": 100, "params_rel": 1.0, "macs_deployed": 1000,
                  "macs_rel": 1.0, "total_rank": 10, "wall_s": wall, "train_macs_rel": 1.0, "train_params_rel": 1.0}
        runs.append(Run(Path(f"/x/{model}{factorize}"), cfg, [record], _flatten(cfg)))
    rows = {(r["variant"], r["dense"]): r for r in sweep_table(runs)}
    times = {key: row.get("time_rel") for key, row in rows.items()}
    assert sorted(v for v in times.values() if v is not None) == [1.0, 1.5]  # LeNet's dense and Maestro runs
    assert [key for key, v in times.items() if v is None] == [k for k in times if "resnet18" in k[0]]  # not 60x


def test_a_sweep_whose_jobs_all_left_no_record_says_so(tmp_path, capsys):
    from fedmaestro import plot

    (tmp_path / "sweep" / "0_lam=1e-3" / ".hydra").mkdir(parents=True)  # interrupted before its first epoch
    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(tmp_path / "sweep")])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "0_lam=1e-3 holds no records" in captured.out
    assert "(every job below left no record (see above))" in captured.err and "mode=theory" not in captured.err


def test_sweep_of_federated_runs_unfinished_and_failed_jobs(tmp_path, capsys):
    from fedmaestro import plot
    from fedmaestro.config import to_dict

    sweep = tmp_path / "sweep"
    for job, lam, rounds_done in (("0_lam=1e-4", 1e-4, 3), ("1_lam=1e-2", 1e-2, 2)):
        cfg = tiny(lambda_gl=lam)
        cfg.mode, cfg.fl.rounds = "federated", 3
        (sweep / job / ".hydra").mkdir(parents=True)
        (sweep / job / "config.json").write_text(json.dumps(to_dict(cfg)))
        records = [{"round": r, "accuracy": 0.5 + 0.1 * r, "loss": 1.0, "params": 66274, "params_deployed": 44426,
                    "params_rel": 1.0, "macs": 340316, "macs_deployed": 281640, "macs_rel": 1.0, "total_rank": 236 - r,
                    "ranks": {"conv1": 6, "conv2": 16, "fc1": 120 - r, "fc2": 84, "fc3": 10}, "wall_s": 2.0 * r,
                    "bytes_down": 1_000_000 * r, "bytes_up": 1_000_000 * r} for r in range(1, rounds_done + 1)]
        (sweep / job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (sweep / "2_lam=-1" / ".hydra").mkdir(parents=True)  # a job that failed before its first round
    assert plot.main([str(sweep)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "left out: " in out and "2_lam=-1 holds no records" in out
    assert "1_lam=1e-2 stopped at round 2 of 3 (marked * in the table)" in out
    table = (sweep / "sweep.md").read_text().splitlines()
    assert table[0].endswith("| Rel. MACs / Params. (Train.) | MB down + up | runs |")
    assert table[2] == "| Maestro (λ=0.0001) | 80.00 | 281,640 (1.00x) | 44,426 (1.000x) | - | 6.0 | 1 |"
    assert table[3].startswith("| Maestro (λ=0.01) * | 70.00 |") and table[5].startswith("\\* unfinished")
    # the job without records is named in the table's file too, not only on the terminal
    assert table[-2:] == ["Not in the table:", f"- left out: {sweep / '2_lam=-1'} holds no records (the job failed or "
                                                "was stopped before its first epoch)"]
    assert (sweep / "sweep_total_rank.png").stat().st_size > 0
    search = tmp_path / "hpo" / "lambda_0.1"  # a lambda search stops its runs itself: not "unfinished"
    (search / ".." / ".hydra").mkdir(parents=True)
    (search / "config.json").write_text(json.dumps(to_dict(tiny(epochs=5, lambda_gl=0.1))))
    (search / "metrics.jsonl").write_text(json.dumps({
        "epoch": 2, "accuracy": 0.5, "params_deployed": 100, "params_rel": 0.5, "macs_deployed": 1000, "macs_rel": 0.4,
        "train_macs_rel": 0.9, "train_params_rel": 0.8, "total_rank": 10, "ranks": {"fc1": 10}, "wall_s": 1.0}) + "\n")
    interrupted = tmp_path / "hpo" / "lambda_0.05"  # its config.json comes when it ends: named, not dropped silently
    interrupted.mkdir()
    (interrupted / "metrics.jsonl").write_text((search / "metrics.jsonl").read_text())
    assert plot.main([str(tmp_path / "hpo")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "stopped at" not in out and "holds no records" not in out and "| Maestro (λ=0.1) |" in out
    assert f"left out: {interrupted} holds records but no config.json (a lambda of a search that was stopped or " \
           f"diverged before its end)" in out and "λ=0.05" not in out
    # a federated run next to a centralized one listed first (smaller lambda): the CSV has the columns of both
    central = tmp_path / "central"
    central.mkdir()
    (central / "config.json").write_text(json.dumps(to_dict(tiny(epochs=2, lambda_gl=1e-5))))
    (central / "metrics.jsonl").write_text((search / "metrics.jsonl").read_text())
    both = tmp_path / "both"
    assert plot.main([str(sweep / "0_lam=1e-4"), str(central), "--out", str(both)]) == 0
    with (both / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {"mb", "acc"} <= set(rows[0]) and sorted(bool(r["mb"]) for r in rows) == [False, True]
    with pytest.raises(SystemExit) as e:  # --out a file: one line, not a traceback
        plot.main([str(sweep / "0_lam=1e-4"), str(central), "--out", str(central / "config.json")])
    assert e.value.code == 2 and "cannot be the directory of the sweep's figures" in capsys.readouterr().err


def test_a_redrawn_deploy_figure_keeps_the_runs_targets(tmp_path, monkeypatch):
    from fedmaestro import plot

    (tmp_path / "deploy_curve.csv").write_text("method,macs_rel,params_rel,accuracy\nmaestro,1.0,1.0,0.9\n"
                                               "maestro,0.5,0.4,0.85\n")
    (tmp_path / "config.json").write_text(json.dumps({"deploy": {"target_macs": [0.5, 0.25], "target_params": [0.3]}}))
    drawn = {}
    monkeypatch.setattr(plot, "plot_deploy", lambda curves, path, targets=None: drawn.setdefault("t", targets) and path)
    assert plot.main([str(tmp_path)]) == 0
    assert drawn["t"] == {"macs_frac": [0.5, 0.25], "params_frac": [0.3]}


def test_deploy_targets_are_drawn_where_they_land_on_each_methods_curve(tmp_path, monkeypatch):
    """deploy.target_macs=[0.5] is half of each method's starting MACs: a Maestro start at 0.6x dense lands at
    0.3x on the dense-relative axis, an SVD start at 1.0x at 0.5x; target_params likewise on the other axis."""
    from matplotlib.axes import Axes

    from fedmaestro.plots import plot_deploy

    def curve(start):
        return [{"macs_rel": start, "params_rel": start / 2, "accuracy": 0.9},
                {"macs_rel": start / 4, "params_rel": start / 8, "accuracy": 0.8}]

    lines, original = [], Axes.axvline
    monkeypatch.setattr(Axes, "axvline", lambda ax, x, **kw: lines.append((x, kw["color"])) or original(ax, x, **kw))
    plot_deploy({"maestro": curve(0.6), "svd": curve(1.0)}, tmp_path / "d.png",
                targets={"macs_frac": [0.5], "params_frac": [0.25]})
    assert sorted((round(x, 6), c) for x, c in lines) == [(0.075, "C0"), (0.125, "C1"), (0.3, "C0"), (0.5, "C1")]


def test_sweep_table_of_translation_runs_shows_perplexity(tmp_path):
    from fedmaestro import plot
    from fedmaestro.config import to_dict

    for job, lam, ppl in (("0_lam=0.32", 0.32, 9.5), ("1_lam=0.64", 0.64, 9.9)):
        cfg = tiny(epochs=1, lambda_gl=lam)
        (tmp_path / job).mkdir()
        (tmp_path / job / "config.json").write_text(json.dumps(to_dict(cfg)))
        record = {"epoch": 1, "accuracy": 0.6, "loss": 2.3, "perplexity": ppl, "params_deployed": 100, "params_rel": 0.5,
                  "macs_deployed": 1000, "macs_rel": 0.4, "train_macs_rel": 0.9, "train_params_rel": 0.8,
                  "total_rank": 10, "ranks": {"fc1": 10}, "wall_s": 1.0}
        (tmp_path / job / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    assert plot.main([str(tmp_path)]) == 0
    table = (tmp_path / "sweep.md").read_text().splitlines()
    assert table[0].startswith("| Variant | Acc. (%) | Perplexity | MACs (Inf.) |")
    assert table[2].startswith("| Maestro (λ=0.32) | 60.00 | 9.50 | 1,000 (0.40x) |")


@pytest.mark.parametrize("mode, resume, message", [
    ("centralized", False, r"checkpoint=/x/checkpoint.pt is read only with resume=true .*or drop checkpoint="),
    ("federated", False, r"is read only with resume=true"),
    ("hpo", True, r"is not read by mode=hpo: a lambda search resumes from its run directory"),
    ("theory", False, r"is not read by mode=theory: its experiments train small linear maps from scratch"),
])
def test_a_checkpoint_the_mode_would_not_read_is_refused(tmp_path, mode, resume, message):
    from omegaconf import OmegaConf

    from fedmaestro.__main__ import run_mode

    cfg = OmegaConf.structured(Config(mode=mode, resume=resume, checkpoint="/x/checkpoint.pt"))
    with pytest.raises(ValueError, match=message):
        run_mode(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_what_a_resume_may_change_is_pinned_per_mode(caplog):
    common = {"resume", "checkpoint", "progress", "device", "data.root", "train.threads", "fl.client_cpus",
              "fl.client_gpus"}
    assert set(checkpoint.resume_ignored("federated", "fashion_mnist")) == common | {
        "fl.rounds", "strategy.round_timeout", "strategy.connect_timeout", "strategy.overlap_eval",
        "strategy.keep_init_norm", "train.num_workers"}
    assert set(checkpoint.resume_ignored("centralized", "fashion_mnist")) == common | {"train.epochs",
                                                                                       "train.num_workers"}
    assert set(checkpoint.resume_ignored("centralized", "imagenet")) == common | {"train.epochs"}  # loader workers
    workers = to_dict(Config())
    workers["train"]["num_workers"] = 8
    with pytest.raises(ValueError, match=r"train.num_workers: 0 -> 8 \(ImageNet's random crops come from torch's RNG "
                                         r"without loader workers and from each worker's seed with them"):
        checkpoint.check_resumable(to_dict(Config()), workers, checkpoint.resume_ignored("centralized", "imagenet"))
    saved = to_dict(Config())
    changed = to_dict(Config())
    changed["devices"]["name"], changed["device"], changed["train"]["threads"] = "three_tiers", "cpu", 4
    # "device" is ignored, "devices.name" is not: a prefix names a key and the keys below it, not a longer name
    assert checkpoint.config_diff(saved, changed) == ["devices.name: 'homogeneous' -> 'three_tiers'"]
    changed["devices"]["name"] = saved["devices"]["name"]
    with caplog.at_level(logging.WARNING, logger="fedmaestro.checkpoint"):
        checkpoint.check_resumable(saved, changed)
    assert "train.threads" in caplog.text and "digit for digit" in caplog.text


def test_epochs_are_evaluated_every_eval_every_and_at_the_end_each_after_a_recalibration(tmp_path, monkeypatch):
    calls = []
    real = centralized.recalibrate_batchnorm

    def spy(model, loader, task, device):
        calls.append(loader.epoch)
        return real(model, loader, task, device)

    monkeypatch.setattr(centralized, "recalibrate_batchnorm", spy)
    trainer = Trainer(tiny(eval_every=2, shrink=False, label_smoothing=0.1), tmp_path, DATASETS)
    assert trainer.task.label_smoothing == 0.1
    records = trainer.fit(show_progress=False)
    assert ["accuracy" in r for r in records] == [False, True, True]  # epoch 2, and the last
    assert calls == [1, 2]  # before each evaluation, on that epoch's calibration batches
    calls.clear()
    # a shrink recalibrates even where the epoch is not evaluated
    trainer = Trainer(tiny(epochs=2, eval_every=10, eps_ps=10.0), tmp_path / "shrunk", DATASETS)
    records = trainer.fit(show_progress=False)
    assert records[0]["total_rank"] < 236 and "accuracy" not in records[0]
    assert calls[0] == 0


class _Payload:
    """An object a pickle would rebuild by running this module's code: what weights_only=True refuses."""

    ran = False

    def __reduce__(self):
        return (_Payload._rebuild, ())

    @staticmethod
    def _rebuild():
        _Payload.ran = True
        return "rebuilt"


def test_a_file_holding_pickled_objects_is_refused_without_running_them(tmp_path):
    torch.save({"model": _Payload()}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"is not a checkpoint or model file written by fedmaestro"):
        checkpoint.load(tmp_path / "checkpoint.pt")
    assert not _Payload.ran


@pytest.mark.parametrize("content", [torch.zeros(3), {"config": {}}, {"model": {}}, {"config": [], "model": {}}])
def test_a_torch_file_that_fedmaestro_did_not_write_is_refused_by_name(tmp_path, content):
    torch.save(content, tmp_path / "checkpoint.pt")  # loaded with weights_only, then a traceback or a KeyError
    with pytest.raises(ValueError, match=r"checkpoint.pt is not a checkpoint or model file written by fedmaestro \(it "
                                         r"lacks fedmaestro's 'config' and 'model' dicts\)"):
        checkpoint.load(tmp_path / "checkpoint.pt")


def test_train_threads_sets_the_processes_torch_threads_and_null_leaves_them():
    before = torch.get_num_threads()
    try:
        centralized.apply_threads(tiny(threads=1))
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        centralized.apply_threads(tiny(threads=None))  # null: torch's default, untouched
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_resume_from_another_runs_checkpoint_never_writes_over_the_run_that_is_here(tmp_path):
    """resume=true checkpoint=<run A> hydra.run.dir=<run B> would continue A in B, over B's records: refused
    (RunDirGuard, before Hydra writes), every file of B as it was; into a new directory, A goes on."""
    overrides = ["mode=centralized", "data.subset=128", "data.test_subset=64", "train.epochs=1", "progress=false"]
    for run in ("a", "b"):
        Trainer(compose(overrides + [f"hydra.run.dir={tmp_path / run}", f"seed={ord(run)}"])[0],
                tmp_path / run).fit(show_progress=False)
    with pytest.raises(FileExistsError, match=rf"resume=true checkpoint={tmp_path / 'a'} would continue that other run "
                                              r"here, over this one: drop checkpoint= to continue the run that is here"):
        checkpoint.refuse_overwrite(tmp_path / "b", True, "centralized", source=str(tmp_path / "a"))
    for own in (tmp_path / "b", tmp_path / "b" / "checkpoint.pt"):  # its own checkpoint, named: goes on
        checkpoint.refuse_overwrite(tmp_path / "b", True, "centralized", source=str(own))
    checkpoint.refuse_overwrite(tmp_path / "new", True, "centralized", source=str(tmp_path / "a"))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "b").rglob("*") if p.is_file()}
    done = subprocess.run([sys.executable, "-m", "fedmaestro", *overrides, "train.epochs=2", "resume=true",
                           f"checkpoint={tmp_path / 'a'}", f"hydra.run.dir={tmp_path / 'b'}", "seed=97"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "would continue that other run here" in done.stderr, done.stderr
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "b").rglob("*") if p.is_file()} == before


def test_a_run_that_diverges_ends_with_one_line_naming_the_fix(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fedmaestro", "mode=centralized", "data.subset=128",
                           "data.test_subset=64", "train.epochs=1", "train.lr=1e6", "progress=false",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "error: training loss is nan; lower train.lr (now 1e+06) or set train.grad_clip" in done.stderr
    assert "Traceback" not in done.stderr
    assert "- error: training loss is nan" in (tmp_path / "run" / "fedmaestro.log").read_text()  # how the run ended
