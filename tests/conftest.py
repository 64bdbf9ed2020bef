"""Shared fixtures: offline environment, Hydra compose, tiny corpora."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline",
                  WANDB_SILENT="true", TOKENIZERS_PARALLELISM="false")

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from ladm import CONFIG_DIR  # noqa: E402


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenizer cache for the session (the BPE is trained once)."""
    path = tmp_path_factory.mktemp("ladm-cache")
    os.environ["LADM_CACHE"] = str(path)
    return path


@pytest.fixture
def make_cfg(cache_dir):
    """Compose conf/ with overrides, as `ladm-train` would (no W&B, no external metrics by default)."""

    def _make(*overrides: str) -> DictConfig:
        base = ["logger=none", "eval.metrics=[chrf++]", f"cache_dir={cache_dir}"]
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            return compose("config", overrides=base + list(overrides))

    return _make


@pytest.fixture
def repeated_corpus(tmp_path) -> tuple[Path, Path]:
    """A tiny zh→lo corpus (the 8 FLORES dev pairs with the shortest Lao side, repeated), aligned text files."""
    from ladm import REPO_ROOT

    flores = REPO_ROOT / "data" / "flores200" / "dev"
    all_src = (flores / "zho_Hans.dev").read_text(encoding="utf-8").splitlines()
    all_tgt = (flores / "lao_Laoo.dev").read_text(encoding="utf-8").splitlines()
    shortest = sorted(range(len(all_tgt)), key=lambda i: (len(all_tgt[i]), i))[:8]
    src, tgt = [all_src[i] for i in shortest], [all_tgt[i] for i in shortest]
    src_path, tgt_path = tmp_path / "train.zh", tmp_path / "train.lo"
    src_path.write_text("\n".join(src * 4) + "\n", encoding="utf-8")
    tgt_path.write_text("\n".join(tgt * 4) + "\n", encoding="utf-8")
    return src_path, tgt_path


@pytest.fixture
def files_overrides(repeated_corpus) -> list[str]:
    """Train and test on the repeated corpus through `data=files`; the ΔR probe's zh→en reference pair reads
    the shipped FLORES dev files."""
    from ladm import REPO_ROOT

    src, tgt = repeated_corpus
    flores = REPO_ROOT / "data" / "flores200" / "dev"
    return ["data=files", f"data.train.src={src}", f"data.train.tgt={tgt}",
            f"data.test.src={src}", f"data.test.tgt={tgt}", "eval.max_samples=4",
            f"probe.reference_data={{format: text, src: {flores / 'zho_Hans.dev'}, tgt: {flores / 'eng_Latn.dev'}}}"]


@pytest.fixture
def whole_and_resumed(tmp_path, monkeypatch):
    """`(cfg, step) -> (whole, resumed, adapters equal)`: the run uninterrupted in tmp/whole, and stopped by SIGTERM
    at `step` (a fault-injection knob, not a timing window) then run again in tmp/stopped."""
    import torch
    from safetensors.torch import load_file

    from ladm.train import run
    from ladm.trainer import Preempted

    def compare(cfg, step: int):
        whole = run(cfg, tmp_path / "whole")
        monkeypatch.setenv("LADM_FAULT_SIGNAL_AT_STEP", f"{step}:SIGTERM")
        with pytest.raises(Preempted):
            run(cfg, tmp_path / "stopped")
        monkeypatch.delenv("LADM_FAULT_SIGNAL_AT_STEP")
        resumed = run(cfg, tmp_path / "stopped")
        ours, theirs = (load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("whole", "stopped"))
        return whole, resumed, ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    return compare
