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
    """Three seeded trials over train.batch_size ∈ {4, 100} (the command line's search space replaces the preset's):
    a batch of 100 cannot be filled from debug=fast's 16 training sentences, which only the run can see, so that
    trial fails and is recorded as failed with its error, the study goes on, the best is chosen among the completed
    trials, and the search exits 1 after all trials with the closing line."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = subprocess.run(
        [sys.executable, "-m", "ladm.train", "-m", "hparams_search=optuna_ladm", "hydra.sweeper.n_trials=3",
         "train.batch_size=choice(100,4)", "train.lr=1e-3", "strength=s0.5", "method.r=4", "debug=fast",
         "data.validation_size=8", "eval.max_samples=2", "eval.max_new_tokens=4", f"cache_dir={cache_dir}",
         f"hydra.sweep.dir={tmp_path}"],
        cwd=REPO_ROOT, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "of 3 jobs failed" in proc.stderr.splitlines()[-1]
    jobs = {json.loads(p.read_text())["config"]["train"]["batch_size"]: json.loads(p.read_text())
            for p in tmp_path.glob("*/results.json")}
    assert sorted(jobs) == [4, 100] and jobs[100]["status"] == "failed" and "cannot fill one batch" in jobs[100]["error"]
    assert jobs[4]["status"] == "complete"
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert best["best_params"] == {"train.batch_size": 4}
    assert best["best_value"] == pytest.approx(jobs[4]["validation"]["zh-lo"]["chrf++"])


BAD_PRESET = """# @package _global_
defaults:
  - /hparams_search/optuna_ladm
hydra:
  sweeper:
    params:
      strength: choice(s0.5, bogus)
"""


@pytest.mark.parametrize("override,message", [
    ("train.lr=interval(1e-3, 1e-5)", "hydra.sweeper.params.train.lr: interval(1e-3, 1e-5) is empty or reversed"),
    ("train.lr=tag(log, interval(-1, 1e-3))", "a log-scale interval needs low > 0"),
    ("train.lr=interval(-1, 1e-3)", "train.lr must be a positive number, and -1"),
    ("hydra.sweeper.n_trials=0", "hydra.sweeper.n_trials must be a positive integer, got 0"),
    ("hparams_search=bad_choice", "hydra.sweeper.params.strength: choice(s0.5, bogus): unknown strength 'bogus': "
                                  "choose among s0, s0.25, s0.5, s1"),
    ("method.r=choice(0,8)", "hydra.sweeper.params.method.r: choice(0,8): method.r must be a positive integer, and 0"),
])
def test_a_bad_search_space_is_one_line_before_optuna_starts(monkeypatch, capsys, tmp_path, override, message):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from ladm.train import main

    (tmp_path / "conf" / "hparams_search").mkdir(parents=True)
    (tmp_path / "conf" / "hparams_search" / "bad_choice.yaml").write_text(BAD_PRESET)
    search = [] if override.startswith("hparams_search=") else ["hparams_search=optuna_ladm"]
    monkeypatch.setattr(sys, "argv", ["ladm-train", "-m", "--config-dir", str(tmp_path / "conf"), *search, override,
                                      f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "sweep").exists()


def test_a_search_whose_every_trial_fails_ends_in_one_line(tmp_path, cache_dir):
    """Both trials ask for batches that debug=fast's 16 sentences cannot fill: the search ends with one closing
    line and exit 1, not Optuna's "No trials are completed yet" traceback, and both failures are recorded."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = subprocess.run(
        [sys.executable, "-m", "ladm.train", "-m", "hparams_search=optuna_ladm", "hydra.sweeper.n_trials=2",
         "train.batch_size=choice(100,200)", "train.lr=1e-3", "strength=s0.5", "method.r=4", "debug=fast",
         "data.validation_size=8", f"cache_dir={cache_dir}", f"hydra.sweep.dir={tmp_path}"],
        cwd=REPO_ROOT, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "No trials are completed" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("ladm-train: all 2 trials of the search failed, so there is no best")
    jobs = [json.loads(p.read_text()) for p in tmp_path.glob("*/results.json")]
    assert len(jobs) == 2 and all(job["status"] == "failed" and "cannot fill one batch" in job["error"] for job in jobs)
