"""Model and tokenizer loading: real checkpoints by `model.path`, tiny random models by config."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerFast

from ladm import REPO_ROOT, LadmError

log = logging.getLogger(__name__)

TOKENIZER_CORPUS = sorted((REPO_ROOT / "data" / "flores200" / "dev").glob("*.dev"))
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or Path(path).exists()


def _resolve(path: str) -> str:
    return str(Path(path).expanduser()) if _looks_local(str(path)) else str(path)


def check_model_path(model_cfg: DictConfig) -> None:
    """Fail early on a local `model.path` that does not exist (hub ids are left to transformers)."""
    path = model_cfg.path
    if path is not None and _looks_local(str(path)) and not Path(path).expanduser().is_dir():
        raise LadmError(f"model.path does not exist: {path} (give a local model directory or a hub id)")


def build_tiny_tokenizer(vocab_size: int, cache_dir: str | Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the shipped FLORES-200 dev text; deterministic and cached."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    digest = hashlib.sha256(str(vocab_size).encode())
    for path in TOKENIZER_CORPUS:
        digest.update(path.read_bytes())
    target = Path(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{digest.hexdigest()[:12]}"
    if (target / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(target)
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(p) for p in TOKENIZER_CORPUS], trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    fast.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic; a concurrent builder may have won the race
    except OSError:
        shutil.rmtree(tmp)
    return PreTrainedTokenizerFast.from_pretrained(target)


def load_tokenizer(model_cfg: DictConfig, cache_dir: str | Path):
    """The tokenizer of `model.path`, or the offline tiny one; a missing pad token becomes EOS."""
    if model_cfg.path is None:
        tokenizer = build_tiny_tokenizer(model_cfg.tiny.vocab_size, cache_dir)
    else:
        check_model_path(model_cfg)
        try:
            tokenizer = AutoTokenizer.from_pretrained(_resolve(model_cfg.path))
        except OSError as err:
            raise LadmError(f"cannot load the tokenizer of {model_cfg.path}: {str(err).splitlines()[0]} "
                            "(download it first, or set model.path to a local directory)") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        log.warning("tokenizer has no pad token: using the EOS token %r for padding", tokenizer.eos_token)
    return tokenizer


def model_config(model_cfg: DictConfig, tokenizer=None) -> PretrainedConfig:
    """The transformers config of `model.path`, or of the tiny model `model.tiny` (no weights read)."""
    if model_cfg.path is None:
        spec = OmegaConf.to_container(model_cfg.tiny, resolve=True)
        spec.pop("init_seed")
        special = {} if tokenizer is None else {"bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id,
                                                "eos_token_id": tokenizer.eos_token_id}
        config = AutoConfig.for_model(spec.pop("model_type"), **spec, **special)
        config._attn_implementation = model_cfg.attn_implementation
        return config
    check_model_path(model_cfg)
    try:
        return AutoConfig.from_pretrained(_resolve(model_cfg.path))
    except OSError as err:
        raise LadmError(f"cannot read the config of {model_cfg.path}: {str(err).splitlines()[0]} "
                        "(download the model first, or set model.path to a local directory)") from err


def load_model(model_cfg: DictConfig, tokenizer) -> torch.nn.Module:
    """`from_pretrained(model.path)`, or a tiny random model from `model.tiny` (seeded)."""
    dtype = DTYPES[model_cfg.dtype]
    if model_cfg.path is None:
        with torch.random.fork_rng():
            torch.manual_seed(model_cfg.tiny.init_seed)
            model = AutoModelForCausalLM.from_config(model_config(model_cfg, tokenizer), dtype=dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                _resolve(model_cfg.path), dtype=dtype, attn_implementation=model_cfg.attn_implementation
            )
        except OSError as err:
            raise LadmError(f"cannot load model {model_cfg.path}: {str(err).splitlines()[0]}") from err
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a (possibly PEFT-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def num_layers(model_cfg: DictConfig) -> int:
    """The decoder layer count from the config alone (no weights loaded)."""
    return int(model_config(model_cfg).get_text_config().num_hidden_layers)
