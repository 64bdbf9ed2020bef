"""The padding share of training batches over all of a pair's FLORES dev split, random batches against
`train.group_by_length` (ladm's `GroupedBatches`), for each model's real tokenizer.

    python benchmarks/bench_padding.py [--models tiny-llama3 tiny-qwen2.5] [--pairs zh-km zh-my] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import datetime
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from ladm import CONFIG_DIR  # noqa: E402
from ladm.data import SequenceFormat, read_split  # noqa: E402
from ladm.models import load_tokenizer  # noqa: E402
from ladm.trainer import GroupedBatches  # noqa: E402


def padding_share(batches: list[list[int]], lengths: list[int]) -> float:
    """Padding positions / all positions when every batch is padded to its longest sequence."""
    cells = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return 1 - sum(lengths[i] for batch in batches for i in batch) / cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-llama3", "tiny-qwen2.5"])
    parser.add_argument("--pairs", nargs="+", default=["zh-km", "zh-my"])
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    print(f"{datetime.date.today()} padding share of batches of {args.batch_size} over all of FLORES dev, random → grouped")
    for model in args.models:
        for pair in args.pairs:
            with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
                cfg = compose("config", overrides=[f"model={model}", f"pair={pair}"])
            tokenizer = load_tokenizer(cfg.model)
            lengths = [len(e.input_ids) for e in
                       SequenceFormat.from_cfg(tokenizer, cfg).encode(read_split(cfg.data.train), cfg.pair)]
            shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
            random = [shuffled[i:i + args.batch_size] for i in range(0, len(shuffled) - args.batch_size + 1, args.batch_size)]
            grouped = list(GroupedBatches(lengths, args.batch_size, 1, 0, seed=0))
            print(f"{model} {pair} ({len(lengths)} sentences): {padding_share(random, lengths):.1%} → "
                  f"{padding_share(grouped, lengths):.1%}")


if __name__ == "__main__":
    main()
