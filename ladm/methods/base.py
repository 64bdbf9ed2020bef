"""The seam between the trainer and a method."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig

from ladm import LadmError
from ladm.distributed import DistEnv
from ladm.evaluation import EvalSet, Evaluator
from ladm.files import read_json
from ladm.models import safetensors_header, tensors_digest


def adapter_folders(folder: Path) -> list[Path]:
    """PEFT's layout: `default` at the top, other adapters in subfolders, each with an adapter_config.json."""
    folder = Path(folder)
    return ([folder] if (folder / "adapter_config.json").is_file() else []) + sorted(
        p.parent for p in folder.glob("*/adapter_config.json"))


def _same_model(a: str, b: str) -> bool:
    """Two names of one model: equal, or the same last path component (a hub id and its local copy)."""
    last = lambda name: Path(str(name).rstrip("/")).name.lower()
    return str(a) == str(b) or last(a) == last(b)


def check_pickled_weights(path: Path) -> None:
    """A pickled `adapter_model.bin` must load under torch's safe unpickler (`weights_only=True`, as PEFT loads it):
    one that would run code, or is damaged, is one line here, never a hint to turn the safe loader off."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError (code in the pickle), EOFError, RuntimeError: not loadable
        raise LadmError(f"{path} is not plain tensors that torch's safe loader accepts ({type(err).__name__}): ladm "
                        "never runs code from a weights file; save the adapter again (PEFT writes "
                        "adapter_model.safetensors)") from err


def check_peft_folder(folder: Path, model_path: str | None = None, allow_other_base: bool = False) -> None:
    """Before any model is loaded: every adapter in `folder` has a readable adapter_config.json and complete
    weights whose LoRA ranks match its config, and (given `model_path`) was trained on that model, unless
    `allow_other_base` (evaluate.allow_other_base=true)."""
    folders = adapter_folders(folder)
    if not folders:
        raise LadmError(f"{folder} holds no PEFT adapter (no adapter_config.json): give the adapter/ folder of a "
                        "run or a folder written by PEFT's save_pretrained")
    for adapter in folders:
        config = read_json(adapter / "adapter_config.json", "adapter config", "save the adapter again")
        if not isinstance(config, dict) or not isinstance(config.get("r", 0), int):
            raise LadmError(f"{adapter / 'adapter_config.json'} is not a PEFT adapter config: save the adapter again")
        weights = adapter / "adapter_model.safetensors"
        if not weights.is_file():
            if (adapter / "adapter_model.bin").is_file():
                check_pickled_weights(adapter / "adapter_model.bin")
                continue
            raise LadmError(f"{adapter} has no adapter_model.safetensors: save the adapter again")
        header = safetensors_header(weights)
        rank, patterns = config.get("r"), config.get("rank_pattern") or {}
        for key, entry in header.items():
            if key != "__metadata__" and "lora_A" in key and not patterns and entry["shape"][0] != rank:
                raise LadmError(f"{weights}: {key} has rank {entry['shape'][0]}, but its adapter_config.json says "
                                f"r={rank}: the files do not belong together; save the adapter again")
        base = config.get("base_model_name_or_path")
        if model_path and base and not allow_other_base and not _same_model(base, model_path):
            raise LadmError(f"{adapter} was trained on {base}, not on model.path={model_path}: evaluate it on its "
                            "own base model, or set evaluate.allow_other_base=true")


def load_peft_adapters(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """Every PEFT adapter saved in `folder` (PEFT's layout: `default` at the top, other names in subfolders),
    the first one active."""
    from peft import PeftModel

    folder = Path(folder)
    check_peft_folder(folder)
    found = adapter_folders(folder)
    names = ["default" if path == folder else path.name for path in found]
    model = PeftModel.from_pretrained(model, found[0], adapter_name=names[0])
    for path, name in zip(found[1:], names[1:], strict=True):
        model.load_adapter(path, adapter_name=name)
    return model.eval()


class Method:
    """A fine-tuning method, as the trainer sees it.

    (a) `prepare_model` wraps or edits the model; (b) `param_groups` builds the optimizer's
    parameter groups; (c) `after_backward` may act on gradients after backward and after any
    DDP all-reduce, before clipping; (d) `select_adapters` may switch adapters per batch; (e) `save`
    writes the trained state.
    """

    name: ClassVar[str]
    trains: ClassVar[bool] = True
    # DDP must be told when some trainable parameters sit idle in a step (multi-adapter methods).
    find_unused_parameters: ClassVar[bool] = False

    def __init__(self, cfg: DictConfig, dist: DistEnv | None = None):
        self.cfg = cfg
        self.dist = dist or DistEnv()

    @property
    def pairs(self) -> list[str]:
        """The language pairs one run trains and evaluates (most methods: `pair`)."""
        return [self.cfg.pair.name]

    def prepare_model(self, model: torch.nn.Module, tokenizer) -> torch.nn.Module:
        return model

    def param_groups(self, model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]

    def after_backward(self, model: torch.nn.Module) -> None:
        """Called once per optimizer step, with gradients already all-reduced."""

    def select_adapters(self, model: torch.nn.Module, pair: str) -> None:
        """Called before each forward with the batch's language pair."""

    def grad_norm_groups(self, model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
        """Named parameter sets whose gradient norms are logged per step."""
        return {}

    def save(self, model: torch.nn.Module, folder: Path) -> None:
        """The trained state, loadable onto the base model (PEFT methods: `PeftModel.from_pretrained`)."""
        model.save_pretrained(folder, save_embedding_layers=False)

    def load(self, model: torch.nn.Module, folder: Path) -> torch.nn.Module:
        """Put the state `save` wrote back on the base `model`, for evaluation."""
        return load_peft_adapters(model, folder)

    def trained_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Every tensor the method put on the base model (PEFT methods: all LoRA tensors of every adapter)."""
        return {name: p for name, p in model.named_parameters() if "lora_" in name}

    def state_digest(self, model: torch.nn.Module) -> str:
        """The identity of the trained state for the predictions' fingerprint: `trained_state` and every LoRA
        layer's scaling (LaDM's `forward` multipliers live there)."""
        scalings = {name: dict(sorted(m.scaling.items())) for name, m in model.named_modules()
                    if isinstance(getattr(m, "scaling", None), dict)}
        return tensors_digest(self.trained_state(model), scalings)

    def describe(self) -> dict[str, Any]:
        """What the method decided (e.g. per-layer multipliers), for results.json and W&B."""
        return {}

    def on_step(self, model: torch.nn.Module, step: int, optimizer: torch.optim.Optimizer, scheduler,
                last: bool) -> dict[str, float]:
        """Called after optimizer step `step` (its scheduler step taken); what it returns is logged at `step`."""
        return {}

    def trainer_state(self) -> dict[str, Any]:
        """What `on_step` changed, for the checkpoint (the optimizer and scheduler are saved by the trainer)."""
        return {}

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        """Restore `trainer_state` when training resumes."""

    merges: ClassVar[bool] = False  # one adapter for every pair, which PEFT can fold into the base weights

    def can_merge(self, model: torch.nn.Module) -> bool:
        """The method `merges` and the model carries PEFT adapters (a base model evaluated as it is has none)."""
        return self.merges and hasattr(model, "merge_adapter")

    @contextmanager
    def merged(self, model: torch.nn.Module) -> Iterator[None]:
        """The adapters folded into the base weights while the body runs (PEFT's `merge_adapter`, undone by
        `unmerge_adapter` after) where `can_merge`; as they are elsewhere."""
        if not self.can_merge(model):
            yield
            return
        model.merge_adapter()
        try:
            yield
        finally:
            model.unmerge_adapter()


def translate_test_sets(evaluator: Evaluator, method: Method, model: torch.nn.Module, test_sets: list[EvalSet],
                        merge_setting: bool | str) -> dict[str, dict[str, list[str]]]:
    """Every test set's hypotheses, with the adapters merged into the weights where `eval.merge_adapters` says
    so (auto: on a GPU, where generation then runs one matmul per projection) and the method allows it; the
    predictions record `merged_adapters`."""
    device = next(model.parameters()).device
    merge = (device.type == "cuda" if merge_setting == "auto" else bool(merge_setting)) and method.can_merge(model)
    if merge:
        evaluator.generated_by["merged_adapters"] = True
    with method.merged(model) if merge else nullcontext():
        return {eval_set.name: evaluator.translate(eval_set) for eval_set in test_sets}
