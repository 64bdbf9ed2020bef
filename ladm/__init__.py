"""ladm: LaDM and baselines for low-resource machine translation."""

import hashlib
from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "conf"

# `${repo_root:}` in conf/ points at the checkout, so shipped data resolves from any cwd.
OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT), replace=True)


def job_dirname(overrides: str) -> str:
    """A sweep job's folder from its overrides: one level deep, and short enough for any filesystem."""
    name = overrides.replace("/", "%") or "default"
    return name if len(name) <= 120 else f"{name[:100]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"


OmegaConf.register_new_resolver("job_dirname", job_dirname, replace=True)


def _run_stamp() -> str:
    from ladm.distributed import run_stamp

    return run_stamp()


OmegaConf.register_new_resolver("run_stamp", _run_stamp, use_cache=True, replace=True)


class LadmError(Exception):
    """A user error: printed as one line, before any heavy work, with a non-zero exit."""
