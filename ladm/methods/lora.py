"""Plain LoRA through PEFT, on the configured projections of every decoder layer."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model

from ladm import LadmError
from ladm.methods.base import Method
from ladm.models import NON_TEXT_MODULES


def lora_config(method_cfg, **overrides) -> LoraConfig:
    """The PEFT `LoraConfig` of `method.{r, alpha, dropout, target_modules}` (`overrides` replace any of them), on
    the language model only."""
    settings = dict(r=method_cfg.get("r"), lora_alpha=method_cfg.alpha, lora_dropout=method_cfg.dropout,
                    target_modules=list(OmegaConf.to_container(method_cfg.target_modules)), task_type="CAUSAL_LM",
                    exclude_modules=NON_TEXT_MODULES)
    return LoraConfig(**(settings | overrides))


class LoRA(Method):
    name = "lora"

    def prepare_model(self, model: torch.nn.Module, tokenizer) -> torch.nn.Module:
        try:
            return get_peft_model(model, lora_config(self.cfg.method))
        except ValueError as err:
            raise LadmError(f"method.target_modules does not fit this model: {str(err).splitlines()[0]}") from err
