"""Prompt, loss masking, truncation and corpus readers (METHODS.md §5)."""

import json
import re
import zipfile

import pytest
from omegaconf import OmegaConf

from ladm import LadmError
from ladm.data import ParallelCorpus, SequenceFormat, collate, read_split, render_prompt, truncate
from ladm.models import load_tokenizer


def test_prompt_matches_methods_md(make_cfg):
    cfg = make_cfg("pair=zh-km")
    assert render_prompt("你好", cfg.pair) == "Translate the following Chinese text into Khmer.\nChinese: 你好\nKhmer:"


def test_long_answers_are_truncated_and_counted(make_cfg):
    cfg = make_cfg()
    fmt = SequenceFormat.from_cfg(load_tokenizer(cfg.model), cfg)
    examples = fmt.encode(ParallelCorpus(["你好", "你好"], ["ສະບາຍດີ", "ສະບາຍດີ " * 50]), cfg.pair)
    cut_examples, cut = truncate(examples, 40)
    assert cut == [False, True]
    assert cut_examples[1].input_ids == examples[1].input_ids[:40] and cut_examples[0] == examples[0]


def test_prompt_longer_than_max_length_is_an_error(make_cfg):
    cfg = make_cfg()
    fmt = SequenceFormat.from_cfg(load_tokenizer(cfg.model), cfg)
    with pytest.raises(LadmError, match="raise train.max_length"):
        truncate(fmt.encode(ParallelCorpus(["你好" * 50], ["x"]), cfg.pair), 10)


def test_collate_right_pads_and_masks():
    from ladm.data import Example

    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([5, 6], [-100, 6])], pad_token_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 6, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 6, -100]]


def test_crlf_text_files_are_read_like_lf(tmp_path, make_cfg):
    (tmp_path / "a").write_bytes("一\r\n二\r\n".encode())
    (tmp_path / "b").write_bytes(b"one\ntwo\n")
    split = make_cfg().data.train.copy()
    split.src, split.tgt = str(tmp_path / "a"), str(tmp_path / "b")
    corpus = read_split(split)
    assert corpus.src == ["一", "二"] and corpus.tgt == ["one", "two"]


def test_tsv_and_jsonl_readers(tmp_path):
    from omegaconf import OmegaConf

    (tmp_path / "d.tsv").write_text("一\tone\n二\ttwo\n", encoding="utf-8")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"zh": s, "en": t}) for s, t in [("一", "one"), ("二", "two")]))
    tsv = read_split(OmegaConf.create({"format": "tsv", "path": str(tmp_path / "d.tsv")}))
    jsonl = read_split(OmegaConf.create({"format": "jsonl", "path": str(tmp_path / "d.jsonl"),
                                         "src_key": "zh", "tgt_key": "en"}))
    assert tsv.src == jsonl.src == ["一", "二"] and tsv.tgt == jsonl.tgt == ["one", "two"]


def test_ntrex128_config_reads_crlf_test_files(make_cfg, tmp_path):
    (tmp_path / "newstest2019-ref.zho-CN.txt").write_bytes("一\r\n二\r\n".encode())
    (tmp_path / "newstest2019-ref.khm.txt").write_bytes("មួយ\r\nពីរ\r\n".encode())
    cfg = make_cfg("data=ntrex128", "pair=zh-km", f"data.ntrex_root={tmp_path}")
    corpus = read_split(cfg.data.test)
    assert corpus.src == ["一", "二"] and corpus.tgt == ["មួយ", "ពីរ"]
    assert cfg.data.train.src.endswith("dev/zho_Hans.dev")  # trains on the shipped FLORES-200 dev


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (b"\x00\x01\x02binary", "is binary"),
    ("caf\u00e9\n".encode("latin-1"), "is not UTF-8 (byte 3, line 1)"),
])
def test_unreadable_text_files_are_one_line(tmp_path, make_cfg, content, message):
    (tmp_path / "bad").write_bytes(content)
    (tmp_path / "good").write_text("x\n", encoding="utf-8")
    split = make_cfg().data.train.copy()
    split.src, split.tgt = str(tmp_path / "bad"), str(tmp_path / "good")
    with pytest.raises(LadmError, match=re.escape(message)):
        read_split(split)


@pytest.mark.parametrize("line,message", [
    ('{"src": "一", "tgt": ', "line 2 is not JSON"),
    ('["一", "one"]', "line 2 is a JSON list"),
    ('{"src": "一", "tgt": 5}', "line 2 lacks a non-empty string 'src' or 'tgt'"),
    ('{"src": "一"}', "line 2 lacks a non-empty string"),
])
def test_bad_jsonl_lines_are_named(tmp_path, line, message):
    from omegaconf import OmegaConf

    (tmp_path / "d.jsonl").write_text('{"src": "二", "tgt": "two"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(LadmError, match=re.escape(message)):
        read_split(OmegaConf.create({"format": "jsonl", "path": str(tmp_path / "d.jsonl")}))


def test_validation_is_a_fixed_held_out_slice_of_the_training_split(make_cfg):
    from ladm.data import hold_out

    corpus = read_split(make_cfg().data.train)
    train, valid = hold_out(corpus, 100, seed=0)
    assert len(valid) == 100 and len(train) == len(corpus) - 100
    pairs = lambda c: list(zip(c.src, c.tgt, strict=True))  # noqa: E731
    assert not set(pairs(valid)) & set(pairs(train))  # disjoint
    assert sorted(pairs(train) + pairs(valid)) == sorted(pairs(corpus))
    assert hold_out(corpus, 100, seed=0) == (train, valid)  # the same slice every time
    assert len(hold_out(corpus.head(40), 100, seed=0)[1]) == 8  # at most a fifth of a small corpus


def test_prompt_is_a_config_group(make_cfg):
    """The default template is METHODS.md §5's; another template reaches every sequence, plain or chat."""
    from ladm.data import PROMPT

    cfg = make_cfg("pair=zh-lo")
    assert cfg.prompt.template == PROMPT
    custom = make_cfg("pair=zh-lo", "prompt.template='{src_name} → {tgt_name}: {src} ='")
    tokenizer = load_tokenizer(custom.model)
    plain = SequenceFormat.from_cfg(tokenizer, custom).prompt_ids(["你好"], custom.pair)
    assert plain == [tokenizer("Chinese → Lao: 你好 =").input_ids]
    chat_cfg = make_cfg("pair=zh-lo", "model=tiny-qwen2.5", "model.chat_template=true",
                        "prompt.template='{src_name} → {tgt_name}: {src} ='")
    chat_tokenizer = load_tokenizer(chat_cfg.model)
    expected = chat_tokenizer.apply_chat_template([{"role": "user", "content": "Chinese → Lao: 你好 ="}],
                                                  add_generation_prompt=True, tokenize=True, return_dict=False)
    assert SequenceFormat.from_cfg(chat_tokenizer, chat_cfg).prompt_ids(["你好"], chat_cfg.pair) == [list(expected)]
    for bad, message in (("'{source}'", "got {source}"), ("'no placeholder'", "got no {src}")):
        with pytest.raises(LadmError, match=re.escape(message)):
            SequenceFormat.from_cfg(tokenizer, make_cfg(f"prompt.template={bad}"))


NESTED = [{"id": 1, "translation": {"zh": "一", "lo": "ໜຶ່ງ"}}, {"id": 2, "translation": {"zh": "二", "lo": "ສອງ"}}]


def test_nested_jsonl_and_hugging_face_datasets(tmp_path):
    """JSONL records with nested `translation.{src,tgt}`; the same file through `datasets.load_dataset`."""
    from omegaconf import OmegaConf

    path = tmp_path / "nested.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in NESTED), encoding="utf-8")
    keys = {"src_key": "translation.zh", "tgt_key": "translation.lo"}
    jsonl = read_split(OmegaConf.create({"format": "jsonl", "path": str(path), **keys}))
    hf = read_split(OmegaConf.create({"format": "hf", "dataset": "json", "data_files": [str(path)], "split": "train",
                                      **keys}))
    assert jsonl == hf == ParallelCorpus(["一", "二"], ["ໜຶ່ງ", "ສອງ"])
    with pytest.raises(LadmError, match=r"record 1 lacks a non-empty string 'translation.zh_Hans' .*its keys: id, translation"):
        read_split(OmegaConf.create({"format": "hf", "dataset": "json", "data_files": [str(path)], "split": "train",
                                     "src_key": "translation.zh_Hans", "tgt_key": "translation.lo"}))
    with pytest.raises(LadmError, match="could not load dataset json, split validation"):
        read_split(OmegaConf.create({"format": "hf", "dataset": "json", "data_files": [str(path)], "split": "validation",
                                     **keys}))


def test_debug_fast_preset():
    from hydra import compose, initialize_config_dir

    from ladm import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        default, cfg = compose("config"), compose("config", overrides=["debug=fast"])
    assert default.logger.name == "wandb" and cfg.logger.name == "none"
    assert cfg.train.max_steps == 2 and cfg.eval.metrics == ["chrf++"]
    assert cfg.name == "debug" and cfg.data.validation_size == 0


def zip_one(path, name: str, text: str) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(name, text)


@pytest.mark.parametrize("damage,message", [
    (lambda f: f.write_bytes(b"PK\x03\x04garbage"), "is not a readable TMX memory (BadZipFile"),
    (lambda f: zip_one(f, "readme.txt", "x"), "holds no .tmx file"),
    (lambda f: zip_one(f, "all.en-km.tmx", "<tmx><body><tu tuid='1'"), "(ParseError"),
])
def test_a_damaged_translation_memory_is_one_line(tmp_path, damage, message):
    for lang in ("zh", "km"):
        damage(tmp_path / f"all.en-{lang}.tmx.zip")
    split = OmegaConf.create({"format": "tmx", "root": str(tmp_path), "src_lang": "zh", "tgt_lang": "km"})
    with pytest.raises(LadmError, match=re.escape(message)) as error:
        read_split(split)
    assert "\n" not in str(error.value) and "all.en-zh.tmx.zip" in str(error.value)
