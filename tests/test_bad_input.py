"""Bad input: one clear line naming the problem, a non-zero exit, before any training."""

import logging
import sys

import pytest
from transformers import PreTrainedTokenizerFast

from ladm import LadmError
from ladm.models import load_model, load_tokenizer
from ladm.train import main


def cli_error(monkeypatch, capsys, tmp_path, *args: str) -> str:
    """Run `ladm-train ARGS` in-process; return its single stderr line (exit code must be 2)."""
    argv = ["ladm-train", "logger=none", "eval.metrics=[chrf++]", f"hydra.run.dir={tmp_path / 'run'}", *args]
    monkeypatch.setattr(sys, "argv", argv)
    root_handlers = logging.getLogger().handlers[:]
    with pytest.raises(SystemExit) as exit_info:
        main()
    logging.getLogger().handlers[:] = root_handlers  # Hydra pointed logging at pytest's captured stdout
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ladm-train: error: "), lines
    assert not (tmp_path / "run" / "results.json").exists()
    return lines[0]


@pytest.mark.parametrize("group,valid", [("model", "tiny-llama3"), ("pair", "zh-lo"), ("method", "lora")])
def test_unknown_group_option_lists_valid_ones(monkeypatch, capsys, tmp_path, group, valid):
    line = cli_error(monkeypatch, capsys, tmp_path, f"{group}=nope")
    assert f"unknown {group} 'nope'" in line and valid in line


def test_unknown_option_inside_a_sweep(monkeypatch, capsys, tmp_path):
    assert "unknown method 'lorra'" in cli_error(monkeypatch, capsys, tmp_path, "method=lora,lorra")


def test_missing_data_file(monkeypatch, capsys, tmp_path):
    line = cli_error(monkeypatch, capsys, tmp_path, f"data.root={tmp_path}/nowhere")
    assert "data file not found" in line and "nowhere" in line


def test_line_counts_differ(monkeypatch, capsys, tmp_path, files_overrides, repeated_corpus):
    short = tmp_path / "short.lo"
    short.write_text("ສະບາຍດີ\n", encoding="utf-8")
    line = cli_error(monkeypatch, capsys, tmp_path, *files_overrides, f"data.train.tgt={short}")
    assert "differ in length" in line and "has 32 lines" in line and "has 1" in line


def test_empty_lines_are_reported_with_line_numbers(monkeypatch, capsys, tmp_path, files_overrides, repeated_corpus):
    src, _ = repeated_corpus
    lines = src.read_text(encoding="utf-8").splitlines()
    lines[2] = lines[6] = " "
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    line = cli_error(monkeypatch, capsys, tmp_path, *files_overrides)
    assert "2 empty line(s)" in line and "line(s) 3, 7" in line


def test_model_path_that_does_not_exist(monkeypatch, capsys, tmp_path):
    line = cli_error(monkeypatch, capsys, tmp_path, "model=qwen2.5-7b", f"model.path={tmp_path}/no-model")
    assert "model.path does not exist" in line


@pytest.mark.parametrize("override,key", [("train.max_steps=0", "train.max_steps"), ("train.lr=-1e-4", "train.lr"),
                                          ("train.batch_size=0", "train.batch_size")])
def test_non_positive_steps_or_lr(monkeypatch, capsys, tmp_path, override, key):
    assert f"{key} must be a positive" in cli_error(monkeypatch, capsys, tmp_path, override)


def test_missing_spm_model_fails_before_training(monkeypatch, capsys, tmp_path):
    from sacrebleu.tokenizers import tokenizer_spm

    monkeypatch.setattr(tokenizer_spm, "SACREBLEU_DIR", str(tmp_path))
    line = cli_error(monkeypatch, capsys, tmp_path, "eval.metrics=[chrf++,spbleu]")
    assert "eval.on_missing=skip" in line and str(tmp_path / "models" / "flores200sacrebleuspm") in line


def test_tokenizer_without_pad_token_pads_with_eos(make_cfg, tmp_path, caplog):
    """A local model directory (the `model.path` code path) whose tokenizer has no pad token."""
    cfg = make_cfg()
    tokenizer = load_tokenizer(cfg.model)
    load_model(cfg.model, tokenizer).save_pretrained(tmp_path / "model")
    no_pad = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<|begin_of_text|>",
                                     eos_token="<|end_of_text|>")
    no_pad.save_pretrained(tmp_path / "model")
    local = make_cfg("model=llama3.1-8b", f"model.path={tmp_path / 'model'}", "model.dtype=float32").model
    with caplog.at_level(logging.INFO):
        loaded = load_tokenizer(local)
    assert loaded.pad_token_id == loaded.eos_token_id
    assert "no pad token" in caplog.text
    assert load_model(local, loaded).generation_config.pad_token_id == loaded.eos_token_id


def test_unloadable_hub_id_is_one_line(make_cfg):
    with pytest.raises(LadmError, match="cannot load the tokenizer of nobody/no-such-model"):
        load_tokenizer(make_cfg("model=qwen2.5-7b", "model.path=nobody/no-such-model").model)


@pytest.fixture
def saved_model(make_cfg, tmp_path):
    """tiny-qwen2.5 saved as a local model folder (the `model.path` code path)."""
    cfg = make_cfg("model=tiny-qwen2.5")
    tokenizer = load_tokenizer(cfg.model)
    load_model(cfg.model, tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.parametrize("damage,message", [
    (lambda d: [f.unlink() for f in d.glob("*.safetensors")], "has no weights"),
    (lambda d: (d / "config.json").unlink(), "has no readable config.json"),
    (lambda d: [f.unlink() for f in d.glob("*") if f.name.startswith(("tokenizer", "vocab", "merges"))],
     "has no tokenizer files"),
    (lambda d: [f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]) for f in d.glob("*.safetensors")],
     "is truncated or corrupt"),
])
def test_broken_model_folders_are_one_line_before_loading(monkeypatch, capsys, tmp_path, saved_model, damage, message):
    capsys.readouterr()  # what saving the model printed (transformers 5: a progress bar) is not the command's output
    damage(saved_model)
    line = cli_error(monkeypatch, capsys, tmp_path, "model=qwen2.5-7b", f"model.path={saved_model}", "model.dtype=float32")
    assert message in line


@pytest.mark.parametrize("name", ["../..", "/tmp/elsewhere", "a/b", "lora,../x"])
def test_a_name_that_is_a_path_is_refused_before_any_folder_is_made(monkeypatch, capsys, tmp_path, name):
    """`name=` becomes outputs/<name>/...: refused before Hydra makes that folder (no hydra.run.dir given)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ladm-train", "logger=none", f"name={name}"] if "," not in name else
                        ["ladm-train", "-m", "logger=none", f"name={name}"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert "name must be a name without '/'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no outputs/ or multirun/ folder anywhere below


@pytest.mark.parametrize("override,message", [
    ("prompt.template='{src} {'", "prompt.template '{src} {' is not a format string"),
    ("prompt.template='Translate {source}'", "prompt.template must contain {src}"),
    ("+model.random_init.config.hidden_sizee=64", "model.random_init.config.hidden_sizee is not a field of LlamaConfig"),
    ("model.random_init.config.hidden_size=abc", "model.random_init.config.hidden_size must be a positive integer, got 'abc'"),
    ("model.random_init.config.num_hidden_layers=-1", "model.random_init.config.num_hidden_layers must be a positive integer"),
    ("model.random_init.config.num_attention_heads=5", "hidden size (64) is not a multiple of the number of attention heads"),
    ("+model.random_init.sede=1", "model.random_init has unknown key(s) sede"),
    ("train.select_on=validation/chrf++", "train.select_on=validation/chrf++ needs train.eval_every=N (N > 0)"),
    ("train.early_stop_patience=2", "train.early_stop_patience=2 needs train.select_on=validation/chrf++"),
    ("train.select_on=validation/comet", "train.select_on must be one of validation/chrf++ | validation/spbleu"),
])
def test_prompt_and_random_init_mistakes_are_one_line_before_loading(monkeypatch, capsys, tmp_path, override, message):
    assert message in cli_error(monkeypatch, capsys, tmp_path, override)


def test_dynamic_delta_r_in_forward_mode_is_refused(monkeypatch, capsys, tmp_path):
    line = cli_error(monkeypatch, capsys, tmp_path, "method=ladm", "method.mode=forward", "method.reprobe_every=2")
    assert "method.reprobe_every needs method.mode=step or grad" in line
