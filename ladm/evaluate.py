"""`ladm-eval`: a saved model (a ladm run folder, a plain PEFT adapter, or the base model) on one or several
test sets → predictions/ and results.json in the layout of a training run, so `ladm-report` files it.

    ladm-eval evaluate.run=multirun/ladm_vs_lora/method=ladm,pair=zh-lo eval.test_sets=[flores200,ntrex128,tico19]
    ladm-eval model=qwen2.5-7b pair=zh-km evaluate.adapter=/path/to/adapter eval.num_beams=4
"""

from __future__ import annotations

import glob
import logging
import re
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ladm import CONFIG_DIR, LadmError
from ladm.cli import cli_main
from ladm.data import LengthBudgets, SequenceFormat, pair_config, training_data
from ladm.distributed import DistEnv
from ladm.evaluation import Evaluator, read_test_sets, record_test_results, run_once, versions
from ladm.files import folder_digest, read_json
from ladm.generation import eval_batch_size
from ladm.methods import build_method
from ladm.methods.base import adapter_folders, check_peft_folder, load_peft_adapters, translate_test_sets
from ladm.metrics import Scorer
from ladm.models import base_identity, check_model_path, context_length, load_model, load_tokenizer
from ladm.schema import config_hash, validate, with_later_keys
from ladm.tracking import Tracker

log = logging.getLogger("ladm.eval")
KEPT = ("name", "force", "cache_dir", "logger", "evaluate")  # from this command, not from the run


def changed_eval_settings(eval_cfg: DictConfig) -> dict:
    """The `eval.*` settings of this command that differ from conf/eval/default.yaml (they override the run's)."""
    default = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "eval" / "default.yaml"))
    given = OmegaConf.to_container(eval_cfg, resolve=True)

    def changed(ours: dict, theirs: dict) -> dict:
        return {k: (changed(v, theirs[k]) if isinstance(v, dict) and isinstance(theirs.get(k), dict) else v)
                for k, v in ours.items() if v != theirs.get(k)}

    return changed(given, default)


OWN_RESOLVERS = ("repo_root", "job_dirname", "run_stamp")  # ladm's, reading nothing of the machine
RESOLVER = re.compile(r"\$\{\s*([A-Za-z_][\w.]*)\s*:")


def refuse_foreign_resolvers(config: DictConfig, source: Path) -> None:
    """A run folder's config is evaluated without reading this machine: a value (outside the keys this command
    replaces) that calls a resolver other than ladm's own, e.g. `${oc.env:SECRET}`, is refused in one line."""
    def walk(node: object, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if f"{key}{k}" not in KEPT:
                    walk(v, f"{key}{k}.")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{key}{i}.")
        elif isinstance(node, str):
            for name in RESOLVER.findall(node):
                if name not in OWN_RESOLVERS:
                    raise LadmError(f"{key.rstrip('.')} in {source} is {node!r}: ladm-eval does not resolve ${{{name}:...}} "
                                    "in a run folder's config (it would read this machine's environment); replace it by "
                                    "its value in that file")

    walk(OmegaConf.to_container(config, resolve=False), "")


def run_config(run_dir: Path) -> tuple[DictConfig, dict]:
    """The config a ladm run folder was trained with (its .hydra/config.yaml, else its results.json) and that
    results.json (empty if there is none)."""
    if not run_dir.is_dir():
        raise LadmError(f"evaluate.run={run_dir} is not a folder: give a ladm-train run folder")
    results_path = run_dir / "results.json"
    results = read_json(results_path, "results file", "give a ladm-train run folder") if results_path.is_file() else {}
    if not isinstance(results, dict):
        raise LadmError(f"{results_path} holds a JSON {type(results).__name__}, not a run's results: restore it or "
                        "re-run the training")
    saved = run_dir / ".hydra" / "config.yaml"
    if saved.is_file():
        try:
            config = OmegaConf.load(saved)
        except Exception as err:  # noqa: BLE001 - YAML and OmegaConf errors alike: one line
            raise LadmError(f"{saved} is not a readable config ({type(err).__name__}): restore it from the run's "
                            "results.json (its `config`) or re-run the training") from err
        if not isinstance(config, DictConfig):
            raise LadmError(f"{saved} does not hold a config mapping: restore it or re-run the training")
        refuse_foreign_resolvers(config, saved)
        return config, results
    if isinstance(results.get("config"), dict):
        config = OmegaConf.create(results["config"])
        refuse_foreign_resolvers(config, results_path)
        return config, results
    raise LadmError(f"{run_dir} is not a ladm run folder (no .hydra/config.yaml and no results.json with a config)")


def what_to_evaluate(cfg: DictConfig) -> tuple[DictConfig, dict]:
    """The config to evaluate under and what is evaluated. A run is evaluated under its own config, with the
    `eval.*` settings this command changes (decoding, test sets, metrics) and its `name`, `logger`, `cache_dir`."""
    if cfg.evaluate.run and cfg.evaluate.adapter:
        raise LadmError("give evaluate.run (a ladm run folder) or evaluate.adapter (a PEFT folder), not both")
    if cfg.evaluate.run:
        run_dir = Path(cfg.evaluate.run).expanduser().resolve()
        trained_cfg, results = run_config(run_dir)
        merged = OmegaConf.merge(with_later_keys(trained_cfg), {key: cfg[key] for key in KEPT},
                                 {"eval": changed_eval_settings(cfg.eval)})
        evaluated = {"kind": "run", "path": str(run_dir), "run_status": results.get("status", "unknown"),
                     "method_details": results.get("method_details", {})}
        if build_method(merged).trains:
            if not (run_dir / "adapter").is_dir():
                raise LadmError(f"{run_dir} has no adapter/: that run stopped before training finished; run its "
                                "ladm-train command again to resume it, then evaluate")
            if adapter_folders(run_dir / "adapter"):  # PEFT adapters (LANDeRMT saves its own tensors)
                check_peft_folder(run_dir / "adapter", merged.model.path, bool(cfg.evaluate.get("allow_other_base")))
            evaluated["files_digest"] = folder_digest(run_dir / "adapter")
        return merged, evaluated
    if cfg.evaluate.adapter:
        folder = Path(cfg.evaluate.adapter).expanduser().resolve()
        if not folder.is_dir():
            raise LadmError(f"evaluate.adapter={folder} is not a folder: give a PEFT adapter folder")
        check_peft_folder(folder, cfg.model.path, bool(cfg.evaluate.get("allow_other_base")))
        return cfg, {"kind": "peft_adapter", "path": str(folder), "files_digest": folder_digest(folder)}
    return cfg, {"kind": "base_model"}


def run(cfg: DictConfig, out_dir: Path) -> dict:
    """Evaluate one saved model; returns what is written to `out_dir/results.json`."""
    started = time.perf_counter()
    dist = DistEnv.from_environment()
    out_dir = Path(dist.broadcast(str(out_dir)))
    cfg, evaluated = what_to_evaluate(cfg)
    validate(cfg, stored=evaluated["kind"] == "run")
    return run_once(cfg, out_dir, dist, lambda _: evaluate(cfg, evaluated, out_dir, dist, started),
                    inputs=evaluated.get("files_digest"))  # a replaced adapter is evaluated again


def evaluate(cfg: DictConfig, evaluated: dict, out_dir: Path, dist: DistEnv, started: float) -> dict:
    """The body of `run`: cheap checks first, then the model, then generation and scoring."""
    check_model_path(cfg.model)
    method = build_method(cfg, dist)
    pair_cfgs = {name: pair_config(cfg, name) for name in method.pairs}
    train_corpora, _ = training_data(cfg, pair_cfgs)  # for eval.max_new_tokens=auto, as in training
    test_sets = read_test_sets(pair_cfgs, cfg.eval.max_samples)
    scorer = Scorer.preflight(cfg.eval)

    tokenizer = load_tokenizer(cfg.model)
    fmt = SequenceFormat.from_cfg(tokenizer, cfg)
    for eval_set in test_sets:
        eval_set.prompts = {name: fmt.prompt_ids(corpus.src, pair_cfgs[name].pair) for name, corpus in eval_set.corpora.items()}
    all_prompts = {name: [p for s in test_sets for p in s.prompts[name]] for name in pair_cfgs}
    train_examples = {name: fmt.encode(train_corpora[name], c.pair) for name, c in pair_cfgs.items()}
    budgets = LengthBudgets.choose(cfg.train.max_length, cfg.train.length_coverage, cfg.eval.max_new_tokens,
                                   cfg.eval.length_margin, context_length(cfg.model), train_examples, all_prompts)

    model = load_model(cfg.model, tokenizer).to(dist.device)
    base = base_identity(cfg.model, model)
    stop_ids = fmt.stop_ids(model.generation_config)
    if evaluated["kind"] == "run":
        model = method.load(model, Path(evaluated["path"]) / "adapter")
    elif evaluated["kind"] == "peft_adapter":
        model = load_peft_adapters(model, Path(evaluated["path"]))
    longest = max(len(p) + budgets.max_new_tokens[name] for name, prompts in all_prompts.items() for p in prompts)
    batch_size = eval_batch_size(cfg.eval.batch_size, model, longest, dist.device,
                                 Path(cfg.cache_dir) / "eval_batch_size.json", cfg.model.name)
    reuse_from = (Path(evaluated["path"]),) if evaluated["kind"] == "run" else ()
    evaluator = Evaluator(model, tokenizer, lambda pair: method.select_adapters(model, pair), stop_ids, batch_size,
                          budgets.max_new_tokens, cfg.eval.num_beams, dist, out_dir, reuse_from)
    method_name = {"run": cfg.method.name, "peft_adapter": "peft_adapter", "base_model": "zero_shot"}[evaluated["kind"]]
    evaluator.generated_by = {"base_model": base, "method": method_name, "state": method.state_digest(model)}
    tracker = Tracker(cfg, out_dir, dist.is_main)

    eval_started = time.perf_counter()
    outputs = translate_test_sets(evaluator, method, model, test_sets, cfg.eval.merge_adapters)
    if not dist.is_main:
        dist.close()
        return {}
    results = {
        "status": "complete",
        "name": cfg.name,
        "config_hash": config_hash(cfg, evaluated.get("files_digest")),
        "model": cfg.model.name,
        "method": method_name,
        "evaluated": {k: v for k, v in evaluated.items() if k != "method_details"},
        "pairs": list(pair_cfgs),
        "method_details": evaluated.get("method_details", {}),
        "world_size": dist.world_size,
        "max_new_tokens": budgets.max_new_tokens,
        "versions": versions(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    targets = {name: c.pair.tgt.code for name, c in pair_cfgs.items()}
    results = record_test_results(results, out_dir, scorer, evaluator, test_sets, outputs, targets, tracker,
                                  0, cfg.eval.n_samples, started, eval_started)
    tracker.finish()
    dist.close()
    return results


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "results.json").is_file() or (path / ".hydra" / "config.yaml").is_file())


def _quoted(path: Path) -> str:
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def expand_run_folders(argv: list[str]) -> list[str]:
    """`evaluate.run=<glob>` (e.g. `multirun/my_sweep/*`) or `evaluate.run=@<file>` (one folder per line) becomes
    the run folders it names, quoted for Hydra (job folder names hold '=' and ','); folders that are not runs
    (a sweep's report/, wandb/) are left out. Several folders need `-m` (one evaluation job each)."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    expanded = []
    for arg in argv:
        key, _, value = arg.partition("=")
        value = value.strip("'\"")
        if key != "evaluate.run" or not (value.startswith("@") or any(c in value for c in "*?[")):
            expanded.append(arg)
            continue
        if value.startswith("@"):
            listing = Path(value[1:]).expanduser()
            if not listing.is_file():
                raise LadmError(f"evaluate.run=@{listing}: no such file (give a file with one run folder per line)")
            named = [Path(line.strip()).expanduser() for line in listing.read_text(encoding="utf-8").splitlines()
                     if line.strip()]
        else:
            named = [Path(p) for p in sorted(glob.glob(str(Path(value).expanduser())))]
        folders = [p.resolve() for p in named if is_run_folder(p)]
        if not folders:
            raise LadmError(f"evaluate.run={value} names no run folder (a folder with results.json or "
                            ".hydra/config.yaml): check the path")
        if len(folders) > 1 and not multirun:
            raise LadmError(f"evaluate.run={value} names {len(folders)} run folders: add -m to evaluate each "
                            "(one job per folder)")
        expanded.append("evaluate.run=" + ",".join(_quoted(f) for f in folders))
    return expanded


main = cli_main("ladm-eval", "evaluate", run, prepare_argv=expand_run_folders)


if __name__ == "__main__":
    main()
