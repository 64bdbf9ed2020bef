"""Atomic writes respect the user's umask; a full disk is one clear line and leaves no partial folder."""

from __future__ import annotations

import errno
import os
import stat

import pytest
import torch

from ladm import LadmError
from ladm.checkpoint import save_checkpoint
from ladm.files import write_json_atomic


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "results.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == mode


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")])
def test_disk_full_during_a_checkpoint(tmp_path, monkeypatch, error):
    """torch.save reports a full disk as OSError or RuntimeError: both are the one-line error, and no .tmp stays."""
    save_checkpoint(tmp_path, 2, {"step": 2}, keep=2)

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(LadmError, match="(No space left on device|file write failed).*the previous checkpoint is intact"):
        save_checkpoint(tmp_path, 4, {"step": 4}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 256 KiB tmpfs (needs the right to mount: root, as on the CI machines; skipped elsewhere)."""
    import subprocess

    folder = tmp_path / "small"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_really_full_disk_is_one_line_and_leaves_no_partial_files(small_tmpfs):
    from ladm.files import write_text_atomic

    save_checkpoint(small_tmpfs, 1, {"w": torch.zeros(8)}, keep=2)
    with pytest.raises(LadmError, match="cannot write .*step-2.*the previous checkpoint is intact"):
        save_checkpoint(small_tmpfs, 2, {"w": torch.zeros(200_000)}, keep=2)  # 800 kB into 256 KiB
    with pytest.raises(LadmError, match=r"cannot write .*results.json \(No space left on device\)"):
        write_text_atomic(small_tmpfs / "results.json", "x" * 400_000)
    leftovers = sorted(p.name for p in small_tmpfs.rglob("*"))
    assert leftovers == ["checkpoints", "state.pt", "step-1"], leftovers


def test_a_failed_adapter_write_leaves_the_old_adapter_and_no_partial_folder(tmp_path):
    from ladm.train import save_adapter

    class Failing:
        def save(self, model, folder):
            (folder / "adapter_config.json").write_text("{}")
            raise RuntimeError("safetensors_rust.SafetensorError: Error while serializing: IoError(No space left)")

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "old.safetensors").write_text("old")
    with pytest.raises(LadmError, match="cannot write .*adapter.*Error while serializing"):
        save_adapter(Failing(), None, tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["adapter", "old.safetensors"]


@pytest.mark.parametrize("method", ["lora", "mlas_lora"])
def test_saved_adapters_follow_the_umask(make_cfg, files_overrides, tmp_path, method):
    """PEFT writes adapter_model.safetensors 0600; under umask 002 every adapter file is group-readable (0664)."""
    from ladm.train import run

    extra = ["probe.n_sentences=4", "probe.batch_size=4", "method.r_gen=4", "method.r_spe=4",
             "method.pairs=[zh-lo,zh-km]", "data.max_train_samples=8"] if method == "mlas_lora" else files_overrides
    old = os.umask(0o002)
    try:
        run(make_cfg(f"method={method}", "train.max_steps=1", "train.batch_size=4", "eval.max_samples=1",
                     "eval.max_new_tokens=2", *extra), tmp_path)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "adapter").rglob("*") if p.is_file()]
    assert any(p.name == "adapter_model.safetensors" for p in files)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o664 for p in files}


ARTEFACTS = ["predictions", "checkpoints", "adapter", "wandb", ".hydra", "predictions/flores200-devtest",
             "results.json", "ladm.log", "train_log.jsonl", ".lock", "checkpoints/step-4"]


@pytest.mark.parametrize("artefact", ARTEFACTS)
def test_a_link_that_leaves_the_run_folder_is_refused_before_any_write(tmp_path, artefact):
    """A run folder whose artefact (a folder, a file, or one inside a real folder) is a symbolic link to somewhere
    outside it is refused in one line naming the link, and nothing there is written or deleted."""
    from ladm.checkpoint import RunFolderLock

    run, outside = tmp_path / "run", tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "step-2").mkdir()  # what checkpoint rotation would have deleted
    (outside / "kept.txt").write_text("theirs")
    link = run / artefact
    link.parent.mkdir(parents=True, exist_ok=True)
    is_folder = "." not in artefact.rsplit("/", 1)[-1] or artefact in (".hydra",)
    link.symlink_to(outside if is_folder else outside / "kept.txt")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in outside.iterdir())
    with pytest.raises(LadmError, match=f"{link} is a symbolic link to {outside}.*outside the run folder"):
        RunFolderLock(run)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in outside.iterdir()) == before
    assert (outside / "kept.txt").read_text() == "theirs" and not (run / ".lock").exists() or artefact == ".lock"


def test_links_inside_the_run_folder_and_a_linked_run_folder_are_fine(tmp_path):
    """A link that stays inside the folder writes nowhere else; the run folder itself may be a link (to scratch)."""
    from ladm.checkpoint import RunFolderLock

    scratch = tmp_path / "scratch" / "run"
    (scratch / "predictions-real").mkdir(parents=True)
    (scratch / "predictions").symlink_to(scratch / "predictions-real")
    (tmp_path / "run").symlink_to(scratch)
    RunFolderLock(tmp_path / "run").release()


def test_ladm_train_refuses_a_run_folder_whose_checkpoints_point_elsewhere(tmp_path, monkeypatch, capsys):
    """End to end: one line, exit 2, the other folder's step-* untouched (rotation would delete them)."""
    import logging
    import sys

    from ladm.train import main

    run, outside = tmp_path / "run", tmp_path / "theirs"
    (outside / "step-1").mkdir(parents=True)
    run.mkdir()
    (run / "checkpoints").symlink_to(outside)
    monkeypatch.setattr(sys, "argv", ["ladm-train", "logger=none", "debug=fast", f"hydra.run.dir={run}",
                                      "train.checkpoint_every=1"])
    handlers = logging.getLogger().handlers[:]
    with pytest.raises(SystemExit) as exit_info:
        main()
    logging.getLogger().handlers[:] = handlers
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and "checkpoints is a symbolic link" in lines[0], lines
    assert [p.name for p in outside.iterdir()] == ["step-1"] and not (run / ".hydra").exists()


def test_a_full_disk_under_the_step_log_is_one_line(tmp_path):
    """train_log.jsonl is appended to step by step: ENOSPC there is the one-line error, not a traceback."""
    import errno

    from ladm.trainer import StepLog

    class FullDisk:
        def write(self, _text):
            raise OSError(errno.ENOSPC, "No space left on device")

    log = StepLog(tmp_path / "train_log.jsonl", first_step=0)
    log.file.close()
    log.file = FullDisk()
    with pytest.raises(LadmError, match=r"cannot write .*train_log.jsonl \(No space left on device\): free disk space"):
        log.write({"step": 1})


class _RunsCode:
    """A pickle that would run code when loaded (writes a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickled_adapter_that_would_run_code_is_one_line_and_runs_nothing(tmp_path):
    import json
    import pickle

    import torch

    from ladm.methods.base import check_peft_folder

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4, "peft_type": "LORA"}))
    torch.save({"base_model.model.x.lora_A.weight": torch.zeros(4, 8)}, adapter / "adapter_model.bin")
    check_peft_folder(adapter)  # plain tensors: accepted
    marker = tmp_path / "code-ran"
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"weights": _RunsCode(marker)}))
    with pytest.raises(LadmError) as err:
        check_peft_folder(adapter)
    assert "is not plain tensors that torch's safe loader accepts (UnpicklingError)" in str(err.value)
    assert "weights_only=False" not in str(err.value) and not marker.exists()
