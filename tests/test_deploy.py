"""Train once, deploy everywhere (fedmaestro/deploy.py): the greedy search of Sec. 3.4, its exports,
and the SVD baseline of Fig. 5a / 11.

LeNet-5 trained for two short epochs on the tiny in-memory data set of test_centralized.py; the
end-to-end run reads 512 + 256 Fashion-MNIST images. A few seconds in all, on one CPU thread.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from fedmaestro import deploy, lod
from fedmaestro.centralized import Trainer, deployed_footprint, load_model, save_model
from fedmaestro.config import Config, DataConfig, DatasetConfig, DeployConfig, ModelConfig
from fedmaestro.footprint import measure
from fedmaestro.train import evaluate, task_for
from fedmaestro import data
from test_centralized import DATASETS, patterns, tiny

CPU = torch.device("cpu")
EXAMPLE = (torch.zeros(1, 1, 28, 28),)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(Maestro model dir (lambda 0), dense model dir), trained briefly."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    out = []
    for name, factorize in (("maestro", True), ("dense", False)):
        cfg = tiny(epochs=2, lambda_gl=0.0, lr=0.1)
        cfg.model.factorize = factorize
        trainer = Trainer(cfg, root / name, DATASETS)
        trainer.fit(show_progress=False)
        trainer.save_model(root / name / "model.pt")
        out.append(root / name)
    return tuple(out)


def context(stop_macs=0.3, criterion="loss", test=True) -> deploy.GreedyContext:
    train, test_set = DATASETS
    batch = next(iter(data.BatchLoader(train, 128, shuffle=True, seed=0)))
    cfg = tiny()
    return deploy.GreedyContext(batch=batch, task=task_for("fashion_mnist"), device=CPU, example=EXAMPLE,
                                dense=measure(_dense(), example=EXAMPLE),
                                deploy=DeployConfig(stop_macs=stop_macs, criterion=criterion),
                                test_loader=data.BatchLoader(test_set, 128, shuffle=False) if test else None)


def _dense():
    cfg = tiny()
    cfg.model.factorize = False
    from fedmaestro.train import build_model
    return build_model(cfg)


def test_every_step_applies_the_candidate_with_the_smallest_loss(trained):
    model, _ = load_model(trained[0])
    start = copy.deepcopy(model)
    ctx = context(stop_macs=0.3, test=False)
    points, candidates = [], []
    curve = deploy.greedy_curve(model, ctx, on_point=points.append,
                                on_candidate=lambda done, of: candidates.append((done, of)))
    assert points == curve  # progress: every point as it is made, and every candidate of every step
    live = [sum(r > 0 for r in p["ranks"].values()) for p in curve[:-1]]
    assert candidates == [(i, n) for n in live for i in range(1, n + 1)]
    assert len(curve) > 5 and curve[0]["step"] == 0 and curve[0]["ranks"] == {n: l.rank for n, l in lod.layers(start)}
    chunk = {n: max(1, round(0.1 * l.rank)) for n, l in lod.layers(start)}
    replay = copy.deepcopy(start)
    for before, after in zip(curve, curve[1:]):
        lod.truncate(replay, before["ranks"])
        losses = {}
        for name, layer in lod.layers(replay):
            if layer.rank:
                layer.active_rank = max(0, layer.rank - chunk[name])
                replay.eval()  # the loss written out here, not deploy.batch_loss (the code under test)
                with torch.no_grad():
                    losses[name] = float(F.cross_entropy(replay(ctx.batch[0]), ctx.batch[1]))
                layer.active_rank = None
        cheapest = min(losses, key=losses.get)
        changed = [n for n in after["ranks"] if after["ranks"][n] != before["ranks"][n]]
        assert changed == [cheapest] and after["removed"] == f"{cheapest}->{after['ranks'][cheapest]}"
        assert after["ranks"][cheapest] == max(0, before["ranks"][cheapest] - chunk[cheapest])
        assert after["batch_loss"] == pytest.approx(losses[cheapest], rel=1e-6)
    assert curve[-1]["macs_frac"] <= 0.3 < curve[-2]["macs_frac"]  # stops at the first point below stop_macs


def test_curve_is_monotone_in_parameters_and_macs_and_counts_merged_layers(trained):
    model, _ = load_model(trained[0])
    curve = deploy.greedy_curve(model, context(stop_macs=0.1))
    for a, b in zip(curve, curve[1:]):
        assert b["total_rank"] < a["total_rank"]
        assert b["params"] <= a["params"] and b["macs"] <= a["macs"]
        assert b["params_factorized"] < a["params_factorized"] and b["macs_factorized"] <= a["macs_factorized"]
    assert all(not math.isnan(p["accuracy"]) for p in curve)  # eval_every = 1
    # a full-rank start is cheaper dense in every layer: it deploys as the dense LeNet (App. D.4)
    assert curve[0]["params"] == 44_426 and curve[0]["macs"] == 281_640 and curve[0]["params_factorized"] == 66_274
    for p in curve:
        cut = copy.deepcopy(load_model(trained[0])[0])
        lod.truncate(cut, p["ranks"])
        assert deployed_footprint(cut, EXAMPLE).params == p["params"]


def test_loss_per_mac_criterion_divides_by_the_macs_a_candidate_saves(trained):
    model, _ = load_model(trained[0])
    ctx = context(criterion="loss_per_mac", test=False)
    layer = dict(lod.layers(model))["fc1"]
    # 12 of fc1's columns (256 -> 120, one output position per example) cost 12 * (256 + 120) MACs
    layer.active_rank = layer.rank - 12  # as greedy_curve sets it for the candidate (and resets it after)
    assert deploy._score(1.0, model, layer, layer.rank - 12, ctx) == pytest.approx(1.0 / (12 * (256 + 120)))
    layer.active_rank = None


def test_helpers_pick_the_first_point_below_a_target_and_interpolate():
    curve = [{"macs_frac": 1.0, "accuracy": 0.9}, {"macs_frac": 0.6, "accuracy": math.nan},
             {"macs_frac": 0.4, "accuracy": 0.7}]
    assert deploy.first_at_or_below(curve, "macs_frac", 0.5) is curve[2]
    assert deploy.first_at_or_below(curve, "macs_frac", 0.3) is None
    # linear between the evaluated points (1.0, 0.9) and (0.4, 0.7); 0.6 has no evaluation
    assert deploy.accuracy_at(curve, "macs_frac", 0.5) == pytest.approx(0.7 + 0.2 * 0.1 / 0.6)
    assert math.isnan(deploy.accuracy_at(curve, "macs_frac", 0.2))
    # plateaus (steps on a layer merged to dense change no MACs): read by step, not by accuracy
    plateaus = [{"macs_frac": f, "accuracy": a} for f, a in [(1.0, 0.5), (1.0, 0.7), (0.5, 0.4), (0.5, 0.8)]]
    assert deploy.accuracy_at(plateaus, "macs_frac", 1.0) == 0.5  # the first point there: the one exported
    assert deploy.accuracy_at(plateaus, "macs_frac", 0.75) == pytest.approx(0.55)  # from (1.0, 0.7) to (0.5, 0.4)
    assert deploy.accuracy_at(plateaus, "macs_frac", 0.5) == 0.4  # (0.7 / 0.65 / 0.8 when sorted by accuracy)
    assert math.isnan(deploy.accuracy_at(plateaus[2:], "macs_frac", 0.75))  # the curve starts below the target


def test_svd_baseline_factorizes_a_dense_model_exactly_and_refuses_a_factorized_one(trained):
    dense, _ = load_model(trained[1])
    svd, _ = deploy.svd_model(trained[1], CPU)
    assert len(lod.layers(svd)) == 5 and not lod.layers(dense)
    x = DATASETS[1].batch(torch.arange(32))[0]
    dense.eval(), svd.eval()
    with torch.no_grad():  # float32 SVD: agreement to rounding of a few ulp of the logits' scale
        torch.testing.assert_close(svd(x), dense(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="model.factorize=false"):
        deploy.svd_model(trained[0], CPU)


def test_svd_baseline_keeps_what_its_config_keeps_dense_and_its_exports_reload(tmp_path):
    cfg = tiny(epochs=1, lambda_gl=0.0)
    cfg.model.factorize, cfg.model.skip_last, cfg.model.skip = False, True, ["conv1"]
    trainer = Trainer(cfg, tmp_path / "dense", DATASETS)
    trainer.save_model(tmp_path / "dense.pt")
    svd, svd_cfg = deploy.svd_model(tmp_path / "dense.pt", CPU)
    assert [n for n, _ in lod.layers(svd)] == ["conv2", "fc1", "fc2"]  # conv1 (model.skip) and fc3 (skip_last)
    lod.truncate(svd, {"fc1": 5})
    save_model(tmp_path / "export.pt", svd, svd_cfg)
    reloaded, _ = load_model(tmp_path / "export.pt")
    assert {n: layer.rank for n, layer in lod.layers(reloaded)} == {n: layer.rank for n, layer in lod.layers(svd)}


def test_deploy_refuses_a_baseline_of_another_model_or_data_set_before_any_search(trained, tmp_path):
    other = tiny(epochs=1, lambda_gl=0.0)
    other.model.factorize, other.dataset.num_classes = False, 7
    Trainer(other, tmp_path / "other", DATASETS).save_model(tmp_path / "other.pt")
    cfg = Config(mode="deploy", device="cpu", progress=False, checkpoint=str(trained[0]),
                 deploy=DeployConfig(svd_baseline=str(tmp_path / "other.pt")))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(ValueError, match=r"dataset.num_classes: 10 vs 7"):
        deploy.run(cfg, run_dir)
    assert list(run_dir.iterdir()) == []  # refused before config.json: nothing of a deployment is there
    # the layers its SVD leaves dense must be the checkpoint's too
    maestro_cfg, skipping = load_model(trained[0])[1], tiny()
    skipping.model.skip_last = True
    with pytest.raises(ValueError, match=r"model.skip_last: False vs True.*model.skip / model.skip_last"):
        deploy.check_baseline(maestro_cfg, skipping, "dense.pt")


def test_deploy_names_the_model_settings_it_does_not_use():
    trained_as = Config(model=ModelConfig(name="resnet18"), dataset=DatasetConfig(name="cifar10", input_shape=[3, 32, 32]))
    given = Config(mode="deploy", model=ModelConfig(name="vgg19"))  # dataset left at its default
    assert deploy.ignored_settings(given, trained_as) == ["model.name: 'resnet18' -> 'vgg19'"]
    assert deploy.ignored_settings(Config(mode="deploy"), trained_as) == []


def test_deploy_run_writes_curves_plot_and_exports_merged_where_cheaper(trained, tmp_path, capsys):
    cfg = Config(mode="deploy", device="cpu", progress=False, checkpoint=str(trained[0]),
                 data=DataConfig(subset=512, test_subset=256),
                 deploy=DeployConfig(batch_size=256, target_macs=[1.0, 0.5, 0.06], target_params=[0.3], stop_macs=0.05,
                                     stop_params=0.25,
                                     eval_every=7, svd_baseline=str(trained[1] / "model.pt")))
    summary = deploy.run(cfg, tmp_path)
    out = " ".join(capsys.readouterr().out.split())
    assert "accuracy on 256 test examples (the data settings are this command's: data.root, data.test_subset=256)" in out
    for method in ("svd",):  # 0.06 lies beyond its curve's end: named, with the setting that ended it
        assert re.search(method + r": no model at macs_frac <= 0.06 is exported: the curve stops above it "
                         r"\(params_frac 0\.2\d+ <= "
                         r"deploy.stop_params=0.25; lower deploy.stop_params\)", out), out
    with (tmp_path / "deploy_curve.csv").open() as f:
        rows = list(csv.DictReader(f))
    methods = {r["method"] for r in rows}
    assert methods == {"maestro", "svd"} and summary["curve_points"]["maestro"] > 3
    for method in methods:  # evaluated every 7th step, and at the point that ends the curve
        mine = [r for r in rows if r["method"] == method]
        assert int(mine[-1]["step"]) % 7 and not math.isnan(float(mine[-1]["accuracy"]))
        assert all(math.isnan(float(r["accuracy"])) == (int(r["step"]) % 7 != 0) for r in mine[:-1])
    assert (tmp_path / "deploy.png").stat().st_size > 0
    assert json.loads((tmp_path / "deploy.json").read_text())["exports"] == json.loads(json.dumps(summary["exports"]))
    assert {(e["method"], e["target"]) for e in summary["exports"]} == {("maestro", "macs_frac<=0.06")} | {
        (m, t) for m in methods for t in ("macs_frac<=1", "macs_frac<=0.5", "params_frac<=0.3")}
    test_loader = data.BatchLoader(data.subset(data.load("fashion_mnist", train=False), 256), 256, shuffle=False)
    for e in summary["exports"]:
        state = torch.load(e["path"], weights_only=True)
        assert state["merged"] == e["merged"]
        model, _ = load_model(e["path"])
        footprint = measure(model, example=EXAMPLE)
        assert (footprint.params, footprint.macs) == (e["params"], e["macs"])
        # merged exactly where the dense layer is cheaper: r (m + n) >= m n (App. D.4)
        for name, rank in e["ranks"].items():
            layer = dict(lod.layers(load_model(trained[0])[0]))[name]
            cheaper_dense = rank * (layer.out_dim + layer.fan_in) >= layer.out_dim * layer.fan_in
            assert (name in e["merged"]) == cheaper_dense, (name, rank)
        assert {n for n, _ in lod.layers(model)} == set(e["ranks"]) - set(e["merged"])
        assert evaluate(model, test_loader, task_for("fashion_mnist"), CPU)["accuracy"] == pytest.approx(e["accuracy"])
        if e["target"] == "macs_frac<=1":  # the start: full rank, every layer merged back to dense
            assert e["params"] == 44_426 and len(e["merged"]) == 5
        else:
            assert e[e["target"].split("<=")[0]] <= float(e["target"].split("<=")[1]) + 1e-12


def test_a_new_deployment_into_a_directory_that_holds_one_is_refused(trained, tmp_path):
    from omegaconf import OmegaConf

    from fedmaestro.__main__ import run_mode

    (tmp_path / "deploy.json").write_text("{}")
    cfg = Config(mode="deploy", device="cpu", progress=False, checkpoint=str(trained[0]), resume=True)
    with pytest.raises(FileExistsError, match=r"already holds a deployment \(deploy.json\); give the new run its own"):
        run_mode(OmegaConf.structured(cfg), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["deploy.json"]


def test_a_deployment_into_a_training_run_directory_is_refused_as_another_modes(tmp_path):
    from fedmaestro import checkpoint

    Trainer(tiny(epochs=1), tmp_path, DATASETS).fit(show_progress=False)
    (tmp_path / "config.json").write_text(json.dumps({"mode": "centralized"}))
    with pytest.raises(FileExistsError, match=r"holds a centralized run \(checkpoint.pt\), not a deployment"):
        checkpoint.refuse_overwrite(tmp_path, True, "deploy")


def test_a_model_cut_to_rank_zero_everywhere_is_refused_before_any_search(trained):
    model, _ = load_model(trained[0])
    lod.truncate(model, {n: 0 for n, _ in lod.layers(model)})
    with pytest.raises(ValueError, match=r"every LoD layer of the model is at rank 0 .*nothing is left to prune"):
        deploy.greedy_curve(model, context())


def test_loss_per_param_criterion_divides_by_the_parameters_of_the_removed_columns(trained):
    model, _ = load_model(trained[0])
    ctx = context(criterion="loss_per_param", test=False)
    layer = dict(lod.layers(model))["fc1"]  # 256 -> 120 at rank 120: a column costs 120 + 256 parameters
    assert deploy._score(1.0, model, layer, layer.rank - 12, ctx) == pytest.approx(1.0 / (12 * (120 + 256)))


def test_the_lazy_search_makes_the_exact_searchs_choices_in_far_fewer_forward_passes(trained, monkeypatch):
    """Where a layer's loss increase only grows as the model shrinks (here a separable convex loss of the ranks
    removed), scoring best-first by the last scores and stopping once none left can beat the best picks what
    scoring every layer picks."""
    model, _ = load_model(trained[0])
    start = {name: layer.rank for name, layer in lod.layers(model)}
    weight = {name: math.sqrt(p) for name, p in zip(start, (2, 3, 5, 7, 11, 13))}  # no two candidates tie

    def convex_loss(m, batch, task, device):
        return sum(weight[n] * (1 - (layer.rank if layer.active_rank is None else layer.active_rank) / start[n]) ** 2
                   for n, layer in lod.layers(m))

    monkeypatch.setattr(deploy, "batch_loss", convex_loss)
    curves, passes = {}, {}
    for lazy in (False, True):
        ctx = context(stop_macs=0.2, test=False)
        ctx.deploy.lazy = lazy
        calls = []
        curve = deploy.greedy_curve(copy.deepcopy(model), ctx, on_candidate=lambda done, of: calls.append(done))
        curves[lazy], passes[lazy] = [p["ranks"] for p in curve], len(calls)
    assert len(curves[False]) > 10 and curves[True] == curves[False]
    assert passes[True] < passes[False] / 2  # 5 layers: the exact search scores 5 candidates a step


def test_the_lazy_search_on_a_trained_model_reaches_the_stop_with_fewer_passes(trained):
    model, _ = load_model(trained[0])
    passes = {}
    for lazy in (False, True):
        ctx = context(stop_macs=0.3, test=False)
        ctx.deploy.lazy = lazy
        calls = []
        curve = deploy.greedy_curve(copy.deepcopy(model), ctx, on_candidate=lambda done, of: calls.append(done))
        assert curve[-1]["macs_frac"] <= 0.3 < curve[-2]["macs_frac"]
        passes[lazy] = len(calls)
    assert passes[True] < passes[False]


def test_a_steps_share_is_of_the_layers_starting_rank_not_its_width(trained):
    model, _ = load_model(trained[0])
    lod.truncate(model, {"fc1": 60})
    curve = deploy.greedy_curve(model, context(stop_macs=0.0, test=False))
    fc1 = [p["ranks"]["fc1"] for p in curve if p["removed"].startswith("fc1->")]
    assert fc1[0] == 54  # 10% of rank 60, not of fc1's 120 outputs


@pytest.mark.parametrize("stop", ["params", "accuracy"])
def test_the_curve_stops_at_the_parameter_or_accuracy_floor(trained, stop):
    model, _ = load_model(trained[0])
    ctx = context(stop_macs=0.0)
    floor = deploy._test_accuracy(copy.deepcopy(model), ctx) - 0.05  # below the start: the curve takes steps first
    if stop == "params":
        ctx.deploy.stop_params = 0.5
    else:
        ctx.deploy.min_accuracy = floor
    curve = deploy.greedy_curve(model, ctx)
    assert len(curve) > 2
    if stop == "params":
        assert curve[-1]["params_frac"] <= 0.5 < curve[-2]["params_frac"]
    else:  # the first evaluated point below the floor ends the curve
        evaluated = [p for p in curve[:-1] if not math.isnan(p["accuracy"])]
        assert curve[-1]["accuracy"] < floor and len(evaluated) > 1 and all(p["accuracy"] >= floor for p in evaluated)
        assert curve[-1]["total_rank"] > 0


def test_no_model_below_the_accuracy_floor_is_exported(trained, tmp_path, capsys, monkeypatch):
    """The point that falls below deploy.min_accuracy ends the curve but is not a deployment: a target only it
    reaches exports nothing, and a model between the curve's evaluations is checked against the floor too."""
    monkeypatch.setattr(deploy, "load_datasets", lambda cfg: DATASETS)  # the data the model was trained on

    def run(targets, where):
        where.mkdir()
        cfg = Config(mode="deploy", device="cpu", progress=False, checkpoint=str(trained[0]),
                     deploy=DeployConfig(batch_size=256, target_macs=targets, stop_macs=0.0, eval_every=3,
                                         min_accuracy=floor))
        return deploy.run(cfg, where)

    model, _ = load_model(trained[0])
    floor = deploy._test_accuracy(model, context(stop_macs=0.0)) - 0.1
    run([], tmp_path / "curve")
    with (tmp_path / "curve" / "deploy_curve.csv").open() as f:
        rows = list(csv.DictReader(f))
    last, before = float(rows[-1]["macs_frac"]), [float(r["macs_frac"]) for r in rows[1:-1]]
    assert float(rows[-1]["accuracy"]) < floor and len(before) > 2  # unevaluated points between start and end
    capsys.readouterr()
    middle = before[len(before) // 2]
    summary = run([last, middle], tmp_path / "deploy")
    out = " ".join(capsys.readouterr().out.split())
    assert f"maestro: no model at macs_frac <= {last:g} is exported: only the point that ended the curve reaches " \
           f"it (accuracy" in out
    assert not (tmp_path / "deploy" / f"deploy_maestro_macs{last:g}.pt").exists()
    assert all(e["accuracy"] >= floor for e in summary["exports"])
    exported = (tmp_path / "deploy" / f"deploy_maestro_macs{middle:g}.pt").exists()
    assert exported == bool(summary["exports"])
    assert exported or f"no model at macs_frac <= {middle:g} is exported: the first one there" in out


def test_a_dense_checkpoint_or_a_missing_baseline_is_refused_naming_its_setting_and_writes_nothing(trained, tmp_path):
    def run(**settings):
        cfg = Config(mode="deploy", device="cpu", progress=False, checkpoint=str(settings.pop("checkpoint")),
                     deploy=DeployConfig(target_macs=[0.5], **settings))
        deploy.run(cfg, tmp_path)

    with pytest.raises(ValueError, match=rf"checkpoint={trained[1]} is a dense model \(model.factorize=false\); "
                                         rf"deploy prunes a factorized one: give a Maestro model as checkpoint=, "
                                         rf"with this dense one as deploy.svd_baseline={trained[1]}"):
        run(checkpoint=trained[1])
    with pytest.raises(FileNotFoundError, match=rf"deploy.svd_baseline {tmp_path / 'gone'} does not exist; "
                                                r"give deploy.svd_baseline=<a run directory"):
        run(checkpoint=trained[0], svd_baseline=str(tmp_path / "gone"))
    assert list(tmp_path.iterdir()) == []  # refused before config.json: the run directory can be discarded


def test_data_missing_at_deploy_names_the_root_the_checkpoint_was_trained_with(trained, tmp_path, monkeypatch):
    model, trained_as = load_model(trained[0])
    trained_as.data.root = str(tmp_path / "their-data")
    save_model(tmp_path / "model.pt", model, trained_as)

    def missing(cfg):
        raise FileNotFoundError(f"no fashion_mnist files under {cfg.data.root}")

    monkeypatch.setattr(deploy, "load_datasets", missing)
    (tmp_path / "run").mkdir()
    cfg = Config(mode="deploy", device="cpu", progress=False, checkpoint=str(tmp_path / "model.pt"),
                 data=DataConfig(root=str(tmp_path / "elsewhere")))
    with pytest.raises(FileNotFoundError, match=rf"no fashion_mnist files under {tmp_path / 'elsewhere'} \(the checkpoint "
                                                rf"was trained with data.root={tmp_path / 'their-data'}: .*give "
                                                rf"data.root={tmp_path / 'their-data'}\)"):
        deploy.run(cfg, tmp_path / "run")
    cfg.data.root = trained_as.data.root  # the same root: the loader's own message, nothing added
    with pytest.raises(FileNotFoundError, match=r"files under [^ ]+their-data$"):
        deploy.run(cfg, tmp_path / "run")


def test_a_curve_that_ends_above_a_target_names_the_setting_that_ended_it():
    d = DeployConfig(stop_macs=0.1, stop_params=0.2, min_accuracy=0.5)
    point = {"macs_frac": 0.3, "params_frac": 0.3, "accuracy": 0.7}
    assert "deploy.min_accuracy=0.5; lower deploy.min_accuracy" in deploy.stopped_by({**point, "accuracy": 0.4}, d)
    assert "deploy.stop_params=0.2; lower deploy.stop_params" in deploy.stopped_by({**point, "params_frac": 0.2}, d)
    assert "deploy.stop_macs=0.1; lower deploy.stop_macs" in deploy.stopped_by({**point, "macs_frac": 0.1}, d)
    assert deploy.stopped_by(point, d) == "no rank left to remove"


def test_a_deployment_that_exports_nothing_says_so_instead_of_an_empty_table(capsys):
    deploy._print_exports([])
    out = capsys.readouterr().out
    assert "no model exported: no target was reached" in out and "Exported models" not in out


def test_a_target_met_exactly_ends_the_curve_and_an_accuracy_at_the_floor_does_not():
    from types import SimpleNamespace
    point = {"macs_frac": 0.5, "params_frac": 0.4, "accuracy": 0.8}
    assert deploy._done(point, SimpleNamespace(deploy=DeployConfig(stop_macs=0.5)))
    assert deploy._done(point, SimpleNamespace(deploy=DeployConfig(stop_macs=0.0, stop_params=0.4)))
    assert not deploy._done(point, SimpleNamespace(deploy=DeployConfig(stop_macs=0.0, min_accuracy=0.8)))
    assert deploy._done({**point, "accuracy": 0.7999}, SimpleNamespace(deploy=DeployConfig(stop_macs=0.0,
                                                                                         min_accuracy=0.8)))
    assert not deploy._done({**point, "accuracy": float("nan")},  # a point that was not evaluated
                            SimpleNamespace(deploy=DeployConfig(stop_macs=0.0, min_accuracy=0.8)))


def test_the_batch_loss_uses_the_batchs_statistics_and_leaves_the_running_ones_alone():
    torch.manual_seed(0)
    model = lod.factorize(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                              torch.nn.Linear(4 * 26 * 26, 10))).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 28, 28, generator=g) * 3 + 2, torch.randint(0, 10, (16,), generator=g)
    bn = model[1]
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    loss = deploy.batch_loss(model, (x, y), task_for("fashion_mnist"), CPU)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var) and not model.training
    with torch.no_grad():
        on_the_batch = F.cross_entropy(copy.deepcopy(model).train()(x), y).item()
        on_the_running = F.cross_entropy(model(x), y).item()
    assert loss == pytest.approx(on_the_batch, rel=1e-5) and loss != pytest.approx(on_the_running, rel=1e-3)


def test_a_loss_per_param_search_removes_the_cheapest_increase_per_parameter(trained):
    model, _ = load_model(trained[0])
    start = copy.deepcopy(model)
    ctx = context(stop_macs=0.0, criterion="loss_per_param", test=False)
    ctx.deploy.stop_params = 0.6
    curve = deploy.greedy_curve(model, ctx)
    chunk = {n: max(1, round(0.1 * l.rank)) for n, l in lod.layers(start)}
    replay = copy.deepcopy(start).eval()
    for before, after in zip(curve[:4], curve[1:4]):
        lod.truncate(replay, before["ranks"])
        with torch.no_grad():
            base = float(F.cross_entropy(replay(ctx.batch[0]), ctx.batch[1]))
        per_param = {}
        for name, layer in lod.layers(replay):
            layer.active_rank = max(0, layer.rank - chunk[name])
            with torch.no_grad():
                increase = float(F.cross_entropy(replay(ctx.batch[0]), ctx.batch[1])) - base
            layer.active_rank = None
            per_param[name] = increase / ((layer.rank - max(0, layer.rank - chunk[name])) *
                                          (layer.out_dim + layer.fan_in))
        cheapest = min(per_param, key=per_param.get)
        assert after["removed"].startswith(f"{cheapest}->")


def test_every_evaluated_point_is_recalibrated_on_the_same_batches(trained, monkeypatch):
    model, _ = load_model(trained[0])
    ctx = context(stop_macs=0.5)
    ctx.calib_loader = data.BatchLoader(DATASETS[0], 64, shuffle=True, seed=0)
    ctx.deploy.eval_every = 2
    epochs = []
    real = deploy.recalibrate_batchnorm

    def spy(model, loader, task, device):
        epochs.append(loader.epoch)
        next(iter(loader))  # a pass moves the loader's epoch on (LeNet has no BatchNorm to read it for)
        return real(model, loader, task, device)

    monkeypatch.setattr(deploy, "recalibrate_batchnorm", spy)
    curve = deploy.greedy_curve(model, ctx)
    evaluated = [p for p in curve if not math.isnan(p["accuracy"])]
    assert len(curve) > 3 and len(evaluated) < len(curve)
    assert epochs == [0] * len(evaluated)


def test_the_search_reads_its_training_batches_without_augmentation_and_with_the_models_loss(monkeypatch):
    augmented = patterns(256, 0, augment=True)
    monkeypatch.setattr(deploy, "load_datasets", lambda cfg: (augmented, DATASETS[1]))
    model_cfg = tiny(label_smoothing=0.1)
    cfg = Config()
    ctx = deploy._context(cfg, model_cfg, CPU)
    assert augmented.train and not ctx.calib_loader.dataset.train  # a copy read without augmentation
    # the loss batch, which decides every greedy step, too: the same examples as an unaugmented read
    plain = data.unaugmented(augmented)
    expected = next(iter(data.BatchLoader(plain, cfg.deploy.batch_size, shuffle=True, seed=cfg.seed)))
    assert torch.equal(ctx.batch[0], expected[0]) and torch.equal(ctx.batch[1], expected[1])
    assert ctx.task.label_smoothing == 0.1
