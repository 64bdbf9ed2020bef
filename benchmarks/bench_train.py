"""Training throughput: ladm's trainer against `transformers.Trainer` + PEFT on the same work.

Same model, LoRA config (PEFT, from `method=lora`), data (FLORES zh→km under the model's real tokenizer),
batch size, AdamW, learning rate, precision and number of steps; the two alternate in one process for
`--rounds` rounds and the best round of each counts. Tokens/s counts real (non-padding) tokens. Also:
ladm with `train.group_by_length=true`, the padding share of each batching, and the peak memory of each
run in a fresh process (`peak_memory.py`).
    python benchmarks/bench_train.py [--model tiny-llama3] [--steps 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from peak_memory import peak_during  # noqa: E402

import ladm.trainer  # noqa: E402
from ladm import CONFIG_DIR  # noqa: E402
from ladm.data import SequenceFormat, collate, read_split, truncate  # noqa: E402
from ladm.distributed import DistEnv  # noqa: E402
from ladm.methods import build_method  # noqa: E402
from ladm.models import load_model, load_tokenizer  # noqa: E402
from ladm.tracking import Tracker  # noqa: E402

RUNNERS = ("hf_trainer", "ladm", "ladm_grouped")


class Counter:
    """Wraps the collate function: counts real and padded token cells of every batch built."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id, self.real, self.cells = pad_token_id, 0, 0

    def __call__(self, examples) -> dict:
        batch = collate(examples, self.pad_token_id)
        self.real += int(batch["attention_mask"].sum())
        self.cells += batch["attention_mask"].numel()
        return batch


def setup(model_name: str, batch_size: int, steps: int, group: bool = False):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model_name}", "method=lora", "pair=zh-km", "logger=none",
                                           f"train.batch_size={batch_size}", f"train.max_steps={steps}",
                                           "train.warmup_ratio=0", "train.scheduler=constant", "method.dropout=0.0",
                                           f"train.group_by_length={str(group).lower()}"])
    tokenizer = load_tokenizer(cfg.model)
    examples = SequenceFormat.from_cfg(tokenizer, cfg).encode(read_split(cfg.data.train), cfg.pair)
    examples, _ = truncate(examples, 1024)
    return cfg, tokenizer, examples


def ladm_run(cfg, tokenizer, examples) -> Counter:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method = build_method(cfg)
    model = method.prepare_model(load_model(cfg.model, tokenizer).to(device), tokenizer)
    counter = Counter(tokenizer.pad_token_id)
    ladm.trainer.collate = lambda batch, pad: counter(batch)
    with tempfile.TemporaryDirectory() as out:
        ladm.trainer.fit(model, method, {"zh-km": examples}, tokenizer.pad_token_id, cfg.train,
                         DistEnv(), Tracker(cfg, Path(out), False), Path(out))
    return counter


def hf_run(cfg, tokenizer, examples) -> Counter:
    from transformers import Trainer, TrainingArguments

    model = build_method(cfg).prepare_model(load_model(cfg.model, tokenizer), tokenizer)
    counter = Counter(tokenizer.pad_token_id)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=cfg.train.batch_size,
                                 max_steps=cfg.train.max_steps, learning_rate=cfg.train.lr, lr_scheduler_type="constant",
                                 optim="adamw_torch", weight_decay=cfg.train.weight_decay, max_grad_norm=cfg.train.max_grad_norm,
                                 logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True,
                                 dataloader_num_workers=0, seed=cfg.train.seed, bf16=torch.cuda.is_available(),
                                 use_cpu=not torch.cuda.is_available(), remove_unused_columns=False)
        data = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
        Trainer(model=model, args=args, train_dataset=data,
                data_collator=lambda rows: counter([type(examples[0])(r["input_ids"], r["labels"]) for r in rows])).train()
    return counter


def run_one(runner: str, model_name: str, batch_size: int, steps: int) -> dict:
    cfg, tokenizer, examples = setup(model_name, batch_size, steps, group=runner == "ladm_grouped")
    start = time.perf_counter()
    counter = (hf_run if runner == "hf_trainer" else ladm_run)(cfg, tokenizer, examples)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens_per_s": counter.real / seconds, "padding": 1 - counter.real / counter.cells}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama3")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-of", choices=RUNNERS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.memory_of:
        cfg, tokenizer, examples = setup(args.model, args.batch_size, 2, group=args.memory_of == "ladm_grouped")
        run = hf_run if args.memory_of == "hf_trainer" else ladm_run
        print(json.dumps({"peak_bytes": peak_during(lambda: run(cfg, tokenizer, examples), device)}))
        return
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for runner in RUNNERS:
            result = run_one(runner, args.model, args.batch_size, args.steps)
            if runner not in best or result["tokens_per_s"] > best[runner]["tokens_per_s"]:
                best[runner] = result
    memory = {}
    for runner in RUNNERS:
        out = subprocess.run([sys.executable, __file__, "--memory-of", runner, "--model", args.model,
                              "--batch-size", str(args.batch_size)], capture_output=True, text=True, check=True)
        memory[runner] = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
    print(f"{datetime.date.today()} model={args.model} device={device} FLORES zh→km batch={args.batch_size} steps={args.steps} "
          f"rounds={args.rounds} threads={torch.get_num_threads()}")
    for runner in RUNNERS:
        r = best[runner]
        print(f"{runner:13s} {r['tokens_per_s']:8.1f} tokens/s   padding {100 * r['padding']:5.1f}%   "
              f"peak {memory[runner] / 2**20:8.1f} MiB")
    hf = best["hf_trainer"]["tokens_per_s"]
    print(f"ladm / HF Trainer tokens/s: {best['ladm']['tokens_per_s'] / hf:.2f}x (grouped: "
          f"{best['ladm_grouped']['tokens_per_s'] / hf:.2f}x); peak memory ladm / HF: "
          f"{memory['ladm'] / memory['hf_trainer']:.3f}")


if __name__ == "__main__":
    main()
