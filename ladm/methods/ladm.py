"""LaDM: sparse dual-directional modulation of LoRA by the Activation Disparity ΔR (METHODS.md §2)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from ladm import LadmError
from ladm.analysis.relevance import (
    check_measured,
    delta_r_report,
    measure_relevance,
    probe_examples,
    reference_pair_cfg,
    relevance_inputs,
    sentence_mean,
    sentence_relevance,
)
from ladm.data import SequenceFormat
from ladm.distributed import DistEnv
from ladm.files import read_json
from ladm.methods.lora import LoRA, lora_config
from ladm.models import num_layers

LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def layer_of(parameter_name: str) -> int | None:
    match = LAYER_INDEX.search(parameter_name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Selection:
    """TAL/LIL thresholds, the sparse strategy and the multipliers m_l (METHODS.md §2)."""

    tau_tal: float
    tau_lil: float
    select: str
    k_tal: int
    k_lil: int
    ratio_tal: float
    ratio_lil: float
    alpha: float
    beta: float
    variant: str
    m_min: float
    m_max: float

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> Selection:
        """Build from `method.*` and `strength.*` (each value checked by `ladm.schema`)."""
        method_cfg = cfg.method
        alpha, beta = float(cfg.strength.alpha), float(cfg.strength.beta)
        if method_cfg.m_min > method_cfg.m_max:
            raise LadmError(f"need method.m_min ≤ method.m_max, got {method_cfg.m_min} and {method_cfg.m_max}")
        return cls(method_cfg.tau_tal, method_cfg.tau_lil, method_cfg.select, method_cfg.k_tal, method_cfg.k_lil,
                   method_cfg.ratio_tal, method_cfg.ratio_lil, alpha, beta, method_cfg.variant,
                   method_cfg.m_min, method_cfg.m_max)

    def check_layer_count(self, n_layers: int) -> None:
        if self.select == "topk" and max(self.k_tal, self.k_lil) > n_layers:
            raise LadmError(f"method.k_tal={self.k_tal} / k_lil={self.k_lil} exceed the model's {n_layers} layers")

    def _budget(self, side: str, n_layers: int) -> int:
        if self.select == "all":
            return n_layers
        if self.select == "topk":
            return self.k_tal if side == "tal" else self.k_lil
        ratio = self.ratio_tal if side == "tal" else self.ratio_lil
        return math.floor(ratio * n_layers + 0.5)

    def __call__(self, delta_r: list[float]) -> dict[str, Any]:
        """TAL = {ΔR > τ_TAL}, LIL = {ΔR < −τ_LIL}; the strongest of each side get m_l ≠ 1."""
        n = len(delta_r)
        tal = [l for l in range(n) if delta_r[l] > self.tau_tal]
        lil = [l for l in range(n) if delta_r[l] < -self.tau_lil]
        selected_tal = sorted(sorted(tal, key=lambda l: -delta_r[l])[:self._budget("tal", n)])
        selected_lil = sorted(sorted(lil, key=lambda l: delta_r[l])[:self._budget("lil", n)])
        scale = max(abs(d) for d in delta_r) or 1.0
        multipliers = [1.0] * n
        for layers, strength, sign in ((selected_tal, self.alpha, 1), (selected_lil, self.beta, -1)):
            for l in layers:
                if self.variant == "signed":
                    multipliers[l] = 1.0 + sign * strength
                else:
                    multipliers[l] = min(max(1.0 + strength * delta_r[l] / scale, self.m_min), self.m_max)
        return {"tal": tal, "lil": lil, "selected_tal": selected_tal, "selected_lil": selected_lil,
                "multipliers": multipliers}


class LaDM(LoRA):
    """LoRA on every layer; layer l's adapters are modulated by m_l.

    `mode=step` (default) gives layer l the learning rate m_l·lr (scales the step under any
    optimizer); the clipped gradient norm is the unmodulated one, plain LoRA's, so one step of
    layer l is exactly m_l × LoRA's. `grad` multiplies its gradients by m_l after backward and any
    all-reduce, before clipping (the clip then sees the modulated norm; under Adam, which is invariant
    to gradient scale, nearly a no-op); `forward` scales its LoRA output by m_l through PEFT's
    `alpha_pattern`. m_l = 0 gives the layer's adapters no update.
    """

    name = "ladm"

    def __init__(self, cfg: DictConfig, dist: DistEnv | None = None):
        super().__init__(cfg, dist)
        self.selection = Selection.from_cfg(cfg)
        reference_pair_cfg(cfg)
        self.n_layers = num_layers(cfg.model)
        self.selection.check_layer_count(self.n_layers)
        self.given = self._read_delta_r(cfg.method.delta_r_path) if cfg.method.delta_r_path else None
        self.report: dict[str, Any] = {}
        self.reprobe_every = cfg.method.get("reprobe_every", 0)
        if self.reprobe_every and cfg.method.mode == "forward":
            raise LadmError("method.reprobe_every needs method.mode=step or grad (forward mode's multipliers are part "
                            "of the model's function, not of its training)")
        self.trajectory: list[dict[str, Any]] = []  # every re-measurement: step, ΔR, selected layers, multipliers

    def _read_delta_r(self, path: str) -> dict:
        """A delta_r.json from `ladm-probe`, checked against this model and these pairs."""
        fix = "give a delta_r.json written by ladm-probe, or method.delta_r_path=null to probe now"
        given = read_json(path, "method.delta_r_path", fix)
        if not isinstance(given, dict):
            check_measured(given, path, fix)
        expected = {"model": self.cfg.model.name, "n_layers": self.n_layers, "pair": self.cfg.pair.name,
                    "reference_pair": self.cfg.probe.reference_pair}
        for key, value in expected.items():
            if given.get(key) != value:
                raise LadmError(f"{path} was measured with {key}={given.get(key)!r}, but this run has {value!r}: "
                                "probe this model and pair again (ladm-probe)")
        return check_measured(given, path, fix)

    @property
    def multipliers(self) -> list[float]:
        """The m_l in force: the base model's ΔR's, or the last re-measurement's (`method.reprobe_every`)."""
        return self.trajectory[-1]["multipliers"] if self.trajectory else self.report["multipliers"]

    def prepare_model(self, model: torch.nn.Module, tokenizer) -> torch.nn.Module:
        # Rank 0 probes; every rank then modulates with the very same ΔR.
        measured = self.given or self.dist.broadcast(
            measure_relevance(model, tokenizer, self.cfg) if self.dist.is_main else None)
        self.report = delta_r_report(measured, self.cfg.probe, self.selection)
        overrides = {}
        if self.cfg.method.mode == "forward":
            overrides["alpha_pattern"] = {rf"layers\.{l}\..*": self.cfg.method.alpha * m
                                          for l, m in enumerate(self.multipliers) if m != 1.0}
        # Layers with m_l = 0 keep requiring gradients: their step is zero (lr 0, or a zero gradient), and the
        # gradient norm that is clipped stays plain LoRA's, so every layer's update is exactly m_l × LoRA's.
        model = self.peft_model(model, lora_config(self.cfg.method, **overrides))
        self.params_by_layer = self._trainable_by_layer(model)  # fixed from here on; used every step
        if self.reprobe_every:  # the probe sentences, tokenised once; measured again on the model in training
            fmt = SequenceFormat.from_cfg(tokenizer, self.cfg)
            self.probe_inputs = {side: relevance_inputs(probe_examples(c, c.pair.name, fmt), self.cfg.probe)
                                 for side, c in (("hi", reference_pair_cfg(self.cfg)), ("lo", self.cfg))}
            self.pad_token_id = tokenizer.pad_token_id
        return model

    def on_step(self, model: torch.nn.Module, step: int, optimizer: torch.optim.Optimizer, scheduler,
                last: bool) -> dict[str, float]:
        """`method.reprobe_every=N` (dynamic ΔR): every N steps, R of both pairs is measured on the current model
        (adapters active, the same probe sentences), ΔR and the TAL/LIL selection recomputed (METHODS.md §1–2),
        and the multipliers of the steps that follow are the new ones; the trajectory is logged and kept."""
        if not self.reprobe_every or step % self.reprobe_every or last:
            return {}
        rows = self.dist.broadcast({side: sentence_relevance(model, ids, first, self.pad_token_id,
                                                             self.cfg.probe.batch_size, desc=f"re-probe {side}").tolist()
                                    for side, (ids, first) in self.probe_inputs.items()} if self.dist.is_main else None)
        again = delta_r_report({"pair": self.cfg.pair.name, "n_sentences": len(rows["lo"]),
                                "R_hi": sentence_mean(rows["hi"]), "R_lo": sentence_mean(rows["lo"])},
                               self.cfg.probe, self.selection)
        self.trajectory.append({"step": step, **{k: again[k] for k in ("delta_r", "selected_tal", "selected_lil",
                                                                        "multipliers")}})
        self._modulate(self.multipliers, optimizer, scheduler)
        return {**{f"ladm/delta_r/layer{l}": v for l, v in enumerate(again["delta_r"])},
                **{f"ladm/multiplier/layer{l}": m for l, m in enumerate(again["multipliers"])}}

    def _modulate(self, multipliers: list[float], optimizer: torch.optim.Optimizer, scheduler) -> None:
        """The new m_l from here on: `step` mode sets each layer group's learning rate (and the schedule's base)
        to m_l × its unmodulated one; `grad` mode scales the next gradients by them."""
        if self.cfg.method.mode != "step":
            return
        for index, group in enumerate(optimizer.param_groups):
            layer = group.get("layer")
            if layer is None:
                continue
            unmodulated = group["unmodulated_lr"]
            group["initial_lr"] = scheduler.base_lrs[index] = unmodulated * multipliers[layer]
            group["lr"] = group["initial_lr"] * scheduler.lr_lambdas[index](scheduler.last_epoch)

    def trainer_state(self) -> dict[str, Any]:
        return {"trajectory": self.trajectory} if self.reprobe_every else {}

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        """The trajectory so far (the optimizer and scheduler states carry step mode's learning rates)."""
        self.trajectory = list(state.get("trajectory", []))

    def _trainable_by_layer(self, model: torch.nn.Module) -> dict[int | None, list[torch.nn.Parameter]]:
        groups: dict[int | None, list[torch.nn.Parameter]] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                groups.setdefault(layer_of(name), []).append(param)
        return groups

    def param_groups(self, model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """`step` mode: every group of the base variant (one; LoRA+: A and B apart) split by layer, layer l's at
        m_l × the group's learning rate."""
        groups = super().param_groups(model, lr, weight_decay)
        if self.cfg.method.mode != "step":
            return groups
        layer_by_param = {id(p): layer for layer, params in self.params_by_layer.items() for p in params}
        split = []
        for index, group in enumerate(groups):
            by_layer: dict[int | None, list[torch.nn.Parameter]] = {}
            for param in group["params"]:
                by_layer.setdefault(layer_by_param.get(id(param)), []).append(param)
            for layer, params in sorted(by_layer.items(), key=lambda kv: -1 if kv[0] is None else kv[0]):
                name = ("other" if layer is None else f"layer{layer}") + (f"/group{index}" if len(groups) > 1 else "")
                split.append(group | {"params": params, "layer": layer, "name": name, "unmodulated_lr": group["lr"],
                                      "lr": group["lr"] * (1.0 if layer is None else self.multipliers[layer])})
        return split

    def after_backward(self, model: torch.nn.Module) -> None:
        if self.cfg.method.mode != "grad":
            return
        for layer, params in self.params_by_layer.items():
            m = 1.0 if layer is None else self.multipliers[layer]
            for param in params:
                if param.grad is not None and m != 1.0:
                    param.grad.mul_(m)

    def grad_norm_groups(self, model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
        """LoRA parameters of the modulated TAL layers, the modulated LIL layers, and the rest."""
        tal, lil = set(self.report["selected_tal"]), set(self.report["selected_lil"])
        groups: dict[str, list[torch.nn.Parameter]] = {"tal": [], "lil": [], "other": []}
        for name, param in model.named_parameters():
            if "lora_" in name:
                layer = layer_of(name)
                groups["tal" if layer in tal else "lil" if layer in lil else "other"].append(param)
        return groups

    def describe(self) -> dict[str, Any]:
        keep = ("reference_pair", "pair", "n_sentences", "R_hi", "R_lo", "delta_r", "tal", "lil",
                "selected_tal", "selected_lil", "multipliers", "bootstrap", "probe")
        described = {k: self.report[k] for k in keep if k in self.report} | {
            "mode": self.cfg.method.mode, "alpha": self.selection.alpha, "beta": self.selection.beta}
        if self.reprobe_every:  # `multipliers` are the base model's; the trajectory holds those that followed
            described |= {"reprobe_every": self.reprobe_every, "trajectory": self.trajectory}
        return described
