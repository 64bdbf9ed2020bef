"""Batched generation for evaluation (METHODS.md §5): greedy by default, left padding,
batches sorted by length, output cut at the first newline, original order restored."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig


def left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row)
        attention_mask[i, width - len(row):] = 1
    return input_ids, attention_mask


def first_line(text: str) -> str:
    """The text up to its first line break (any of `str.splitlines`' separators), stripped."""
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


@torch.no_grad()
def translate(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int,
              num_beams: int = 1, desc: str = "generate") -> list[str]:
    """Translate every prompt; returns hypotheses in the order of `prompts`."""
    if not prompts:  # a rank whose share of a small test set is empty
        return []
    device = next(model.parameters()).device
    encoded = tokenizer(prompts).input_ids
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    generation = GenerationConfig(
        max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, stop_strings=["\n"],
    )
    was_training = model.training
    model.eval()
    hypotheses: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        index = order[start:start + batch_size]
        input_ids, attention_mask = left_pad([encoded[i] for i in index], tokenizer.pad_token_id)
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                generation_config=generation, tokenizer=tokenizer)
        texts = tokenizer.batch_decode(output[:, input_ids.shape[1]:], skip_special_tokens=True)
        for i, text in zip(index, texts, strict=True):
            hypotheses[i] = first_line(text)
    model.train(was_training)
    return hypotheses
