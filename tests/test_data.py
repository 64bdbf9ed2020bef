"""Prompt, loss masking, truncation and corpus readers (METHODS.md §5)."""

import json
import re

import pytest

from ladm import LadmError
from ladm.data import ParallelCorpus, SequenceFormat, collate, read_split, render_prompt, truncate
from ladm.models import load_tokenizer


def test_prompt_matches_methods_md(make_cfg):
    cfg = make_cfg("pair=zh-km")
    assert render_prompt("你好", cfg.pair) == "Translate the following Chinese text into Khmer.\nChinese: 你好\nKhmer:"


def test_long_answers_are_truncated_and_counted(make_cfg):
    cfg = make_cfg()
    fmt = SequenceFormat.from_cfg(load_tokenizer(cfg.model), cfg.model)
    examples = fmt.encode(ParallelCorpus(["你好", "你好"], ["ສະບາຍດີ", "ສະບາຍດີ " * 50]), cfg.pair)
    cut_examples, cut = truncate(examples, 40)
    assert cut == [False, True]
    assert cut_examples[1].input_ids == examples[1].input_ids[:40] and cut_examples[0] == examples[0]


def test_prompt_longer_than_max_length_is_an_error(make_cfg):
    cfg = make_cfg()
    fmt = SequenceFormat.from_cfg(load_tokenizer(cfg.model), cfg.model)
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
