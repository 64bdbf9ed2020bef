"""Every sweep preset runs as a Hydra multirun (CI-sized) and every job leaves a results.json."""

import json
import os
import subprocess
import sys

import pytest

from ladm import REPO_ROOT

CI_SIZE = ["train.max_steps=2", "train.batch_size=4", "data.max_train_samples=16", "eval.max_samples=2",
           "eval.max_new_tokens=4", "eval.metrics=[chrf++]", "probe.n_sentences=4", "logger=none"]


@pytest.mark.parametrize("experiment,narrowing,n_jobs", [
    ("demo", [], 3),
    ("ladm_vs_lora", ["pair=zh-lo,zh-km"], 4),
    ("strength_sweep", ["pair=zh-lo"], 4),
    ("threshold_ablation", ["method.tau_lil=0.0", "method.k_tal=1,4", "method.k_lil=1"], 4),
    ("mlas_ablation", ["method=mlas_lora,mlas_lora-R-i,mlas_lora-Ms-spe", "++method.r_gen=4", "++method.r_spe=4"], 3),
    ("ladm_vs_baselines", ["pair=zh-lo"], 5),
    ("peft_variants", ["method.base=dora,loraplus"], 4),
])
def test_experiment_multirun(tmp_path, cache_dir, experiment, narrowing, n_jobs):
    sweep_dir = tmp_path / experiment
    proc = subprocess.run(
        [sys.executable, "-m", "ladm.train", "--multirun", f"experiment={experiment}", *CI_SIZE, *narrowing,
         f"cache_dir={cache_dir}", f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO_ROOT, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sweep_dir.glob("*/results.json")]
    assert len(results) == n_jobs and all(r["status"] == "complete" for r in results)
    assert len({json.dumps(r["config"], sort_keys=True) for r in results}) == n_jobs  # distinct jobs


def test_a_sweep_without_a_name_gives_all_its_jobs_one_name(tmp_path, cache_dir):
    """`hydra.sweep.dir=` without `name=`: every job shares one adhoc-<time> name, so ladm-report takes the folder
    as one experiment."""
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "ladm.train", "--multirun", "method=zero_shot", "pair=zh-lo,zh-km", "logger=none",
         "eval.metrics=[chrf++]",
         "eval.max_samples=2", "eval.max_new_tokens=2", f"cache_dir={cache_dir}", f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO_ROOT, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {json.loads(p.read_text())["config"]["name"] for p in sweep_dir.glob("*/results.json")}
    assert len(names) == 1 and next(iter(names)).startswith("adhoc-"), names
    report = subprocess.run([sys.executable, "-m", "ladm.report", str(sweep_dir)], cwd=REPO_ROOT, capture_output=True,
                            text=True)
    assert report.returncode == 0 and "zh-km" in report.stdout, report.stderr[-2000:]
