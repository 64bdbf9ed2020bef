"""The seam between the trainer and a method."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig

from ladm import LadmError
from ladm.distributed import DistEnv
from ladm.models import tensors_digest


def load_peft_adapters(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """Every PEFT adapter saved in `folder` (PEFT's layout: `default` at the top, other names in subfolders),
    the first one active."""
    from peft import PeftModel

    folder = Path(folder)
    found = ([folder] if (folder / "adapter_config.json").is_file() else []) + sorted(
        p.parent for p in folder.glob("*/adapter_config.json"))
    if not found:
        raise LadmError(f"{folder} holds no PEFT adapter (no adapter_config.json): give the adapter/ folder of a "
                        "run or a folder written by PEFT's save_pretrained")
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
