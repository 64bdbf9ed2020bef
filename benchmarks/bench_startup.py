"""Where a job's first seconds go: each start-up phase of `ladm-train`, timed in one process, twice (the second
job of a local sweep reuses what the process has: the tokenizer, the COMET environment check).

    python benchmarks/bench_startup.py [--model gemma3-270m]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
started = time.perf_counter()
import ladm.train  # noqa: E402, F401 - what a job imports

imported = time.perf_counter() - started

from hydra import compose, initialize_config_dir  # noqa: E402

from ladm import CONFIG_DIR  # noqa: E402
from ladm.metrics import Scorer, comet_python, worker_problem  # noqa: E402
from ladm.models import base_identity, check_model_path, load_model, load_tokenizer  # noqa: E402
from ladm.schema import validate  # noqa: E402


def timed(phases: dict[str, float], name: str, work):
    start = time.perf_counter()
    value = work()
    phases[name] = time.perf_counter() - start
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    args = parser.parse_args()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}", "logger=none", "eval.on_missing=skip",
                                           f"cache_dir={os.environ.get('LADM_CACHE', tempfile.mkdtemp())}"])
    check_model_path(cfg.model)  # a GGUF model is converted here once; not part of a job's usual start-up
    print(f"ladm start-up phases, model={args.model} ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs)")
    print(f"  import ladm.train: {imported:.2f} s (once per process)")
    for job in ("first job", "second job"):
        phases: dict[str, float] = {}
        timed(phases, "validate config", lambda: validate(cfg))
        timed(phases, "metric pre-flight", lambda: Scorer.preflight(cfg.eval))
        python = comet_python(cfg.eval)
        if python:  # what the pre-flight adds when the COMET checkpoint is there
            timed(phases, "COMET environment check", lambda: worker_problem(python))
        tokenizer = timed(phases, "tokenizer", lambda: load_tokenizer(cfg.model))
        model = timed(phases, "model load", lambda: load_model(cfg.model, tokenizer))
        timed(phases, "weights fingerprint", lambda: base_identity(cfg.model, model))
        print(f"  {job}: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in phases.items())
              + f"; total {sum(phases.values()):.2f} s")


if __name__ == "__main__":
    main()
