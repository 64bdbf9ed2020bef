"""Every config option composes; names other tools rely on exist; the sweep preset composes."""

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ladm import CONFIG_DIR, REPO_ROOT

GROUPS = ["model", "pair", "method", "data", "train", "eval", "logger", "prompt", "strength", "probe"]
LADM_PAIRS = ["zh-lo", "zh-km", "zh-my", "zh-th", "zh-vi", "zh-id", "zh-ms", "zh-en"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(make_cfg, group):
    for option in options(group):
        cfg = make_cfg(f"{group}={option}")
        assert option.startswith(cfg[group].get("name", option))  # presets such as mlas_lora-R-i keep their method name
        if group != "data" or option != "files":  # data=files has mandatory paths to fill
            OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("pair", LADM_PAIRS)
def test_shipped_flores_files_exist_for_ladm_pairs(make_cfg, pair):
    cfg = make_cfg(f"pair={pair}")
    for split in (cfg.data.train, cfg.data.test):
        assert Path(split.src).is_file() and Path(split.tgt).is_file()


@pytest.mark.parametrize("pair", LADM_PAIRS[:-1])
def test_shipped_test_sets_cover_the_ladm_pairs(make_cfg, pair):
    """FLORES-200 and NTREX-128 for all seven zh→X pairs, TICO-19 for the five it has (no lo, th, vi)."""
    from ladm.data import read_split, test_set_configs

    cfg = make_cfg(f"pair={pair}", "eval.test_sets=[flores200,ntrex128]")
    assert [len(read_split(split)) for split in test_set_configs(cfg)] == [1012, 1997]
    if pair.split("-")[1] not in ("lo", "th", "vi"):
        (tico,) = test_set_configs(make_cfg(f"pair={pair}", "eval.test_sets=[tico19]"))
        assert len(read_split(tico)) == 3071


def test_names_relied_on_exist(make_cfg):
    cfg = make_cfg()
    for key in ["model.path", "train.max_steps", "train.batch_size", "train.lr", "train.seed",
                "data.max_train_samples", "eval.max_samples", "eval.batch_size"]:
        assert OmegaConf.select(cfg, key, default="MISSING") != "MISSING", key
    assert make_cfg("logger=wandb").logger.mode == "offline"


def test_real_models_point_at_hub_ids_and_accept_local_path(make_cfg):
    assert make_cfg("model=qwen2.5-7b").model.path == "Qwen/Qwen2.5-7B"
    assert make_cfg("model=llama3.1-8b", "model.path=/data/llama").model.path == "/data/llama"
    assert make_cfg("model=gemma2-9b").model.dtype == "bfloat16"


def test_demo_experiment_overrides_only_what_differs(make_cfg):
    cfg = make_cfg("experiment=demo")
    assert cfg.name == "demo" and cfg.pair.name == "zh-th" and cfg.model.name == "gemma3-270m"
    assert cfg.train.lr == 1.0e-3 and cfg.train.seed == make_cfg().train.seed


def readme_commands() -> list[tuple[str, list[str]]]:
    """Every `ladm-train`, `ladm-probe` and awareness line of the README's bash blocks: (config name, arguments).
    Lines with placeholders (`...`, `<job>`) or a user's --config-dir are run elsewhere or not at all."""
    import shlex

    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            for prefix, config in (("ladm-train ", "config"), ("ladm-probe ", "probe"),
                                   ("python -m ladm.awareness ", "awareness")):
                if line.startswith(prefix) and "..." not in line and "<" not in line and "--config-dir" not in line:
                    found.append((config, shlex.split(line.removeprefix(prefix))))
    return found


@pytest.mark.parametrize("config,args", readme_commands(), ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_every_readme_command_composes_and_passes_the_schema(config, args):
    """What the command line would check before any work: group options, the search space, the composed tree
    against the schema (a sweep's first value of each axis)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from ladm.cli import check_group_choices, check_search_space
    from ladm.schema import validate

    overrides = [a for a in args if a not in ("-m", "--multirun")]
    check_group_choices(overrides)
    check_search_space(config, overrides)
    first = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            if override.is_discrete_sweep():  # choice or range: its first value (an interval is left to the search)
                first.append(f"{override.key_or_group}={next(iter(override.sweep_string_iterator()))}")
        else:
            first.append(override.input_line)
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        validate(compose(config, overrides=first))
