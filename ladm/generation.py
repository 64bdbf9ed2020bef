"""Batched generation for evaluation (METHODS.md §5): greedy by default, left padding, batches sorted
by length, stopping on every end token of the model, output cut at the first newline, original order
restored."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteriaList, StopStringCriteria

from ladm.data import left_pad
from ladm.files import write_json_atomic

log = logging.getLogger(__name__)


def first_line(text: str) -> str:
    """The text up to its first line break (any of `str.splitlines`' separators), stripped."""
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


@functools.lru_cache(maxsize=8)
def newline_stop(tokenizer) -> StopStringCriteria:
    """transformers' own stop-string criterion for "\n", built once per tokenizer: building it walks the whole
    vocabulary (1.8 s for Llama-3's 128,256 entries on a 2-core CPU), which `generate(stop_strings=...)` redoes per call."""
    return StopStringCriteria(tokenizer, ["\n"])


@dataclass
class Translations:
    hypotheses: list[str]
    hit_budget: list[bool]  # generation ran to max_new_tokens without ending


@torch.no_grad()
def translate(model, tokenizer, prompt_ids: list[list[int]], stop_ids: list[int], batch_size: int,
              max_new_tokens: int, num_beams: int = 1, desc: str = "generate") -> Translations:
    """Translate every tokenised prompt; returns hypotheses in the order of `prompt_ids`."""
    if not prompt_ids:  # a rank whose share of a small test set is empty
        return Translations([], [])
    device = next(model.parameters()).device
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]), reverse=True)
    generation = GenerationConfig(
        max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids,
    )
    stop_at_newline = StoppingCriteriaList([newline_stop(tokenizer)])
    was_training = model.training
    model.eval()
    hypotheses, hit_budget = [""] * len(prompt_ids), [False] * len(prompt_ids)
    ended = set(stop_ids) | {tokenizer.pad_token_id}
    progress = tqdm(total=len(order), desc=desc, unit="sentence")
    start = 0
    while start < len(order):
        index = order[start:start + batch_size]
        input_ids, attention_mask = left_pad([prompt_ids[i] for i in index], tokenizer.pad_token_id)
        try:
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    generation_config=generation, stopping_criteria=stop_at_newline)
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2  # the longest prompts come first: a batch that fits here fits from here on
            log.warning("out of memory while generating: eval batch size lowered to %d", batch_size)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        start += len(index)
        progress.update(len(index))
        generated = output[:, input_ids.shape[1]:].cpu()
        texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        for i, row, text in zip(index, generated.tolist(), texts, strict=True):
            hypotheses[i] = first_line(text)
            hit_budget[i] = len(row) == max_new_tokens and row[-1] not in ended and "\n" not in text.strip()
    progress.close()
    model.train(was_training)
    return Translations(hypotheses, hit_budget)


def largest_fitting_batch(fits: Callable[[int], bool], start: int = 256) -> int:
    """The largest of start, start/2, ... 1 for which `fits(batch_size)` holds (`eval.batch_size=auto`)."""
    batch_size = start
    while batch_size > 1 and not fits(batch_size):
        batch_size //= 2
    return batch_size


def fits_in_memory(model, length: int, device: torch.device) -> Callable[[int], bool]:
    """Whether a batch of `length`-token sequences (the longest prompt + the generation budget) runs one
    cached forward pass without running out of device memory."""
    def fits(batch_size: int) -> bool:
        try:
            with torch.no_grad():
                ids = torch.zeros((batch_size, length), dtype=torch.long, device=device)
                model(input_ids=ids, use_cache=True, logits_to_keep=1)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return fits


CPU_BATCH_SIZE = 32  # measured: batched generation is ~7× one-at-a-time at 32 on CPU (README, benchmarks)


def eval_batch_size(setting: int | str, model, length: int, device: torch.device, cache: Path, model_name: str) -> int:
    """`eval.batch_size`: a number as given; `auto`: 32 on CPU, on a GPU the largest batch of `length`-token
    sequences that fits, found once per (model, GPU, length) and cached in `cache` (a JSON file)."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    key = f"{model_name}|{torch.cuda.get_device_name(device)}|{length}"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if not isinstance(known.get(key), int):
        known[key] = largest_fitting_batch(fits_in_memory(model, length, device))
        write_json_atomic(cache, known)
        log.info("eval.batch_size=auto: %d fits on %s", known[key], key)
    return known[key]
