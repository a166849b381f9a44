"""The lambda search (Algorithm 2, fedmaestro/hpo.py).

The decision logic runs against a scripted trainer (each lambda's accuracy and parameter count per
epoch are given by a table), so every branch of Algorithm 2 is hit exactly; two searches then train
LeNet-5 for real on a tiny in-memory data set (see test_centralized.py), a few seconds in all.
"""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedmaestro import hpo
from fedmaestro.centralized import Trainer
from fedmaestro.config import HPOConfig
from test_centralized import DATASETS, tiny


class ScriptedTrainer:
    """Trainer's interface for hpo: lambda -> (final accuracy, params_rel); the parameter count is
    reached after the first epoch (shrinking is fast), the accuracy grows linearly over the epochs.
    lambda -> None: it diverges in its third epoch (FloatingPointError, as train_epoch raises)."""

    table: dict[float, tuple[float, float]] = {}
    built: list[float] = []

    def __init__(self, cfg, run_dir, datasets=None, validation=None):
        self.cfg, self.run_dir, self.records = cfg, run_dir, []
        self.validation = validation
        self.lam = cfg.train.lambda_gl
        ScriptedTrainer.built.append(self.lam)

    def record(self, epoch: int) -> dict:
        t = self.cfg.train
        acc, params = self.table[self.lam] or (0.5, 0.5)  # a diverging lambda's epochs before it diverges
        frac = epoch / t.epochs
        rec = {"epoch": epoch, "params_rel": params, "macs_rel": 1.0, "train_macs_rel": 0.5}
        rec.update(params_deployed=round(44_426 * rec["params_rel"]), macs_deployed=281_640)
        if epoch % t.eval_every == 0 or epoch == t.epochs:
            rec["accuracy"] = acc * frac
            if self.validation is not None:  # the held-out examples score lower: the test set must not decide
                rec["accuracy"], rec["val_accuracy"] = acc * frac + 0.3, acc * frac
        return rec

    def fit(self, on_epoch=None, show_progress=True):
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for epoch in range(1, self.cfg.train.epochs + 1):
            if self.table[self.lam] is None and epoch == 3:  # this lambda diverges in its third epoch
                raise FloatingPointError("training loss is nan; lower train.lr or set train.grad_clip")
            self.records.append(self.record(epoch))
            if on_epoch is not None and on_epoch(self.records[-1]):
                break
        return self.records

    def save_model(self, path):
        torch.save({"lambda": self.lam}, path)

    def plot(self):
        return []


@pytest.fixture
def scripted(monkeypatch):
    monkeypatch.setattr(hpo, "Trainer", ScriptedTrainer)
    ScriptedTrainer.built = []
    return ScriptedTrainer


def search_cfg(min_accuracy=0.75, max_params=0.3, epochs=6, eval_every=2):
    cfg = tiny(epochs=epochs)
    cfg.mode = "hpo"
    cfg.hpo.min_accuracy, cfg.hpo.max_params, cfg.hpo.eval_every = min_accuracy, max_params, eval_every
    cfg.hpo.lambda_large, cfg.hpo.lambda_small, cfg.hpo.few_params = 0.8, 0.05, 0.02
    cfg.hpo.val_fraction = 0.0  # accuracy checked on the scripted "accuracy"
    return cfg


def test_lambdas_halve_from_large_while_above_small():
    assert list(hpo._lambdas(0.8, 0.05)) == [0.8, 0.4, 0.2, 0.1]
    assert list(hpo._lambdas(5.12e-3, 1e-5)) == pytest.approx([5.12e-3 / 2**k for k in range(9)])


def test_returns_the_first_lambda_that_meets_both_constraints_at_an_evaluation(scripted, tmp_path):
    scripted.table = {0.8: (0.60, 0.05), 0.4: (0.90, 0.10), 0.2: (0.95, 0.20)}
    result = hpo.search(search_cfg(), tmp_path)
    assert scripted.built == [0.8, 0.4]  # 0.2 is never trained
    assert result.chosen.lambda_gl == 0.4 and result.chosen.outcome == "met"
    # accuracy 0.9 * e / 6 >= 0.75 first at e = 5, but only even epochs are evaluated: epoch 6
    assert result.chosen.epochs == 6
    assert [t.outcome for t in result.trials] == ["under_params", "met"]
    assert torch.load(tmp_path / "model.pt", weights_only=True) == {"lambda": 0.4}


def test_met_stops_that_lambda_early(scripted, tmp_path):
    scripted.table = {0.8: (1.0, 0.10)}
    result = hpo.search(search_cfg(min_accuracy=0.5, eval_every=2, epochs=8), tmp_path)
    assert result.chosen.lambda_gl == 0.8 and result.chosen.epochs == 4  # acc 0.5 at epoch 4 of 8
    assert result.cost == pytest.approx(0.5 * 4 / 8)  # trained half of one (scripted 0.5x) training


def test_a_lambda_that_diverges_is_recorded_and_the_search_goes_on(scripted, tmp_path, capsys):
    scripted.table = {0.8: None, 0.4: (0.90, 0.10)}
    result = hpo.search(search_cfg(), tmp_path)
    assert scripted.built == [0.8, 0.4] and result.chosen.lambda_gl == 0.4 and result.constraints_met
    diverged = result.trials[0]
    assert diverged.outcome == "diverged" and diverged.epochs == 2 and diverged.accuracy is None
    assert diverged.train_macs_rel == pytest.approx(0.5 * 2 / 6)  # its two finished epochs count in the cost
    assert "lambda_gl = 0.8 diverged: training loss is nan; lower train.lr" in capsys.readouterr().out
    assert [t["outcome"] for t in json.loads((tmp_path / "hpo.json").read_text())["trials"]] == ["diverged", "met"]


def test_a_search_where_every_lambda_diverges_says_how_to_fix_it_and_writes_its_summary(scripted, tmp_path):
    scripted.table = {0.8: None, 0.4: None, 0.2: None, 0.1: None}
    result = hpo.search(search_cfg(), tmp_path)
    assert result.chosen is None and [t.outcome for t in result.trials] == ["diverged"] * 4
    assert "every lambda diverged" in result.reason and "lower train.lr (now 0.05) or set train.grad_clip" in \
        result.reason
    assert json.loads((tmp_path / "hpo.json").read_text())["reason"] == result.reason
    assert len(list(csv.DictReader((tmp_path / "hpo_summary.csv").open()))) == 4


def test_over_the_parameter_limit_returns_the_last_model_within_it(scripted, tmp_path):
    scripted.table = {0.8: (0.60, 0.10), 0.4: (0.70, 0.25), 0.2: (0.90, 0.50)}
    result = hpo.search(search_cfg(), tmp_path)
    assert scripted.built == [0.8, 0.4, 0.2]
    assert [t.outcome for t in result.trials] == ["under_params", "under_params", "over_params"]
    assert result.chosen.lambda_gl == 0.4 and "last model within the limit" in result.reason
    assert torch.load(tmp_path / "model.pt", weights_only=True) == {"lambda": 0.4}


def test_first_lambda_over_the_limit_returns_nothing(scripted, tmp_path):
    scripted.table = {0.8: (0.90, 0.50)}
    result = hpo.search(search_cfg(), tmp_path)
    assert result.chosen is None and "no lambda tried reached it; raise hpo.lambda_large or hpo.max_params" in result.reason
    assert not (tmp_path / "model.pt").exists()
    assert json.loads((tmp_path / "hpo.json").read_text())["chosen"] is None


def test_too_sparse_stops_the_lambda_and_the_search_goes_on(scripted, tmp_path):
    scripted.table = {0.8: (0.50, 0.001), 0.4: (0.80, 0.20)}
    result = hpo.search(search_cfg(eval_every=1), tmp_path)
    first = result.trials[0]
    assert first.outcome == "too_sparse" and first.epochs < 6  # stopped as soon as params < few_params
    assert result.chosen.lambda_gl == 0.4


def test_no_lambda_meets_accuracy_returns_the_last_within_the_limit(scripted, tmp_path):
    scripted.table = {0.8: (0.5, 0.05), 0.4: (0.6, 0.1), 0.2: (0.65, 0.2), 0.1: (0.7, 0.3)}
    result = hpo.search(search_cfg(), tmp_path)
    assert scripted.built == [0.8, 0.4, 0.2, 0.1]
    assert result.chosen.lambda_gl == 0.1 and "lambda_small" in result.reason
    assert not result.constraints_met and json.loads((tmp_path / "hpo.json").read_text())["constraints_met"] is False


def test_summary_table_lists_every_lambda_and_its_cost(scripted, tmp_path, capsys):
    scripted.table = {0.8: (0.60, 0.10), 0.4: (0.70, 0.25), 0.2: (0.90, 0.50)}
    cfg = search_cfg()
    result = hpo.run(cfg, tmp_path)
    with (tmp_path / "hpo_summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["lambda_gl"]) for r in rows] == [0.8, 0.4, 0.2]
    assert [r["outcome"] for r in rows] == ["under_params", "under_params", "over_params"]
    assert float(rows[2]["params_rel"]) == pytest.approx(0.5)
    summary = json.loads((tmp_path / "hpo.json").read_text())
    assert summary["search_cost_dense_trainings"] == pytest.approx(1.5) == result.cost
    assert summary["chosen"]["lambda_gl"] == 0.4
    out = capsys.readouterr().out
    assert "Lambda search" in out and "search cost: 1.50x" in out and "returned: lambda 0.4" in out
    assert "it meets the parameter limit only, not the accuracy target" in " ".join(out.split())  # the fallback
    assert summary["constraints_met"] is False
    assert ("lambda_gl from hpo.lambda_large=0.8, halved while above hpo.lambda_small=0.05 (train.lambda_gl is not "
            "used); test accuracy checked every hpo.eval_every=2 epoch(s)") in " ".join(out.split())


def test_train_eval_every_is_named_as_unused_and_every_lambda_checks_at_hpo_eval_every(scripted, tmp_path, caplog):
    scripted.table = {0.8: (0.60, 0.05), 0.4: (0.90, 0.10)}
    cfg = search_cfg(eval_every=3)
    cfg.train.eval_every, cfg.train.lambda_gl = 5, 0.123
    with caplog.at_level(logging.WARNING, logger="fedmaestro.hpo"):
        result = hpo.search(cfg, tmp_path)
    assert any("train.eval_every=5 is not used by mode=hpo; set hpo.eval_every" in m for m in caplog.messages)
    assert scripted.built == [0.8, 0.4] and result.chosen.epochs == 6  # 0.9 * e / 6 >= 0.75 at e = 5: checked at 6


def test_accuracy_is_checked_on_held_out_training_examples_not_on_the_test_set(scripted, tmp_path):
    scripted.table = {0.8: (0.60, 0.05), 0.4: (0.70, 0.10), 0.2: (0.90, 0.20)}
    cfg = search_cfg()
    cfg.hpo.val_fraction = 0.25
    result = hpo.search(cfg, tmp_path, DATASETS)  # 0.4 meets 0.75 on the scripted test set only
    assert result.chosen.lambda_gl == 0.2 and "validation accuracy" in result.reason
    assert result.chosen.val_accuracy == pytest.approx(0.9) and result.chosen.accuracy == pytest.approx(1.2)


def test_real_search_returns_the_first_lambda_when_the_constraints_are_loose(tmp_path):
    cfg = tiny(epochs=2)
    cfg.mode = "hpo"
    cfg.hpo.min_accuracy, cfg.hpo.max_params, cfg.hpo.eval_every = 0.0, 1.0, 1
    cfg.hpo.lambda_large, cfg.hpo.lambda_small = 0.2, 0.04
    result = hpo.search(cfg, tmp_path, DATASETS)
    assert [t.lambda_gl for t in result.trials] == [0.2]
    assert result.chosen.epochs == 1 and result.chosen.outcome == "met" and result.constraints_met
    assert (tmp_path / "lambda_0.2" / "training.png").stat().st_size > 0  # each lambda's figures, as the README says
    record = json.loads((tmp_path / "lambda_0.2" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 <= record["val_accuracy"] <= 1 and 0 <= record["accuracy"] <= 1  # held out (10%) and test
    assert (tmp_path / "lambda_0.2" / "metrics.jsonl").is_file()
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert state["config"]["train"]["lambda_gl"] == 0.2


def test_real_search_halves_down_to_small_when_accuracy_is_out_of_reach(tmp_path):
    cfg = tiny(epochs=1, hgl_mode="proximal")
    cfg.mode = "hpo"
    cfg.hpo.min_accuracy, cfg.hpo.max_params, cfg.hpo.eval_every, cfg.hpo.few_params = 1.0, 1.0, 1, 0.0
    cfg.hpo.lambda_large, cfg.hpo.lambda_small = 2.0, 0.4
    result = hpo.search(cfg, tmp_path, DATASETS)
    assert [t.lambda_gl for t in result.trials] == [2.0, 1.0, 0.5]
    assert all(t.epochs == 1 for t in result.trials) and result.chosen.lambda_gl == 0.5
    # larger lambda, smaller model: the search's premise holds on this data too
    params = [t.params for t in result.trials]
    assert params == sorted(params) and params[0] < params[-1]
    assert result.cost == pytest.approx(sum(t.train_macs_rel for t in result.trials)) and result.cost > 0


def test_hpo_needs_at_least_one_epoch_per_lambda(tmp_path):
    cfg = tiny(epochs=0)
    with pytest.raises(ValueError, match="train.epochs=0; every lambda must train at least one epoch"):
        hpo.search(cfg, tmp_path, DATASETS)
    with pytest.raises(ValueError, match="hpo.few_params=0.5 is invalid"):
        HPOConfig(max_params=0.3, few_params=0.5)


def test_the_command_line_refuses_a_new_search_into_a_directory_that_holds_one(tmp_path):
    trial = tmp_path / "lambda_0.001"
    Trainer(tiny(epochs=1), trial, DATASETS).fit(show_progress=False)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    done = subprocess.run([sys.executable, "-m", "fedmaestro", "mode=hpo", f"hydra.run.dir={tmp_path}"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "already holds a lambda search (lambda_0.001/checkpoint.pt); continue it with resume=true" in done.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written or lost


def test_the_command_line_exits_1_when_the_search_returns_no_model(scripted, tmp_path, monkeypatch, capsys):
    from omegaconf import OmegaConf

    from fedmaestro.__main__ import run_mode

    scripted.table = {0.8: (0.60, 0.50)}  # the first lambda already ends above the parameter limit
    search = hpo.search
    monkeypatch.setattr(hpo, "search", lambda cfg, run_dir: search(cfg, run_dir, DATASETS))
    with pytest.raises(SystemExit) as exit_info:
        run_mode(OmegaConf.structured(search_cfg()), tmp_path)
    assert exit_info.value.code == 1
    assert "error: the lambda search returned no model: lambda 0.8 ends above the parameter limit" in capsys.readouterr().err


def test_in_a_sweep_a_search_without_a_model_fails_its_job_only(scripted, tmp_path, monkeypatch, capsys):
    from omegaconf import OmegaConf

    from fedmaestro.__main__ import run_mode

    scripted.table = {0.8: (0.60, 0.50)}
    search = hpo.search
    monkeypatch.setattr(hpo, "search", lambda cfg, run_dir: search(cfg, run_dir, DATASETS))
    # the job returns its exit status (the sweep's callback collects it) and the sweep goes on
    assert run_mode(OmegaConf.structured(search_cfg()), tmp_path, sweep=True) == 1
    assert f"error: job {tmp_path.name}: the lambda search returned no model" in capsys.readouterr().err


def test_a_search_checkpointed_before_val_fraction_existed_resumes_as_it_ran_on_the_test_set():
    from fedmaestro.checkpoint import config_diff
    from fedmaestro.config import to_dict

    old = to_dict(search_cfg())
    del old["hpo"]["val_fraction"]
    on_test, held_out = search_cfg(), search_cfg()
    held_out.hpo.val_fraction = 0.1
    assert config_diff(old, to_dict(on_test)) == []
    assert config_diff(old, to_dict(held_out)) == ["hpo.val_fraction: 0.0 -> 0.1"]


def test_another_modes_run_is_never_written_over_even_with_resume(tmp_path):
    from fedmaestro import checkpoint

    Trainer(tiny(epochs=1), tmp_path / "lambda_0.1", DATASETS).fit(show_progress=False)
    for resume in (False, True):
        with pytest.raises(FileExistsError, match=r"holds a lambda search \(lambda_0.1/checkpoint.pt\), not a "
                                                  r"centralized run; give the new run its own directory"):
            checkpoint.refuse_overwrite(tmp_path, resume, "centralized")
    checkpoint.refuse_overwrite(tmp_path, True, "hpo")  # resuming the search itself goes on


def test_one_lambdas_directory_is_refused_as_a_search_directory(tmp_path):
    from fedmaestro import checkpoint

    from fedmaestro.config import to_dict

    cfg = search_cfg(epochs=1)
    Trainer(cfg, tmp_path / "lambda_0.1", DATASETS).fit(show_progress=False)
    (tmp_path / "lambda_0.1" / "config.json").write_text(json.dumps(to_dict(cfg)))  # mode=hpo, as the search writes
    for resume in (False, True):  # resume=true started a search inside it and wrote its model.pt over
        with pytest.raises(FileExistsError, match=rf"lambda_0.1 holds one lambda of a lambda search: .*resume the "
                                                  rf"search with hydra.run.dir={tmp_path}"):
            checkpoint.refuse_overwrite(tmp_path / "lambda_0.1", resume, "hpo")
    checkpoint.refuse_overwrite(tmp_path, True, "hpo")  # the search's own directory resumes
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "checkpoint.pt").write_bytes(b"")  # no config.json to say whose: not named a lambda's
    with pytest.raises(FileExistsError, match=r"already holds a lambda search \(checkpoint.pt\); continue it") as e:
        checkpoint.refuse_overwrite(tmp_path / "other", False, "hpo")
    assert "one lambda" not in str(e.value)


def test_a_search_of_a_dense_model_is_refused_before_any_lambda_trains(scripted, tmp_path):
    cfg = search_cfg()
    cfg.model.factorize = False
    with pytest.raises(ValueError, match=r"mode=hpo searches train.lambda_gl.*model.factorize=false leaves no rank "
                                         r"to prune: set model.factorize=true"):
        hpo.search(cfg, tmp_path, DATASETS)
    assert scripted.built == []


def test_the_command_line_says_a_search_does_not_read_checkpoint_before_reading_it_or_writing(tmp_path):
    Trainer(tiny(epochs=1), tmp_path / "centralized", DATASETS).fit(show_progress=False)
    held = tmp_path / "held"  # a search's directory: Hydra must not write its .hydra/ files over
    (held / ".hydra").mkdir(parents=True)
    (held / "hpo.json").write_text("{}")
    (held / ".hydra" / "overrides.yaml").write_text("- ORIGINAL\n")
    for run_dir in (tmp_path / "search", held):
        done = subprocess.run([sys.executable, "-m", "fedmaestro", "mode=hpo", "resume=true",
                               f"checkpoint={tmp_path / 'centralized'}", f"hydra.run.dir={run_dir}"],
                              cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]  # it listed the keys that differ, as if a resume read it
        assert "is not read by mode=hpo" in done.stderr and "different config" not in done.stderr
    assert not (tmp_path / "search").exists()
    assert (held / ".hydra" / "overrides.yaml").read_text() == "- ORIGINAL\n"


def test_a_search_resumed_with_another_config_is_refused_before_hydra_writes(tmp_path):
    from test_centralized import compose

    overrides = ["mode=hpo", "data.subset=256", "data.test_subset=64", "train.epochs=1", "progress=false"]
    cfg, _ = compose(overrides + [f"hydra.run.dir={tmp_path}"])
    cfg.train.lambda_gl, cfg.train.eval_every = cfg.hpo.lambda_large, cfg.hpo.eval_every  # as the search trains it
    Trainer(cfg, tmp_path / f"lambda_{cfg.hpo.lambda_large:.6g}").fit(show_progress=False)
    done = subprocess.run([sys.executable, "-m", "fedmaestro", *overrides, "resume=true", "train.lr=0.5",
                           f"hydra.run.dir={tmp_path}"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "error: resume: the checkpoint was written with a different config" in done.stderr
    differ = [line for line in done.stderr.splitlines() if line.startswith("  ") and " -> " in line]
    assert [line.split(":")[0].strip() for line in differ] == ["train.lr"], done.stderr  # lambda_gl is the search's
    assert not (tmp_path / ".hydra").exists()


def test_a_model_at_exactly_few_params_is_not_too_sparse():
    from fedmaestro.config import HPOConfig
    h = HPOConfig(min_accuracy=0.9, max_params=0.3, few_params=0.02, val_fraction=0.0)
    assert hpo._check({"accuracy": 0.1, "params_rel": 0.02}, h) is None  # Algorithm 2: stop below few_params
    assert hpo._check({"accuracy": 0.1, "params_rel": 0.0199}, h) == "too_sparse"
    assert hpo._check({"accuracy": 0.9, "params_rel": 0.3}, h) == "met"  # both constraints met exactly
    assert hpo._check({"params_rel": 0.001}, h) is None  # an epoch that was not evaluated decides nothing


def test_a_resumed_lambda_that_had_met_the_constraints_is_chosen_without_training_on(scripted, tmp_path, monkeypatch):
    class Resumed(ScriptedTrainer):  # its checkpoint holds epochs 1-4: the constraints were met at epoch 4
        fitted = []

        def resume(self):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.records = [self.record(e) for e in range(1, 5)]
            return True

        def fit(self, on_epoch=None, show_progress=True):
            Resumed.fitted.append(self.lam)
            for epoch in range(len(self.records) + 1, self.cfg.train.epochs + 1):
                self.records.append(self.record(epoch))
                if on_epoch is not None and on_epoch(self.records[-1]):
                    break
            return self.records

    monkeypatch.setattr(hpo, "Trainer", Resumed)
    scripted.table = {0.8: (1.0, 0.10)}
    cfg = search_cfg(min_accuracy=0.5, eval_every=2, epochs=8)
    cfg.resume = True
    result = hpo.search(cfg, tmp_path)
    assert result.chosen.lambda_gl == 0.8 and result.chosen.epochs == 4 and Resumed.fitted == []
