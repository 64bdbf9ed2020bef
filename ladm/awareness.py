"""The MLAS-LoRA awareness stage alone (METHODS.md §3, steps 1–4): computes (or reuses) the cached stage
and writes its summary into the run folder.

    python -m ladm.awareness method=mlas_lora method.pairs=[zh-lo,zh-km]
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from ladm.cli import cli_main
from ladm.files import write_json_atomic
from ladm.methods.mlas_lora import check_mlas_cfg, load_or_compute
from ladm.models import load_tokenizer
from ladm.schema import validate

log = logging.getLogger("ladm.awareness")


def run_awareness(cfg: DictConfig, out_dir: Path) -> dict:
    """Compute (or reuse) the stage and copy its summary into the run folder."""
    validate(cfg)
    check_mlas_cfg(cfg)
    tokenizer = load_tokenizer(cfg.model)
    _, summary = load_or_compute(cfg, tokenizer, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    write_json_atomic(out_dir / "awareness.json", summary)
    log.info("teacher layers %s → student layers 0..%d", summary["teacher_layers"], len(summary["teacher_layers"]) - 1)
    return summary


main = cli_main("ladm-awareness", "awareness", run_awareness)


if __name__ == "__main__":
    main()
