"""Model and tokenizer loading by `model.path` (a hub id or a local directory).

With `model.random_init` set, the model is built from the config.json at `model.path` with the given
sizes and random weights (seeded; no weights are read): the test models keep the real vocabulary,
special tokens, chat template and generation config of their family.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PretrainedConfig

from ladm import LadmError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or Path(path).exists()


def _resolve(path: str) -> str:
    return str(Path(path).expanduser()) if _looks_local(str(path)) else str(path)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")


def check_model_path(model_cfg: DictConfig) -> None:
    """Fail early on a local `model.path` that is not a loadable model folder: no config, no tokenizer, no
    weights (unless `random_init`), or a truncated safetensors file. Hub ids are left to transformers."""
    path = model_cfg.path
    if path is None:
        raise LadmError(f"model.path of {model_cfg.name} is not set: give a hub id or a local model directory")
    if not _looks_local(str(path)):
        return
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise LadmError(f"model.path does not exist: {path} (give a local model directory or a hub id)")
    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LadmError(f"model.path {path} has no readable config.json ({type(err).__name__}): "
                        "give a complete model folder (save_pretrained or a hub download)") from err
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise LadmError(f"model.path {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): "
                        "save the tokenizer into the model folder")
    if model_cfg.get("random_init"):
        return
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not weights:
        raise LadmError(f"model.path {path} has no weights (*.safetensors or pytorch_model*.bin): "
                        "download or save the model's weights there")
    for file in weights:
        if file.suffix == ".safetensors":
            _check_safetensors(file)


def _check_safetensors(file: Path) -> None:
    """The header parses and the file is as long as the header says (a truncated download is refused)."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length)) if 0 < length < size else None
        end = max((t["data_offsets"][1] for k, t in (header or {}).items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LadmError(f"{file} is not a readable safetensors file ({type(err).__name__}): download it again") from err
    if header is None or 8 + length + end != size:
        raise LadmError(f"{file} is truncated or corrupt ({size:,} bytes, its header describes "
                        f"{8 + length + end:,}): download it again")


def load_tokenizer(model_cfg: DictConfig):
    """The tokenizer of `model.path`; a missing pad token becomes EOS."""
    check_model_path(model_cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(_resolve(model_cfg.path))
    except OSError as err:
        raise LadmError(f"cannot load the tokenizer of {model_cfg.path}: {str(err).splitlines()[0]} "
                        "(download it first, or set model.path to a local directory)") from err
    if model_cfg.chat_template and not tokenizer.chat_template:
        raise LadmError(f"model.chat_template=true, but the tokenizer of {model_cfg.path} has no chat template: "
                        "set model.chat_template=false (base models) or use the instruct model's tokenizer")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer has no pad token: using the EOS token %r for padding", tokenizer.eos_token)
    return tokenizer


def model_config(model_cfg: DictConfig) -> PretrainedConfig:
    """The transformers config of `model.path`, resized by `model.random_init.config` (no weights read)."""
    check_model_path(model_cfg)
    try:
        values, _ = PretrainedConfig.get_config_dict(_resolve(model_cfg.path))
    except OSError as err:
        raise LadmError(f"cannot read the config of {model_cfg.path}: {str(err).splitlines()[0]} "
                        "(download the model first, or set model.path to a local directory)") from err
    if model_cfg.get("random_init"):
        # Resized before the config is built, so derived fields (e.g. per-layer attention types) follow.
        values |= OmegaConf.to_container(model_cfg.random_init.config, resolve=True)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    config._attn_implementation = model_cfg.attn_implementation
    return config


def load_model(model_cfg: DictConfig, tokenizer) -> torch.nn.Module:
    """`from_pretrained(model.path)`, or a random-weight model from its resized config (seeded)."""
    dtype = DTYPES[model_cfg.dtype]
    path = _resolve(model_cfg.path)
    if model_cfg.get("random_init"):
        with torch.random.fork_rng():
            torch.manual_seed(model_cfg.random_init.seed)
            model = AutoModelForCausalLM.from_config(model_config(model_cfg), dtype=dtype)
        if (Path(path) / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(path)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                         attn_implementation=model_cfg.attn_implementation)
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


def context_length(model_cfg: DictConfig) -> int:
    """The longest sequence the model takes (`max_position_embeddings`), from the config alone."""
    return int(model_config(model_cfg).get_text_config().max_position_embeddings)


def tensors_digest(tensors: dict[str, torch.Tensor], extra: object = None) -> str:
    """sha256 of every tensor (name, dtype, shape, every byte) in name order, and of `extra` (JSON): the identity
    of a trained state (adapters, LANDeRMT deltas) for the predictions' fingerprint."""
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


SAMPLED_ENTRIES = 4096


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap fingerprint of loaded base weights: every tensor's name, dtype and shape, and the values of up to
    4,096 evenly spaced entries of each (a few MB read for an 8B model, on its device). Any checkpoint, random
    initialisation or de-quantisation gives its own; a change confined to unsampled entries would go unseen."""
    sampled = {}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.reshape(-1)
            if flat.numel() > SAMPLED_ENTRIES:
                flat = flat[torch.linspace(0, flat.numel() - 1, SAMPLED_ENTRIES, device=flat.device).long()]
            sampled[f"{name}|{tuple(tensor.shape)}"] = flat
    return tensors_digest(sampled)


def base_identity(model_cfg: DictConfig, model: torch.nn.Module) -> dict[str, object]:
    """What the base model of a generation was: its config entry and its weights' fingerprint (before adapters)."""
    return {"name": model_cfg.name, "path": str(model_cfg.path), "revision": model_cfg.get("revision"),
            "dtype": str(next(model.parameters()).dtype), "attention": model.config._attn_implementation,
            "weights": weights_fingerprint(model)}
