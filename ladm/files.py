"""Atomic writes that respect the user's umask, and validated reads of the artefacts a run consumes.

A crash never leaves a half-written file that looks finished; a file that does not parse, or holds the
wrong shape, is one clear error naming the file and what to do.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ladm import LadmError


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# What a failed write raises: OSError (disk full, quota, permissions) and RuntimeError (torch.save's and
# safetensors' writers report a full disk that way).
WRITE_ERRORS = (OSError, RuntimeError)


def write_failure(target: str | Path, err: BaseException,
                  fix: str = "free disk space and run the same command again") -> LadmError:
    """The one-line error for a write that failed: what, why (the first line of the reason), what to do."""
    reason = getattr(err, "strerror", None) or (str(err).splitlines() or [type(err).__name__])[0]
    return LadmError(f"cannot write {target} ({reason}): {fix}")


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` into a temp file in the same folder, fsync, give it the umask's mode, rename over `path`. A
    failed write leaves no temp file and is one clear error."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except WRITE_ERRORS as err:
        raise write_failure(path, err) from err
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600: let the user's group read results
        os.replace(tmp, path)
    except WRITE_ERRORS as err:
        tmp.unlink(missing_ok=True)
        raise write_failure(path, err) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_folder_atomic(folder: str | Path, write: Callable[[Path], None],
                        fix: str = "free disk space and run the same command again") -> None:
    """`write(tmp)` into a temporary folder beside `folder`, give its files the umask's mode (libraries such as PEFT
    write 0600), then replace `folder` by it: a failed write leaves no partial folder (and the old one in place)
    and is one clear error."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        follow_umask(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except WRITE_ERRORS as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failure(folder, err, fix) from err


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def write_lines_atomic(path: str | Path, lines: list[str]) -> None:
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def read_json(path: str | Path, what: str, fix: str) -> Any:
    """The JSON in `path`; absent, truncated or non-JSON is one line naming `what` and how to `fix` it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise LadmError(f"{what} not found: {path}: {fix}") from err
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise LadmError(f"{what} {path} is not valid JSON ({str(err).splitlines()[0]}): {fix}") from err


def finite_numbers(value: Any, length: int | None = None) -> bool:
    """A list of finite numbers (of `length` entries when given)."""
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))


def _hash_file(path: Path, digest: Any) -> Any:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


def file_sha256(path: str | Path) -> str:
    return _hash_file(Path(path), hashlib.sha256()).hexdigest()


def folder_digest(folder: str | Path) -> str:
    """sha256 of every file below `folder` (relative path and bytes, in path order): a saved adapter's identity."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        _hash_file(path, digest)
    return digest.hexdigest()


def links_leaving(folder: str | Path) -> list[Path]:
    """The symbolic links below `folder` (never followed) whose target lies outside it: a run folder received from
    someone else whose `predictions/` or `checkpoints/` points elsewhere would make ladm write or delete there."""
    root = Path(folder).resolve()
    leaving = []
    for parent, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            path = Path(parent) / name
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                leaving.append(path)
    return leaving


def refuse_links_leaving(folder: str | Path) -> None:
    """One line naming the first link below `folder` that points outside it (see `links_leaving`)."""
    leaving = links_leaving(folder)
    if leaving:
        link = leaving[0]
        more = f" (and {len(leaving) - 1} more)" if len(leaving) > 1 else ""
        raise LadmError(f"{link} is a symbolic link to {os.readlink(link)}, outside the run folder {folder}{more}: "
                        "ladm never writes or deletes through it; replace it by a copy of what it points to (or "
                        "remove it) and run again")


def follow_umask(folder: str | Path) -> None:
    """Give every file below `folder` the user's umask mode (0666 & ~umask): what libraries wrote with their own
    modes (PEFT's safetensors: 0600) becomes readable by the user's group where the umask says so."""
    mode = 0o666 & ~current_umask()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)
