"""Translate and score evaluation sets (METHODS.md §5), for `ladm-train` (the validation slice during training,
the test sets at the end) and `ladm-eval` (any saved model).

Nothing computed is lost: each test set's sources, hypotheses and references are written to
`predictions/<test set>/<pair>.{src,hyp,ref}` right after generation (with the decoding settings in
`<pair>.json`, with the decoding settings and what generated them); results.json is written right after scoring,
or with `status: failed` and the error if scoring fails. Saved hypotheses are scored again without generating only
when everything that decides them is the same: sentences, prompt token ids (template, sequence format, chat
template), decoding, stop tokens, the base model (its weights' fingerprint), the trained state (a digest of every
adapter / LANDeRMT tensor and LoRA scaling) and the method.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import platform
import shutil
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ladm import REPO_ROOT
from ladm.checkpoint import HELD_BY_LAUNCHER, RunFolderLock
from ladm.data import ParallelCorpus, read_split, share, test_set_configs
from ladm.distributed import DistEnv
from ladm.files import write_json_atomic, write_lines_atomic
from ladm.generation import translate
from ladm.metrics import Scorer, target_language_rate, target_script_ratio
from ladm.schema import config_hash
from ladm.tracking import Tracker

log = logging.getLogger(__name__)
VERSIONED = ("torch", "transformers", "peft", "sacrebleu", "unbabel-comet", "hydra-core", "wandb", "ladm")


def installed_version(name: str) -> str | None:
    """The installed version of a distribution; None when it is not installed (an optional part: COMET, W&B)."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def versions() -> dict[str, object]:
    """The versions of the packages a result depends on (None: not installed), the checkout's git commit and its
    folder (`ladm_root`: the report compares the config's paths relative to it), for results.json."""
    return {name: installed_version(name) for name in VERSIONED} | {"python": platform.python_version(),
                                                                    "ladm_source": source_revision(),
                                                                    "ladm_root": str(REPO_ROOT)}


@functools.cache
def source_revision() -> dict[str, object] | None:
    """The git commit of the checkout ladm runs from and whether it has uncommitted changes to tracked files;
    None for an installed wheel (its version says what it is). Read once per process: the code that runs is the
    code imported at its start (results.json and every pair's predictions ask for it)."""
    if not (REPO_ROOT / ".git").exists():
        return None
    try:
        git = lambda *args: subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,  # noqa: E731
                                           check=True, timeout=60).stdout.strip()
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


@dataclass
class EvalSet:
    """One evaluated set: per pair, its sentences and tokenised prompts."""

    name: str  # "validation", or a test set's name (flores200-devtest, ntrex128, tico19, files, ...)
    corpora: dict[str, ParallelCorpus]
    prompts: dict[str, list[list[int]]] = field(default_factory=dict)
    is_test: bool = True  # test sets are saved under predictions/ and scored with COMET


def read_test_sets(pair_cfgs: dict[str, DictConfig], max_samples: int | None) -> list[EvalSet]:
    """Every test set of `eval.test_sets` (or `data.test`) for every pair, read and checked before any model loads."""
    by_name: dict[str, dict[str, ParallelCorpus]] = {}
    for pair, pair_cfg in pair_cfgs.items():
        for split in test_set_configs(pair_cfg):
            by_name.setdefault(split.name, {})[pair] = read_split(split).head(max_samples)
    return [EvalSet(name, corpora) for name, corpora in by_name.items()]


def completed_results(out_dir: Path, config_hash: str) -> tuple[dict | None, bool]:
    """(results, stale): the complete results.json in `out_dir` if it was computed with this config hash;
    `stale` when the folder holds complete results of another config (the job runs again)."""
    path = out_dir / "results.json"
    if path.is_file():
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            results = err
        if not isinstance(results, dict):  # truncated, hand-edited, another tool's: kept aside, the job runs again
            aside = path.with_name(f"results.damaged-{int(time.time())}.json")
            shutil.copy2(path, aside)
            log.warning("%s is not a results file (%s): copied to %s, running the job again", path,
                        type(results).__name__, aside.name)
            return None, False
        if results.get("status") == "complete":
            if results.get("config_hash") == config_hash:
                return results, False
            log.warning("%s holds results of another config (hash %s, now %s): running it again", out_dir,
                        results.get("config_hash"), config_hash)
            return None, True
    return None, False


def run_once(cfg: DictConfig, out_dir: Path, dist: DistEnv, job: Callable[[bool], dict], inputs: str | None = None) -> dict:
    """The complete results.json in `out_dir` when it has this config's hash (with `inputs`, see `config_hash`)
    and not `force=true`; otherwise `job(fresh)` under the folder's lock, `fresh` when earlier results must not
    be resumed from."""
    done, stale = dist.broadcast(completed_results(out_dir, config_hash(cfg, inputs)) if dist.is_main else None)
    if done and not cfg.force:
        log.info("skipping %s: results.json is complete for this config (force=true to run it again)", out_dir)
        dist.close()
        return done
    held = out_dir.resolve() in HELD_BY_LAUNCHER  # taken by the entry point before Hydra's files were written
    lock = RunFolderLock(out_dir) if dist.is_main and not held else None
    try:
        return job(cfg.force or stale)
    finally:
        if lock is not None:
            lock.release()


def _read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").removesuffix("\n").split("\n")


@dataclass
class Evaluator:
    """Generates with one model, pair by pair (`select` activates a pair's adapters); rank 0 gets every output."""

    model: Any
    tokenizer: Any
    select: Callable[[str], None]
    stop_ids: list[int]
    batch_size: int
    max_new_tokens: dict[str, int]
    num_beams: int
    dist: DistEnv
    out_dir: Path
    reuse_from: tuple[Path, ...] = ()  # folders whose saved predictions may be scored again (if `generated_by` agrees)
    generated_by: dict = field(default_factory=dict)  # base model identity, method, trained-state digest: set by the caller
    hit_budget: dict[str, dict[str, dict]] = field(default_factory=dict)  # test set → pair → share

    def decoding(self, pair: str) -> dict[str, int]:
        return {"num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens[pair]}

    def identity(self, eval_set: EvalSet, pair: str) -> dict:
        """Everything that decides the hypotheses of `pair` on `eval_set` (recorded beside them)."""
        prompts = hashlib.sha256(json.dumps(eval_set.prompts[pair]).encode()).hexdigest()
        return self.generated_by | {"pair": pair, "prompt_ids": prompts, "stop_ids": sorted(self.stop_ids),
                                    "device": next(self.model.parameters()).device.type}

    def saved(self, eval_set: EvalSet, pair: str) -> tuple[list[str], dict, dict | None] | None:
        """Hypotheses saved earlier for exactly these sources, references and decoding settings by the same model
        (`identity`), with their budget share and the ladm source that generated them: anything else is generated
        again."""
        if not self.generated_by:
            return None
        corpus, identity = eval_set.corpora[pair], self.identity(eval_set, pair)
        for root in (self.out_dir, *self.reuse_from):
            folder = root / "predictions" / eval_set.name
            try:
                meta = json.loads((folder / f"{pair}.json").read_text(encoding="utf-8"))
                src, ref, hyp = (_read_lines(folder / f"{pair}.{ext}") for ext in ("src", "ref", "hyp"))
            except (OSError, ValueError):
                continue
            if (src, ref, len(hyp), meta.get("decoding")) != (corpus.src, corpus.tgt, len(src), self.decoding(pair)):
                continue
            if meta.get("generated_by") == identity:
                return hyp, meta["hit_generation_budget"], meta.get("generated_with")
            log.info("%s %s: the hypotheses in %s came from another model or settings (%s): generating again",
                     eval_set.name, pair, folder, ", ".join(sorted(k for k in identity
                                                                   if (meta.get("generated_by") or {}).get(k) != identity[k])))
        return None

    def translate(self, eval_set: EvalSet) -> dict[str, list[str]]:
        """Per pair, every rank translates its share with that pair's adapters; test sets are saved at once."""
        outputs = {}
        for pair, prompts in eval_set.prompts.items():
            found = self.dist.broadcast(self.saved(eval_set, pair) if eval_set.is_test and self.dist.is_main else None)
            if found is not None:
                log.info("%s %s: scoring the saved hypotheses (same model, sentences and decoding), not generating again",
                         eval_set.name, pair)
                outputs[pair], hit_share, source = found
            else:
                self.select(pair)
                shard = translate(self.model, self.tokenizer, prompts[self.dist.rank::self.dist.world_size],
                                  self.stop_ids, self.batch_size, self.max_new_tokens[pair], self.num_beams,
                                  desc=f"generate {pair} ({eval_set.name})")
                hypotheses, hit = [""] * len(prompts), [False] * len(prompts)
                for rank, part in enumerate(self.dist.gather(shard)):
                    hypotheses[rank::self.dist.world_size], hit[rank::self.dist.world_size] = part.hypotheses, part.hit_budget
                outputs[pair], hit_share, source = hypotheses, share(hit), source_revision()
            if eval_set.is_test and self.dist.is_main:  # right away; saved ones are copied into this folder
                self.save(eval_set, pair, outputs[pair], hit_share, source)
            if eval_set.is_test:
                self.hit_budget.setdefault(eval_set.name, {})[pair] = hit_share
                if hit_share["count"]:
                    log.warning("%s %s: %.1f%% of hypotheses ran to eval.max_new_tokens=%d without ending",
                                eval_set.name, pair, 100 * hit_share["share"], self.max_new_tokens[pair])
        return outputs

    def save(self, eval_set: EvalSet, pair: str, hypotheses: list[str], hit_share: dict, source: dict | None) -> None:
        """The sentences and hypotheses, with what generated them: `generated_by` (the identity compared for
        reuse) and `generated_with` (the ladm commit, kept from the first generation when hypotheses are reused)."""
        folder = self.out_dir / "predictions" / eval_set.name
        corpus = eval_set.corpora[pair]
        for ext, lines in (("src", corpus.src), ("hyp", hypotheses), ("ref", corpus.tgt)):
            write_lines_atomic(folder / f"{pair}.{ext}", lines)
        write_json_atomic(folder / f"{pair}.json", {"decoding": self.decoding(pair), "hit_generation_budget": hit_share,
                                                    "generated_by": self.identity(eval_set, pair),
                                                    "generated_with": source})


OFF_TARGET_BELOW = 0.5  # a target-script ratio below this is warned about


def score(scorer: Scorer, eval_set: EvalSet, outputs: dict[str, list[str]], targets: dict[str, str],
          tracker: Tracker, step: int) -> dict[str, tuple[dict, dict]]:
    """Per pair, corpus metrics (with the off-target `target_script_ratio`) and sacrebleu signatures (COMET: see
    `score_comet`). `targets`: each pair's target language code."""
    scored = {}
    for pair, hypotheses in outputs.items():
        corpus = eval_set.corpora[pair]
        metrics, signatures = scorer.score(corpus.src, hypotheses, corpus.tgt, comet=False)
        scored[pair] = (metrics | {"target_script_ratio": target_script_ratio(hypotheses, targets[pair]),
                                   "target_language": target_language_rate(hypotheses, targets[pair])}, signatures)
    for pair, (metrics, _) in scored.items():
        tracker.log({f"{eval_set.name}/{pair}/{k}": v for k, v in metrics.items() if v is not None}, step=step)
    return scored


def score_comet(scorer: Scorer, test_sets: list[EvalSet], outputs: dict[str, dict[str, list[str]]],
                scored: dict[str, dict[str, tuple[dict, dict]]], out_dir: Path, tracker: Tracker, step: int) -> None:
    """COMET of every pair of every test set in one call (one model load), into `scored`; each pair's segment
    scores saved as `predictions/<test set>/<pair>.comet` (one per line, in the order of the hypotheses)."""
    if "comet" not in scorer.eval_cfg.metrics:
        return
    keys = {f"{s.name}\t{pair}": (s, pair) for s in test_sets for pair in outputs[s.name]}
    values = scorer.comet_by_pair({key: (s.corpora[pair].src, outputs[s.name][pair], s.corpora[pair].tgt)
                                   for key, (s, pair) in keys.items()})
    for key, (s, pair) in keys.items():
        scored[s.name][pair][0]["comet"] = values[key]
        if values[key] is not None:
            write_lines_atomic(out_dir / "predictions" / s.name / f"{pair}.comet",
                               [f"{v:.6f}" for v in scorer.comet_segments[key]])
            tracker.log({f"{s.name}/{pair}/comet": values[key]}, step=step)


def record_test_results(results: dict, out_dir: Path, scorer: Scorer, evaluator: Evaluator, test_sets: list[EvalSet],
                        outputs: dict[str, dict[str, list[str]]], targets: dict[str, str], tracker: Tracker,
                        step: int, n_samples: int, started: float, eval_started: float) -> dict:
    """Score every test set, then write results.json: the first test set is the headline (`test_set`, `metrics`,
    `signatures`), every set has its own entry under `test_sets`. A scoring failure writes `status: failed`
    with the error (the predictions are already on disk) and re-raises. Then the W&B samples tables and summary."""
    try:
        scored = {s.name: score(scorer, s, outputs[s.name], targets, tracker, step) for s in test_sets}
        if "comet" in scorer.eval_cfg.metrics and next(evaluator.model.parameters()).is_cuda:
            evaluator.model.to("cpu")  # every hypothesis exists: COMET gets the GPU memory the trained model held
            torch.cuda.empty_cache()
        score_comet(scorer, test_sets, outputs, scored, out_dir, tracker, step)
    except Exception as err:
        write_json_atomic(out_dir / "results.json", results | {
            "status": "failed", "error": f"scoring failed: {type(err).__name__}: {err}",
            "traceback": traceback.format_exc()})
        raise
    by_set = {s.name: {"n_test": {pair: len(c) for pair, c in s.corpora.items()},
                       "metrics": {pair: m for pair, (m, _) in scored[s.name].items()},
                       "signatures": next(iter(scored[s.name].values()))[1],
                       "hit_generation_budget": evaluator.hit_budget.get(s.name, {})} for s in test_sets}
    headline = by_set[test_sets[0].name]
    results = results | {"test_set": test_sets[0].name, **headline, "test_sets": by_set, "skipped": scorer.skipped}
    results["timings"] = {"total_s": time.perf_counter() - started, "eval_s": time.perf_counter() - eval_started,
                          "train_s": results.get("train", {}).get("seconds", 0.0)}
    write_json_atomic(out_dir / "results.json", results)  # before anything that talks to W&B
    tracker.artifact("results", [out_dir / "results.json", out_dir / "predictions"])
    for s in test_sets:
        for pair, hypotheses in outputs[s.name].items():
            corpus = s.corpora[pair]
            rows = [list(row) for row in zip(corpus.src, corpus.tgt, hypotheses, strict=True)][:n_samples]
            tracker.table(f"samples/{s.name}/{pair}", ["source", "reference", "hypothesis"], rows)
    tracker.summary({f"{s}/{pair}/{k}": v for s, entry in by_set.items() for pair, m in entry["metrics"].items()
                     for k, v in m.items()})
    for s, entry in by_set.items():
        for pair, m in entry["metrics"].items():
            log.info("%s %s %s (%s): %s", results["model"], results["method"], pair, s,
                     ", ".join(f"{k}={v:.2f}" for k, v in m.items() if v is not None))
            language, script = m.get("target_language"), m.get("target_script_ratio")
            if language is not None and language < OFF_TARGET_BELOW:
                log.warning("%s %s %s (%s): mostly off-target output: only %.0f%% of the hypotheses are in the target "
                            "language (CLD2; see predictions/%s/%s.hyp)", results["model"], results["method"], pair, s,
                            100 * language, s, pair)
            elif language is None and script is not None and script < OFF_TARGET_BELOW:
                log.warning("%s %s %s (%s): mostly off-target output: only %.0f%% of the hypotheses' letters are in "
                            "the target's script (see predictions/%s/%s.hyp)", results["model"], results["method"],
                            pair, s, 100 * script, s, pair)
    return results
