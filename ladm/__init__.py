"""ladm: LaDM and baselines for low-resource machine translation."""

from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"

REPO_ROOT = Path(__file__).resolve().parent.parent

# `${repo_root:}` in conf/ points at the checkout, so shipped data resolves from any cwd.
OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT), replace=True)


class LadmError(Exception):
    """A user error: printed as one line, before any heavy work, with a non-zero exit."""
