"""The public API of DESIGN.md, called exactly as outside tests call it (names, orientation, semantics)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedmaestro import data, lod, models, nested
from fedmaestro.footprint import measure


def test_default_ranks_and_the_papers_factor_orientation():
    linear = lod.LoDLinear(7, 4)
    conv = lod.LoDConv2d(3, 16, 3, padding=1)
    assert (linear.rank, linear.active_rank) == (4, None)
    assert conv.rank == min(16, 3 * 3 * 3)
    u, v = linear.factors()
    assert (u.shape, v.shape) == ((4, 4), (7, 4))  # U (out, rank), V (fan_in, rank)
    u, v = conv.factors()
    assert (u.shape, v.shape) == ((16, 16), (27, 16))  # fan_in = in_channels * kh * kw
    assert linear.dense_weight().shape == (4, 7)
    assert conv.dense_weight().shape == (16, 3, 3, 3)


@pytest.mark.parametrize("layer, x", [(lod.LoDLinear(6, 5, rank=3), torch.randn(2, 6)),
                                      (lod.LoDConv2d(2, 4, 3, stride=2, padding=1, rank=3), torch.randn(2, 2, 7, 7))])
def test_factors_are_views_and_dense_weight_is_u_vt(layer, x):
    u, v = layer.factors()
    w = (u @ v.T).reshape(layer.dense_weight().shape)
    torch.testing.assert_close(layer.dense_weight(), w)
    dense = (nn.functional.linear(x, w, layer.bias) if isinstance(layer, lod.LoDLinear) else
             nn.functional.conv2d(x, w, layer.bias, stride=2, padding=1))
    torch.testing.assert_close(layer(x), dense, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        u[:, 1:] = 0  # an in-place edit of the view is an edit of the layer
    layer.active_rank = 1
    full = layer.dense_weight()
    layer.active_rank = None
    torch.testing.assert_close(layer.dense_weight(), full)


def test_factorize_keeps_the_dense_function_and_lists_layers_in_module_order():
    torch.manual_seed(0)
    dense = models.build("lenet").eval()
    x = torch.randn(4, 1, 28, 28)
    expected = dense(x)
    names = [name for name, module in dense.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
    model = lod.factorize(dense)
    assert model is dense
    assert [name for name, _ in lod.layers(model)] == names
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_importance_is_the_product_of_tail_norms():
    layer = lod.LoDLinear(3, 2, rank=2)
    u, v = layer.factors()
    with torch.no_grad():
        u.copy_(torch.tensor([[3.0, 4.0], [0.0, 1.0]]).T)  # U columns (3, 4) and (0, 1)
        v.copy_(torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 2.0]]).T)  # V columns (1, 2, 2) and (0, 0, 2)
    # b = 1: ||U||_F = sqrt(26), ||V||_F = sqrt(13); b = 2: 1 * 2
    torch.testing.assert_close(lod.importance(layer), torch.tensor([26.0 ** 0.5 * 13.0 ** 0.5, 2.0]))
    # HGL: sum_b ||U_{:,b:}|| + ||V_{:,b:}|| = (sqrt(26) + 1) + (sqrt(13) + 2)
    torch.testing.assert_close(lod.hgl_penalty(nn.Sequential(layer)),
                               torch.tensor(26.0 ** 0.5 + 1 + 13.0 ** 0.5 + 2))


def test_shrink_truncate_and_to_dense_follow_the_contract():
    model = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 3))
    lod.factorize(model)
    with torch.no_grad():
        model[0].factors()[0][:, 4:] = 0  # columns 5.. carry nothing: importance 0
    ranks = lod.shrink(model, eps=1e-6)
    assert ranks == {"0": 4, "2": 3} and model[0].factors()[0].shape == (10, 4)
    lod.truncate(model, {"0": 2, "2": 3})
    assert (model[0].rank, model[2].rank) == (2, 3)
    x = torch.randn(5, 20)
    before = model(x)
    lod.to_dense(model)  # 2 * (20 + 10) < 200 stays low-rank; 3 * (10 + 3) >= 30 is merged
    assert isinstance(model[0], lod.LoDLinear) and type(model[2]) is nn.Linear
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert measure(model, (20,)).params == 2 * 30 + 10 + 33


def test_measure_counts_params_and_macs_at_the_active_rank():
    layer = lod.LoDLinear(8, 6, rank=4)
    assert (measure(layer, (8,)).params, measure(layer, (8,)).macs) == (4 * 14 + 6, 4 * 14)
    layer.active_rank = 1
    assert measure(layer, (8,)).macs == 14


def test_nested_aggregate_weights_columns_by_the_clients_that_held_them():
    current = {"u": np.zeros((2, 3)), "b": np.zeros(2)}
    replies = [({"u": np.ones((2, 3)), "b": np.ones(2)}, 1.0), ({"u": np.full((2, 1), 4.0), "b": np.full(2, 4.0)}, 3.0)]
    out = nested.aggregate(current, replies, {"u": 1, "b": None})
    np.testing.assert_allclose(out["u"], [[3.25, 1.0, 1.0]] * 2)  # column 0: (1 + 12) / 4
    np.testing.assert_allclose(out["b"], [3.25, 3.25])


def test_data_and_models_entry_points():
    synthetic = data.load("synthetic")
    assert len(synthetic) > 0
    parts = data.partition(np.repeat(np.arange(4), 25), "dirichlet", 4, seed=1, alpha=0.5)
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))
    assert isinstance(models.build("lenet"), nn.Module)


def test_the_contract_override_keys_compose():
    from hydra import compose, initialize_config_dir

    from fedmaestro.__main__ import CONF_DIR
    from fedmaestro.config import resolve

    overrides = ["seed=3", "model=lenet", "model.factorize=false", "dataset=synthetic", "data.root=/tmp/x",
                 "data.subset=100", "train.epochs=2", "train.batch_size=16", "train.lr=0.05", "train.lambda_gl=1e-4",
                 "train.eps_ps=1e-5", "train.sampler=across_layers", "partition=dirichlet", "partition.alpha=0.3",
                 "devices=five_tiers", "fl.num_clients=7", "fl.rounds=3", "fl.clients_per_round=4",
                 "fl.local_epochs=2", "resume=false", "mode=centralized"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = resolve(compose(config_name="config", overrides=overrides))
    assert (cfg.seed, cfg.model.factorize, cfg.data.subset, cfg.train.sampler) == (3, False, 100, "across_layers")
    assert (cfg.partition.alpha, cfg.fl.num_clients, cfg.fl.clients_per_round, cfg.fl.local_epochs) == (0.3, 7, 4, 2)
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None), pytest.raises(ValueError, match="alpha"):
        resolve(compose(config_name="config", overrides=["partition.alpha=-1"]))


def test_a_wheel_carries_the_configs_and_its_cli_finds_them(tmp_path):
    """`pip install .` (not editable) gets conf/ inside the package, where the command line looks first."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:  # a copy of the checkout: building in place would leave build/ behind
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, tmp_path / "src" / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".", "-w",
                    str(tmp_path / "dist")], cwd=tmp_path / "src", check=True, capture_output=True)
    [wheel] = (tmp_path / "dist").glob("fedmaestro-*.whl")
    site = tmp_path / "site-packages"  # where pip would put it
    zipfile.ZipFile(wheel).extractall(site)
    configs = sorted(str(p.relative_to(root / "conf")) for p in (root / "conf").rglob("*.yaml"))
    shipped = sorted(str(p.relative_to(site / "fedmaestro/conf")) for p in (site / "fedmaestro/conf").rglob("*.yaml"))
    assert shipped == configs and "experiment/paper/lenet_fmnist.yaml" in shipped
    out = subprocess.run([sys.executable, "-c", "import fedmaestro.__main__ as m; print(m.CONF_DIR)"], cwd=tmp_path,
                         env={"PYTHONPATH": str(site)}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(site / "fedmaestro" / "conf")
    # a bad value is one line there too (the project's own errors are told apart from a library's by where its
    # packages are, site-packages included)
    out = subprocess.run([sys.executable, "-m", "fedmaestro", "mode=centralized", "train.lr=-1",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env={"PYTHONPATH": str(site)},
                         capture_output=True, text=True)
    assert out.returncode == 2 and "error: config: train.lr=-1" in out.stderr and "Traceback" not in out.stderr, \
        out.stderr[-2000:]
