"""Batched generation for evaluation (METHODS.md §5): greedy by default, left padding, batches sorted
by length, stopping on every end token of the model, output cut at the first newline, original order
restored."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from ladm.data import left_pad


def first_line(text: str) -> str:
    """The text up to its first line break (any of `str.splitlines`' separators), stripped."""
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


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
        pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids, stop_strings=["\n"],
    )
    was_training = model.training
    model.eval()
    hypotheses, hit_budget = [""] * len(prompt_ids), [False] * len(prompt_ids)
    ended = set(stop_ids) | {tokenizer.pad_token_id}
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        index = order[start:start + batch_size]
        input_ids, attention_mask = left_pad([prompt_ids[i] for i in index], tokenizer.pad_token_id)
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                generation_config=generation, tokenizer=tokenizer)
        generated = output[:, input_ids.shape[1]:].cpu()
        texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        for i, row, text in zip(index, generated.tolist(), texts, strict=True):
            hypotheses[i] = first_line(text)
            hit_budget[i] = len(row) == max_new_tokens and row[-1] not in ended and "\n" not in text.strip()
    model.train(was_training)
    return Translations(hypotheses, hit_budget)
