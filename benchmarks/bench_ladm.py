"""LaDM overheads, measured in one process on the same model and batches, alternating:

(a) a `ladm` training step against a `lora` training step (target ≤ 1.02),
(b) the ΔR probe against a plain no-grad forward pass over the same batches (target ≤ 1.10),
(c) peak memory of the two trainings (target ≤ 1.02): CUDA max_memory_allocated on a GPU; on CPU,
    where torch keeps no peak counter, the bytes of parameters + gradients + optimizer state
    (activations are the same forward pass for both).

    python benchmarks/bench_ladm.py [--model tiny-llama3] [--steps 20] [--rounds 5]
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

from ladm import CONFIG_DIR  # noqa: E402
from ladm.analysis.relevance import LayerRelevance  # noqa: E402
from ladm.data import SequenceFormat, collate, left_pad, read_split  # noqa: E402
from ladm.losses import answer_loss  # noqa: E402
from ladm.methods import build_method  # noqa: E402
from ladm.models import load_model, load_tokenizer  # noqa: E402


def build(cfg, tokenizer, device):
    method = build_method(cfg)
    torch.manual_seed(0)
    model = method.prepare_model(load_model(cfg.model, tokenizer).to(device), tokenizer)
    optimizer = torch.optim.AdamW(method.param_groups(model, cfg.train.lr, 0.0), lr=cfg.train.lr)
    return model, method, optimizer


def train_step(model, method, optimizer, batch) -> None:
    loss = answer_loss(model, batch) / (batch["labels"] != -100).sum()
    loss.backward()
    method.after_backward(model)
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def state_bytes(model, optimizer) -> int:
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama3")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfgs = {name: compose("config", overrides=[f"model={args.model}", f"method={name}", "probe.n_sentences=32"])
                for name in ("lora", "ladm")}
    cfg = cfgs["lora"]
    tokenizer = load_tokenizer(cfg.model)
    corpus = read_split(cfg.data.train).head(args.batch_size * args.steps)
    examples = SequenceFormat.from_cfg(tokenizer, cfg).encode(corpus, cfg.pair)
    batches = [{k: v.to(device) for k, v in collate(examples[i:i + args.batch_size],
               tokenizer.pad_token_id).items()} for i in range(0, len(examples), args.batch_size)]
    runs = {name: build(c, tokenizer, device) for name, c in cfgs.items()}

    times = {"lora": [], "ladm": []}
    for _ in range(args.rounds):
        for name, (model, method, optimizer) in runs.items():
            sync(device)
            start = time.perf_counter()
            for batch in batches:
                train_step(model, method, optimizer, batch)
            sync(device)
            times[name].append(time.perf_counter() - start)
    step_ratio = statistics.median(times["ladm"]) / statistics.median(times["lora"])
    memory = {name: state_bytes(model, optimizer) for name, (model, _, optimizer) in runs.items()}
    if device.type == "cuda":
        memory = {}
        for name, (model, method, optimizer) in runs.items():
            torch.cuda.reset_peak_memory_stats()
            for batch in batches[:3]:
                train_step(model, method, optimizer, batch)
            memory[name] = torch.cuda.max_memory_allocated()

    base = load_model(cfg.model, tokenizer).to(device).eval()
    probe_batches = [left_pad(ex, tokenizer.pad_token_id) for ex in
                     ([e.input_ids for e in examples[i:i + args.batch_size]] for i in range(0, len(examples), args.batch_size))]
    probe_batches = [(ids.to(device), mask.to(device)) for ids, mask in probe_batches]
    relevance = LayerRelevance(base)
    forward_times, probe_times = [], []
    with torch.no_grad():
        for _ in range(args.rounds):
            sync(device)
            start = time.perf_counter()
            for ids, mask in probe_batches:
                base(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False,
                     logits_to_keep=1)
            sync(device)
            forward_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            with relevance.hooked():
                for ids, mask in probe_batches:
                    relevance.add_batch(base, ids, mask)
            sync(device)
            probe_times.append(time.perf_counter() - start)
    probe_ratio = statistics.median(probe_times) / statistics.median(forward_times)

    print(f"{datetime.date.today()} model={args.model} "
          f"device={device} steps/round={len(batches)} batch={args.batch_size} rounds={args.rounds}")
    print(f"(a) ladm step / lora step time:      {step_ratio:.3f}  (target ≤ 1.02)")
    print(f"(b) probe / no-grad forward time:    {probe_ratio:.3f}  (target ≤ 1.10)")
    print(f"(c) ladm / lora peak memory:         {memory['ladm'] / memory['lora']:.3f}  (target ≤ 1.02; "
          f"{'CUDA peak allocated' if device.type == 'cuda' else 'CPU: params + grads + optimizer state'})")


if __name__ == "__main__":
    main()
