"""`ladm-probe`: per-layer relevance R for a reference and a target pair, ΔR, TAL/LIL (METHODS.md §1).

    ladm-probe pair=zh-km                      # tiny-llama3, reference zh-en
    ladm-probe model=qwen2.5-7b model.path=/models/qwen pair=zh-lo probe.n_sentences=500
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ladm import LadmError
from ladm.activations import activation_disparity, layer_relevance, normalise
from ladm.cli import cli_main
from ladm.data import SequenceFormat, pair_config, read_split
from ladm.files import finite_numbers, read_json, write_json_atomic
from ladm.models import check_model_path, load_model, load_tokenizer
from ladm.plots import pyplot, save_figure
from ladm.schema import validate

log = logging.getLogger("ladm.probe")


def reference_pair_cfg(cfg: DictConfig) -> DictConfig:
    """The config with `pair` replaced by `probe.reference_pair`: its data paths re-resolve, or come
    from `probe.reference_data` when the data config does not depend on the pair (data=files)."""
    if cfg.probe.reference_pair == cfg.pair.name:
        raise LadmError(f"pair {cfg.pair.name} is the reference pair itself: choose a low-resource pair "
                        f"or another probe.reference_pair")
    try:
        ref_cfg = pair_config(cfg, cfg.probe.reference_pair)
    except LadmError as err:
        raise LadmError(f"probe.reference_pair: {err}") from err
    split = cfg.probe.split
    if cfg.probe.reference_data is not None:
        ref_cfg.data[split] = cfg.probe.reference_data
    elif cfg.probe.input == "prompt+reference" and OmegaConf.to_container(ref_cfg.data[split], resolve=True) == \
            OmegaConf.to_container(cfg.data[split], resolve=True):
        raise LadmError(f"the probe would read the same files for {ref_cfg.pair.name} as for {cfg.pair.name} "
                        "(data.* does not depend on the pair), so its references would be mislabelled: "
                        "set probe.reference_data (format/src/tgt of the reference pair) or probe.input=prompt")
    return ref_cfg


def probe_inputs(cfg: DictConfig, fmt: SequenceFormat) -> list[list[int]]:
    """Tokenised probe set of `cfg.pair`: the prompt, or the prompt followed by the reference, exactly the
    trainer's sequence without its closing token (METHODS.md §1)."""
    corpus = read_split(cfg.data[cfg.probe.split]).head(cfg.probe.n_sentences)
    prompts = fmt.prompt_ids(corpus.src, cfg.pair)
    if cfg.probe.input == "prompt":
        return prompts
    answers = fmt.answer_ids(corpus.src, corpus.tgt, cfg.pair)
    return [prompt + answer[:-1] for prompt, answer in zip(prompts, answers, strict=True)]


def probe_key(cfg: DictConfig) -> str:
    """Identifies R_hi/R_lo: model, both pairs, the probe knobs that change R, and the data files."""
    ref_cfg = reference_pair_cfg(cfg)
    split = cfg.probe.split
    identity = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "pairs": [ref_cfg.pair.name, cfg.pair.name],
        "probe": {k: cfg.probe[k] for k in ("split", "n_sentences", "input")},
        "sequences": 2,  # how probe inputs are built (2: the trainer's token sequences)
        "files": [OmegaConf.to_container(c.data[split], resolve=True) for c in (ref_cfg, cfg)],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def check_measured(measured: Any, source: str, fix: str) -> dict:
    """A probe measurement (delta_r.json or its cache): R_hi and R_lo, `n_layers` finite numbers each."""
    if not isinstance(measured, dict):
        raise LadmError(f"{source} holds a JSON {type(measured).__name__}, not a probe measurement: {fix}")
    n_layers = measured.get("n_layers")
    for key in ("R_hi", "R_lo"):
        if not isinstance(n_layers, int) or not finite_numbers(measured.get(key), n_layers):
            raise LadmError(f"{source}: {key} must be a list of n_layers={n_layers!r} finite numbers: {fix}")
    return measured


def measure_relevance(model: torch.nn.Module, tokenizer, cfg: DictConfig) -> dict:
    """R_hi and R_lo (raw, per layer) on the base model, cached under `cache_dir/delta_r/` (a corrupt cache
    entry is measured again)."""
    ref_cfg = reference_pair_cfg(cfg)
    cache = Path(cfg.cache_dir) / "delta_r" / f"{probe_key(cfg)}.json"
    if cache.is_file():
        try:
            measured = check_measured(read_json(cache, "the ΔR cache", "it is measured again"), str(cache), "")
            log.info("ΔR probe: reusing %s", cache)
            return measured
        except LadmError as err:
            log.warning("%s; measuring again", err)
    relevance = {}
    fmt = SequenceFormat.from_cfg(tokenizer, cfg.model)
    for name, pair_cfg in (("R_hi", ref_cfg), ("R_lo", cfg)):
        inputs = probe_inputs(pair_cfg, fmt)
        relevance[name] = layer_relevance(model, inputs, tokenizer.pad_token_id, cfg.probe.batch_size,
                                          desc=f"probe {pair_cfg.pair.name}").tolist()
    measured = {"model": cfg.model.name, "model_path": cfg.model.path, "n_layers": len(relevance["R_hi"]),
                "reference_pair": ref_cfg.pair.name, "pair": cfg.pair.name,
                "n_sentences": len(inputs), **relevance}
    write_json_atomic(cache, measured)
    return measured


def delta_r_report(measured: dict, probe_cfg: DictConfig, selection=None) -> dict:
    """The delta_r.json content: R, R̃, ΔR, and (given a selection) TAL/LIL and multipliers."""
    r_hi, r_lo = torch.tensor(measured["R_hi"]), torch.tensor(measured["R_lo"])
    delta = activation_disparity(r_hi, r_lo, probe_cfg.normalisation, probe_cfg.sign)
    report = measured | {
        "R_hi_norm": normalise(r_hi, probe_cfg.normalisation).tolist(),
        "R_lo_norm": normalise(r_lo, probe_cfg.normalisation).tolist(),
        "delta_r": delta.tolist(),
        "probe": OmegaConf.to_container(probe_cfg, resolve=True),
    }
    if selection is not None:
        report |= selection(delta.tolist())
    return report


def plot_delta_r(report: dict, path: Path) -> None:
    """Bar chart of ΔR per layer; TAL red, LIL blue, modulated layers hatched and labelled m_l."""
    from matplotlib.patches import Patch

    plt = pyplot()
    delta = report["delta_r"]
    tal, lil = set(report.get("tal", [])), set(report.get("lil", []))
    selected = set(report.get("selected_tal", [])) | set(report.get("selected_lil", []))
    colours = ["tab:red" if i in tal else "tab:blue" if i in lil else "tab:gray" for i in range(len(delta))]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(delta)), 3.5))
    bars = ax.bar(range(len(delta)), delta, color=colours, edgecolor="black", linewidth=0.4)
    for i, bar in enumerate(bars):
        if i in selected:
            bar.set_hatch("//")
            ax.annotate(f"×{report['multipliers'][i]:.2g}", (i, delta[i]), ha="center", fontsize=7,
                        va="bottom" if delta[i] >= 0 else "top")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(delta)))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("ΔR")
    ax.set_title(f"{report['model']}: ΔR = R̃({report['reference_pair']}) − R̃({report['pair']})"
                 if report["probe"]["sign"] == "hi_minus_lo" else
                 f"{report['model']}: ΔR = R̃({report['pair']}) − R̃({report['reference_pair']})", fontsize=9)
    ax.legend(handles=[Patch(color="tab:red", label="TAL (amplified)"), Patch(color="tab:blue", label="LIL (inhibited)"),
                       Patch(facecolor="white", edgecolor="black", hatch="//", label="modulated")], fontsize=7)
    save_figure(fig, path)


def run_probe(cfg: DictConfig, out_dir: Path) -> dict:
    """Probe the base model, select TAL/LIL with the `method=ladm` knobs, write json and png."""
    from ladm.methods.ladm import Selection

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
