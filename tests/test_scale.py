"""Scale-out: DDP equals one process, SIGKILL + resume equals an uninterrupted run, sweeps skip and survive."""

import json
import os
import signal
import subprocess
import sys
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


METHOD_EXTRAS = {"lora": [], "ladm": ["probe.n_sentences=4", "probe.batch_size=4"],
                  "mlas_lora": ["method.pairs=[zh-lo,zh-km]", "probe.n_sentences=4", "probe.batch_size=4",
                                "method.r_gen=4", "method.r_spe=4"],
                  "landermt": ["method.pairs=[zh-lo,zh-km]", "method.lambda=0.6", "probe.n_sentences=4",
                               "probe.batch_size=4"]}


def pair_count(method: str) -> int:
    """Pairs one run trains: a run takes pairs × train.max_steps steps (METHODS.md §5)."""
    return next((len(e.split("=")[1].split(",")) for e in METHOD_EXTRAS[method] if e.startswith("method.pairs=")), 1)


def adapters(path: Path) -> dict[str, torch.Tensor]:
    """Every saved tensor of a run folder (MLAS-LoRA: one folder per adapter; LANDeRMT: its delta file)."""
    return {f"{f.parent.name}/{f.name}/{k}": v for f in sorted((path / "adapter").rglob("*.safetensors"))
            for k, v in load_file(f).items()}


@pytest.mark.parametrize("method", sorted(METHOD_EXTRAS))
def test_two_gloo_ranks_equal_one_process(make_cfg, files_overrides, tmp_path, cache_dir, method):
    """Global batch 4 = 2 ranks × 2; one test sentence for two ranks is still evaluated exactly once.

    SGD keeps the update linear in the gradient, so only float summation order separates the two;
    under AdamW a parameter whose gradient is ~ε can differ by more than 1e-6 from that noise alone.
    """
    common = [f"method={method}", f"train.max_steps={4 // pair_count(method)}", *TINY, "train.optimizer=sgd", "train.lr=0.5",
              *METHOD_EXTRAS[method], *(["method.dropout=0.0"] if method != "landermt" else []),
              *files_overrides, "eval.max_samples=1", f"cache_dir={cache_dir}"]
    run(make_cfg(*common), tmp_path / "one")
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ladm.train")
    proc = cli(*common, "train.batch_size=2", f"hydra.run.dir={tmp_path / 'two'}", launcher=torchrun)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # MLAS-LoRA and LANDeRMT: the other pairs' adapters or slices sit idle in each step
    one, two = adapters(tmp_path / "one"), adapters(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) > 0
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-6, rtol=0)
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["world_size"] == 2
    for pair in results["pairs"]:
        assert len((tmp_path / "two" / "predictions" / "files" / f"{pair}.hyp").read_text(encoding="utf-8").splitlines()) == 1
    if method == "ladm":
        assert results["method_details"]["multipliers"] == json.loads(
            (tmp_path / "one" / "results.json").read_text())["method_details"]["multipliers"]


@pytest.mark.parametrize("method", sorted(METHOD_EXTRAS))
def test_sigkill_after_a_checkpoint_then_resume_equals_uninterrupted(files_overrides, tmp_path, cache_dir, method):
    """Killed with SIGKILL right after checkpoint step-4 (a fault-injection knob, not a timing window),
    then resumed: bit-identical adapters of every pair, against an uninterrupted run in a process with the
    same thread count (float sums differ between thread counts, so exactness holds per thread count)."""
    common = [f"method={method}", *METHOD_EXTRAS[method], f"train.max_steps={8 // pair_count(method)}",
              "train.checkpoint_every=2",
              *TINY, *(["method.dropout=0.1"] if method != "landermt" else []), *files_overrides,
              "eval.max_samples=1", f"cache_dir={cache_dir}"]
    whole = cli(*common, f"hydra.run.dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = tmp_path / "killed"
    crash = subprocess.run([sys.executable, "-m", "ladm.train", *common, f"hydra.run.dir={killed}"], cwd=REPO_ROOT,
                           env=ENV | {"LADM_FAULT_SIGKILL_AFTER_CHECKPOINT": "4"}, capture_output=True, text=True)
    assert crash.returncode == -signal.SIGKILL and not (killed / "results.json").exists()
    assert (killed / "checkpoints" / "step-4").is_dir()

    resumed = cli(*common, f"hydra.run.dir={killed}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    expected, again = adapters(tmp_path / "whole"), adapters(killed)
    assert expected.keys() == again.keys() and len(expected) > 0
    assert all(torch.equal(expected[name], again[name]) for name in expected)
    logged = {name: [(r["step"], r["pair"], r["loss"]) for r in map(json.loads, (folder / "train_log.jsonl").read_text()
                                                                   .splitlines())]
              for name, folder in (("whole", tmp_path / "whole"), ("killed", killed))}
    assert logged["killed"] == logged["whole"] and len(logged["whole"]) == 8  # steps 5–8 once, after the resume


def test_sigterm_checkpoints_at_the_step_boundary_and_resumes_exactly(files_overrides, tmp_path, cache_dir):
    """SLURM's warning signal: a checkpoint of the finished step, exit 128+15, and the rerun ends identical."""
    common = ["method=lora", "train.max_steps=6", "train.checkpoint_every=0", *TINY, *files_overrides,
              "eval.max_samples=1", f"cache_dir={cache_dir}"]
    assert cli(*common, f"hydra.run.dir={tmp_path / 'whole'}").returncode == 0
    stopped = tmp_path / "stopped"
    first = subprocess.run([sys.executable, "-m", "ladm.train", *common, f"hydra.run.dir={stopped}"], cwd=REPO_ROOT,
                           env=ENV | {"LADM_FAULT_SIGNAL_AT_STEP": "3:SIGTERM"}, capture_output=True, text=True)
    assert first.returncode == 128 + signal.SIGTERM, first.stderr[-3000:]
    assert "stopped by SIGTERM after writing a checkpoint" in first.stderr
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == ["step-3"]
    assert cli(*common, f"hydra.run.dir={stopped}").returncode == 0
    expected, again = adapters(tmp_path / "whole"), adapters(stopped)
    assert all(torch.equal(expected[name], again[name]) for name in expected)


def test_run_folder_ownership(make_cfg, files_overrides, tmp_path, caplog):
    """A folder in use is refused; a resume with another config is refused naming the key; force starts over
    with the old checkpoints set aside; a corrupt newest checkpoint falls back to the previous one."""
    from ladm import LadmError
    from ladm.checkpoint import RunFolderLock

    common = ["method=lora", "train.max_steps=4", "train.checkpoint_every=2", *TINY, *files_overrides,
              "eval.max_samples=1"]
    holder = RunFolderLock(tmp_path)
    with pytest.raises(LadmError, match="is in use by pid"):
        run(make_cfg(*common), tmp_path)
    holder.release()

    run(make_cfg(*common, "train.max_steps=3"), tmp_path)  # leaves checkpoint step-2 and the finished step-3
    (tmp_path / "results.json").unlink()
    with pytest.raises(LadmError, match=r"trained with another config \(train.lr: 0.01 → 0.02\)"):
        run(make_cfg(*common, "train.max_steps=3", "train.lr=2e-2"), tmp_path)

    (tmp_path / "checkpoints" / "step-3" / "state.pt").write_bytes(b"truncated")
    with caplog.at_level("WARNING"):
        results = run(make_cfg(*common, "train.max_steps=3"), tmp_path)
    assert "is unreadable" in caplog.text and results["status"] == "complete"

    run(make_cfg(*common, "train.max_steps=3", "force=true"), tmp_path)
    assert list(tmp_path.glob("checkpoints.before-*"))


def test_no_checkpoint_of_non_finite_weights(make_cfg, files_overrides, tmp_path):
    from ladm import LadmError

    with pytest.raises(LadmError):
        run(make_cfg("method=lora", "train.max_steps=6", "train.checkpoint_every=1", "train.lr=1e30",
                     "train.warmup_ratio=0", "train.max_grad_norm=1e38", *TINY[2:], *files_overrides), tmp_path)
    for step in (tmp_path / "checkpoints").glob("step-*"):
        state = torch.load(step / "state.pt", weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["trainable"].values())


def test_complete_jobs_are_skipped_unless_forced(make_cfg, files_overrides, tmp_path, monkeypatch):
    import ladm.train

    """Skipping compares the config hash in results.json: a flag that changes no result (W&B, batch size for
    generation, the experiment name) skips; a setting that changes results runs the job again."""
    from ladm.schema import config_hash

    cfg = make_cfg("method=zero_shot", "eval.max_new_tokens=2", *files_overrides)
    first = run(cfg, tmp_path)
    assert first["config_hash"] == config_hash(cfg)
    monkeypatch.setattr(ladm.train, "load_model", lambda *a, **k: pytest.fail("a complete job was run again"))
    assert run(cfg, tmp_path)["metrics"] == first["metrics"]
    harmless = make_cfg("method=zero_shot", "eval.max_new_tokens=2", "eval.batch_size=3", "name=renamed",
                        "logger=wandb", "logger.mode=disabled", *files_overrides)
    assert run(harmless, tmp_path)["metrics"] == first["metrics"]
    for changed in (["eval.max_new_tokens=3"], ["force=true", "eval.max_new_tokens=2"]):
        with pytest.raises(pytest.fail.Exception):
            run(make_cfg("method=zero_shot", *changed, *files_overrides), tmp_path)


def test_sweep_job_folders_name_the_axes_in_a_fixed_order():
    from ladm import job_dirname

    assert job_dirname(["train.lr=0.001", "pair=zh-km", "experiment=demo", "train.seed=2", "method=ladm",
                        "model=qwen2.5-7b", "strength=s1", "logger=none"]) == \
        "model=qwen2.5-7b,method=ladm,pair=zh-km,seed=2,strength=s1,train.lr=0.001"
    long = job_dirname(["pair=zh-km", "train.seed=1", *[f"method.knob_{i}={'x' * 10}" for i in range(12)]])
    assert long.startswith("pair=zh-km,seed=1,method.knob_0=") and len(long) == 111
    assert job_dirname(["data.train.src=/a/b.txt"]) == "data.train.src=%a%b.txt"


def test_a_failing_job_does_not_stop_the_sweep_but_the_sweep_reports_it(tmp_path, cache_dir, files_overrides):
    """Every job runs; then the command exits 1 with one closing line naming how many failed and where."""
    sweep = tmp_path / "sweep"
    proc = cli("-m", "method=zero_shot", "eval.max_new_tokens=2", "logger=none", "eval.metrics=[chrf++]",
               "eval.num_beams=1,0", *files_overrides, f"cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    closing = proc.stderr.strip().splitlines()[-1]
    assert closing.startswith("ladm-train: 1 of 2 jobs failed: see the results.json of ") and str(sweep) in closing
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


def test_a_refused_second_run_changes_nothing_in_the_folder(tmp_path, cache_dir):
    """The lock is taken before Hydra's files and the log are written: a second `ladm-train` in a folder in use
    (here held by this process) exits 2 naming the holder, and every file of the folder keeps its bytes."""
    import subprocess
    import sys

    from ladm import REPO_ROOT
    from ladm.checkpoint import RunFolderLock

    folder = tmp_path / "run"
    command = [sys.executable, "-m", "ladm.train", "method=zero_shot", "debug=fast", "eval.max_samples=2",
               "eval.max_new_tokens=2", f"cache_dir={cache_dir}", f"hydra.run.dir={folder}"]
    first = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    assert {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "ladm.log", "results.json"} <= {
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    snapshot = lambda: {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
                        if p.is_file() and p.name != ".lock"}
    before = snapshot()
    holder = RunFolderLock(folder)
    try:
        second = subprocess.run(command + ["train.lr=5e-4", "force=true"], cwd=REPO_ROOT, capture_output=True, text=True)
    finally:
        holder.release()
    assert second.returncode == 2 and "is in use by pid" in second.stderr.strip().splitlines()[-1], second.stderr[-2000:]
    assert snapshot() == before
