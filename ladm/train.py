"""`ladm-train`: compose → build → fit → evaluate → results.json.

    ladm-train model=tiny-qwen2.5 pair=zh-km method=lora
    ladm-train -m experiment=demo
"""

from __future__ import annotations

import json
import logging
import platform
import time
from importlib.metadata import version
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from transformers import set_seed

from ladm import LadmError
from ladm.checkpoint import RunFolderLock, config_differences, load_latest, set_aside
from ladm.cli import cli_main
from ladm.data import LengthBudgets, SequenceFormat, pair_config, read_split, share, truncate
from ladm.distributed import DistEnv
from ladm.files import write_json_atomic, write_lines_atomic
from ladm.generation import eval_batch_size, translate
from ladm.methods import build_method
from ladm.metrics import Scorer
from ladm.models import check_model_path, context_length, load_model, load_tokenizer
from ladm.schema import training_identity, validate
from ladm.tracking import Tracker
from ladm.trainer import fit

log = logging.getLogger("ladm.train")
VERSIONED = ("torch", "transformers", "peft", "sacrebleu", "unbabel-comet", "hydra-core", "wandb", "ladm")


def completed_results(out_dir: Path) -> dict | None:
    """The results.json of a finished run in `out_dir`, if there is one."""
    path = out_dir / "results.json"
    if path.is_file():
        results = json.loads(path.read_text(encoding="utf-8"))
        if results.get("status") == "complete":
            return results
    return None


def run(cfg: DictConfig, out_dir: Path) -> dict:
    """Train and evaluate one configuration; returns what is written to `out_dir/results.json`."""
    started = time.perf_counter()
    dist = DistEnv.from_environment()
    out_dir = Path(dist.broadcast(str(out_dir)))  # every rank uses rank 0's run folder
    if not cfg.force and (done := dist.broadcast(completed_results(out_dir) if dist.is_main else None)):
        log.info("skipping %s: results.json is complete (force=true to run it again)", out_dir)
        dist.close()
        return done
    validate(cfg)  # the whole config, before anything is read
    lock = RunFolderLock(out_dir) if dist.is_main else None
    try:
        return train_and_evaluate(cfg, out_dir, dist, started)
    finally:
        if lock is not None:
            lock.release()


def resume_state(cfg: DictConfig, out_dir: Path, dist: DistEnv, trains: bool) -> dict | None:
    """The newest checkpoint's state when `train.resume=auto` (refused if it was trained with another config);
    with `force=true` or `train.resume=never` old checkpoints are moved aside and training starts at step 0."""
    if not trains:
        return None
    if cfg.force or cfg.train.resume == "never":
        if dist.is_main:
            set_aside(out_dir)
        dist.barrier()
        return None
    found = load_latest(out_dir)
    if found is None:
        return None
    path, state = found
    differences = config_differences(state.get("identity") or {}, training_identity(cfg))
    if differences:
        raise LadmError(f"{path} was trained with another config ({'; '.join(differences[:5])}"
                        f"{' ...' if len(differences) > 5 else ''}): run with the same settings to resume, or "
                        "train.resume=never to start over (the old checkpoints are kept aside)")
    log.info("resuming from %s", path)
    return state


def train_and_evaluate(cfg: DictConfig, out_dir: Path, dist: DistEnv, started: float) -> dict:
    """The body of `run`, inside the run folder's lock."""
    # Cheap checks first: model path, method knobs, data files, metric models, the checkpoint to resume.
    check_model_path(cfg.model)
    method = build_method(cfg, dist)
    pair_cfgs = {name: pair_config(cfg, name) for name in method.pairs}
    train_corpora = {name: read_split(c.data.train).head(cfg.data.max_train_samples) for name, c in pair_cfgs.items()}
    test_corpora = {name: read_split(c.data.test).head(cfg.eval.max_samples) for name, c in pair_cfgs.items()}
    scorer = Scorer.preflight(cfg.eval)
    resume = resume_state(cfg, out_dir, dist, method.trains)

    tokenizer = load_tokenizer(cfg.model)
    fmt = SequenceFormat.from_cfg(tokenizer, cfg.model)
    train_examples = {name: fmt.encode(train_corpora[name], c.pair) for name, c in pair_cfgs.items()}
    test_prompts = {name: fmt.prompt_ids(test_corpora[name].src, c.pair) for name, c in pair_cfgs.items()}
    budgets = LengthBudgets.choose(cfg.train.max_length, cfg.train.length_coverage, cfg.eval.max_new_tokens,
                                   cfg.eval.length_margin, context_length(cfg.model), train_examples, test_prompts)
    log.info("length budgets: train.max_length=%d, eval.max_new_tokens=%s", budgets.max_length, budgets.max_new_tokens)

    set_seed(cfg.train.seed)  # adapter initialisation is seeded too
    model = load_model(cfg.model, tokenizer).to(dist.device)
    stop_ids = fmt.stop_ids(model.generation_config)
    model = method.prepare_model(model, tokenizer)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # frozen embeddings, trainable adapters: keep the graph alive
    longest = max(len(p) + budgets.max_new_tokens[name] for name, prompts in test_prompts.items() for p in prompts)
    batch_size = eval_batch_size(cfg.eval.batch_size, model, longest, dist.device,
                                 Path(cfg.cache_dir) / "eval_batch_size.json", cfg.model.name)
    tracker = Tracker(cfg, out_dir, dist.is_main, resume_id=resume["wandb_id"] if resume else None)
    tracker.config({"method_details": method.describe()})

    hit_budget: dict[str, dict] = {}

    def evaluate(step: int | None = None) -> dict[str, tuple[list[str], dict, dict]]:
        """Per pair, with that pair's adapters: every rank translates its share, rank 0 scores the whole
        (COMET at the end only, every pair in one call)."""
        outcome = {}
        for name in pair_cfgs:
            method.select_adapters(model, name)
            corpus, prompts = test_corpora[name], test_prompts[name]
            shard = translate(model, tokenizer, prompts[dist.rank::dist.world_size], stop_ids, batch_size,
                              budgets.max_new_tokens[name], cfg.eval.num_beams, desc=f"generate {name}")
            hypotheses, hit = [""] * len(prompts), [False] * len(prompts)
            for rank, part in enumerate(dist.gather(shard)):
                hypotheses[rank::dist.world_size], hit[rank::dist.world_size] = part.hypotheses, part.hit_budget
            if dist.is_main:
                hit_budget[name] = share(hit)
                if hit_budget[name]["count"]:
                    log.warning("%s: %.1f%% of hypotheses ran to eval.max_new_tokens=%d without ending", name,
                                100 * hit_budget[name]["share"], budgets.max_new_tokens[name])
                outcome[name] = (hypotheses, *scorer.score(corpus.src, hypotheses, corpus.tgt, comet=False))
        if dist.is_main and step is None and "comet" in cfg.eval.metrics:
            comet = scorer.comet_by_pair({name: (test_corpora[name].src, hypotheses, test_corpora[name].tgt)
                                          for name, (hypotheses, _, _) in outcome.items()})
            for name, score in comet.items():
                outcome[name][1]["comet"] = score
        for name, (_, metrics, _) in outcome.items():
            tracker.log({f"eval/{name}/{k}": v for k, v in metrics.items() if v is not None}, step=step or cfg.train.max_steps)
        return outcome

    train_stats: dict = {}
    truncated_train: dict[str, dict] = {}
    if method.trains:
        examples = {}
        for name, pair_examples in train_examples.items():
            examples[name], cut = truncate(pair_examples, budgets.max_length)
            truncated_train[name] = share(cut)
            if truncated_train[name]["count"]:
                log.warning("%s: %.1f%% of training examples were truncated to train.max_length=%d", name,
                            100 * truncated_train[name]["share"], budgets.max_length)
        train_stats = fit(model, method, examples, tokenizer.pad_token_id, cfg.train, dist, tracker, out_dir,
                          resume=resume, on_eval=evaluate, identity=training_identity(cfg))
        train_stats |= {"n_train": sum(map(len, examples.values())), "max_length": budgets.max_length}

    eval_started = time.perf_counter()
    outcome = evaluate()
    eval_seconds = time.perf_counter() - eval_started
    if not dist.is_main:
        dist.close()
        return {}

    for name, (hypotheses, _, _) in outcome.items():
        write_lines_atomic(out_dir / "predictions" / f"{name}.hyp", hypotheses)
        write_lines_atomic(out_dir / "predictions" / f"{name}.ref", test_corpora[name].tgt)
    if method.trains and cfg.train.save_adapter:
        method.save(model, out_dir / "adapter")
    metrics = {name: m for name, (_, m, _) in outcome.items()}
    results = {
        "status": "complete",
        "name": cfg.name,
        "model": cfg.model.name,
        "method": cfg.method.name,
        "pairs": list(pair_cfgs),
        "test_set": cfg.data.test.name,
        "n_test": {name: len(corpus) for name, corpus in test_corpora.items()},
        "metrics": metrics,
        "signatures": next(iter(outcome.values()))[2],
        "skipped": scorer.skipped,
        "method_details": method.describe(),
        "world_size": dist.world_size,
        "train": {k: v for k, v in train_stats.items() if k != "losses"},
        "max_new_tokens": budgets.max_new_tokens,
        "truncated_train": truncated_train,
        "hit_generation_budget": hit_budget,
        "timings": {"total_s": time.perf_counter() - started, "train_s": train_stats.get("seconds", 0.0),
                    "eval_s": eval_seconds},
        "versions": {name: version(name) for name in VERSIONED} | {"python": platform.python_version()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    tracker.summary({f"{name}/{k}": v for name, m in metrics.items() for k, v in m.items()})
    tracker.finish()
    write_json_atomic(out_dir / "results.json", results)
    dist.close()
    for name, m in metrics.items():
        log.info("%s %s %s: %s", cfg.model.name, cfg.method.name, name,
                 ", ".join(f"{k}={v:.2f}" for k, v in m.items() if v is not None))
    return results | {"losses": train_stats.get("losses", [])}


main = cli_main("ladm-train", "config", run)


if __name__ == "__main__":
    main()
