"""Sentences per second: the batched evaluator against one-sentence-at-a-time `generate`.

Same model, same prompts, one process, alternating rounds; prints the ratio.
    python benchmarks/bench_eval.py [--sentences 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from ladm import CONFIG_DIR  # noqa: E402
from ladm.data import SequenceFormat, read_split  # noqa: E402
from ladm.generation import CPU_BATCH_SIZE, first_line, translate  # noqa: E402
from ladm.models import load_model, load_tokenizer  # noqa: E402


@torch.no_grad()
def one_at_a_time(model, tokenizer, prompts: list[list[int]], stop_ids: list[int], max_new_tokens: int) -> list[str]:
    hypotheses = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id, stop_strings=["\n"],
                             tokenizer=tokenizer)
        hypotheses.append(first_line(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
    return hypotheses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama3")
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=CPU_BATCH_SIZE)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}"])
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tokenizer).eval()
    corpus = read_split(cfg.data.test).head(args.sentences)
    fmt = SequenceFormat.from_cfg(tokenizer, cfg)
    prompts = fmt.prompt_ids(corpus.src, cfg.pair)
    stop_ids = fmt.stop_ids(model.generation_config)

    timings = {"batched": [], "single": []}
    for _ in range(args.rounds):
        start = time.perf_counter()
        batched = translate(model, tokenizer, prompts, stop_ids, args.batch_size, args.max_new_tokens,
                            desc="batched").hypotheses
        timings["batched"].append(time.perf_counter() - start)
        start = time.perf_counter()
        single = one_at_a_time(model, tokenizer, prompts, stop_ids, args.max_new_tokens)
        timings["single"].append(time.perf_counter() - start)
    agree = sum(a == b for a, b in zip(batched, single, strict=True)) / len(prompts)
    best = {k: min(v) for k, v in timings.items()}
    print(f"{datetime.date.today()} model={args.model} sentences={len(prompts)} batch_size={args.batch_size} "
          f"max_new_tokens={args.max_new_tokens} threads={torch.get_num_threads()}")
    print(f"batched: {len(prompts) / best['batched']:.1f} sent/s   single: {len(prompts) / best['single']:.1f} sent/s")
    print(f"speed-up (batched / single): {best['single'] / best['batched']:.2f}x   identical outputs: {agree:.0%}")


if __name__ == "__main__":
    main()
