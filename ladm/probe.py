"""`ladm-probe`: per-layer relevance R for a reference and a target pair, ΔR, TAL/LIL (METHODS.md §1),
written as delta_r.json and a bar plot.

    ladm-probe pair=zh-km                      # tiny-llama3, reference zh-en
    ladm-probe model=qwen2.5-7b model.path=/models/qwen pair=zh-lo probe.n_sentences=500
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from ladm.analysis.relevance import delta_r_report, measure_relevance, reference_pair_cfg
from ladm.cli import cli_main
from ladm.files import write_json_atomic
from ladm.methods.ladm import Selection
from ladm.models import check_model_path, load_model, load_tokenizer
from ladm.plots import delta_r_title, draw_delta_r, pyplot, save_figure
from ladm.schema import validate

log = logging.getLogger("ladm.probe")


def plot_delta_r(report: dict, path: Path) -> None:
    """Bars of ΔR per layer with the bootstrap's intervals; TAL red, LIL blue, modulated layers hatched."""
    fig, ax = pyplot().subplots(figsize=(max(6, 0.35 * len(report["delta_r"])), 3.5))
    draw_delta_r(ax, report, delta_r_title(report))
    save_figure(fig, path)


def run_probe(cfg: DictConfig, out_dir: Path) -> dict:
    """Probe the base model, select TAL/LIL with the `method=ladm` knobs, write json and png."""
    validate(cfg)
    selection = Selection.from_cfg(cfg)
    reference_pair_cfg(cfg)
    check_model_path(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tokenizer)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    report = delta_r_report(measure_relevance(model, tokenizer, cfg), cfg.probe, selection)
    write_json_atomic(out_dir / "delta_r.json", report)
    plot_delta_r(report, out_dir / "delta_r.png")
    log.info("ΔR %s vs %s: TAL %s, LIL %s → %s", report["reference_pair"], report["pair"], report["tal"],
             report["lil"], out_dir / "delta_r.json")
    return report


main = cli_main("ladm-probe", "probe", run_probe)


if __name__ == "__main__":
    main()
