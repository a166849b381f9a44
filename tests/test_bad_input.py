"""Bad input: every value, key, file or directory a run cannot use is refused before any work, in one line that
names the setting and the fix, and nothing a user has is written over."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedmaestro import checkpoint, data, lod, models
from fedmaestro.config import (Config, DataConfig, DeployConfig, DevicesConfig, FLConfig, PartitionConfig, TierConfig,
                               TrainConfig, unknown_key)
from fedmaestro.data.memory import NORMALIZATION
from fedmaestro.plots import read_records
from fedmaestro.train import resolve_device, unused_settings

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, module: str = "fedmaestro") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("make, match", [
    (lambda: TrainConfig(lambda_gl=float("inf")), r"train.lambda_gl=inf is invalid: must be a finite number"),
    (lambda: TrainConfig(eps_ps=float("nan")), r"train.eps_ps=nan is invalid: must be a finite number"),
    (lambda: TrainConfig(betas=[0.9, float("nan")]), r"train.betas=\[0.9, nan\] is invalid: must be a finite number"),
    (lambda: PartitionConfig(alpha=float("inf")), r"partition.alpha=inf is invalid: must be a finite number"),
    (lambda: TierConfig(name="s", share=float("inf")), r"devices.tiers\[s\].share=inf is invalid: must be a finite"),
    (lambda: TrainConfig(lambda_stop_params=1.0), r"train.lambda_stop_params=1.0 is invalid: .*\(0, 1\).*would stop "
                                                  r"the lasso before the first epoch"),
    (lambda: Config(seed=2 ** 64), r"seed=18446744073709551616 is invalid: must be in \[0, 2\*\*32\)"),
    (lambda: Config(fl=FLConfig(federated_eval_every=1), data=DataConfig(local_test_fraction=0.0)),
     r"fl.federated_eval_every=1 is invalid: .*data.local_test_fraction=0 holds none out"),
    (lambda: DevicesConfig(tiers=[TierConfig(name="a", dropout=1.0), TierConfig(name="b", dropout=0.5, straggler=0.5)]),
     r"no client of any tier could ever answer a round in time"),
    (lambda: DeployConfig(min_accuracy=85.0), r"deploy.min_accuracy=85.0 is invalid: .*a fraction, not a percentage"),
    (lambda: DeployConfig(stop_macs=0.6, target_macs=[0.5, 0.7]),
     r"deploy.target_macs=\[0.5, 0.7\] is invalid: \[0.5\] lie below deploy.stop_macs=0.6"),
    (lambda: DeployConfig(stop_params=0.3, target_params=[0.2]), r"\[0.2\] lie below deploy.stop_params=0.3"),
])
def test_values_no_run_can_use_are_refused_naming_the_key(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_values_at_the_edges_that_a_run_can_use_pass():
    DevicesConfig(tiers=[TierConfig(name="a", dropout=1.0), TierConfig(name="b", dropout=0.5)])  # b still answers
    DeployConfig(stop_macs=0.5, target_macs=[0.5], min_accuracy=0.0)
    Config(seed=2 ** 32 - 1, fl=FLConfig(federated_eval_every=0), data=DataConfig(local_test_fraction=0.0))
    TrainConfig(lambda_stop_params=0.99)


def test_an_unknown_key_inside_a_list_entry_is_named_with_its_closest_key():
    assert unknown_key("devices.tiers[0].dropuot") == "devices.tiers[0].dropuot (did you mean devices.tiers[0].dropout?)"
    assert unknown_key("devices.tiers[3].budgt") == "devices.tiers[3].budgt (did you mean devices.tiers[3].budget?)"
    assert unknown_key("train.epoch") == "train.epoch (did you mean train.epochs?)"


@pytest.mark.parametrize("override, message", [
    ("devices.tiers.0.dropuot=0.2", "unknown keys (not in the schema, fedmaestro/config.py): devices.tiers[0].dropuot "
                                    "(did you mean devices.tiers[0].dropout?)"),
    ("devices.tiers=[{name: a, dropuot: 0.2}]", "unknown keys (not in the schema, fedmaestro/config.py): dropuot, in an "
                                               "entry of type TierConfig (did you mean dropout?)"),
    ("model.skip=fc1", "model.skip: Invalid value assigned: str is not a ListConfig, list or tuple. Give a list: "
                       "model.skip=[fc1]"),
    ("fl.num_clients=1e3", "fl.num_clients: Value '1000.0' of type 'float' could not be converted to Integer; give a "
                           "whole number"),
    ("train.lr=${oc.env:FEDMAESTRO_NO_SUCH_VARIABLE}", "train.lr: the interpolation does not resolve"),
    ("+model.kwargs.widht=2", "model.kwargs={'widht': 2} does not fit model.name=lenet: "),
    ("dataset.num_classes=5", "dataset.num_classes=5 but fashion_mnist has 10 classes; set dataset.num_classes=10"),
])
def test_the_command_line_names_the_key_and_the_fix(tmp_path, override, message):
    done = cli("mode=centralized", "data.subset=200", "data.test_subset=100", "train.epochs=1", "progress=false",
               override, f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 2 and f"error: config: {message}" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


def test_a_sweep_jobs_directory_given_unquoted_is_answered_with_the_quoted_override(tmp_path):
    job = tmp_path / "0_train.lambda_gl=1e-4,seed=0"  # a --multirun job's directory name
    done = cli("mode=deploy", f"checkpoint={job}")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"must be quoted for Hydra: \"checkpoint='{job}'\"" in done.stderr, done.stderr[-2000:]
    quoted = cli("mode=deploy", f"checkpoint='{job}'")  # the advice parses: the run now fails on the missing directory
    assert quoted.returncode == 2 and f"checkpoint {job} does not exist" in quoted.stderr, quoted.stderr[-2000:]


def test_the_number_of_classes_must_fit_the_data_set():
    images = torch.zeros(6, 1, 28, 28, dtype=torch.uint8)
    known = data.InMemoryDataset(images, torch.tensor([0, 1, 2, 3, 4, 9]), train=True, name="fashion_mnist",
                                 norm=NORMALIZATION["fashion_mnist"])
    data.check_num_classes(known, 10)
    data.check_num_classes(data.subset(known, 2), 10)  # a subset without class 9 is still 10 classes
    with pytest.raises(ValueError, match=r"dataset.num_classes=20 but fashion_mnist has 10 classes"):
        data.check_num_classes(known, 20)
    unknown = torch.utils.data.TensorDataset(torch.zeros(3))
    unknown.targets = [0, 4, 2]  # an ImageFolder-like set: its labels must lie below the count
    data.check_num_classes(unknown, 5)
    with pytest.raises(ValueError, match=r"labels go up to 4; set dataset.num_classes=5 or more"):
        data.check_num_classes(unknown, 4)


def test_devices_and_model_arguments_that_cannot_work_are_refused():
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match=r"device='mps' but Apple's MPS is not available here"):
            resolve_device("mps")
    from fedmaestro.train import build_model
    with pytest.raises(ValueError, match=r"model.kwargs=\{'depth': 3\} does not fit model.name=lenet: .*'depth'"):
        build_model(Config(model=Config().model.__class__(name="lenet", kwargs={"depth": 3})))
    with pytest.raises(ValueError, match=r"nothing to factorize \(to train the dense model, set model.factorize=false\)"):
        lod.factorize(models.build("lenet"), skip=["conv1", "conv2", "fc1", "fc2", "fc3"])


def test_settings_without_effect_are_named():
    notices = unused_settings(TrainConfig(full_pass=True, sampler="none"), "cpu")
    assert any("train.full_pass=true" in n and "train.sampler=none" in n for n in notices)
    notices = unused_settings(TrainConfig(distill_weight=2.0), "cpu")
    assert any("train.distill_weight=2" in n and "full_pass, which is off" in n for n in notices)
    assert unused_settings(TrainConfig(full_pass=True, distill_weight=2.0), "cpu") == []
    (notice,) = unused_settings(TrainConfig(lambda_warmup=2), "cpu")
    assert "train.lambda_warmup=2 delays the lasso, and train.lambda_gl=0 turns it off" in notice
    assert unused_settings(TrainConfig(lambda_warmup=2, lambda_gl=1e-3), "cpu") == []


def test_shrinking_every_layer_away_is_warned(caplog):
    model = lod.factorize(models.build("lenet"))
    with caplog.at_level(logging.WARNING, logger="fedmaestro.lod.shrink"):
        lod.shrink(model, 1e3)  # a little above the importance of every first column: not a refused value
    assert all(layer.rank == 0 for _, layer in lod.layers(model))
    assert any("cut every LoD layer to rank 0" in m and "train.eps_ps" in m for m in caplog.messages)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedmaestro.lod.shrink"):
        lod.shrink(model, 1e3)  # said once: nothing was left to cut
    assert caplog.messages == []


# --- files and run directories ----------------------------------------------------------------------------------
def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"model": {f"w{i}": torch.randn(100, 100) for i in range(4)}}, path)
    whole = path.read_bytes()
    failures = set()
    for cut in range(1000, len(whole), len(whole) // 40):  # an interrupted copy, cut anywhere
        path.write_bytes(whole[:cut])
        with pytest.raises(ValueError, match=r"is not a checkpoint or model file written by fedmaestro") as e:
            checkpoint.load(path)
        failures.add(type(e.value.__cause__).__name__)
    # which error torch raises depends on where the file ends: all of them are one message, with the cause kept
    assert "NoneType" not in failures


def _finished_run(run_dir: Path, mode: str = "centralized", files=("model.pt", "metrics.jsonl")) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"mode": mode}))
    for name in files:
        (run_dir / name).write_text("{}")


def test_a_finished_run_whose_checkpoint_was_deleted_is_still_not_written_over(tmp_path):
    run = tmp_path / "run"
    _finished_run(run)
    assert checkpoint.held_run(run) == ("centralized", run / "model.pt")
    with pytest.raises(FileExistsError, match=r"already holds a centralized run \(model.pt\); give the new run its "
                                              r"own directory"):
        checkpoint.refuse_overwrite(run, False, "centralized")
    with pytest.raises(FileExistsError, match=r"but no checkpoint.pt to continue it from \(resume=true would start "
                                              r"afresh over it\)"):
        checkpoint.refuse_overwrite(run, True, "centralized")
    with pytest.raises(FileExistsError, match=r"holds a centralized run \(model.pt\), not a federated run"):
        checkpoint.refuse_overwrite(run, False, "federated")
    _finished_run(tmp_path / "search", mode="hpo", files=("hpo.json",))
    with pytest.raises(FileExistsError, match=r"holds a lambda search \(hpo.json\)"):
        checkpoint.refuse_overwrite(tmp_path / "search", False, "hpo")
    started = tmp_path / "started"  # what a run refused at start-up leaves: no run
    started.mkdir()
    (started / "config.json").write_text(json.dumps({"mode": "federated"}))
    (started / "metrics.jsonl").write_text("")
    checkpoint.refuse_overwrite(started, False, "federated")


def test_a_theory_run_is_not_written_over_and_is_not_resumed(tmp_path):
    run = tmp_path / "theory"
    args = ["mode=theory", "theory.steps=20", "theory.shrink_every=10", "progress=false", f"hydra.run.dir={run}"]
    done = cli(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for again in ([], ["resume=true"]):
        done = cli(*args, *again)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert f"{run} already holds a theory run (theory.json); give the new run its own directory" in done.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    done = cli(*args[:-1], "resume=true", f"hydra.run.dir={tmp_path / 'other'}")
    assert done.returncode == 2 and "resume=true is not read by mode=theory" in done.stderr, done.stderr[-2000:]


def test_plotting_a_run_killed_while_writing_its_last_record(tmp_path, caplog):
    records = [{"epoch": i, "accuracy": 0.5} for i in range(3)]
    text = "".join(json.dumps(r) + "\n" for r in records)
    (tmp_path / "metrics.jsonl").write_text(text + '{"epoch": 3, "accur')
    with caplog.at_level(logging.WARNING, logger="fedmaestro.plots"):
        assert read_records(tmp_path) == records
    assert any("its last line is cut off" in m for m in caplog.messages)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0, "accur\n' + text)
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 1 is not a JSON record; the file is damaged"):
        read_records(tmp_path)
    done = cli(str(tmp_path), module="fedmaestro.plot")
    assert done.returncode == 2 and "line 1 is not a JSON record" in done.stderr and "Traceback" not in done.stderr


def test_a_run_directory_that_cannot_be_one_is_refused_in_one_line(tmp_path):
    (tmp_path / "afile").write_text("mine")
    for run_dir, message in [(tmp_path / "afile", f"{tmp_path / 'afile'} is a file, not a directory"),
                             (tmp_path / "afile" / "sub", f"{tmp_path / 'afile'} is a file, not a directory"),
                             (Path("/proc/fedmaestro/run"), "cannot be made (")]:
        done = cli("mode=centralized", f"hydra.run.dir={run_dir}")
        assert done.returncode == 2 and f"error: hydra.run.dir={run_dir}" in done.stderr, done.stderr[-2000:]
        assert message in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "afile").read_text() == "mine"


def test_partition_settings_of_another_scheme_are_named():
    from fedmaestro.train import unused_partition_settings

    assert unused_partition_settings(PartitionConfig(scheme="iid", alpha=0.05)) == [
        "partition.alpha=0.05 is read by partition=dirichlet only; partition=iid does not use it"]
    assert unused_partition_settings(PartitionConfig(scheme="dirichlet", alpha=0.05)) == []
    notices = unused_partition_settings(PartitionConfig(scheme="dirichlet", classes_per_partition=3,
                                                        shards_per_partition=4))
    assert len(notices) == 2 and "partition=pathological only" in notices[0] and "partition=shard only" in notices[1]


def test_the_pathological_class_assignment_is_a_setting_and_its_warning_is_reported_once(caplog):
    from clients import local
    from strategies.server_app import compose

    with pytest.raises(ValueError, match=r"partition.class_assignment='fixed' is not allowed; choose one of "
                                         r"\['first-deterministic', 'deterministic', 'random'\]"):
        PartitionConfig(class_assignment="fixed")
    overrides = ["partition=pathological", "partition.classes_per_partition=2", "fl.num_clients=4", "fl.clients_per_round=2",
                 "data.subset=600"]
    reported: list[str] = []
    local.forget_data()  # (built by an earlier test, the partitions would be reused and nothing reported)
    first = local.client_data(compose(overrides)[0], report=reported.append)
    assert len(reported) == 1 and "leaves classes" in reported[0] and "use at least 10 clients" in reported[0]
    deterministic = local.client_data(compose(overrides + ["partition.class_assignment=deterministic"])[0])
    held = [sorted(set(data.labels(first.train_set)[list(train)])) for train, _ in first.splits]
    assert held[0][0] == 0 and held[1][0] == 1  # first-deterministic: client i holds class i
    assert [sorted(set(data.labels(deterministic.train_set)[list(train)])) for train, _ in deterministic.splits] == \
        [[0, 1], [1, 2], [2, 3], [3, 4]]  # deterministic: classes i .. i + k - 1
    # a later run in this process with another class count is checked, not served the cached partitions
    with pytest.raises(ValueError, match=r"dataset.num_classes=7 but fashion_mnist has 10 classes"):
        local.client_data(compose(overrides + ["dataset.num_classes=7"])[0])
    local.forget_data()


def test_sweep_labels_name_only_what_a_runs_mode_reads_and_full_keys_where_short_ones_clash():
    from types import SimpleNamespace

    from fedmaestro.plots import _settings

    keys = ["fl.rounds", "hpo.eval_every", "train.epochs", "train.eval_every"]
    values = {"fl.rounds": 20, "hpo.eval_every": 5, "train.epochs": 20, "train.eval_every": 1}
    centralized = SimpleNamespace(flat={"mode": "centralized", **values})
    federated = SimpleNamespace(flat={"mode": "federated", **values})
    assert _settings(centralized, keys) == ["epochs=20", "train.eval_every=1"]
    assert _settings(federated, keys) == ["rounds=20", "train.eval_every=1"]


def test_dense_runs_of_a_sweep_are_averaged_only_where_they_differ_in_the_seed_alone():
    from fedmaestro.plots import Run, _flatten, _label, _varying_keys

    def run(factorize, lr, eps, seed):
        config = {"mode": "centralized", "seed": seed, "model": {"factorize": factorize},
                  "train": {"lr": lr, "eps_ps": eps, "lambda_gl": 0.0 if not factorize else 1e-3}}
        return Run(Path("."), config, [{"epoch": 1}], _flatten(config))

    runs = [run(False, 0.01, 1e-5, 0), run(False, 0.01, 1e-5, 1), run(False, 0.5, 1e-5, 0), run(True, 0.01, 1e-3, 0)]
    keys = _varying_keys(runs)
    labels = [_label(r, keys) for r in runs]
    # the learning rate names a dense run (two such runs are not seeds of one); the lasso's threshold does not
    assert labels[:3] == ["Non-Factorized, lr=0.01", "Non-Factorized, lr=0.01", "Non-Factorized, lr=0.5"]
    assert labels[3] == "Maestro (λ=0.001, eps_ps=0.001, lr=0.01)"


def test_a_root_key_typo_is_named_as_a_root_key():
    done = cli("mode=centralized", "seedd=1")
    assert done.returncode == 2 and "error: config: unknown keys (not in the schema, fedmaestro/config.py): seedd " \
                                    "(did you mean seed?)" in done.stderr, done.stderr[-2000:]
    done = cli("mode=centralized", "train.milestones=5")
    assert "Give a list: train.milestones=[5]" in done.stderr, done.stderr[-2000:]


BASE = ["mode=centralized", "data.subset=200", "data.test_subset=100", "train.epochs=1", "progress=false"]


def test_a_refused_resume_leaves_no_new_directory(tmp_path):
    base = BASE
    assert cli(*base, f"hydra.run.dir={tmp_path / 'a'}").returncode == 0
    done = cli(*base, "train.lr=0.5", "resume=true", f"checkpoint={tmp_path / 'a'}",
               f"hydra.run.dir={tmp_path / 'new' / 'b'}")
    assert done.returncode == 2 and "the checkpoint was written with a different config" in done.stderr
    assert not (tmp_path / "new").exists()


def test_models_whose_stored_config_predates_a_new_check_still_load(tmp_path):
    from fedmaestro.centralized import load_model

    assert cli(*BASE, f"hydra.run.dir={tmp_path}").returncode == 0
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    state["config"]["train"]["lambda_stop_params"] = 1.0  # valid until 2026-12-03
    state["config"]["seed"] = 2 ** 40
    state["config"]["deploy"]["min_accuracy"] = 85.0
    state["config"]["train"]["lr"] = float("inf")
    torch.save(state, tmp_path / "old.pt")
    _, loaded = load_model(tmp_path / "old.pt")
    assert loaded.train.lambda_stop_params == 1.0 and loaded.seed == 2 ** 40
    with pytest.raises(ValueError, match=r"train.lambda_stop_params=1.0 is invalid"):  # a new run: refused
        TrainConfig(lambda_stop_params=1.0)


def test_a_search_directory_is_named_as_one_when_its_lambda_checkpoints_are_gone(tmp_path):
    (tmp_path / "hpo.json").write_text("{}")
    (tmp_path / "model.pt").write_text("{}")
    assert checkpoint.held_run(tmp_path) == ("hpo", tmp_path / "hpo.json")


def test_a_federated_run_that_never_got_a_valid_reply_stays_failed_when_resumed(tmp_path):
    from clients import client_app
    from strategies.local_grid import LocalGrid
    from strategies.maestro import MaestroStrategy
    from strategies.server_app import compose, finish_done_run

    overrides = ["data.subset=600", "data.test_subset=200", "fl.num_clients=4", "fl.clients_per_round=2", "fl.rounds=1",
                 "progress=false", f"hydra.run.dir={tmp_path}"]

    class Silent(LocalGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            if messages and messages[0].metadata.message_type == "train":
                return []
            return super().send_and_receive(messages, timeout=timeout)

    cfg = compose(overrides)[0]
    with pytest.raises(TimeoutError, match="no client answered any of the 1 rounds"):
        MaestroStrategy(cfg, tmp_path, show_progress=False).start(Silent(client_app.app, 4))
    with pytest.raises(TimeoutError, match="no client answered any of the 1 rounds"):
        finish_done_run(tmp_path, compose(overrides + ["resume=true"])[0], 1)


def test_nodes_with_the_wrong_partition_ids_are_told_so(tmp_path):
    from clients import client_app
    from fedmaestro import protocol as P
    from strategies.local_grid import LocalGrid
    from strategies.maestro import MaestroStrategy
    from strategies.server_app import compose

    cfg = compose(["data.subset=600", "fl.num_clients=4", "fl.clients_per_round=2", "fl.rounds=1", "progress=false",
                   f"hydra.run.dir={tmp_path}"])[0]
    grid = LocalGrid(client_app.app, 4)
    for node, context in grid.contexts.items():  # ids 1..4, as a SuperNode started with 1-based ids would give
        context.node_config[P.PARTITION_ID] = int(context.node_config[P.PARTITION_ID]) + 1
    with pytest.raises(ValueError, match=r"the nodes' partition ids are \[1, 2, 3, 4\], not 0..3 .*num-partitions=4"):
        MaestroStrategy(cfg, tmp_path, show_progress=False).start(grid)


def test_a_last_batch_of_one_example_is_skipped_where_batchnorm_cannot_train_on_it():
    from fedmaestro.train import make_optimizer, task_for, train_epoch

    model = models.build("vgg19", in_channels=1, num_classes=10)  # 28 x 28 inputs: its last feature maps are 1 x 1
    x, y = torch.randn(3, 1, 28, 28), torch.tensor([0, 1, 2])
    train = TrainConfig(batch_size=2, lr=0.01)
    stats = train_epoch(model, [(x[:2], y[:2]), (x[2:], y[2:])], make_optimizer(model, train), train,
                        task_for("fashion_mnist"), torch.device("cpu"))
    assert stats["steps"] == 1 and stats["num_examples"] == 2
    lenet = models.build("lenet")  # no BatchNorm: every example trains
    stats = train_epoch(lenet, [(x[:2], y[:2]), (x[2:], y[2:])], make_optimizer(lenet, train), train,
                        task_for("fashion_mnist"), torch.device("cpu"))
    assert stats["steps"] == 2 and stats["num_examples"] == 3
