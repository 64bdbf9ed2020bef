"""The README's GPU table in one prepared script (under 8 minutes on one H100/H200-class GPU; nothing downloaded).

Llama-3.1-8B's shape (32 layers × 4,096, FFN 14,336, 32/8 heads, the real 128,256-entry Llama-3 tokenizer from
tests/assets) with random weights in bf16, built on the GPU; LoRA (`method=lora`) on FLORES zh→my dev under that
tokenizer (its lengths: median ~290 target tokens); batch 8, AdamW, constant lr. For ladm's trainer and for
`transformers.Trainer` + PEFT, with and without gradient checkpointing: real (non-padding) tokens/s over the
steps after `--warmup`, model-FLOPs utilisation and peak memory. Then generation on the first `--sentences`
FLORES zh→km devtest sentences (1,012: all), greedy, `--max-new-tokens` new tokens, batch found by
`eval.batch_size=auto`, with the LoRA adapters merged into the weights (`eval.merge_adapters`) and unmerged.

MFU convention: model FLOPs = 6 · N · tokens (forward 2N, backward 4N per token, N = every parameter except the
input embedding; attention-score FLOPs and the frozen base's skipped weight gradients not counted, as in PaLM's
MFU), divided by `--peak-tflops` (989.5: bf16 dense of an H100/H200 SXM).
    python benchmarks/bench_gpu.py [--shape llama3.1-8b] [--steps 12] [--sentences 1012]
`--shape tiny` runs the same code on tiny-llama3 on a CPU in seconds (the test suite does).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import ladm.trainer  # noqa: E402
from ladm import CONFIG_DIR  # noqa: E402
from ladm.data import SequenceFormat, collate, read_split, truncate  # noqa: E402
from ladm.distributed import DistEnv  # noqa: E402
from ladm.generation import eval_batch_size, translate  # noqa: E402
from ladm.methods import build_method  # noqa: E402
from ladm.models import load_tokenizer, model_config  # noqa: E402
from ladm.tracking import Tracker  # noqa: E402

SHAPES = {
    "llama3.1-8b": ["model.random_init.config.num_hidden_layers=32", "model.random_init.config.hidden_size=4096",
                    "model.random_init.config.intermediate_size=14336", "model.random_init.config.num_attention_heads=32",
                    "model.random_init.config.num_key_value_heads=8", "model.random_init.config.head_dim=128",
                    "model.random_init.config.initializer_range=0.02", "model.dtype=bfloat16"],
    "tiny": [],
}


def compose_cfg(shape: str, pair: str, steps: int, checkpointing: bool):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=["model=tiny-llama3", *SHAPES[shape], "method=lora", f"pair={pair}",
                                            "logger=none", "train.batch_size=8", f"train.max_steps={steps}",
                                            "train.warmup_ratio=0", "train.scheduler=constant", "method.dropout=0.0",
                                            f"train.gradient_checkpointing={str(checkpointing).lower()}"])


def build_model(cfg, tokenizer, device: torch.device) -> torch.nn.Module:
    """The resized config's random model, created on `device` directly (an 8B model never sits on the CPU)."""
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" and device.type == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(cfg.model), dtype=dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return build_method(cfg).prepare_model(model, tokenizer)


def flops_parameters(model: torch.nn.Module) -> int:
    """N of the MFU convention: every parameter but the input embedding (LoRA's included)."""
    embedding = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - embedding


def enable_checkpointing(model: torch.nn.Module) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


class StepTimes(TrainerCallback):
    """HF Trainer: wall time (CUDA synchronised) and real tokens of every optimizer step; the tokens are counted
    where the model receives its batch (the loss's target tokens, as ladm counts them)."""

    def __init__(self, model: torch.nn.Module):
        self.tokens, self.steps = 0, []
        model.get_base_model().register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs):
        if module.training and kwargs.get("labels") is not None:
            self.tokens += int((kwargs["labels"][:, 1:] != -100).sum())

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start, self.before = time.perf_counter(), self.tokens

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.steps.append((time.perf_counter() - self.start, self.tokens - self.before))


def ladm_steps(cfg, tokenizer, model, examples, device) -> list[tuple[float, int]]:
    """(seconds, real tokens) of every step of ladm's trainer, from its train_log.jsonl."""
    method = build_method(cfg)  # its optimizer groups: the model's trainable (LoRA) tensors
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(model)
    with tempfile.TemporaryDirectory() as out:
        ladm.trainer.fit(model, method, {cfg.pair.name: examples}, tokenizer.pad_token_id, cfg.train,
                         DistEnv(), Tracker(cfg, Path(out), False), Path(out))
        rows = [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]
    return [(row["seconds"], row["tokens"]) for row in rows]


def hf_steps(cfg, tokenizer, model, examples, device) -> list[tuple[float, int]]:
    def collator(rows):
        return collate([type(examples[0])(r["input_ids"], r["labels"]) for r in rows], tokenizer.pad_token_id)

    timer = StepTimes(model)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=cfg.train.batch_size,
                                 max_steps=cfg.train.max_steps, learning_rate=cfg.train.lr, lr_scheduler_type="constant",
                                 optim="adamw_torch", max_grad_norm=cfg.train.max_grad_norm, logging_strategy="no",
                                 save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
                                 seed=cfg.train.seed, bf16=device.type == "cuda", use_cpu=device.type != "cuda",
                                 remove_unused_columns=False, gradient_checkpointing=bool(cfg.train.gradient_checkpointing),
                                 gradient_checkpointing_kwargs={"use_reentrant": False})
        data = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
        Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[timer]).train()
    return timer.steps


def train_row(runner: str, checkpointing: bool, shape: str, steps: int, warmup: int, device, peak_tflops: float) -> dict:
    cfg = compose_cfg(shape, "zh-my", steps, checkpointing)
    tokenizer = load_tokenizer(cfg.model)
    examples, _ = truncate(SequenceFormat.from_cfg(tokenizer, cfg).encode(read_split(cfg.data.train), cfg.pair), 1024)
    model = build_model(cfg, tokenizer, device)
    n = flops_parameters(model)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timed = (ladm_steps if runner == "ladm" else hf_steps)(cfg, tokenizer, model, examples, device)[warmup:]
    seconds, tokens = sum(s for s, _ in timed), sum(t for _, t in timed)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    tokens_per_s = tokens / seconds
    return {"runner": runner, "gradient_checkpointing": checkpointing, "tokens_per_s": tokens_per_s,
            "mfu": 6 * n * tokens_per_s / (peak_tflops * 1e12), "peak_gib": peak, "steps_timed": len(timed)}


def generation_rows(shape: str, sentences: int, max_new_tokens: int, device) -> list[dict]:
    """Sentences/s on FLORES zh→km devtest, adapters merged and unmerged (random, non-zero B: merging matters)."""
    cfg = compose_cfg(shape, "zh-km", 1, False)
    tokenizer = load_tokenizer(cfg.model)
    model = build_model(cfg, tokenizer, device).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1e-3)
    fmt = SequenceFormat.from_cfg(tokenizer, cfg)
    prompts = fmt.prompt_ids(read_split(cfg.data.test).head(sentences).src, cfg.pair)
    stop_ids = fmt.stop_ids(model.generation_config)
    with tempfile.TemporaryDirectory() as cache:
        batch = eval_batch_size("auto", model, max(map(len, prompts)) + max_new_tokens, device, Path(cache) / "b.json",
                                "bench")
    rows, outputs = [], {}
    method = build_method(cfg)
    translate(model, tokenizer, prompts[:batch], stop_ids, batch, 4)  # warm-up: kernels, allocator
    for merged in (False, True):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if merged:
            with method.merged(model):
                outputs[merged] = translate(model, tokenizer, prompts, stop_ids, batch, max_new_tokens).hypotheses
        else:
            outputs[merged] = translate(model, tokenizer, prompts, stop_ids, batch, max_new_tokens).hypotheses
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows.append({"merged": merged, "sentences_per_s": len(prompts) / (time.perf_counter() - start), "batch": batch})
    same = sum(a == b for a, b in zip(outputs[False], outputs[True], strict=True)) / len(prompts)
    return [row | {"identical_hypotheses": same} for row in rows]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3.1-8b")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--sentences", type=int, default=1012)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--peak-tflops", type=float, default=989.5)
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"shape={args.shape} device={name} torch={torch.__version__} steps={args.steps} (timed after {args.warmup})",
          flush=True)
    rows = []
    for checkpointing in (False, True):
        for runner in ("hf_trainer", "ladm"):
            row = train_row(runner, checkpointing, args.shape, args.steps, args.warmup, device, args.peak_tflops)
            rows.append(row)
            peak = "n/a" if row["peak_gib"] is None else f"{row['peak_gib']:.1f} GiB"
            print(f"train {runner:10s} gradient_checkpointing={checkpointing!s:5s} {row['tokens_per_s']:9.1f} tokens/s  "
                  f"MFU {100 * row['mfu']:5.1f}%  peak {peak}", flush=True)
    for row in generation_rows(args.shape, args.sentences, args.max_new_tokens, device):
        rows.append(row)
        print(f"generate merged={row['merged']!s:5s} {row['sentences_per_s']:8.2f} sentences/s (batch {row['batch']}, "
              f"{args.max_new_tokens} new tokens; identical hypotheses {row['identical_hypotheses']:.0%})", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"device": name, "shape": args.shape, "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
