"""Training checkpoints and the ownership of a run folder.

`checkpoints/step-N/state.pt` holds every tensor the optimizer trains (by parameter name, whatever adapter
is active when it is written), the optimizer and scheduler state, every rank's RNG, the data position, the
W&B run id and the config that shapes training. It is written to a temporary folder and renamed, only when
every weight and optimizer state is finite, and loaded with `torch.load(weights_only=True)`. A newest
checkpoint that cannot be read is skipped, with a warning, for the one before it.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ladm import LadmError
from ladm.files import refuse_links_leaving, write_folder_atomic

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def trained_parameters(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.nn.Parameter]:
    """Every parameter the optimizer trains, by name (idle adapters included)."""
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return {name: p for name, p in model.named_parameters() if id(p) in trained}


def all_finite(tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> bool:
    states = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return all(bool(torch.isfinite(t).all()) for t in [*tensors.values(), *states])


def checkpoint_steps(out_dir: Path) -> list[tuple[int, Path]]:
    return sorted((int(m.group(1)), p) for p in (out_dir / "checkpoints").glob("step-*") if (m := STEP_DIR.match(p.name)))


def load_latest(out_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint and its state; unreadable newer ones are skipped with a warning."""
    for _, path in reversed(checkpoint_steps(out_dir)):
        try:
            return path, torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file: fall back to the previous checkpoint
            log.warning("checkpoint %s is unreadable (%s: %s): falling back to the previous one",
                        path, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
    return None


def save_checkpoint(out_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` as checkpoints/step-<step>, atomically; prune all but the newest `keep`.

    A write failure (disk full, quota) removes the partial folder and is one clear error."""
    target = out_dir / "checkpoints" / f"step-{step}"

    def write(folder: Path) -> None:
        torch.save(state, folder / "state.pt")
        with open(folder / "state.pt", "rb") as f:
            os.fsync(f.fileno())

    write_folder_atomic(target, write, "free disk space or set train.checkpoint_every=0; the previous checkpoint is intact")
    for _, old in checkpoint_steps(out_dir)[:-keep]:
        shutil.rmtree(old)
    return target


def drop_checkpoint(out_dir: Path, step: int) -> None:
    """Remove checkpoints/step-<step> (and checkpoints/ when nothing else is left in it)."""
    root = out_dir / "checkpoints"
    shutil.rmtree(root / f"step-{step}", ignore_errors=True)
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def set_aside(out_dir: Path) -> Path | None:
    """Move old checkpoints out of the way (a run that starts over keeps them, under a stamped name)."""
    root = out_dir / "checkpoints"
    if not root.is_dir() or not any(root.iterdir()):
        return None
    aside = out_dir / f"checkpoints.before-{time.strftime('%Y%m%d-%H%M%S')}"
    root.rename(aside)
    log.warning("starting over: the old checkpoints were moved to %s", aside)
    return aside


def config_differences(saved: dict[str, Any], current: dict[str, Any], neutral: dict[str, Any] | None = None) -> list[str]:
    """`key: old → new` for every flattened key whose value differs; a key of `neutral` that one side lacks (it was
    added to ladm later) counts as its neutral value there."""
    flat_saved, flat_current = _flatten(saved), _flatten(current)
    for key, value in (neutral or {}).items():
        flat_saved.setdefault(key, value)
        flat_current.setdefault(key, value)
    return [f"{key}: {flat_saved.get(key, '<absent>')!r} → {flat_current.get(key, '<absent>')!r}"
            for key in sorted(flat_saved.keys() | flat_current.keys()) if flat_saved.get(key) != flat_current.get(key)
            and not (_is_nan(flat_saved.get(key)) and _is_nan(flat_current.get(key)))]


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat |= _flatten(value, f"{prefix}{key}.")
    return flat


class FolderInUse(LadmError):
    """Another process holds the run folder's lock."""


HELD_BY_LAUNCHER: dict[Path, RunFolderLock] = {}


def hold_run_folder(out_dir: Path) -> RunFolderLock:
    """The entry point takes the folder's lock before anything is written there (Hydra's files, the log); the
    job's `run_once` then finds it held by this process."""
    lock = RunFolderLock(out_dir)
    HELD_BY_LAUNCHER[out_dir.resolve()] = lock
    return lock


def release_run_folder(out_dir: Path) -> None:
    lock = HELD_BY_LAUNCHER.pop(out_dir.resolve(), None)
    if lock is not None:
        lock.release()


class RunFolderLock:
    """An exclusive `flock` on `<run folder>/.lock`: a second run in the same folder is refused. The kernel
    drops the lock when the process ends, however it ends (SIGKILL included), so it never stays stuck. A folder
    holding a symbolic link that points outside it is refused before anything is written (`refuse_links_leaving`)."""

    def __init__(self, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        refuse_links_leaving(out_dir)  # before the first byte is written there, the lock file's included
        self.file = open(out_dir / ".lock", "a+")  # noqa: SIM115 - held for the life of the run
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise FolderInUse(f"run folder {out_dir} is in use by {holder}: wait for it to finish, or give this run "
                            "another folder (hydra.run.dir=...)") from err
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
