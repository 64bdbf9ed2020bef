"""One typed schema for the whole composed config, checked once before any data or model is loaded.

Every key has a type and, where it has one, a range or a set of choices. A violation is one line that
names the key, the bad value and what is allowed (`LadmError`, exit code 2 at the command line).
Relations between keys (m_min ≤ m_max, a teacher at least as large as the student, ...) are checked by
the code that owns them; this module checks each value on its own.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from transformers import SchedulerType

from ladm import CONFIG_DIR, REPO_ROOT, LadmError
from ladm.data import check_prompt_template

AUTO = "auto"


@dataclass(frozen=True)
class Rule:
    """The allowed values of one key."""

    kind: str  # int | float | bool | str | list | dict
    low: float | None = None  # inclusive unless low_open
    high: float | None = None  # inclusive unless high_open
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()  # for str, and for each element of a list
    nullable: bool = False
    auto: bool = False  # the string "auto" is allowed too
    nonempty: bool = False  # lists
    component: bool = False  # str, and each element of a list: it becomes one file or folder name

    def allowed(self) -> str:
        if self.component:
            what = "a non-empty list of names" if self.kind == "list" else "a name"
            return f"be {what} without '/', '\\' or '..' (it becomes a file or folder name)"
        if self.kind == "list":
            items = "of " + " | ".join(self.choices) if self.choices else "of strings"
            return f"{'a non-empty' if self.nonempty else 'a'} list {items}"
        if self.choices:
            return "one of " + " | ".join(map(str, self.choices))
        if self.kind in ("int", "float") and self.low is not None:
            noun = "an integer" if self.kind == "int" else "a number"
            if self.high is not None:
                text = f"lie in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
            elif self.low == 0 and self.low_open or self.kind == "int" and self.low == 1:
                text = f"be a positive {noun.split()[-1]}"
            else:
                text = f"be {'>' if self.low_open else '≥'} {self.low:g}"
        else:
            text = {"int": "be an integer", "float": "be a number", "bool": "be true or false", "str": "be a string",
                    "list": "be a list", "dict": "be a mapping"}[self.kind]
        return text + (" or auto" if self.auto else "") + (" or null" if self.nullable else "")

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if self.auto and value == AUTO:
            return True
        if self.kind in ("int", "float"):
            if isinstance(value, bool) or not isinstance(value, int if self.kind == "int" else (int, float)):
                return False
            if not math.isfinite(value):
                return False
            if self.low is not None and (value < self.low or self.low_open and value == self.low):
                return False
            return self.high is None or not (value > self.high or self.high_open and value == self.high)
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "str":
            return isinstance(value, str) and (not self.choices or value in self.choices) and \
                (not self.component or is_component(value))
        if self.kind == "list":
            return (isinstance(value, (list, ListConfig)) and (not self.nonempty or len(value) > 0)
                    and all(isinstance(v, str) and (not self.choices or v in self.choices)
                            and (not self.component or is_component(v)) for v in value))
        return isinstance(value, (dict, DictConfig))


def is_component(value: str) -> bool:
    """One path component: not empty, no separator, not `.`/`..`, no NUL (names never escape their folder)."""
    return bool(value) and value not in (".", "..") and not any(c in value for c in "/\\\0")


def _message(key: str, rule: Rule, value: Any) -> str:
    verb = "must be" if (rule.choices or rule.kind == "list") and not rule.component else "must"
    return f"{key} {verb} {rule.allowed()}, got {value!r}"


INT_POS, INT_NONNEG = Rule("int", low=1), Rule("int", low=0)
FLOAT_POS, FLOAT_NONNEG = Rule("float", low=0, low_open=True), Rule("float", low=0)
UNIT = Rule("float", low=0, high=1)
STR, BOOL = Rule("str"), Rule("bool")
NAME = Rule("str", component=True)  # experiment, pair and test-set names become folder and file names
SCHEDULERS = tuple(s.value for s in SchedulerType)
SPLIT = {"format": Rule("str", choices=("text", "tsv", "jsonl", "hf", "tmx"))}
TEST_SETS = tuple(sorted(p.stem for p in (CONFIG_DIR / "test_set").glob("*.yaml")))

COMMON: dict[str, Rule] = {
    "name": NAME, "force": BOOL, "cache_dir": STR,
    "objective": Rule("str", choices=("validation/chrf++", "validation/spbleu"), nullable=True),
    "model.name": STR, "model.path": STR, "model.chat_template": BOOL,
    "model.dtype": Rule("str", choices=("auto", "float32", "bfloat16", "float16")),
    "model.gguf": Rule("dict", nullable=True),
    "model.attn_implementation": Rule("str", choices=("eager", "sdpa", "flash_attention_2", "flash_attention_3",
                                                      "flex_attention")),
    "model.chat_template_kwargs": Rule("dict", nullable=True), "model.random_init": Rule("dict", nullable=True),
    "prompt.name": STR, "prompt.template": STR, "pair.name": NAME, "pair.src.name": STR, "pair.tgt.name": STR,
    "data.name": STR, "data.max_train_samples": Rule("int", low=1, nullable=True), "data.validation_size": INT_NONNEG,
    **{f"data.{split}.{k}": rule for split in ("train", "test") for k, rule in SPLIT.items()}, "data.test.name": NAME,
    "eval.max_samples": Rule("int", low=1, nullable=True), "eval.batch_size": Rule("int", low=1, auto=True),
    "eval.max_new_tokens": Rule("int", low=1, auto=True), "eval.length_margin": Rule("float", low=1),
    "eval.num_beams": INT_POS, "eval.merge_adapters": Rule("bool", auto=True),
    "eval.n_samples": INT_NONNEG, "eval.on_missing": Rule("str", choices=("error", "skip")),
    "eval.metrics": Rule("list", choices=("chrf++", "spbleu", "comet"), nonempty=True),
    "eval.fetch": BOOL, "eval.test_sets": Rule("list", choices=TEST_SETS, nullable=True, nonempty=True),
    "eval.comet.model": STR,
    "eval.comet.batch_size": INT_POS, "eval.comet.python": Rule("str", nullable=True),
    "eval.comet.device": Rule("str", choices=("auto", "cpu", "cuda")),
    "eval.comet.timeout": Rule("float", low=0, low_open=True, auto=True), "eval.comet.check_timeout": FLOAT_POS,
    "evaluate.run": Rule("str", nullable=True), "evaluate.adapter": Rule("str", nullable=True),
    "evaluate.allow_other_base": Rule("bool", nullable=True),
    "logger.name": Rule("str", choices=("wandb", "none")),
    "logger.mode": Rule("str", choices=("offline", "online", "disabled")),
    "probe.reference_pair": STR, "probe.split": Rule("str", choices=("train", "test")),
    "probe.n_sentences": INT_POS, "probe.batch_size": INT_POS, "probe.bootstrap": Rule("int", low=0, high=100_000),
    "probe.input": Rule("str", choices=("prompt", "prompt+reference")),
    "probe.reference_data": Rule("dict", nullable=True),
    "probe.normalisation": Rule("str", choices=("none", "sum", "zscore")),
    "probe.sign": Rule("str", choices=("hi_minus_lo", "lo_minus_hi")),
    "probe.tokens": Rule("str", choices=("all", "target")),
    "strength.alpha": FLOAT_NONNEG, "strength.beta": UNIT,
    "train.max_steps": INT_POS, "train.batch_size": INT_POS, "train.grad_accum": INT_POS, "train.lr": FLOAT_POS,
    "train.optimizer": Rule("str", choices=("adamw", "sgd")), "train.weight_decay": FLOAT_NONNEG,
    "train.scheduler": Rule("str", choices=SCHEDULERS), "train.warmup_ratio": UNIT, "train.max_grad_norm": FLOAT_POS,
    "train.max_length": Rule("int", low=1, auto=True), "train.length_coverage": Rule("float", low=0, high=1, low_open=True),
    "train.gradient_checkpointing": BOOL, "train.group_by_length": BOOL,
    "train.precision": Rule("str", choices=("auto", "bf16", "fp32")),
    "train.seed": Rule("int"), "train.log_every": INT_POS, "train.eval_every": INT_NONNEG,
    "train.select_on": Rule("str", choices=("validation/chrf++", "validation/spbleu"), nullable=True),
    "train.early_stop_patience": INT_NONNEG, "train.save_adapter": BOOL,
    "train.checkpoint_every": INT_NONNEG, "train.keep_checkpoints": INT_POS,
    "train.resume": Rule("str", choices=("auto", "never")),
}
PAIRS = Rule("list", nonempty=True, component=True)  # config names of conf/pair, never paths
PHI_ESTIMATE = Rule("str", choices=("taylor", "abs"))  # METHODS.md §3.2
LORA = {"method.r": INT_POS, "method.alpha": FLOAT_POS, "method.dropout": Rule("float", low=0, high=1, high_open=True),
        "method.target_modules": Rule("list", nonempty=True),
        "method.base": Rule("str", choices=("lora", "dora", "rslora", "pissa", "olora", "loraplus")),
        "method.loraplus_ratio": FLOAT_POS}
METHOD: dict[str, dict[str, Rule]] = {
    "zero_shot": {},
    "lora": LORA,
    "ladm": LORA | {
        "method.delta_r_path": Rule("str", nullable=True), "method.tau_tal": FLOAT_NONNEG, "method.tau_lil": FLOAT_NONNEG,
        "method.select": Rule("str", choices=("topk", "ratio", "all")), "method.k_tal": INT_NONNEG,
        "method.k_lil": INT_NONNEG, "method.ratio_tal": UNIT, "method.ratio_lil": UNIT,
        "method.variant": Rule("str", choices=("signed", "proportional")), "method.m_min": FLOAT_NONNEG,
        "method.m_max": FLOAT_NONNEG, "method.mode": Rule("str", choices=("step", "grad", "forward")),
        "method.reprobe_every": INT_NONNEG},
    "mlas_lora": {
        "method.pairs": PAIRS, "method.lambda": Rule("float", low=0, high=1, low_open=True),
        "method.phi_norm": Rule("str", choices=("none", "per_pair")), "method.phi_estimate": PHI_ESTIMATE,
        "method.r_gen": INT_POS, "method.r_spe": INT_POS,
        "method.alpha": FLOAT_POS, "method.dropout": Rule("float", low=0, high=1, high_open=True),
        "method.target_modules": Rule("list", nonempty=True),
        "method.adapters": Rule("str", choices=("general+specific", "specific", "single")),
        "method.init": Rule("str", choices=("teacher", "random")), "method.layers": Rule("str", choices=("relevant", "random")),
        "method.neurons": Rule("str", choices=("split", "all", "general", "specific")),
        "method.init_offset": Rule("str", choices=("keep", "subtract")),
        "method.teacher.name": STR, "method.teacher.path": STR,
        "method.teacher.dtype": COMMON["model.dtype"], "method.teacher.attn_implementation": COMMON["model.attn_implementation"]},
    "landermt": {
        "method.pairs": PAIRS, "method.k_layers": Rule("int", low=1, nullable=True),
        "method.split": Rule("str", choices=("lambda", "ratio")), "method.lambda": Rule("float", low=0, high=1, low_open=True),
        "method.general_ratio": UNIT, "method.partition": UNIT, "method.routing": Rule("str", choices=("gate", "none")),
        "method.units": Rule("str", choices=("split", "general", "all")), "method.phi_estimate": PHI_ESTIMATE},
}
DATA_FILES = {"text": ("src", "tgt"), "tsv": ("path",), "jsonl": ("path",), "hf": ("dataset", "split"), "tmx": ("root",)}


def _value(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except OmegaConfBaseException as err:
        reason = str(err).splitlines()[0]
        raise LadmError(f"{key} cannot be resolved ({reason}): set it on the command line, e.g. {key}=...") from err


def rule_for(key: str) -> Rule | None:
    """The schema's rule of `key` (a common key, or a method's own key under any method)."""
    return COMMON.get(key) or next((rules[key] for rules in METHOD.values() if key in rules), None)


def check_rules(cfg: DictConfig, rules: dict[str, Rule]) -> None:
    """Each key of `rules` in `cfg` against its rule: the first violation is one line."""
    for key, rule in rules.items():
        value = _value(cfg, key)
        if not rule.ok(value):
            raise LadmError(_message(key, rule, value))


def validate_eval(eval_cfg: DictConfig) -> None:
    """The `eval.*` keys alone (what `ladm-fetch-metrics` reads), by the same rules as a whole tree."""
    check_rules(OmegaConf.create({"eval": eval_cfg}), {k: r for k, r in COMMON.items() if k.startswith("eval.")})


# The groups whose keys a user's config (or `+key=` on the command line) could misspell, and the subtrees that hold
# free-form keys of their own (passed on to the tokenizer) or another group's config (a teacher is a model).
CHECKED_GROUPS = ("model", "pair", "method", "strength", "data", "train", "eval", "probe", "prompt")
# (model.random_init is checked against the model's own config class where it is built.)
FREE_FORM = ("model.chat_template_kwargs", "method.teacher.chat_template_kwargs", "model.random_init",
             "method.teacher.random_init")
GROUP_AT = {"method.teacher": "model"}


def _key_tree(node: Any, prefix: str, into: dict[str, bool]) -> dict[str, bool]:
    """`into` gains every key path under `prefix` of the plain container `node` → whether it holds a mapping."""
    for key, value in node.items():
        if key == "defaults":
            continue
        path = f"{prefix}.{key}"
        into[path] = into.get(path, False) or isinstance(value, dict)
        if isinstance(value, dict) and path not in FREE_FORM:
            _key_tree(value, path, into)
    return into


def known_keys() -> dict[str, bool]:
    """Every key path that ladm's own options of the CHECKED_GROUPS define (conf/<group>/*.yaml), with the keys
    added later (HASH_NEUTRAL) and those a group is placed at (a teacher's model keys)."""
    known: dict[str, bool] = {}
    for group in CHECKED_GROUPS:
        for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
            node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            if isinstance(node, dict):
                _key_tree(node, group, known)
    for at, group in GROUP_AT.items():
        known[at] = True
        known |= {at + key[len(group):]: holds for key, holds in known.copy().items() if key.startswith(group + ".")}
    for key in HASH_NEUTRAL:
        known.setdefault(key, False)
    return known


def check_known_keys(cfg: DictConfig) -> None:
    """A key that no ladm config defines (a typo in a user's config file or a `+key=`) is one line naming it, the
    file's group and its nearest known keys, instead of being silently ignored."""
    import difflib

    known = known_keys()
    given: dict[str, bool] = {}
    for group in CHECKED_GROUPS:
        node = cfg.get(group)
        if isinstance(node, DictConfig):
            _key_tree(OmegaConf.to_container(node, resolve=False), group, given)
    for path in given:
        parent = path.rsplit(".", 1)[0]
        if path in known or parent in FREE_FORM or (parent in given and not known.get(parent, False)):
            continue  # known, free-form, or inside a value that ladm takes whole (a mapping where a value goes)
        siblings = sorted(k.rsplit(".", 1)[1] for k in known if k.rsplit(".", 1)[0] == parent)
        near = difflib.get_close_matches(path.rsplit(".", 1)[1], siblings, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(f'{parent}.{k}' for k in near)}?" if near else \
            f"{parent} takes {', '.join(siblings)}"
        raise LadmError(f"{path} is not a key ladm knows ({hint}): remove it or correct its name in your config")


def validate(cfg: DictConfig, stored: bool = False) -> None:
    """Check every key of the schema (and the method's own keys), each data split's paths, one line per problem;
    and that every key is one ladm knows, unless `cfg` is a run folder's saved config (`stored`: an older ladm's
    may hold keys removed since)."""
    if not stored:
        check_known_keys(cfg)
    method = _value(cfg, "method.name")
    if method not in METHOD:
        raise LadmError(f"method.name must be one of {' | '.join(METHOD)}, got {method!r}")
    check_rules(cfg, COMMON | METHOD[method])
    check_prompt_template(_value(cfg, "prompt.template"))
    for split in ("train", "test"):
        for field in DATA_FILES[_value(cfg, f"data.{split}.format")]:
            key = f"data.{split}.{field}"
            if not isinstance(_value(cfg, key), str):
                raise LadmError(f"{key} must be a file path, got {_value(cfg, key)!r}")


# Keys that change where results go, what is logged or how often state is saved, not what is trained.
RUN_ONLY_KEYS = ("name", "force", "cache_dir", "logger", "eval", "objective", "train.resume", "train.checkpoint_every",
                 "train.keep_checkpoints", "train.log_every", "train.eval_every", "train.save_adapter")
# Of those, the ones that change no number in results.json either (the eval settings do).
NOT_IN_RESULTS = ("name", "force", "cache_dir", "logger", "train.resume", "train.checkpoint_every",
                  "train.keep_checkpoints", "train.log_every", "train.save_adapter", "eval.batch_size",
                  "eval.n_samples", "eval.fetch", "eval.comet.batch_size", "eval.comet.python",
                  "eval.comet.device", "eval.comet.timeout", "eval.comet.check_timeout")


# Keys added after runs were made, at the value that does what those runs did: left out of the hash there, so
# a sweep made before them is still complete (and skipped) under today's code.
HASH_NEUTRAL = {"train.select_on": None, "train.early_stop_patience": 0, "eval.merge_adapters": "auto",
                "method.reprobe_every": 0, "model.gguf.file": None, "method.teacher.gguf.file": None}


def with_later_keys(cfg: DictConfig) -> DictConfig:
    """A run folder's config with the HASH_NEUTRAL keys it predates filled in (ladm-eval of an older run)."""
    filled = cfg.copy()
    for key, value in HASH_NEUTRAL.items():
        parent = key.rsplit(".", 1)[0]
        if OmegaConf.select(filled, key, default="<absent>") == "<absent>" and \
                isinstance(OmegaConf.select(filled, parent, default=None), DictConfig):  # never a group it lacks
            OmegaConf.update(filled, key, value, force_add=True)
    return filled


def _without(cfg: DictConfig, keys: tuple[str, ...]) -> dict[str, Any]:
    tree = OmegaConf.to_container(cfg, resolve=True)
    for key in keys:
        *parents, leaf = key.split(".")
        node = tree
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return tree


def training_identity(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without its run-only keys: two runs that agree here train identically. With
    `train.select_on` the validation scores choose the weights, so `train.eval_every` and the `eval.*` settings
    that change a score stay in."""
    if not OmegaConf.select(cfg, "train.select_on"):
        return _without(cfg, RUN_ONLY_KEYS)
    scoring = ("eval", "train.eval_every")
    return _without(cfg, tuple(k for k in RUN_ONLY_KEYS if k not in scoring)
                    + tuple(k for k in NOT_IN_RESULTS if k.startswith("eval.")))


def config_hash(cfg: DictConfig, inputs: str | None = None) -> str:
    """A hash of everything in the resolved config that changes a job's results (the checkout's location
    left out), and of `inputs` (ladm-eval: the digest of the evaluated adapter's files), recorded in
    results.json: "skip complete jobs" compares it."""
    neutral = tuple(key for key, value in HASH_NEUTRAL.items() if OmegaConf.select(cfg, key, default=value) == value)
    tree = _without(cfg, NOT_IN_RESULTS + neutral)
    text = json.dumps([tree, inputs] if inputs else tree,
                      sort_keys=True, default=str).replace(str(REPO_ROOT), "<ladm>")
    if cfg.get("cache_dir"):  # a converted model's folder lives there (model=gemma3-270m)
        text = text.replace(str(cfg.cache_dir), "<cache>")
    return hashlib.sha256(text.encode()).hexdigest()[:16]
