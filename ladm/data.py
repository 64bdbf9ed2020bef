"""Corpora, the translation prompt and collation (METHODS.md §5)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ladm import CONFIG_DIR, LadmError

log = logging.getLogger(__name__)

PROMPT = "Translate the following {src_name} text into {tgt_name}.\n{src_name}: {src}\n{tgt_name}:"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class ParallelCorpus:
    """Aligned source and target sentences of one language pair."""

    src: list[str]
    tgt: list[str]

    def __len__(self) -> int:
        return len(self.src)

    def head(self, n: int | None) -> ParallelCorpus:
        return self if n is None else ParallelCorpus(self.src[:n], self.tgt[:n])


def _read_lines(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise LadmError(f"data file not found: {path} (check data.root or the data.* paths)")
    # newline=None reads LF and CRLF alike (NTREX-128 ships CRLF).
    with open(path, encoding="utf-8", newline=None) as f:
        return [line.rstrip("\n") for line in f]


def _check_nonempty(lines: list[str], path: str) -> None:
    empty = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
        raise LadmError(f"{len(empty)} empty line(s) in {path} at line(s) {shown}: remove or fill them")


def read_split(split: DictConfig) -> ParallelCorpus:
    """Read one split described by `data.train` or `data.test` (formats: text, tsv, jsonl)."""
    fmt = split.format
    if fmt == "text":
        src, tgt = _read_lines(split.src), _read_lines(split.tgt)
        if len(src) != len(tgt):
            raise LadmError(
                f"source and target differ in length: {split.src} has {len(src)} lines, "
                f"{split.tgt} has {len(tgt)}; they must be aligned line by line"
            )
        _check_nonempty(src, split.src)
        _check_nonempty(tgt, split.tgt)
        return ParallelCorpus(src, tgt)
    if fmt == "tsv":
        rows = [line.split("\t") for line in _read_lines(split.path)]
        bad = [i + 1 for i, row in enumerate(rows) if len(row) != 2 or not all(c.strip() for c in row)]
        if bad:
            raise LadmError(f"{split.path}: line(s) {bad[:10]} are not 'source<TAB>target' with both sides non-empty")
        return ParallelCorpus([r[0] for r in rows], [r[1] for r in rows])
    if fmt == "jsonl":
        src_key, tgt_key = split.get("src_key", "src"), split.get("tgt_key", "tgt")
        records = [json.loads(line) for line in _read_lines(split.path) if line.strip()]
        bad = [i + 1 for i, r in enumerate(records) if not (str(r.get(src_key, "")).strip() and str(r.get(tgt_key, "")).strip())]
        if bad:
            raise LadmError(f"{split.path}: record(s) {bad[:10]} lack a non-empty '{src_key}' or '{tgt_key}'")
        return ParallelCorpus([r[src_key] for r in records], [r[tgt_key] for r in records])
    raise LadmError(f"unknown data format '{fmt}': use text, tsv or jsonl")


def pair_config(cfg: DictConfig, name: str) -> DictConfig:
    """A copy of `cfg` with `pair` set to conf/pair/<name>.yaml, so `data.*` paths re-resolve for it."""
    if name == cfg.pair.name:
        return cfg
    path = CONFIG_DIR / "pair" / f"{name}.yaml"
    if not path.is_file():
        raise LadmError(f"unknown pair '{name}': choose one of {', '.join(sorted(p.stem for p in path.parent.glob('*.yaml')))}")
    copy = cfg.copy()
    OmegaConf.set_struct(copy, False)
    copy.pair = OmegaConf.load(path)
    return copy


def render_prompt(src: str, pair_cfg: DictConfig, tokenizer=None, chat_template: bool = False) -> str:
    """The shared prompt of METHODS.md §5, optionally wrapped in the tokenizer's chat template."""
    prompt = PROMPT.format(src_name=pair_cfg.src.name, tgt_name=pair_cfg.tgt.name, src=src)
    if chat_template:
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def encode_examples(corpus: ParallelCorpus, pair_cfg: DictConfig, tokenizer, max_length: int,
                    chat_template: bool = False) -> tuple[list[Example], int]:
    """Prompt + " target" + EOS with the loss on target tokens only.

    Past `max_length` the target side is truncated; returns the examples and how many were cut.
    """
    truncated = 0
    examples = []
    for src, tgt in zip(corpus.src, corpus.tgt, strict=True):
        prompt_ids = tokenizer(render_prompt(src, pair_cfg, tokenizer, chat_template)).input_ids
        target_ids = tokenizer(" " + tgt, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        room = max_length - len(prompt_ids)
        if room < 1:
            raise LadmError(
                f"a prompt of {len(prompt_ids)} tokens leaves no room for the target under "
                f"train.max_length={max_length}: raise train.max_length"
            )
        if len(target_ids) > room:
            truncated += 1
            target_ids = target_ids[:room]
        examples.append(Example(prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids))
    return examples, truncated


def collate(examples: list[Example], pad_token_id: int) -> dict:
    """Right-pad a training batch; padding is masked out of attention and loss."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
