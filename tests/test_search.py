"""Hyper-parameter search: the train task returns its validation objective to Hydra's Optuna sweeper."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from ladm import REPO_ROOT
from ladm.cli import objective_value


def test_objective_is_the_mean_validation_score_over_pairs():
    results = {"validation": {"zh-lo": {"chrf++": 10.0}, "zh-km": {"chrf++": 20.0}}}
    assert objective_value("validation/chrf++", results) == 15.0
    assert objective_value(None, results) is None
    assert objective_value("validation/spbleu", results) is None  # not scored: the trial fails, the study goes on
    assert objective_value("validation/chrf++", None) is None  # a failed job
    assert objective_value("validation/chrf++", {"validation": {"zh-lo": {"chrf++": float("nan")}}}) is None


def test_optuna_ladm_runs_three_trials_on_the_validation_split(tmp_path, cache_dir):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")  # the `optuna` extra (make install has it)
    proc = subprocess.run(
        [sys.executable, "-m", "ladm.train", "-m", "hparams_search=optuna_ladm", "hydra.sweeper.n_trials=3",
         "debug=fast", "data.validation_size=8", "eval.max_samples=2", "eval.max_new_tokens=4",
         f"cache_dir={cache_dir}", f"hydra.sweep.dir={tmp_path}"],
        cwd=REPO_ROOT, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [json.loads(p.read_text()) for p in tmp_path.glob("*/results.json")]
    assert len(jobs) == 3 and all(job["objective"] == "validation/chrf++" for job in jobs)
    assert all(job["n_validation"] == {"zh-lo": 8} for job in jobs)  # held out of FLORES dev, never the test set
    scores = [job["validation"]["zh-lo"]["chrf++"] for job in jobs]
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(scores))
    winners = [(job["config"]["train"]["lr"], job["config"]["method"]["r"], job["config"]["strength"]["name"])
               for job, score in zip(jobs, scores, strict=True) if score == max(scores)]  # ties possible
    params = best["best_params"]
    assert any(lr == pytest.approx(params["train.lr"]) and (r, s) == (params["method.r"], params["strength"])
               for lr, r, s in winners)


def test_a_failed_trial_is_recorded_and_the_search_goes_on(tmp_path, cache_dir):
    """Three seeded trials over method.r ∈ {0, 4} (the command line's search space replaces the preset's): the r=0
    trial fails (refused by the schema) and is recorded as failed with its error, the study goes on, the best is
    chosen among the completed trials, and the search exits 1 after all trials with the closing line."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = subprocess.run(
        [sys.executable, "-m", "ladm.train", "-m", "hparams_search=optuna_ladm", "hydra.sweeper.n_trials=3",
         "method.r=choice(0,4)", "train.lr=1e-3", "strength=s0.5", "debug=fast", "data.validation_size=8",
         "eval.max_samples=2", "eval.max_new_tokens=4", f"cache_dir={cache_dir}", f"hydra.sweep.dir={tmp_path}"],
        cwd=REPO_ROOT, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "1 of 3 jobs failed" in proc.stderr.splitlines()[-1]
    jobs = {json.loads(p.read_text())["config"]["method"]["r"]: json.loads(p.read_text())
            for p in tmp_path.glob("*/results.json")}
    assert sorted(jobs) == [0, 4] and jobs[0]["status"] == "failed" and "method.r" in jobs[0]["error"]
    assert jobs[4]["status"] == "complete"
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert best["best_params"] == {"method.r": 4}
    assert best["best_value"] == pytest.approx(jobs[4]["validation"]["zh-lo"]["chrf++"])
