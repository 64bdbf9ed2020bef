"""The typed config schema: every entry point's default tree passes; every key rejects a bad value in one
line that names the key, the value and what is allowed, before anything is loaded."""

from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_dir

from ladm import CONFIG_DIR, LadmError
from ladm.schema import COMMON, METHOD, Rule, validate


@pytest.mark.parametrize("config_name", ["config", "probe", "awareness"])
@pytest.mark.parametrize("method", sorted(METHOD))
def test_every_default_tree_is_valid(config_name, method):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        validate(compose(config_name, overrides=[f"method={method}"]))


def bad_value(rule: Rule) -> str | None:
    """An override value the rule must refuse (None where the command line cannot express one)."""
    if rule.kind == "int":
        return "1.5"
    if rule.kind == "float":
        return str(rule.low - 1) if rule.low is not None else "abc"
    if rule.kind == "bool":
        return "abc"
    if rule.kind == "str" and rule.choices:
        return "bogus"
    if rule.kind == "str" and rule.component:
        return "../escape"
    if rule.kind == "list":
        return "[bogus]" if rule.choices else "[]" if rule.nonempty else None
    return None


CASES = [(method, key, rule) for method, rules in [("ladm", COMMON), *METHOD.items()] for key, rule in rules.items()
         if bad_value(rule) is not None and not (key == "method.teacher.dtype" and method != "mlas_lora")
         and not key.startswith("evaluate.")]  # ladm-eval's own keys: tested through ladm-eval (test_evaluate.py)


@pytest.mark.parametrize("method,key,rule", CASES, ids=[f"{m}:{k}" for m, k, _ in CASES])
def test_each_key_refuses_a_bad_value(make_cfg, method, key, rule):
    value = bad_value(rule)
    with pytest.raises(LadmError) as error:
        validate(make_cfg(f"method={method}", f"{key}={value}"))
    line = str(error.value)
    assert "\n" not in line and line.startswith(key) and rule.allowed() in line


@pytest.mark.parametrize("overrides,message", [
    (["model.dtype=float8"], "model.dtype must be one of auto | float32 | bfloat16 | float16, got 'float8'"),
    (["train.max_steps=1.5"], "train.max_steps must be a positive integer, got 1.5"),
    (["train.seed=abc"], "train.seed must be an integer, got 'abc'"),
    (["train.resume=bogus"], "train.resume must be one of auto | never"),
    (["train.warmup_ratio=-1"], "train.warmup_ratio must lie in [0, 1], got -1"),
    (["train.keep_checkpoints=0"], "train.keep_checkpoints must be a positive integer, got 0"),
    (["train.checkpoint_every=-1"], "train.checkpoint_every must be ≥ 0, got -1"),
    (["eval.metrics=[]"], "eval.metrics must be a non-empty list of chrf++ | spbleu | comet, got []"),
    (["train.max_length=auto"], None),
    (["data=files"], "data.train.src cannot be resolved"),
    (["data=ntrex128", "data.ntrex_root=???"], "cannot be resolved"),
    (["train.lr=inf"], "train.lr must be a positive number, got inf"),
    (["name=../.."], "name must be a name without '/', '\\' or '..' (it becomes a file or folder name), got '../..'"),
    (["name=/tmp/elsewhere"], "name must be a name without"),
    (["data.test.name=../../../x"], "data.test.name must be a name without"),
    (["method=mlas_lora", "method.pairs=[zh-lo,../pair/zh-km]"], "method.pairs must be a non-empty list of names"),
    (["method=landermt", "method.pairs=[zh-lo,..]"], "method.pairs must be a non-empty list of names"),
])
def test_reported_cases(make_cfg, overrides, message):
    cfg = make_cfg(*overrides)
    if message is None:
        validate(cfg)
        return
    with pytest.raises(LadmError, match=re.escape(message)):
        validate(cfg)


def test_keys_added_later_at_their_neutral_value_keep_older_runs_complete(make_cfg):
    """A run made before train.select_on, train.early_stop_patience, eval.merge_adapters and method.reprobe_every
    existed has the hash today's code computes for the same settings (so its sweep is still complete), and
    ladm-eval fills them in."""
    from omegaconf import OmegaConf

    from ladm.schema import HASH_NEUTRAL, config_hash, with_later_keys

    cfg = make_cfg("method=ladm")
    older = OmegaConf.to_container(cfg)
    for key in HASH_NEUTRAL:
        *parents, leaf = key.split(".")
        node = older
        for parent in parents:
            node = node.get(parent) or {}
        node.pop(leaf, None)  # method.reprobe_every: only in ladm; model.gguf.file: only in GGUF models
    older = OmegaConf.create(older)
    assert config_hash(older) == config_hash(cfg)
    assert config_hash(make_cfg("method=ladm", "train.early_stop_patience=2")) != config_hash(cfg)
    filled = with_later_keys(older)
    assert all(OmegaConf.select(filled, key) == value for key, value in HASH_NEUTRAL.items())
    validate(filled)


@pytest.mark.parametrize("override,message", [
    ("+train.max_step=3", "train.max_step is not a key ladm knows (did you mean train.max_steps?)"),
    ("+model.colour=blue", "model.colour is not a key ladm knows (model takes attn_implementation, chat_template, "),
    ("+method.teacher.colour=blue", "method.teacher.colour is not a key ladm knows"),
    ("+probe.n_sentence=8", "probe.n_sentence is not a key ladm knows (did you mean probe.n_sentences?)"),
])
def test_a_key_no_ladm_config_defines_is_one_line(override, message):
    """A misspelt key (from a user's config file or `+key=`) is refused, not silently ignored."""
    method = "mlas_lora" if "teacher" in override else "ladm"
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"method={method}", override])
    with pytest.raises(LadmError) as err:
        validate(cfg)
    assert str(err.value).startswith(message)


def test_free_form_and_stored_configs_are_not_checked_for_known_keys():
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        validate(compose("config", overrides=["+model.chat_template_kwargs.enable_thinking=false"]))
        validate(compose("config", overrides=["+train.removed_since=1"]), stored=True)  # an older run's config


def test_a_broken_or_list_config_file_in_a_users_folder_is_one_line(tmp_path):
    from ladm.cli import check_user_configs

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("name: mine\npath: [unclosed\n")
    with pytest.raises(LadmError, match=r"model/mine.yaml is not valid YAML \(.*at line 3\): fix that file"):
        check_user_configs(["--config-dir", str(tmp_path), "model=mine"])
    (tmp_path / "model" / "mine.yaml").write_text("- a\n- b\n")
    with pytest.raises(LadmError, match=r"model/mine.yaml holds a list, not a mapping of keys"):
        check_user_configs([f"--config-dir={tmp_path}", "model=mine"])
    (tmp_path / "model" / "mine.yaml").write_text("name: mine\npath: /models/mine\n")
    check_user_configs(["-cd", str(tmp_path), "model=mine"])
