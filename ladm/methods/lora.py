"""LoRA through PEFT, on the configured projections of every decoder layer, in the variant `method.base` names:
`lora`, `dora` (use_dora), `rslora` (use_rslora), `pissa` / `olora` (init_lora_weights), `loraplus` (B's learning
rate × `method.loraplus_ratio`, grouped by PEFT's create_loraplus_optimizer)."""

from __future__ import annotations

import atexit
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model

from ladm import LadmError
from ladm.methods.base import Method
from ladm.models import NON_TEXT_MODULES

BASE_SWITCHES = {"lora": {}, "loraplus": {}, "dora": {"use_dora": True}, "rslora": {"use_rslora": True},
                 "pissa": {"init_lora_weights": "pissa"}, "olora": {"init_lora_weights": "olora"}}
# Variants that change the base weights at initialisation (W - BA): their adapters are saved converted to a plain
# LoRA on the unchanged base (PEFT's path_initial_model_for_weight_conversion), so ladm-eval can reload them.
MOVES_BASE_WEIGHTS = ("pissa", "olora")


def lora_config(method_cfg, **overrides) -> LoraConfig:
    """The PEFT `LoraConfig` of `method.{r, alpha, dropout, target_modules, base}` (`overrides` replace any of
    them); `text_only` restricts it to the language model of a vision-language model."""
    settings = dict(r=method_cfg.get("r"), lora_alpha=method_cfg.alpha, lora_dropout=method_cfg.dropout,
                    target_modules=list(OmegaConf.to_container(method_cfg.target_modules)), task_type="CAUSAL_LM",
                    **BASE_SWITCHES[method_cfg.get("base", "lora")])
    return LoraConfig(**(settings | overrides))


def text_only(config: LoraConfig, model: torch.nn.Module) -> LoraConfig:
    """Keep LoRA off a vision tower and projector (their attention maps share the decoder's names); set only where
    the model has them, since PEFT warns about an exclusion that matches nothing."""
    if any(re.fullmatch(NON_TEXT_MODULES, name) for name, _ in model.named_modules()):
        config.exclude_modules = NON_TEXT_MODULES
    return config


def loraplus_groups(model: torch.nn.Module, lr: float, weight_decay: float, ratio: float) -> list[dict[str, Any]]:
    """LoRA+'s parameter groups as PEFT builds them (B matrices at ratio × lr), without keeping its optimizer."""
    from peft.optimizers import create_loraplus_optimizer

    optimizer = create_loraplus_optimizer(model, optimizer_cls=torch.optim.SGD, lr=lr, loraplus_lr_ratio=ratio,
                                          weight_decay=weight_decay)
    return [{"params": list(g["params"]), "lr": g["lr"], "weight_decay": g["weight_decay"]}
            for g in optimizer.param_groups if g["params"]]


class LoRA(Method):
    name = "lora"
    merges = True  # LoRA, its variants and LaDM in every mode: the trained adapter is one W + s·BA per module

    def peft_model(self, model: torch.nn.Module, config: LoraConfig) -> torch.nn.Module:
        try:
            model = get_peft_model(model, text_only(config, model))
        except ValueError as err:
            raise LadmError(f"method.target_modules does not fit this model: {str(err).splitlines()[0]}") from err
        if self.cfg.method.get("base") in MOVES_BASE_WEIGHTS:  # the initial adapter, for the conversion on save
            self.initial_adapter = Path(tempfile.mkdtemp(prefix="ladm-initial-adapter-"))
            atexit.register(shutil.rmtree, self.initial_adapter, ignore_errors=True)  # a sweep leaves none behind
            model.save_pretrained(self.initial_adapter)
        return model

    def prepare_model(self, model: torch.nn.Module, tokenizer) -> torch.nn.Module:
        return self.peft_model(model, lora_config(self.cfg.method))

    def param_groups(self, model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        if self.cfg.method.get("base") == "loraplus":
            return loraplus_groups(model, lr, weight_decay, self.cfg.method.loraplus_ratio)
        return super().param_groups(model, lr, weight_decay)

    def save(self, model: torch.nn.Module, folder: Path) -> None:
        if self.cfg.method.get("base") in MOVES_BASE_WEIGHTS:
            model.save_pretrained(folder, save_embedding_layers=False,
                                  path_initial_model_for_weight_conversion=str(self.initial_adapter))
        else:
            super().save(model, folder)
