"""Sentences per second: the newline stop criterion built once per tokenizer (ladm now) against one built per
`generate` call (what `generate(stop_strings=["\\n"])` does, and ladm did before).

Both run ladm's `translate` on the same batches, alternating batch by batch in one process (so a busy machine
slows both alike), over a whole FLORES devtest pair; prints the criterion's build time, sentences/s of each,
the ratio (in total, and the median of the per-batch ratios, which a burst of other load moves little) and
whether the hypotheses are identical.
    python benchmarks/bench_stop.py [--model gemma3-270m] [--pair zh-th] [--sentences 1012] [--max-new-tokens N]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from transformers import StopStringCriteria  # noqa: E402

import ladm.generation  # noqa: E402
from ladm import CONFIG_DIR  # noqa: E402
from ladm.data import LengthBudgets, SequenceFormat, read_split, training_data  # noqa: E402
from ladm.generation import CPU_BATCH_SIZE, translate  # noqa: E402
from ladm.models import context_length, load_model, load_tokenizer  # noqa: E402


def per_call(tokenizer) -> StopStringCriteria:
    """The criterion as `generate(stop_strings=["\\n"], tokenizer=...)` builds it: anew for every call."""
    return StopStringCriteria(tokenizer, ["\n"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--pair", default="zh-th")
    parser.add_argument("--sentences", type=int, default=1012)
    parser.add_argument("--batch-size", type=int, default=CPU_BATCH_SIZE)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: ladm's choice (eval.max_new_tokens=auto)")
    args = parser.parse_args()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}", f"pair={args.pair}"])
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tokenizer).eval()
    fmt = SequenceFormat.from_cfg(tokenizer, cfg)
    prompts = fmt.prompt_ids(read_split(cfg.data.test).head(args.sentences).src, cfg.pair)
    train, _ = training_data(cfg, {cfg.pair.name: cfg})
    budgets = LengthBudgets.choose(cfg.train.max_length, cfg.train.length_coverage, cfg.eval.max_new_tokens,
                                   cfg.eval.length_margin, context_length(cfg.model),
                                   {cfg.pair.name: fmt.encode(train[cfg.pair.name], cfg.pair)},
                                   {cfg.pair.name: prompts})
    max_new_tokens = args.max_new_tokens or budgets.max_new_tokens[cfg.pair.name]
    stop_ids = fmt.stop_ids(model.generation_config)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)  # translate's own batches
    batches = [[prompts[i] for i in order[s:s + args.batch_size]] for s in range(0, len(order), args.batch_size)]
    print(f"{datetime.date.today()} model={args.model} pair={args.pair} sentences={len(prompts)} "
          f"batch_size={args.batch_size} max_new_tokens={max_new_tokens} threads={torch.get_num_threads()}", flush=True)

    builds = []
    for _ in range(3):
        start = time.perf_counter()
        per_call(tokenizer)
        builds.append(time.perf_counter() - start)
    print(f"building the criterion: {statistics.median(builds):.2f} s (median of 3)", flush=True)

    cached = ladm.generation.newline_stop
    seconds = {"once per tokenizer": [], "per generate call": []}
    identical = 0
    for number, batch in enumerate(batches, 1):
        hypotheses = {}
        for variant, build in (("per generate call", per_call), ("once per tokenizer", cached)):
            ladm.generation.newline_stop = build
            start = time.perf_counter()
            hypotheses[variant] = translate(model, tokenizer, batch, stop_ids, len(batch), max_new_tokens,
                                            desc=variant).hypotheses
            seconds[variant].append(time.perf_counter() - start)
        ladm.generation.newline_stop = cached
        identical += sum(a == b for a, b in zip(*hypotheses.values(), strict=True))
        print(f"batch {number}/{len(batches)}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in seconds.items()), flush=True)
    total = {variant: sum(times) for variant, times in seconds.items()}
    rate = {variant: len(prompts) / s for variant, s in total.items()}
    # the median over batches of the per-batch ratio: a burst of other load on the machine moves it little
    ratio = statistics.median(a / b for a, b in zip(seconds["per generate call"], seconds["once per tokenizer"],
                                                    strict=True))
    print(f"per generate call: {rate['per generate call']:.3f} sent/s ({total['per generate call']:.0f} s)   "
          f"once per tokenizer: {rate['once per tokenizer']:.3f} sent/s ({total['once per tokenizer']:.0f} s)")
    print(f"speed-up: {rate['once per tokenizer'] / rate['per generate call']:.2f}x in total, {ratio:.3f}x per batch "
          f"(median)   identical hypotheses: {identical}/{len(prompts)}")


if __name__ == "__main__":
    main()
