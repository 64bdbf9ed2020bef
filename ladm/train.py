"""`ladm-train`: compose → build → fit → evaluate → results.json.

    ladm-train model=tiny-qwen2.5 pair=zh-km method=lora
    ladm-train -m experiment=demo
"""

from __future__ import annotations

import json
import logging
import platform
import time
import traceback
from importlib.metadata import version
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from transformers import set_seed

from ladm import LadmError
from ladm.checkpoint import RunFolderLock, config_differences, load_latest, set_aside
from ladm.cli import cli_main
from ladm.data import LengthBudgets, SequenceFormat, hold_out, pair_config, read_split, share, truncate
from ladm.distributed import DistEnv
from ladm.files import write_json_atomic, write_lines_atomic
from ladm.generation import eval_batch_size, translate
from ladm.methods import build_method
from ladm.metrics import Scorer, target_script_ratio
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
    held_out = {name: hold_out(read_split(c.data.train), cfg.data.validation_size, seed=0) for name, c in pair_cfgs.items()}
    train_corpora = {name: train.head(cfg.data.max_train_samples) for name, (train, _) in held_out.items()}
    corpora = {"validation": {name: valid for name, (_, valid) in held_out.items()},
               "test": {name: read_split(c.data.test).head(cfg.eval.max_samples) for name, c in pair_cfgs.items()}}
    scorer = Scorer.preflight(cfg.eval)
    resume = resume_state(cfg, out_dir, dist, method.trains)

    tokenizer = load_tokenizer(cfg.model)
    fmt = SequenceFormat.from_cfg(tokenizer, cfg.model)
    train_examples = {name: fmt.encode(train_corpora[name], c.pair) for name, c in pair_cfgs.items()}
    prompts = {split: {name: fmt.prompt_ids(by_pair[name].src, c.pair) for name, c in pair_cfgs.items()}
               for split, by_pair in corpora.items()}
    test_prompts = prompts["test"]
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
    validation: dict[str, dict] = {}

    def generate(split: str) -> dict[str, list[str]]:
        """Per pair, with that pair's adapters, every rank translates its share; rank 0 gets the whole."""
        outputs = {}
        for name in pair_cfgs:
            method.select_adapters(model, name)
            split_prompts = prompts[split][name]
            shard = translate(model, tokenizer, split_prompts[dist.rank::dist.world_size], stop_ids, batch_size,
                              budgets.max_new_tokens[name], cfg.eval.num_beams, desc=f"generate {name} ({split})")
            hypotheses, hit = [""] * len(split_prompts), [False] * len(split_prompts)
            for rank, part in enumerate(dist.gather(shard)):
                hypotheses[rank::dist.world_size], hit[rank::dist.world_size] = part.hypotheses, part.hit_budget
            outputs[name] = hypotheses
            if dist.is_main and split == "test":
                hit_budget[name] = share(hit)
                if hit_budget[name]["count"]:
                    log.warning("%s: %.1f%% of hypotheses ran to eval.max_new_tokens=%d without ending", name,
                                100 * hit_budget[name]["share"], budgets.max_new_tokens[name])
                for ext, lines in (("src", corpora[split][name].src), ("hyp", hypotheses), ("ref", corpora[split][name].tgt)):
                    write_lines_atomic(out_dir / "predictions" / f"{name}.{ext}", lines)  # before any scoring
        return outputs

    def score(split: str, outputs: dict[str, list[str]], step: int) -> dict[str, tuple[dict, dict]]:
        """Corpus metrics and signatures per pair (COMET on the test set only, every pair in one call)."""
        scored = {}
        for name, hypotheses in outputs.items():
            corpus = corpora[split][name]
            metrics, signatures = scorer.score(corpus.src, hypotheses, corpus.tgt, comet=False)
            scored[name] = (metrics | {"target_script_ratio": target_script_ratio(hypotheses, pair_cfgs[name].pair.tgt.code)},
                            signatures)
        if split == "test" and "comet" in cfg.eval.metrics:
            comet = scorer.comet_by_pair({name: (corpora[split][name].src, hyps, corpora[split][name].tgt)
                                          for name, hyps in outputs.items()})
            for name, value in comet.items():
                scored[name][0]["comet"] = value
        for name, (metrics, _) in scored.items():
            tracker.log({f"{split}/{name}/{k}": v for k, v in metrics.items() if v is not None}, step=step)
        return scored

    def evaluate_validation(step: int) -> None:
        """`train.eval_every`: the held-out validation slice, never the test set."""
        if all(len(c) for c in corpora["validation"].values()):
            outputs = generate("validation")
            if dist.is_main:
                validation.update({name: metrics for name, (metrics, _) in score("validation", outputs, step).items()})
        else:
            log.warning("no validation sentences (data.validation_size=0 or a tiny corpus): skipping evaluation at step %d", step)

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
                          resume=resume, on_eval=evaluate_validation, identity=training_identity(cfg))
        train_stats |= {"n_train": sum(map(len, examples.values())), "max_length": budgets.max_length}
        if dist.is_main and cfg.train.save_adapter:
            method.save(model, out_dir / "adapter")  # as soon as it exists: a later failure keeps it

    eval_started = time.perf_counter()
    outputs = generate("test")
    if not dist.is_main:
        dist.close()
        return {}
    results = {
        "status": "complete",
        "name": cfg.name,
        "model": cfg.model.name,
        "method": cfg.method.name,
        "pairs": list(pair_cfgs),
        "test_set": cfg.data.test.name,
        "n_test": {name: len(corpus) for name, corpus in corpora["test"].items()},
        "n_validation": {name: len(corpus) for name, corpus in corpora["validation"].items()},
        "method_details": method.describe(),
        "world_size": dist.world_size,
        "train": {k: v for k, v in train_stats.items() if k != "losses"},
        "max_new_tokens": budgets.max_new_tokens,
        "truncated_train": truncated_train,
        "hit_generation_budget": hit_budget,
        "validation": validation,
        "versions": {name: version(name) for name in VERSIONED} | {"python": platform.python_version()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    try:
        scored = score("test", outputs, cfg.train.max_steps)
    except Exception as err:
        write_json_atomic(out_dir / "results.json", results | {
            "status": "failed", "error": f"scoring failed: {type(err).__name__}: {err}",
            "traceback": traceback.format_exc()})  # the adapter and the predictions are on disk
        raise
    metrics = {name: m for name, (m, _) in scored.items()}
    results |= {"metrics": metrics, "signatures": next(iter(scored.values()))[1], "skipped": scorer.skipped,
                "timings": {"total_s": time.perf_counter() - started, "train_s": train_stats.get("seconds", 0.0),
                            "eval_s": time.perf_counter() - eval_started}}
    write_json_atomic(out_dir / "results.json", results)  # before anything that talks to W&B
    for name, hypotheses in outputs.items():
        rows = [[s, r, h] for s, r, h in zip(corpora["test"][name].src, corpora["test"][name].tgt, hypotheses,
                                             strict=True)][:cfg.eval.n_samples]
        tracker.table(f"samples/{name}", ["source", "reference", "hypothesis"], rows)
    tracker.summary({f"{name}/{k}": v for name, m in metrics.items() for k, v in m.items()})
    tracker.finish()
    dist.close()
    for name, m in metrics.items():
        log.info("%s %s %s: %s", cfg.model.name, cfg.method.name, name,
                 ", ".join(f"{k}={v:.2f}" for k, v in m.items() if v is not None))
    return results | {"losses": train_stats.get("losses", [])}


main = cli_main("ladm-train", "config", run)


if __name__ == "__main__":
    main()
