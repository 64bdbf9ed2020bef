"""`ladm-train`: compose → build → fit → evaluate → results.json.

    ladm-train model=tiny-qwen2.5 pair=zh-km method=lora
    ladm-train -m experiment=demo
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import set_seed

from ladm import LadmError
from ladm.checkpoint import config_differences, drop_checkpoint, load_latest, set_aside
from ladm.cli import cli_main
from ladm.data import LengthBudgets, SequenceFormat, pair_config, share, training_data, truncate
from ladm.distributed import DistEnv
from ladm.evaluation import EvalSet, Evaluator, read_test_sets, record_test_results, run_once, score, versions
from ladm.files import write_folder_atomic
from ladm.generation import eval_batch_size
from ladm.methods import build_method
from ladm.methods.base import translate_test_sets
from ladm.metrics import Scorer
from ladm.models import base_identity, check_model_path, context_length, load_model, load_tokenizer
from ladm.schema import HASH_NEUTRAL, config_hash, training_identity, validate
from ladm.tracking import Tracker
from ladm.trainer import fit

log = logging.getLogger("ladm.train")


def run(cfg: DictConfig, out_dir: Path) -> dict:
    """Train and evaluate one configuration; returns what is written to `out_dir/results.json`."""
    started = time.perf_counter()
    dist = DistEnv.from_environment()
    out_dir = Path(dist.broadcast(str(out_dir)))  # every rank uses rank 0's run folder
    validate(cfg)  # the whole config, before anything is read
    return run_once(cfg, out_dir, dist, lambda fresh: train_and_evaluate(cfg, out_dir, dist, started, fresh))


def resume_state(cfg: DictConfig, out_dir: Path, dist: DistEnv, trains: bool, fresh: bool) -> dict | None:
    """The newest checkpoint's state when `train.resume=auto` (refused if it was trained with another config);
    when `fresh` (force=true, or complete results of another config) or `train.resume=never` old checkpoints are
    moved aside and training starts at step 0."""
    if not trains:
        return None
    if fresh or cfg.train.resume == "never":
        if dist.is_main:
            set_aside(out_dir)
        dist.barrier()
        return None
    found = load_latest(out_dir)
    if found is None:
        return None
    path, state = found
    differences = config_differences(state.get("identity") or {}, training_identity(cfg), HASH_NEUTRAL)
    if differences:
        raise LadmError(f"{path} was trained with another config ({'; '.join(differences[:5])}"
                        f"{' ...' if len(differences) > 5 else ''}): run with the same settings to resume, or "
                        "train.resume=never to start over (the old checkpoints are kept aside)")
    log.info("resuming from %s", path)
    return state


def save_adapter(method, model: torch.nn.Module, folder: Path) -> None:
    """`method.save`, atomically and group-readable (`write_folder_atomic`): a failed write (disk full) leaves no
    half adapter and is one clear error."""
    write_folder_atomic(folder, lambda tmp: method.save(model, tmp),
                        "free disk space and run the same command again (training resumes from its last checkpoint, if any)")


def check_selection(cfg: DictConfig) -> None:
    """`train.select_on` and `train.early_stop_patience` need validation scores to choose by."""
    select_on, patience = cfg.train.select_on, cfg.train.early_stop_patience
    if patience and not select_on:
        raise LadmError(f"train.early_stop_patience={patience} needs train.select_on=validation/chrf++ (or spbleu)")
    if not select_on:
        return
    if not cfg.train.eval_every:
        raise LadmError(f"train.select_on={select_on} needs train.eval_every=N (N > 0): how often to score the "
                        "validation slice")
    if not cfg.data.validation_size:
        raise LadmError(f"train.select_on={select_on} needs a validation slice: data.validation_size > 0")
    if select_on.split("/", 1)[1] not in cfg.eval.metrics:
        raise LadmError(f"train.select_on={select_on} needs {select_on.split('/', 1)[1]} in eval.metrics")


def train_and_evaluate(cfg: DictConfig, out_dir: Path, dist: DistEnv, started: float, fresh: bool) -> dict:
    """The body of `run`, inside the run folder's lock."""
    # Cheap checks first: model path, method knobs, data files, metric models, the checkpoint to resume.
    check_model_path(cfg.model)
    check_selection(cfg)
    method = build_method(cfg, dist)
    if not method.trains and (cfg.train.select_on or cfg.train.early_stop_patience):
        log.warning("train.select_on and train.early_stop_patience do not apply to %s, which does not train: its "
                    "results have no selection (a sweep may set them for every method)", cfg.method.name)
    pair_cfgs = {name: pair_config(cfg, name) for name in method.pairs}
    train_corpora, validation_corpora = training_data(cfg, pair_cfgs)
    validation = EvalSet("validation", validation_corpora, is_test=False)
    test_sets = read_test_sets(pair_cfgs, cfg.eval.max_samples)
    scorer = Scorer.preflight(cfg.eval)
    resume = resume_state(cfg, out_dir, dist, method.trains, fresh)

    tokenizer = load_tokenizer(cfg.model)
    fmt = SequenceFormat.from_cfg(tokenizer, cfg)
    train_examples = {name: fmt.encode(train_corpora[name], c.pair) for name, c in pair_cfgs.items()}
    for eval_set in (validation, *test_sets):
        eval_set.prompts = {name: fmt.prompt_ids(corpus.src, pair_cfgs[name].pair) for name, corpus in eval_set.corpora.items()}
    all_test_prompts = {name: [p for s in test_sets for p in s.prompts[name]] for name in pair_cfgs}
    budgets = LengthBudgets.choose(cfg.train.max_length, cfg.train.length_coverage, cfg.eval.max_new_tokens,
                                   cfg.eval.length_margin, context_length(cfg.model), train_examples, all_test_prompts)
    log.info("length budgets: train.max_length=%d, eval.max_new_tokens=%s", budgets.max_length, budgets.max_new_tokens)

    set_seed(cfg.train.seed)  # adapter initialisation is seeded too
    model = load_model(cfg.model, tokenizer).to(dist.device)
    base = base_identity(cfg.model, model)
    stop_ids = fmt.stop_ids(model.generation_config)
    model = method.prepare_model(model, tokenizer)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # frozen embeddings, trainable adapters: keep the graph alive
    longest = max(len(p) + budgets.max_new_tokens[name] for name, prompts in all_test_prompts.items() for p in prompts)
    batch_size = eval_batch_size(cfg.eval.batch_size, model, longest, dist.device,
                                 Path(cfg.cache_dir) / "eval_batch_size.json", cfg.model.name)
    tracker = Tracker(cfg, out_dir, dist.is_main, resume_id=resume["wandb_id"] if resume else None)
    tracker.config({"method_details": method.describe()})
    evaluator = Evaluator(model, tokenizer, lambda pair: method.select_adapters(model, pair), stop_ids, batch_size,
                          budgets.max_new_tokens, cfg.eval.num_beams, dist, out_dir)
    targets = {name: c.pair.tgt.code for name, c in pair_cfgs.items()}
    validation_scores: dict[str, dict] = {}

    def evaluate_validation(step: int) -> dict | None:
        """`train.eval_every`: the held-out validation slice, never a test set; its scores {pair: {metric: value}}
        on rank 0 (None elsewhere)."""
        if all(len(c) for c in validation.corpora.values()):
            outputs = evaluator.translate(validation)
            if dist.is_main:
                scored = score(scorer, validation, outputs, targets, tracker, step)
                validation_scores.update({name: metrics for name, (metrics, _) in scored.items()})
                hit = evaluator.hit_budget.get(validation.name, {})
                log.info("validation at step %d: %s", step, "; ".join(
                    f"{name} " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if v is not None)
                    + (f", {100 * hit[name]['share']:.0f}% at the generation budget" if name in hit else "")
                    for name, (metrics, _) in scored.items()))
                return {name: metrics for name, (metrics, _) in scored.items()}
        else:
            log.warning("no validation sentences (data.validation_size=0 or a tiny corpus): skipping evaluation at step %d", step)
        return None

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
        log.info("this run: %d optimizer steps of %d sentences, then %d test sentences to generate",
                 cfg.train.max_steps * len(pair_cfgs), cfg.train.batch_size * cfg.train.grad_accum * dist.world_size,
                 sum(len(c) for s in test_sets for c in s.corpora.values()))
        train_stats = fit(model, method, examples, tokenizer.pad_token_id, cfg.train, dist, tracker, out_dir,
                          resume=resume, on_eval=evaluate_validation, identity=training_identity(cfg))
        train_stats |= {"n_train": sum(map(len, examples.values())), "max_length": budgets.max_length}
        if dist.is_main and train_stats["divergence"]:
            log.warning("%s %s %s: training diverged: %s; lower train.lr (results.json: train.divergence)",
                        cfg.model.name, cfg.method.name, ",".join(pair_cfgs), train_stats["divergence"])
        if dist.is_main and cfg.train.save_adapter:
            save_adapter(method, model, out_dir / "adapter")  # as soon as it exists: a later failure keeps it

    final_step = cfg.train.max_steps * len(pair_cfgs)  # the trainer's last optimizer step
    # what generates the test hypotheses: saved ones of any other model are never scored as this one's
    evaluator.generated_by = {"base_model": base, "method": cfg.method.name, "state": method.state_digest(model)}
    if train_stats.get("selection"):  # the validation scores of the weights that are tested
        validation_scores = train_stats["selection"].pop("validation") or {}
    elif cfg.objective is not None:
        evaluate_validation(final_step)  # the sweeper's objective, on the final weights
    eval_started = time.perf_counter()
    outputs = translate_test_sets(evaluator, method, model, test_sets, cfg.eval.merge_adapters)
    if not dist.is_main:
        dist.close()
        return {}
    results = {
        "status": "complete",
        "name": cfg.name,
        "config_hash": config_hash(cfg),
        "model": cfg.model.name,
        "method": cfg.method.name,
        "evaluated": {"kind": "trained" if method.trains else "base_model"},
        "pairs": list(pair_cfgs),
        "n_validation": {name: len(corpus) for name, corpus in validation.corpora.items()},
        "method_details": method.describe(),
        "world_size": dist.world_size,
        "train": {k: v for k, v in train_stats.items() if k != "losses"},
        "max_new_tokens": budgets.max_new_tokens,
        "truncated_train": truncated_train,
        "validation": validation_scores,
        "objective": cfg.objective,
        "versions": versions(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    results = record_test_results(results, out_dir, scorer, evaluator, test_sets, outputs, targets, tracker,
                                  final_step, cfg.eval.n_samples, started, eval_started)
    if method.trains and not cfg.train.checkpoint_every:  # the trainer's end-of-training checkpoint has done its job
        drop_checkpoint(out_dir, train_stats["steps"])
    tracker.finish()
    dist.close()
    return results | {"losses": train_stats.get("losses", [])}


main = cli_main("ladm-train", "config", run)


if __name__ == "__main__":
    main()
