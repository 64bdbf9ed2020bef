"""ladm: LaDM and baselines for low-resource machine translation."""

import hashlib
from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"

PACKAGE_DIR = Path(__file__).resolve().parent
# A checkout (or editable install) reads conf/, data/ and tests/assets/ beside the package; an installed
# wheel reads the copies setup.py put into ladm/_shipped/ with the same layout.
REPO_ROOT = PACKAGE_DIR.parent if (PACKAGE_DIR.parent / "conf" / "config.yaml").is_file() else PACKAGE_DIR / "_shipped"
CONFIG_DIR = REPO_ROOT / "conf"

# `${repo_root:}` in conf/ points at that root, so shipped data resolves from any cwd.
OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT), replace=True)


EXCLUDED_FROM_DIRNAME = ("experiment", "hparams_search", "debug", "name", "logger", "logger.mode", "cache_dir", "force")
FIRST_AXES = ("model", "method", "pair", "train.seed", "strength")  # then the rest, alphabetically


def job_dirname(overrides: list[str]) -> str:
    """A sweep job's folder from its overrides (`hydra.overrides.task`): the swept axes in a fixed order
    (model, method, pair, seed, strength, then the rest), one level deep; beyond 120 characters the tail is
    cut and replaced by a hash of the whole, so the leading axes stay readable."""
    items = {}
    for override in overrides:
        key, _, value = str(override).lstrip("+~").partition("=")
        if key not in EXCLUDED_FROM_DIRNAME and not key.startswith("hydra."):
            items[key] = value
    order = sorted(items, key=lambda k: (FIRST_AXES.index(k) if k in FIRST_AXES else len(FIRST_AXES), k))
    name = ",".join(f"{'seed' if k == 'train.seed' else k}={items[k]}" for k in order).replace("/", "%") or "default"
    return name if len(name) <= 120 else f"{name[:100]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"


OmegaConf.register_new_resolver("job_dirname", job_dirname, replace=True)


def _run_stamp() -> str:
    from ladm.distributed import run_stamp

    return run_stamp()


OmegaConf.register_new_resolver("run_stamp", _run_stamp, use_cache=True, replace=True)


class LadmError(Exception):
    """A user error: printed as one line, before any heavy work, with a non-zero exit."""
