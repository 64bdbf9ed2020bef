"""Peak memory of one LoRA training step: the answer-only chunked loss against the full-logits loss.

The llama3 test model (real 128,256-entry vocabulary) with a realistic batch: 8 FLORES zh→my examples
(Llama-3 tokenizer; ~700 tokens each). Each variant runs in its own fresh process; on CPU the peak is
the largest resident set sampled every millisecond during the step minus its size before the step, on
CUDA `max_memory_allocated` during the step minus the memory allocated before it. Prints both and the ratio.
    python benchmarks/bench_loss.py [--model tiny-llama3] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from peak_memory import peak_during  # noqa: E402

from ladm import CONFIG_DIR  # noqa: E402
from ladm.data import SequenceFormat, collate, read_split  # noqa: E402
from ladm.losses import answer_loss, full_logits_loss_sum  # noqa: E402
from ladm.methods import build_method  # noqa: E402
from ladm.models import load_model, load_tokenizer  # noqa: E402

LOSSES = {"full_logits": full_logits_loss_sum, "chunked": answer_loss}


def measure(variant: str, model_name: str, batch_size: int) -> dict:
    """One LoRA step (forward, backward) with `variant`'s loss; the step's peak extra memory in bytes."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model_name}", "method=lora", "pair=zh-my"])
    tokenizer = load_tokenizer(cfg.model)
    examples = SequenceFormat.from_cfg(tokenizer, cfg).encode(read_split(cfg.data.train).head(batch_size), cfg.pair)
    batch = {k: v.to(device) for k, v in collate(examples, tokenizer.pad_token_id).items()}
    model = build_method(cfg).prepare_model(load_model(cfg.model, tokenizer).to(device), tokenizer)
    start = time.perf_counter()
    peak = peak_during(lambda: LOSSES[variant](model, batch).backward(), device)
    seconds = time.perf_counter() - start
    return {"peak_bytes": peak, "seconds": seconds, "tokens": int(batch["attention_mask"].sum()),
            "shape": list(batch["input_ids"].shape), "device": str(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama3")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--variant", choices=list(LOSSES), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.model, args.batch_size)))
        return
    results = {}
    for variant in LOSSES:
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--model", args.model,
                              "--batch-size", str(args.batch_size)], capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    full, chunked = results["full_logits"], results["chunked"]
    print(f"{datetime.date.today()} model={args.model} "
          f"batch={full['shape']} ({full['tokens']} tokens, FLORES zh→my) device={full['device']}")
    for name, r in results.items():
        print(f"{name:12s} peak step memory {r['peak_bytes'] / 2**20:8.1f} MiB   step {r['seconds']:.2f} s")
    print(f"chunked / full-logits peak memory: {chunked['peak_bytes'] / full['peak_bytes']:.3f}")


if __name__ == "__main__":
    main()
