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


def test_disk_full_during_a_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 2, {"step": 2}, keep=2)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(LadmError, match="No space left on device.*the previous checkpoint is intact"):
        save_checkpoint(tmp_path, 4, {"step": 4}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]
