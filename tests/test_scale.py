"""Scale-out: DDP equals one process, SIGKILL + resume equals an uninterrupted run, sweeps skip and survive."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ladm import REPO_ROOT
from ladm.train import run

TINY = ["train.batch_size=4", "train.lr=1e-2", "eval.max_new_tokens=4", "logger=none",
        "eval.metrics=[chrf++]"]
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def cli(*args, launcher=(sys.executable, "-m", "ladm.train"), **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, *args], cwd=REPO_ROOT, capture_output=True, text=True, env=ENV, **kwargs)


def adapter(path, name: str = "") -> dict[str, torch.Tensor]:
    return load_file(path / "adapter" / name / "adapter_model.safetensors")


@pytest.mark.parametrize("method", ["lora", "ladm", "mlas_lora"])
def test_two_gloo_ranks_equal_one_process(make_cfg, files_overrides, tmp_path, cache_dir, method):
    """Global batch 4 = 2 ranks × 2; one test sentence for two ranks is still evaluated exactly once.

    SGD keeps the update linear in the gradient, so only float summation order separates the two;
    under AdamW a parameter whose gradient is ~ε can differ by more than 1e-6 from that noise alone.
    """
    common = [f"method={method}", "train.max_steps=4", *TINY, "method.dropout=0.0", "train.optimizer=sgd", "train.lr=0.5",
              *(["method.r_gen=4", "method.r_spe=4"] if method == "mlas_lora" else []),
              *files_overrides, "eval.max_samples=1",
              "probe.n_sentences=4", f"cache_dir={cache_dir}"]
    run(make_cfg(*common), tmp_path / "one")
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ladm.train")
    proc = cli(*common, "train.batch_size=2", f"hydra.run.dir={tmp_path / 'two'}", launcher=torchrun)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # MLAS-LoRA: several adapters sit idle in each step (one folder per adapter)
    folders = ["general", "pair_zh-lo", "pair_zh-km"] if method == "mlas_lora" else [""]
    for folder in folders:
        one, two = adapter(tmp_path / "one", folder), adapter(tmp_path / "two", folder)
        assert one.keys() == two.keys()
        for name in one:
            torch.testing.assert_close(two[name], one[name], atol=1e-6, rtol=0)
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["world_size"] == 2
    for pair in results["pairs"]:
        assert len((tmp_path / "two" / "predictions" / f"{pair}.hyp").read_text(encoding="utf-8").splitlines()) == 1
    if method == "ladm":
        assert results["method_details"]["multipliers"] == json.loads(
            (tmp_path / "one" / "results.json").read_text())["method_details"]["multipliers"]


def test_sigkill_then_resume_equals_uninterrupted(make_cfg, files_overrides, tmp_path, cache_dir):
    common = ["method=lora", "train.max_steps=40", "train.checkpoint_every=4", "train.keep_checkpoints=2",
              *TINY, "method.dropout=0.1", *files_overrides, f"cache_dir={cache_dir}"]
    run(make_cfg(*common), tmp_path / "whole")

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "ladm.train", *common, f"hydra.run.dir={killed}"], cwd=REPO_ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step-8").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists(), "the run finished before it could be killed"

    resumed = cli(*common, f"hydra.run.dir={killed}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    whole, again = adapter(tmp_path / "whole"), adapter(killed)
    assert all(torch.equal(whole[name], again[name]) for name in whole)


def test_complete_jobs_are_skipped_unless_forced(make_cfg, files_overrides, tmp_path, monkeypatch):
    import ladm.train

    cfg = make_cfg("method=zero_shot", "eval.max_new_tokens=2", *files_overrides)
    first = run(cfg, tmp_path)
    monkeypatch.setattr(ladm.train, "load_model", lambda *a, **k: pytest.fail("a complete job was run again"))
    assert run(cfg, tmp_path)["metrics"] == first["metrics"]
    with pytest.raises(pytest.fail.Exception):
        run(make_cfg("method=zero_shot", "force=true", *files_overrides), tmp_path)


def test_a_failing_job_does_not_stop_the_sweep(tmp_path, cache_dir, files_overrides):
    sweep = tmp_path / "sweep"
    proc = cli("-m", "method=zero_shot", "eval.max_new_tokens=2", "logger=none", "eval.metrics=[chrf++]",
               "eval.num_beams=1,0", *files_overrides, f"cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = {r["config"]["eval"]["num_beams"]: r for r in map(json.loads, map(Path.read_text, sweep.glob("*/results.json")))}
    assert jobs[1]["status"] == "complete"
    assert jobs[0]["status"] == "failed" and "eval.num_beams must be a positive integer" in jobs[0]["error"]


def test_submitit_local_sweep_of_two_jobs(tmp_path, cache_dir, files_overrides):
    sweep = tmp_path / "sweep"
    proc = cli("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "method=zero_shot,lora",
               "train.max_steps=2", *TINY, *files_overrides, f"cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sweep.glob("*/results.json")]
    assert sorted(r["method"] for r in results) == ["lora", "zero_shot"]
    assert all(r["status"] == "complete" for r in results)


def test_slurm_launcher_preset_gives_one_task_per_gpu(make_cfg):
    from hydra import compose, initialize_config_dir

    from ladm import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.tasks_per_node == 4
