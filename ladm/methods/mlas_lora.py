"""MLAS-LoRA (METHODS.md §3): a language-general LoRA plus one language-specific LoRA per pair on the
student, initialised by SVD from submatrices of a teacher's language-aware neurons (eqs. 7–8);
per batch the general and that pair's specific LoRA are active and trained (eq. 9)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig
from peft import LoraConfig, get_peft_model

from ladm import LadmError
from ladm.distributed import DistEnv
from ladm.methods.base import Method
from ladm.models import decoder_layers

log = logging.getLogger(__name__)
OFFSET = "_offset"


def check_mlas_cfg(cfg: DictConfig) -> None:
    """Reject impossible combinations before anything is loaded (teacher shapes from configs only); each
    value on its own is checked by `ladm.schema`."""
    from ladm.awareness import check_teacher
    from ladm.data import pair_config

    method = cfg.method
    pairs = list(method.pairs)
    if not pairs or len(set(pairs)) != len(pairs):
        raise LadmError(f"method.pairs must list distinct pairs, got {pairs}")
    for pair in pairs:
        pair_config(cfg, pair)
    if len(pairs) == 1:
        log.warning("method.pairs has a single pair: its specific LoRA duplicates the general one")
    elif method["lambda"] <= 1 / len(pairs):
        log.warning("method.lambda=%s ≤ 1/%d (the uniform share over %d pairs): every neuron is language-specific",
                    method["lambda"], len(pairs), len(pairs))
    if method.init == "teacher" and method.adapters == "single" and method.neurons in ("split", "specific"):
        raise LadmError(f"method.neurons={method.neurons} needs per-pair adapters; with adapters=single use all or general")
    if method.init == "teacher":
        check_teacher(cfg)


class MLASLoRA(Method):
    name = "mlas_lora"
    find_unused_parameters = True  # the other pairs' specific adapters sit idle in a step

    def __init__(self, cfg: DictConfig, dist: DistEnv | None = None):
        super().__init__(cfg, dist)
        check_mlas_cfg(cfg)
        self.summary: dict[str, Any] = {}

    @property
    def pairs(self) -> list[str]:
        return list(self.cfg.method.pairs)

    def adapters_for(self, pair: str) -> list[str]:
        layout = self.cfg.method.adapters
        return {"general+specific": ["general", f"pair_{pair}"], "specific": [f"pair_{pair}"], "single": ["shared"]}[layout]

    @property
    def adapter_names(self) -> list[str]:
        return list(dict.fromkeys(name for pair in self.pairs for name in self.adapters_for(pair)))

    def _rank(self, adapter: str) -> int:
        return self.cfg.method.r_spe if adapter.startswith("pair_") else self.cfg.method.r_gen

    def _lora_config(self, adapter: str) -> LoraConfig:
        rank = self._rank(adapter)
        # Teacher initialisation sets B·A itself, so the LoRA scaling must be 1 (alpha = r).
        alpha = rank if self.cfg.method.init == "teacher" else self.cfg.method.alpha
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=self.cfg.method.dropout, task_type="CAUSAL_LM",
                          target_modules=list(self.cfg.method.target_modules))

    def _source(self, adapter: str) -> str:
        """Which extracted submatrix initialises `adapter` (`method.neurons`)."""
        neurons = self.cfg.method.neurons
        pair = adapter.removeprefix("pair_")
        if neurons == "all":
            return "all"
        if neurons == "general" or adapter == "general":
            return "gen"
        return f"spe.{pair}"

    def prepare_model(self, model: torch.nn.Module, tokenizer) -> torch.nn.Module:
        from ladm.awareness import load_or_compute

        device = next(model.parameters()).device
        names = self.adapter_names
        model = get_peft_model(model, self._lora_config(names[0]), adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, self._lora_config(name))
        if self.cfg.method.init == "teacher":
            factors, self.summary = load_or_compute(self.cfg, tokenizer, device, self.dist.is_main, self.dist.barrier)
            self._initialise_from_teacher(model, factors)
        # Every trainable adapter must require grad when DDP wraps the model, or DDP never syncs it;
        # select_adapters() narrows this per batch.
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(OFFSET not in name)
        return model

    def _initialise_from_teacher(self, model: torch.nn.Module, factors: dict[str, torch.Tensor]) -> None:
        """Eqs. 7–8: W_s = UΣVᵀ → B = U[:, :r]Σ[:r, :r], A = Vᵀ[:r, :] (the stage's rank-R factors, cut to r);
        `subtract` adds frozen −B·A twins."""
        subtract = self.cfg.method.init_offset == "subtract"
        if subtract:
            for name in self.adapter_names:
                model.add_adapter(name + OFFSET, self._lora_config(name))
        for k, layer in enumerate(decoder_layers(model)):
            for target in self.cfg.method.target_modules:
                for path, module in layer.named_modules():
                    if path.split(".")[-1] != target or not hasattr(module, "lora_A"):
                        continue
                    for name in self.adapter_names:
                        prefix, r = f"layer{k}.{path}.{self._source(name)}", self._rank(name)
                        like = module.lora_A[name].weight
                        b, a = factors[f"{prefix}.B"][:, :r].to(like), factors[f"{prefix}.A"][:r].to(like)
                        with torch.no_grad():
                            module.lora_B[name].weight.copy_(b)
                            module.lora_A[name].weight.copy_(a)
                            if subtract:
                                module.lora_B[name + OFFSET].weight.copy_(-b)
                                module.lora_A[name + OFFSET].weight.copy_(a)

    def select_adapters(self, model: torch.nn.Module, pair: str) -> None:
        """Activate `pair`'s adapters (and their offsets); only the active trainable ones get gradients."""
        active = self.adapters_for(pair)
        offsets = [name + OFFSET for name in active if name + OFFSET in model.peft_config]
        model.base_model.set_adapter(active + offsets)
        if offsets:  # set_adapter made them trainable; the twins stay frozen
            for name, param in model.named_parameters():
                if OFFSET in name:
                    param.requires_grad_(False)

    def param_groups(self, model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        params = [p for name, p in model.named_parameters() if "lora_" in name and OFFSET not in name]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]

    def describe(self) -> dict[str, Any]:
        keys = ("pairs", "lambda", "phi_norm", "r_gen", "r_spe", "adapters", "init", "layers", "neurons", "init_offset")
        return {k: (list(self.cfg.method[k]) if k == "pairs" else self.cfg.method[k]) for k in keys} | {
            "teacher": self.cfg.method.teacher.name, "adapter_names": self.adapter_names,
            **{k: self.summary[k] for k in ("teacher_layers", "relevance", "counts") if k in self.summary}}
