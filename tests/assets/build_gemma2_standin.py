"""Build `gemma2/tokenizer.json`: a stand-in for Gemma-2's SentencePiece tokenizer, whose model file is
not obtainable offline (see SOURCES.md).

It keeps what our code depends on: the 217 added tokens of the real `tokenizer_config.json` at their real
ids (`<pad>` 0, `<eos>` 1, `<bos>` 2, `<start_of_turn>` 106, `<end_of_turn>` 107, ...), the byte-fallback
pieces `<0x00>`…`<0xFF>` at ids 217–472 as in Gemma's vocabulary, `▁` for spaces, and BOS added by the
post-processor (`add_bos_token: true`). Its other pieces are the single characters of the shipped FLORES-200
dev text and no merges, so a word is split into its characters (any other character into its UTF-8
bytes): Lao, Khmer and Burmese get one piece per character, more pieces than Gemma's own tokenizer gives.
Deterministic; run `python tests/assets/build_gemma2_standin.py` to rebuild.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

HERE = Path(__file__).resolve().parent / "gemma2"
FLORES_DEV = Path(__file__).resolve().parents[2] / "data" / "flores200" / "dev"
FIRST_BYTE_ID = 217


def build() -> Tokenizer:
    config = json.loads((HERE / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = {int(i): token for i, token in config["added_tokens_decoder"].items()}
    assert sorted(added) == list(range(FIRST_BYTE_ID)), "the added tokens must fill ids 0..216"
    vocab = {token["content"]: i for i, token in added.items()}
    vocab |= {f"<0x{b:02X}>": FIRST_BYTE_ID + b for b in range(256)}
    characters = set("▁")
    for path in sorted(FLORES_DEV.glob("*.dev")):
        characters |= set(path.read_text(encoding="utf-8").replace(" ", "▁").replace("\n", ""))
    for character in sorted(characters - set(vocab)):
        vocab[character] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_tokens([AddedToken(t["content"], special=t["special"], normalized=t["normalized"],
                                     lstrip=t["lstrip"], rstrip=t["rstrip"], single_word=t["single_word"])
                          for _, t in sorted(added.items())])
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                             special_tokens=[("<bos>", 2)])
    return tokenizer


if __name__ == "__main__":
    build().save(str(HERE / "tokenizer.json"))
    print(f"wrote {HERE / 'tokenizer.json'}")
