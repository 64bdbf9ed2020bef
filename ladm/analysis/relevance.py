"""Layer relevance R and Activation Disparity ΔR (METHODS.md §1), streamed with forward hooks; the probe
sets they are measured on, and the cached measurement of a (reference, target) pair used by LaDM."""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ladm import LadmError
from ladm.data import Example, SequenceFormat, left_pad, pair_config, read_split, training_max_length, truncate
from ladm.files import finite_numbers, read_json, write_json_atomic
from ladm.models import decoder_layers, weights_fingerprint

log = logging.getLogger(__name__)


class LayerRelevance:
    """Accumulates `R_l(x) = mean_t ||A_{l+1}(x)_t − A_l(x)_t||_1` of every sentence x, batch by batch;
    `relevance` is R_l = 1/N · Σ_x R_l(x).

    Forward hooks on the decoder layers see each layer's input `A_l` and output `A_{l+1}`; only the per-sentence,
    per-layer means (float64) are kept, never the hidden states of the set. The per-sentence rows let the
    probe bootstrap ΔR over sentences.
    """

    def __init__(self, model: torch.nn.Module):  # the token mean runs over `counted` tokens (default: non-padding)
        self.layers = decoder_layers(model)
        self.rows: list[torch.Tensor] = []  # (batch, layers) per batch, on the device: no sync per layer
        self._batch: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

    def _hook(self, index: int):
        def hook(module, args, kwargs, output):
            layer_in = args[0] if args else kwargs["hidden_states"]
            layer_out = output[0] if isinstance(output, tuple) else output
            l1 = (layer_out.float() - layer_in.float()).abs().sum(-1)  # (batch, tokens)
            mask = self._mask.to(l1.dtype)
            self._batch[:, index] = ((l1 * mask).sum(-1) / mask.sum(-1)).double()  # mean over counted tokens

        return hook

    @contextmanager
    def hooked(self):
        handles = [layer.register_forward_hook(self._hook(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def add_batch(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  counted: torch.Tensor | None = None) -> None:
        """One forward pass; position ids follow the mask so left and right padding agree. `counted` (default:
        the attention mask) marks the tokens the mean runs over (`probe.tokens=target`: the reference only)."""
        self._mask = attention_mask if counted is None else counted
        self._batch = torch.zeros(input_ids.shape[0], len(self.layers), dtype=torch.float64, device=input_ids.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
              logits_to_keep=1)  # the hooks need the layers, not the vocabulary-sized logits
        self.rows.append(self._batch)

    @property
    def per_sentence(self) -> torch.Tensor:
        """R_l(x): one row per sentence, one column per layer."""
        return torch.cat(self.rows).cpu() if self.rows else torch.zeros(0, len(self.layers), dtype=torch.float64)

    @property
    def relevance(self) -> torch.Tensor:
        rows = self.per_sentence
        return rows.mean(0) if len(rows) else rows.sum(0)


def sentence_relevance(model: torch.nn.Module, token_ids: list[list[int]], counted_from: list[int], pad_token_id: int,
                       batch_size: int, desc: str = "probe") -> torch.Tensor:
    """R_l(x) of every decoder layer and probe sentence (N × layers); the token mean of sentence i starts at
    `counted_from[i]`."""
    device = next(model.parameters()).device
    relevance = LayerRelevance(model)
    was_training = model.training
    model.eval()
    with relevance.hooked():
        for start in tqdm(range(0, len(token_ids), batch_size), desc=desc, unit="batch"):
            rows = token_ids[start:start + batch_size]
            input_ids, attention_mask = left_pad(rows, pad_token_id)
            counted = attention_mask.clone()
            for i, (row, first) in enumerate(zip(rows, counted_from[start:start + batch_size], strict=True)):
                counted[i, :input_ids.shape[1] - len(row) + first] = 0  # left padding, then the uncounted prefix
            relevance.add_batch(model, input_ids.to(device), attention_mask.to(device), counted.to(device))
    model.train(was_training)
    return relevance.per_sentence


def layer_relevance(model: torch.nn.Module, token_ids: list[list[int]], counted_from: list[int], pad_token_id: int,
                    batch_size: int, desc: str = "probe") -> torch.Tensor:
    """R_l of every decoder layer over a probe set (METHODS.md §1): the mean of `sentence_relevance`."""
    return sentence_relevance(model, token_ids, counted_from, pad_token_id, batch_size, desc).mean(0)


def probe_examples(cfg: DictConfig, pair: str, fmt: SequenceFormat) -> list[Example]:
    """The first `probe.n_sentences` of the pair's `probe.split`, as the trainer's (untruncated) examples."""
    pair_cfg = pair_config(cfg, pair)
    corpus = read_split(pair_cfg.data[cfg.probe.split]).head(cfg.probe.n_sentences)
    return fmt.encode(corpus, pair_cfg.pair)


def relevance_inputs(examples: list[Example], probe_cfg: DictConfig) -> tuple[list[list[int]], list[int]]:
    """Probe inputs (METHODS.md §1): the prompt, or the prompt followed by the reference, exactly the
    trainer's sequence without its closing token; and where each sentence's token mean starts
    (`probe.tokens`: all | target)."""
    if probe_cfg.input == "prompt":
        if probe_cfg.tokens == "target":
            raise LadmError("probe.tokens=target needs the reference in the probe input: set probe.input=prompt+reference")
        return [e.input_ids[:e.n_prompt] for e in examples], [0] * len(examples)
    first = [e.n_prompt if probe_cfg.tokens == "target" else 0 for e in examples]
    return [e.input_ids[:-1] for e in examples], first


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


def pair_probe_key(cfg: DictConfig, pair_cfg: DictConfig, weights: str) -> str:
    """Identifies one pair's R: model (its config entry and `weights`, the loaded weights' fingerprint, so new
    weights at the same path are measured again), pair, the probe knobs that change R, the prompt and the pair's
    data files."""
    identity = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "weights": weights,
        "pair": pair_cfg.pair.name,
        "probe": {k: cfg.probe[k] for k in ("split", "n_sentences", "input", "tokens")},
        "sequences": 3,  # how probe inputs are built and stored (3: the trainer's sequences, R per sentence kept)
        "prompt": cfg.prompt.template,
        "files": OmegaConf.to_container(pair_cfg.data[cfg.probe.split], resolve=True),
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


def cached_pair_relevance(model: torch.nn.Module, tokenizer, cfg: DictConfig, pair_cfg: DictConfig,
                          fmt: SequenceFormat, weights: str) -> list[list[float]]:
    """R_l(x) of one pair's probe sentences (one row per sentence), cached under `cache_dir/relevance/` by
    `pair_probe_key`, so the reference pair is measured once for any number of target pairs (a corrupt entry is
    measured again)."""
    cache = Path(cfg.cache_dir) / "relevance" / f"{pair_probe_key(cfg, pair_cfg, weights)}.json"
    if cache.is_file():
        try:
            rows = read_json(cache, "the relevance cache", "it is measured again")
            rows = rows.get("R_per_sentence") if isinstance(rows, dict) else None
            if isinstance(rows, list) and rows and all(finite_numbers(r, len(rows[0])) for r in rows):
                log.info("probe %s: reusing %s", pair_cfg.pair.name, cache)
                return rows
            log.warning("%s is not a relevance measurement; measuring again", cache)
        except LadmError as err:
            log.warning("%s; measuring again", err)
    examples = probe_examples(pair_cfg, pair_cfg.pair.name, fmt)
    rows = sentence_relevance(model, *relevance_inputs(examples, cfg.probe), tokenizer.pad_token_id,
                              cfg.probe.batch_size, desc=f"probe {pair_cfg.pair.name}").tolist()
    write_json_atomic(cache, {"model": cfg.model.name, "pair": pair_cfg.pair.name, "n_sentences": len(rows),
                              "R_per_sentence": rows})
    return rows


def sentence_mean(rows: list[list[float]]) -> list[float]:
    """R_l of a pair: the mean over its probe sentences of R_l(x) (METHODS.md §1), in float64."""
    return torch.tensor(rows, dtype=torch.float64).mean(0).tolist()


def measure_relevance(model: torch.nn.Module, tokenizer, cfg: DictConfig) -> dict:
    """R_hi and R_lo (raw, per layer) on the base model, and R per sentence of each (for the bootstrap); each
    pair's measurement cached on its own."""
    ref_cfg = reference_pair_cfg(cfg)
    fmt = SequenceFormat.from_cfg(tokenizer, cfg)
    weights = weights_fingerprint(model)
    rows_hi = cached_pair_relevance(model, tokenizer, cfg, ref_cfg, fmt, weights)
    rows_lo = cached_pair_relevance(model, tokenizer, cfg, cfg, fmt, weights)
    return {"model": cfg.model.name, "model_path": cfg.model.path, "n_layers": len(rows_hi[0]),
            "reference_pair": ref_cfg.pair.name, "pair": cfg.pair.name, "n_sentences": len(rows_lo),
            "R_hi": sentence_mean(rows_hi), "R_lo": sentence_mean(rows_lo),
            "R_hi_per_sentence": rows_hi, "R_lo_per_sentence": rows_lo}


UNSTABLE_BELOW = 0.5  # a selected layer re-selected in fewer resamples than this share is warned about


def bootstrap_delta_r(rows_hi: list[list[float]], rows_lo: list[list[float]], probe_cfg: DictConfig, selection=None,
                      resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """ΔR's sampling uncertainty: the probe sentences of each pair are resampled with replacement `resamples`
    times (seeded), ΔR (METHODS.md §1) is recomputed on every resample, and with a `selection` the TAL/LIL layers
    it selects. Gives ΔR's bootstrap standard error and 95% percentile interval per layer, how often each selected
    layer is selected again, and how often the selection is the same."""
    generator = torch.Generator().manual_seed(seed)

    def resampled_means(rows: list[list[float]]) -> torch.Tensor:
        table = torch.tensor(rows, dtype=torch.float64)
        draws = torch.randint(len(table), (resamples, len(table)), generator=generator)
        counts = torch.zeros(resamples, len(table), dtype=torch.float64)
        counts.scatter_add_(1, draws, torch.ones_like(counts))  # how often each sentence was drawn
        return counts @ table / len(table)

    deltas = activation_disparity(resampled_means(rows_hi), resampled_means(rows_lo), probe_cfg.normalisation,
                                  probe_cfg.sign)
    low, high = torch.quantile(deltas, torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0)
    summary: dict[str, Any] = {"resamples": resamples, "seed": seed, "delta_r_se": deltas.std(0).tolist(),
                               "delta_r_low": low.tolist(), "delta_r_high": high.tolist()}
    if selection is not None:
        full = (torch.tensor(sentence_mean(rows), dtype=torch.float64) for rows in (rows_hi, rows_lo))
        chosen = selection(activation_disparity(*full, probe_cfg.normalisation, probe_cfg.sign).tolist())
        picks = [selection(delta) for delta in deltas.tolist()]
        summary["recurrence"] = {side: {str(l): sum(l in p[f"selected_{side}"] for p in picks) / resamples
                                        for l in chosen[f"selected_{side}"]} for side in ("tal", "lil")}
        summary["same_selection"] = sum(p["selected_tal"] == chosen["selected_tal"] and
                                        p["selected_lil"] == chosen["selected_lil"] for p in picks) / resamples
        summary["unstable_layers"] = sorted(int(l) for side in summary["recurrence"].values()
                                            for l, share in side.items() if share < UNSTABLE_BELOW)
    return summary


def delta_r_report(measured: dict, probe_cfg: DictConfig, selection=None) -> dict:
    """The delta_r.json content: R, R̃, ΔR, (given a selection) TAL/LIL and multipliers, and (given R per sentence
    and `probe.bootstrap` > 0) ΔR's bootstrap uncertainty. R per sentence itself is not kept in the report."""
    per_sentence = {k: measured[k] for k in ("R_hi_per_sentence", "R_lo_per_sentence") if k in measured}
    measured = {k: v for k, v in measured.items() if k not in per_sentence}
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
    if len(per_sentence) == 2 and probe_cfg.get("bootstrap", 0):
        report["bootstrap"] = bootstrap_delta_r(per_sentence["R_hi_per_sentence"], per_sentence["R_lo_per_sentence"],
                                                probe_cfg, selection, probe_cfg.bootstrap)
        unstable = report["bootstrap"].get("unstable_layers")
        if unstable:
            shares = {**report["bootstrap"]["recurrence"]["tal"], **report["bootstrap"]["recurrence"]["lil"]}
            log.warning("the TAL/LIL selection of %s is unstable: layer%s %s %s selected again in only %s of %d "
                        "resamples of the %d probe sentences (more sentences: probe.n_sentences)", measured["pair"],
                        "s" if len(unstable) > 1 else "", ", ".join(map(str, unstable)),
                        "are" if len(unstable) > 1 else "is",
                        ", ".join(f"{shares[str(l)]:.0%}" for l in unstable), probe_cfg.bootstrap,
                        measured["n_sentences"])
    return report


def normalise(relevance: torch.Tensor, mode: str) -> torch.Tensor:
    """R̃ per pair: `none`, `sum` (R_l / Σ_k R_k, the default) or `zscore` over layers (the last dimension)."""
    if mode == "none":
        return relevance.clone()
    if mode == "sum":
        return relevance / relevance.sum(-1, keepdim=True)
    if mode == "zscore":
        return (relevance - relevance.mean(-1, keepdim=True)) / relevance.std(-1, keepdim=True)
    raise ValueError(f"unknown normalisation '{mode}': none | sum | zscore")


def activation_disparity(r_hi: torch.Tensor, r_lo: torch.Tensor, normalisation: str = "sum",
                         sign: str = "hi_minus_lo") -> torch.Tensor:
    """ΔR_l = R̃_l(p_hi) − R̃_l(p_lo) (`hi_minus_lo`, the default) or its negation (`lo_minus_hi`)."""
    delta = normalise(r_hi, normalisation) - normalise(r_lo, normalisation)
    if sign == "hi_minus_lo":
        return delta
    if sign == "lo_minus_hi":
        return -delta
    raise ValueError(f"unknown sign '{sign}': hi_minus_lo | lo_minus_hi")


def analysis_identity(cfg: DictConfig, pairs: list[str]) -> dict[str, Any]:
    """What `analysis_examples` depends on: the probe knobs, the training length budget and every pair's files
    (part of an analysis stage's cache key)."""
    probe = {k: v for k, v in cfg.probe.items() if k != "bootstrap"}  # reporting only: R is the same
    return {"probe": probe, "prompt": cfg.prompt.template,
            "train": {k: cfg.train[k] for k in ("max_length", "length_coverage")},
            "files": [pair_config(cfg, p).data[cfg.probe.split] for p in pairs]}


def analysis_examples(cfg: DictConfig, pairs: list[str], fmt: SequenceFormat, context: int) -> dict[str, list[Example]]:
    """Each pair's probe examples, cut to the training length budget (the awareness stages' inputs)."""
    examples = {p: probe_examples(cfg, p, fmt) for p in pairs}
    max_length = training_max_length(cfg.train.max_length, cfg.train.length_coverage, context, examples)
    return {p: truncate(pair_examples, max_length)[0] for p, pair_examples in examples.items()}


def pair_relevance(model: torch.nn.Module, examples: dict[str, list[Example]], probe_cfg: DictConfig,
                   pad_token_id: int) -> dict[str, list[float]]:
    return {p: layer_relevance(model, *relevance_inputs(pair_examples, probe_cfg), pad_token_id, probe_cfg.batch_size,
                               desc=f"relevance {p}").tolist() for p, pair_examples in examples.items()}


def top_layers(relevance: dict[str, list[float]], k: int, mode: str = "relevant", seed: int = 0) -> list[int]:
    """The k layers of highest relevance averaged over the pairs (or k random ones), in depth order."""
    mean = torch.tensor(list(relevance.values())).mean(0)
    if mode == "random":
        chosen = torch.randperm(len(mean), generator=torch.Generator().manual_seed(seed))[:k]
    else:
        chosen = torch.argsort(mean, descending=True, stable=True)[:k]
    return sorted(chosen.tolist())
