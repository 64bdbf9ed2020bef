"""Corpora, the translation prompt and collation (METHODS.md §5)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ladm import CONFIG_DIR, LadmError
from ladm.losses import IGNORE_INDEX

log = logging.getLogger(__name__)

PROMPT = "Translate the following {src_name} text into {tgt_name}.\n{src_name}: {src}\n{tgt_name}:"


@dataclass(frozen=True)
class ParallelCorpus:
    """Aligned source and target sentences of one language pair."""

    src: list[str]
    tgt: list[str]

    def __len__(self) -> int:
        return len(self.src)

    def head(self, n: int | None) -> ParallelCorpus:
        return self if n is None else ParallelCorpus(self.src[:n], self.tgt[:n])


def _read_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file (LF or CRLF); an absent, empty, binary or non-UTF-8 file is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise LadmError(f"data file not found: {path} (check data.root or the data.* paths)")
    raw = path.read_bytes()
    if not raw.strip():
        raise LadmError(f"data file {path} is empty: give a file with one example per line")
    if b"\0" in raw:
        raise LadmError(f"data file {path} is binary (it contains NUL bytes): give UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise LadmError(f"data file {path} is not UTF-8 (byte {err.start}, line {line}): convert it, "
                        f"e.g. iconv -f latin1 -t utf-8") from err
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n").removesuffix("\n").split("\n")


def _check_nonempty(lines: list[str], path: str) -> None:
    empty = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
        raise LadmError(f"{len(empty)} empty line(s) in {path} at line(s) {shown}: remove or fill them")


def _field(record: dict, key: str) -> object:
    """`record[key]`, where a dotted key reaches into nested objects (`translation.zh`)."""
    value: object = record
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _records(records, where: str, src_key: str, tgt_key: str, unit: str = "line") -> ParallelCorpus:
    """Parallel sentences from objects whose `src_key` and `tgt_key` (dotted for nested) are non-empty strings."""
    src, tgt = [], []
    for number, record in records:
        if not isinstance(record, dict):
            raise LadmError(f"{where} {unit} {number} is a JSON {type(record).__name__}, not an object with "
                            f"'{src_key}' and '{tgt_key}'")
        values = [_field(record, src_key), _field(record, tgt_key)]
        if not all(isinstance(v, str) and v.strip() for v in values):
            raise LadmError(f"{where} {unit} {number} lacks a non-empty string '{src_key}' or '{tgt_key}' "
                            f"(its keys: {', '.join(record)}; use a dotted key such as translation.zh for nested ones)")
        src.append(values[0])
        tgt.append(values[1])
    if not src:
        raise LadmError(f"{where} holds no records")
    return ParallelCorpus(src, tgt)


def _json_lines(path: str):
    """(line number, object) for each non-empty line of a JSONL file."""
    for number, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise LadmError(f"{path} line {number} is not JSON ({err.msg}): one object per line") from err


def _hf_dataset(split: DictConfig) -> ParallelCorpus:
    """A Hugging Face `datasets` split: a hub id (cached, or fetched when online) or a builder with data_files."""
    import datasets

    where = f"dataset {split.dataset}" + (f" ({split.config})" if split.get("config") else "") + f", split {split.split}"
    try:
        rows = datasets.load_dataset(split.dataset, split.get("config"), split=split.split,
                                     data_files=OmegaConf.to_container(split.data_files) if split.get("data_files") else None)
    except Exception as err:  # noqa: BLE001 - any loading failure is one line naming the dataset
        raise LadmError(f"could not load {where}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
                        "(check data.*.dataset/config/split; offline, the dataset must be in the datasets cache)") from err
    return _records(enumerate(rows, 1), where, split.get("src_key", "src"), split.get("tgt_key", "tgt"), unit="record")


def read_split(split: DictConfig) -> ParallelCorpus:
    """Read one split described by `data.train` or `data.test` (formats: text, tsv, jsonl)."""
    fmt = split.format
    if fmt == "text":
        src, tgt = _read_lines(split.src), _read_lines(split.tgt)
        if len(src) != len(tgt):
            raise LadmError(
                f"source and target differ in length: {split.src} has {len(src)} lines, "
                f"{split.tgt} has {len(tgt)}; they must be aligned line by line"
            )
        _check_nonempty(src, split.src)
        _check_nonempty(tgt, split.tgt)
        return ParallelCorpus(src, tgt)
    if fmt == "tsv":
        rows = [line.split("\t") for line in _read_lines(split.path)]
        bad = [i + 1 for i, row in enumerate(rows) if len(row) != 2 or not all(c.strip() for c in row)]
        if bad:
            raise LadmError(f"{split.path}: line(s) {bad[:10]} are not 'source<TAB>target' with both sides non-empty")
        return ParallelCorpus([r[0] for r in rows], [r[1] for r in rows])
    if fmt == "jsonl":
        return _records(_json_lines(split.path), split.path, split.get("src_key", "src"), split.get("tgt_key", "tgt"))
    if fmt == "hf":
        return _hf_dataset(split)
    if fmt == "tmx":
        return _pivot_memories(Path(split.root), split.src_lang, split.tgt_lang, split.get("pivot", "en"))
    raise LadmError(f"unknown data format '{fmt}': use text, tsv, jsonl, hf or tmx")


def _tmx_segments(path: Path, lang: str) -> dict[str, str]:
    """tuid → the `lang` segment of every translation unit of a TMX file (plain or zipped)."""
    import xml.etree.ElementTree as ET
    import zipfile

    try:
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as archive:
                inside = [n for n in archive.namelist() if n.endswith(".tmx")]
                if not inside:
                    raise LadmError(f"{path} holds no .tmx file: give a zip of one TMX memory (TICO-19's layout)")
                raw = archive.read(inside[0])
        else:
            raw = path.read_bytes()
        root = ET.fromstring(raw)
    except (OSError, zipfile.BadZipFile, ET.ParseError, EOFError) as err:
        raise LadmError(f"{path} is not a readable TMX memory ({type(err).__name__}: {err}): download or unpack it "
                        "again") from err
    lang_key = "{http://www.w3.org/XML/1998/namespace}lang"
    segments = {}
    for unit in root.iter("tu"):
        for variant in unit.iter("tuv"):
            seg = variant.find("seg")
            if variant.get(lang_key, variant.get("lang")) == lang and seg is not None and unit.get("tuid"):
                segments[unit.get("tuid")] = " ".join("".join(seg.itertext()).split())
    return segments


def _pivot_memories(root: Path, src: str, tgt: str, pivot: str) -> ParallelCorpus:
    """A src→tgt corpus from pivot-language translation memories `<root>/all.<pivot>-<lang>.tmx[.zip]` (TICO-19's
    layout), aligned by translation-unit id in the order of the first memory."""
    if src == tgt:
        raise LadmError(f"a {src}→{tgt} test set needs two different languages")

    def memory(lang: str) -> Path:
        other = (src if tgt == pivot else tgt) if lang == pivot else lang  # the pivot side reads the other's memory
        found = [path for ext in (".zip", "") if (path := root / f"all.{pivot}-{other}.tmx{ext}").is_file()]
        if not found:
            have = sorted(p.name.split(".")[1].split("-")[-1] for p in root.glob(f"all.{pivot}-*.tmx*"))
            raise LadmError(f"{root} has no translation memory for '{other}' (all.{pivot}-{other}.tmx.zip); it covers "
                            f"{', '.join([pivot, *have]) or 'nothing'}: choose another test set for this pair")
        return found[0]

    sides = [_tmx_segments(memory(lang), lang) for lang in (src, tgt)]
    ids = [tuid for tuid in sides[0] if tuid in sides[1] and sides[0][tuid] and sides[1][tuid]]
    if not ids:
        raise LadmError(f"the {src} and {tgt} memories under {root} share no translation units")
    return ParallelCorpus([sides[0][i] for i in ids], [sides[1][i] for i in ids])


def hold_out(corpus: ParallelCorpus, size: int, seed: int) -> tuple[ParallelCorpus, ParallelCorpus]:
    """(training, validation): a seeded slice of `size` sentences (at most a fifth of the corpus) removed from
    the training data, in their original order. `size` 0 gives an empty validation set."""
    size = min(size, len(corpus) // 5)
    chosen = set(torch.randperm(len(corpus), generator=torch.Generator().manual_seed(seed))[:size].tolist())
    keep = [i for i in range(len(corpus)) if i not in chosen]
    held = sorted(chosen)
    return (ParallelCorpus([corpus.src[i] for i in keep], [corpus.tgt[i] for i in keep]),
            ParallelCorpus([corpus.src[i] for i in held], [corpus.tgt[i] for i in held]))


def training_data(cfg: DictConfig, pair_cfgs: dict[str, DictConfig]) -> tuple[dict[str, ParallelCorpus], ...]:
    """Per pair, the training corpus (`data.max_train_samples`) and the validation slice held out of it
    (`data.validation_size` sentences, seed 0, so every run of a pair holds out the same ones)."""
    held_out = {name: hold_out(read_split(c.data.train), cfg.data.validation_size, seed=0) for name, c in pair_cfgs.items()}
    return ({name: train.head(cfg.data.max_train_samples) for name, (train, _) in held_out.items()},
            {name: valid for name, (_, valid) in held_out.items()})


def pair_config(cfg: DictConfig, name: str) -> DictConfig:
    """A copy of `cfg` with `pair` set to conf/pair/<name>.yaml, so `data.*` paths re-resolve for it."""
    if name == cfg.pair.name:
        return cfg
    path = CONFIG_DIR / "pair" / f"{name}.yaml"
    if not path.is_file():
        raise LadmError(f"unknown pair '{name}': choose one of {', '.join(sorted(p.stem for p in path.parent.glob('*.yaml')))}")
    copy = cfg.copy()
    OmegaConf.set_struct(copy, False)
    copy.pair = OmegaConf.load(path)
    return copy


def test_set_configs(pair_cfg: DictConfig) -> list[DictConfig]:
    """The test splits a run evaluates for one pair: `data.test` when `eval.test_sets` is null, otherwise each
    named conf/test_set/<name>.yaml, resolved against this pair."""
    if pair_cfg.eval.get("test_sets") is None:
        return [pair_cfg.data.test]
    folder = CONFIG_DIR / "test_set"
    available = sorted(p.stem for p in folder.glob("*.yaml"))
    splits = []
    for name in pair_cfg.eval.test_sets:
        if name not in available:
            raise LadmError(f"unknown test set '{name}' in eval.test_sets: choose from {', '.join(available)}")
        with_set = pair_cfg.copy()
        OmegaConf.set_struct(with_set, False)
        with_set.test_set = OmegaConf.load(folder / f"{name}.yaml")
        splits.append(with_set.test_set)
    if len({split.name for split in splits}) < len(splits):
        raise LadmError(f"eval.test_sets names a test set twice: {list(pair_cfg.eval.test_sets)}")
    return splits


def render_prompt(src: str, pair_cfg: DictConfig, template: str = PROMPT) -> str:
    """The prompt of METHODS.md §5 (conf/prompt/default.yaml; `prompt.template`), before any chat template."""
    return template.format(src_name=pair_cfg.src.name, tgt_name=pair_cfg.tgt.name, src=src)


def check_prompt_template(template: str) -> None:
    """A template must place the source ({src}) and may name the languages ({src_name}, {tgt_name})."""
    import string

    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:  # an unmatched brace
        raise LadmError(f"prompt.template {template!r} is not a format string ({err}): write a literal brace as {{{{ or }}}}, "
                        "the fields as {src}, {src_name}, {tgt_name}") from err
    unknown = fields - {"src", "src_name", "tgt_name"}
    if unknown or "src" not in fields:
        raise LadmError(f"prompt.template must contain {{src}} and may use {{src_name}} and {{tgt_name}}, got "
                        f"{', '.join('{' + f + '}' for f in sorted(unknown)) or 'no {src}'}: fix conf/prompt or the override")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_prompt(self) -> int:
        return sum(label == IGNORE_INDEX for label in self.labels)


class SequenceFormat:
    """The token sequences one model sees in training, probing and generation (METHODS.md §5).

    Plain: the tokenizer's own special tokens (one BOS where the model uses one) + prompt, then
    " " + target closed by the tokenizer's EOS. Chat template: exactly the tokens of
    `apply_chat_template` for the user turn with the generation prompt, then the assistant's answer
    as the template writes it, up to and including the template's end-of-turn token (Llama-3
    `<|eot_id|>`, Qwen2.5 `<|im_end|>`, Gemma-2 `<end_of_turn>`).
    """

    def __init__(self, tokenizer, chat_template: bool = False, template_kwargs: dict | None = None,
                 prompt: str = PROMPT):
        check_prompt_template(prompt)
        self.prompt = prompt
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.template_kwargs = dict(template_kwargs or {})
        self.end_id = self._end_of_turn() if chat_template else tokenizer.eos_token_id

    @classmethod
    def from_cfg(cls, tokenizer, cfg: DictConfig) -> SequenceFormat:
        """From the composed config: `model.chat_template(_kwargs)` and `prompt.template`."""
        kwargs = cfg.model.get("chat_template_kwargs")
        return cls(tokenizer, cfg.model.chat_template, None if kwargs is None else OmegaConf.to_container(kwargs, resolve=True),
                   cfg.prompt.template)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  **self.template_kwargs)

    def _end_of_turn(self) -> int:
        """The first special token the template writes after an assistant answer."""
        user = [{"role": "user", "content": "x"}]
        prompt = self._render(user, True)
        full = self._render(user + [{"role": "assistant", "content": "y"}], False)
        if not full.startswith(prompt) or full[len(prompt)] != "y":
            raise LadmError("this chat template does not write the answer right after its generation prompt: "
                            "set model.chat_template=false")
        special = {i for i, token in self.tokenizer.added_tokens_decoder.items() if token.special}
        closing = [i for i in self.tokenizer(full[len(prompt) + 1:], add_special_tokens=False).input_ids if i in special]
        if not closing:
            raise LadmError("this chat template closes an answer with no special token, so generation could not stop: "
                            "set model.chat_template=false")
        return closing[0]

    def prompt_texts(self, sources: list[str], pair_cfg: DictConfig) -> list[str]:
        prompts = [render_prompt(src, pair_cfg, self.prompt) for src in sources]
        if self.chat_template:
            prompts = [self._render([{"role": "user", "content": p}], True) for p in prompts]
        return prompts

    def prompt_ids(self, sources: list[str], pair_cfg: DictConfig) -> list[list[int]]:
        """Tokenised prompts; a chat template writes its own BOS, so no special tokens are added then."""
        if not sources:  # e.g. an empty validation slice (data.validation_size=0)
            return []
        return self.tokenizer(self.prompt_texts(sources, pair_cfg), add_special_tokens=not self.chat_template).input_ids

    def answer_ids(self, sources: list[str], targets: list[str], pair_cfg: DictConfig) -> list[list[int]]:
        """Tokenised answers, each closed by `end_id`."""
        if not self.chat_template:
            answers = self.tokenizer([" " + t for t in targets], add_special_tokens=False).input_ids
            return [ids + [self.end_id] for ids in answers]
        texts = []
        for src, tgt in zip(sources, targets, strict=True):
            user = [{"role": "user", "content": render_prompt(src, pair_cfg, self.prompt)}]
            prompt = self._render(user, True)
            texts.append(self._render(user + [{"role": "assistant", "content": tgt}], False)[len(prompt):])
        answers = self.tokenizer(texts, add_special_tokens=False).input_ids
        return [ids[:ids.index(self.end_id) + 1] for ids in answers]

    def encode(self, corpus: ParallelCorpus, pair_cfg: DictConfig) -> list[Example]:
        """Prompt + answer, the loss on the answer and its closing token only; not truncated."""
        prompts = self.prompt_ids(corpus.src, pair_cfg)
        answers = self.answer_ids(corpus.src, corpus.tgt, pair_cfg)
        return [Example(p + a, [IGNORE_INDEX] * len(p) + a) for p, a in zip(prompts, answers, strict=True)]

    def stop_ids(self, generation_config) -> list[int]:
        """Every end token of the model's generation config, the tokenizer's EOS and the closing token."""
        listed = generation_config.eos_token_id
        listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
        return sorted({*listed, self.tokenizer.eos_token_id, self.end_id})


def quantile_length(lengths: list[int], coverage: float) -> int:
    """The smallest length that at least `coverage` of `lengths` fit in."""
    ordered = sorted(lengths)
    return ordered[max(math.ceil(coverage * len(ordered)) - 1, 0)]


def truncate(examples: list[Example], max_length: int) -> tuple[list[Example], list[bool]]:
    """Cut the answers of examples longer than `max_length`; returns the examples and which were cut."""
    out, cut = [], []
    for e in examples:
        if e.n_prompt >= max_length:
            raise LadmError(f"a prompt of {e.n_prompt} tokens leaves no room for the target under "
                            f"train.max_length={max_length}: raise train.max_length")
        cut.append(len(e.input_ids) > max_length)
        if cut[-1]:
            e = Example(e.input_ids[:max_length], e.labels[:max_length])
        out.append(e)
    return out, cut


def collate(examples: list[Example], pad_token_id: int) -> dict:
    """Right-pad a training batch; padding is masked out of attention and loss."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def left_pad(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows for generation and probing; returns input ids and the attention mask."""
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row)
        attention_mask[i, width - len(row):] = 1
    return input_ids, attention_mask


def training_max_length(max_length: int | str, coverage: float, context: int, examples: dict[str, list[Example]]) -> int:
    """`train.max_length`: as given, or (`auto`) the length that fits `coverage` of every pair's examples;
    capped by the context."""
    if max_length == "auto":
        max_length = max(quantile_length([len(e.input_ids) for e in pair_examples], coverage)
                         for pair_examples in examples.values())
    return min(max_length, context)


@dataclass(frozen=True)
class LengthBudgets:
    """`train.max_length` and, per pair, `eval.max_new_tokens` (METHODS.md §5, lengths)."""

    max_length: int
    max_new_tokens: dict[str, int]

    @classmethod
    def choose(cls, max_length: int | str, coverage: float, max_new_tokens: int | str, margin: float, context: int,
               examples: dict[str, list[Example]], prompts: dict[str, list[list[int]]]) -> LengthBudgets:
        """`auto`: the training budget fits `coverage` of every pair's examples; the generation budget is
        `margin` × the longest answer of the pair's training examples. Both are capped by the context."""
        new_tokens = {}
        for pair, pair_prompts in prompts.items():
            room = context - max(map(len, pair_prompts), default=0)
            if max_new_tokens == "auto":
                longest = max((len(e.input_ids) - e.n_prompt for e in examples[pair]), default=0)
                new_tokens[pair] = max(1, min(math.ceil(margin * longest), room))
            else:
                new_tokens[pair] = min(max_new_tokens, room)
        return cls(training_max_length(max_length, coverage, context, examples), new_tokens)


def share(flags: list[bool]) -> dict[str, float | int]:
    """How many of `flags` are set, and their share."""
    return {"count": sum(flags), "of": len(flags), "share": sum(flags) / max(len(flags), 1)}
