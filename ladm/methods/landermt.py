"""LANDeRMT (METHODS.md §4): language-aware neuron detection and routing — a reimplementation from the
paper's description (no public code exists).

On the model itself: the top-K layers by relevance R (§1), the awareness Φ of their FFN intermediate units
(§4.2), a general / language-specific split (§4.3). Training updates only the general units and the
current pair's specific units (§4.4) — as deltas on their rows of `gate_proj`/`up_proj` and columns of
`down_proj`, so every other weight stays bit for bit, and an idle pair's slice gets no gradient at all
(AdamW then moves it neither by momentum nor by weight decay). Per selected layer and pair a router
g(x) = σ(w·x + b), zero-initialised, mixes the general and specific parts (§4.5):
FFN(x) = 2g·FFN_G(x) + 2(1−g)·FFN_S(p)(x) + FFN_rest(x).
The trained state is saved as `landermt.safetensors` (unit indices, deltas, routers) + `landermt.json`,
and `LANDeRMT.load(base_model, folder)` puts it back on the base model (§4.7).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from torch import nn

from ladm import LadmError
from ladm.analysis.awareness import awareness_per_pair
from ladm.analysis.relevance import analysis_examples, analysis_identity, pair_relevance, top_layers
from ladm.analysis.split import lambda_split, ratio_split
from ladm.analysis.stage import cached_stage, stage_key
from ladm.data import SequenceFormat
from ladm.distributed import DistEnv
from ladm.files import write_atomic, write_json_atomic
from ladm.methods.base import Method
from ladm.models import context_length, decoder_layers, num_layers, weights_fingerprint

log = logging.getLogger(__name__)
PARTS = ("gate_proj", "up_proj", "down_proj")


class RoutedFFN(nn.Module):
    """One decoder layer's FFN split into general, per-pair specific and remaining units (METHODS.md §4.4–4.5).

    `trained` maps a group (`general`, or a pair) to the units whose slices carry a trainable delta; `routing`
    adds the zero-initialised router per pair. At zero deltas and g = 0.5 it computes the original FFN."""

    def __init__(self, mlp: nn.Module, general: torch.Tensor, specific: dict[str, torch.Tensor], trained: list[str],
                 routing: bool):
        super().__init__()
        if any(getattr(mlp, part).bias is not None for part in PARTS):
            raise LadmError("LANDeRMT needs a bias-free SwiGLU/GeGLU FFN (gate_proj, up_proj, down_proj)")
        self.mlp = mlp
        self.pair: str | None = None
        self.register_buffer("general", general, persistent=False)
        self.specific = {pair: units for pair, units in specific.items()}
        hidden = mlp.gate_proj.in_features
        self.deltas = nn.ParameterDict()  # float32, like PEFT's adapters, added in the weights' dtype
        for group in trained:
            n = len(general if group == "general" else specific[group])
            self.deltas |= {f"{group}__gate_proj": nn.Parameter(torch.zeros(n, hidden)),
                            f"{group}__up_proj": nn.Parameter(torch.zeros(n, hidden)),
                            f"{group}__down_proj": nn.Parameter(torch.zeros(hidden, n))}
        self.routers = nn.ParameterDict()  # g = σ(w·x + b), w = 0 and b = 0 at the start
        if routing:
            for pair in specific:
                self.routers |= {f"{pair}__weight": nn.Parameter(torch.zeros(hidden)),
                                 f"{pair}__bias": nn.Parameter(torch.zeros(1))}

    def restricted(self, x: torch.Tensor, units: torch.Tensor, group: str | None) -> torch.Tensor:
        """The FFN restricted to `units` (with `group`'s deltas when it has them)."""
        units = units.to(x.device)
        weights = {part: getattr(self.mlp, part).weight for part in PARTS}
        gate, up, down = weights["gate_proj"][units], weights["up_proj"][units], weights["down_proj"][:, units]
        if group is not None and f"{group}__gate_proj" in self.deltas:
            gate = gate + self.deltas[f"{group}__gate_proj"].to(gate.dtype)
            up = up + self.deltas[f"{group}__up_proj"].to(up.dtype)
            down = down + self.deltas[f"{group}__down_proj"].to(down.dtype)
        return F.linear(self.mlp.act_fn(F.linear(x, gate)) * F.linear(x, up), down)

    def rest(self, pair: str) -> torch.Tensor:
        owned = torch.zeros(self.mlp.gate_proj.out_features, dtype=torch.bool)
        owned[self.general] = True
        owned[self.specific[pair]] = True
        return torch.nonzero(~owned).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pair is None:
            raise RuntimeError("RoutedFFN: select a pair first (LANDeRMT.select_adapters)")
        general = self.restricted(x, self.general, "general")
        specific = self.restricted(x, self.specific[self.pair], self.pair)
        rest = self.restricted(x, self.rest(self.pair), None)
        if f"{self.pair}__weight" in self.routers:
            w, b = self.routers[f"{self.pair}__weight"], self.routers[f"{self.pair}__bias"]
            g = torch.sigmoid(x @ w.to(x.dtype)[:, None] + b.to(x.dtype))
            return 2 * g * general + 2 * (1 - g) * specific + rest
        return general + specific + rest


def routed_layers(model: nn.Module) -> dict[int, RoutedFFN]:
    return {l: layer.mlp for l, layer in enumerate(decoder_layers(model)) if isinstance(layer.mlp, RoutedFFN)}


def select_pair(model: nn.Module, pair: str) -> None:
    """Route every LANDeRMT layer for `pair` (its specific units and router)."""
    for ffn in routed_layers(model).values():
        ffn.pair = pair


class LANDeRMT(Method):
    name = "landermt"
    find_unused_parameters = True  # the other pairs' slices and routers sit idle in a step

    def __init__(self, cfg: DictConfig, dist: DistEnv | None = None):
        super().__init__(cfg, dist)
        self.n_layers = num_layers(cfg.model)
        k = cfg.method.k_layers
        self.k_layers = max(1, self.n_layers // 4) if k is None else k
        if self.k_layers > self.n_layers:
            raise LadmError(f"method.k_layers={k} exceeds the model's {self.n_layers} layers")
        if len(set(self.pairs)) != len(self.pairs):
            raise LadmError(f"method.pairs must list distinct pairs, got {self.pairs}")
        if cfg.method.split == "lambda" and len(self.pairs) > 1 and cfg.method["lambda"] <= 1 / len(self.pairs):
            log.warning("method.lambda=%s ≤ 1/%d: every unit is language-specific", cfg.method["lambda"], len(self.pairs))
        self.summary: dict[str, Any] = {}

    @property
    def pairs(self) -> list[str]:
        return list(self.cfg.method.pairs)

    def trained_groups(self) -> list[str]:
        return {"split": ["general", *self.pairs], "general": ["general"], "all": ["general"]}[self.cfg.method.units]

    def prepare_model(self, model: nn.Module, tokenizer) -> nn.Module:
        tensors, self.summary = cached_stage(
            Path(self.cfg.cache_dir) / "landermt" / stage_key(self.identity(weights_fingerprint(model))),
            lambda: analyse(self.cfg, model, tokenizer, self.k_layers), self.dist.is_main, self.dist.barrier)
        model.requires_grad_(False)
        install(model, unit_table(tensors, self.summary["layers"], self.pairs), self.pairs, self.trained_groups(),
                self.cfg.method.routing == "gate")
        return model

    def identity(self, weights: str) -> dict[str, Any]:
        """Everything that changes the layers and units (the analysis cache key), `weights` the base model's
        fingerprint."""
        keys = ("pairs", "k_layers", "split", "lambda", "general_ratio", "partition", "units", "phi_estimate")
        return {"model": self.cfg.model, "weights": weights, "method": {k: self.cfg.method[k] for k in keys}, "k": self.k_layers,
                **analysis_identity(self.cfg, self.pairs)}

    def select_adapters(self, model: nn.Module, pair: str) -> None:
        select_pair(model, pair)

    def trained_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Unit indices, deltas and routers of every routed layer (what `save` writes)."""
        tensors = {}
        for l, ffn in routed_layers(model).items():
            tensors[f"layer{l}.general"] = ffn.general.cpu()
            tensors |= {f"layer{l}.specific.{pair}": units.cpu() for pair, units in ffn.specific.items()}
            tensors |= {f"layer{l}.delta.{key}": p.detach().cpu() for key, p in ffn.deltas.items()}
            tensors |= {f"layer{l}.router.{key}": p.detach().cpu() for key, p in ffn.routers.items()}
        return tensors

    def save(self, model: nn.Module, folder: Path) -> None:
        tensors = self.trained_state(model)
        write_atomic(folder / "landermt.safetensors", lambda tmp: save_file(tensors, tmp))
        write_json_atomic(folder / "landermt.json", {"method": self.name, "model": self.cfg.model.name, "pairs": self.pairs,
                                                     "layers": sorted(routed_layers(model)),
                                                     "trained": self.trained_groups(),
                                                     "routing": self.cfg.method.routing})

    @staticmethod
    def load(model: nn.Module, folder: Path) -> nn.Module:
        """Put a saved LANDeRMT state back on the base `model` (then `select_pair` a pair)."""
        meta = json.loads((Path(folder) / "landermt.json").read_text(encoding="utf-8"))
        tensors = load_file(Path(folder) / "landermt.safetensors")
        model.requires_grad_(False)
        install(model, unit_table(tensors, meta["layers"], meta["pairs"]), meta["pairs"], meta["trained"],
                meta["routing"] == "gate")
        with torch.no_grad():
            for l, ffn in routed_layers(model).items():
                for key, p in [*ffn.deltas.items(), *ffn.routers.items()]:
                    p.copy_(tensors[f"layer{l}.{'delta' if key in ffn.deltas else 'router'}.{key}"])
        return model

    def describe(self) -> dict[str, Any]:
        keys = ("pairs", "split", "lambda", "general_ratio", "partition", "routing", "units", "ablation", "phi_estimate")
        return {k: (list(self.cfg.method[k]) if k == "pairs" else self.cfg.method[k]) for k in keys} | {
            "k_layers": self.k_layers, **{k: self.summary[k] for k in ("layers", "relevance", "counts", "awareness_per_pair")
                                              if k in self.summary}}


def unit_table(tensors: dict[str, torch.Tensor], layers: list[int], pairs: list[str]) -> dict[int, dict]:
    """{layer: {"general": units, "specific": {pair: units}}} from the flat `layer{l}.…` tensors."""
    return {l: {"general": tensors[f"layer{l}.general"],
                "specific": {p: tensors[f"layer{l}.specific.{p}"] for p in pairs}} for l in layers}


def install(model: nn.Module, units: dict[int, dict], pairs: list[str], trained: list[str], routing: bool) -> None:
    """Replace the FFN of every analysed layer by its `RoutedFFN`."""
    layers = decoder_layers(model)
    for l, owned in units.items():
        layers[l].mlp = RoutedFFN(layers[l].mlp, owned["general"], owned["specific"], trained, routing)
        layers[l].mlp.to(next(layers[l].parameters()).device)


def analyse(cfg: DictConfig, model: nn.Module, tokenizer, k_layers: int) -> tuple[dict[str, torch.Tensor], dict]:
    """§4.1–4.3 on the base model: top-K layers by mean R over the pairs, FFN-unit Φ per pair, the split.
    Returns `layer{l}.general` / `layer{l}.specific.{pair}` unit indices and a JSON summary."""
    pairs = list(cfg.method.pairs)
    fmt = SequenceFormat.from_cfg(tokenizer, cfg)
    examples = analysis_examples(cfg, pairs, fmt, context_length(cfg.model))
    relevance = pair_relevance(model, examples, cfg.probe, tokenizer.pad_token_id)
    layers = top_layers(relevance, k_layers)
    blocks = decoder_layers(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)
    awareness = awareness_per_pair(model, examples, {f"layer{l}": (blocks[l].mlp.down_proj, ("in",)) for l in layers},
                                   tokenizer.pad_token_id, cfg.probe.batch_size, cfg.method.phi_estimate)
    for param in trainable:
        param.requires_grad_(True)
    units, counts = {}, {}
    for l in layers:
        table = awareness.phi[(f"layer{l}", "in")]
        if cfg.method.units == "all":
            general, specific = torch.ones(table.shape[1], dtype=torch.bool), torch.zeros_like(table, dtype=torch.bool)
        elif cfg.method.split == "lambda":
            general, specific = lambda_split(table, cfg.method["lambda"])
        else:
            general, specific = ratio_split(table, cfg.method.general_ratio, cfg.method.partition)
        units[f"layer{l}.general"] = torch.nonzero(general).squeeze(1)
        units |= {f"layer{l}.specific.{p}": torch.nonzero(specific[i]).squeeze(1) for i, p in enumerate(pairs)}
        counts[str(l)] = {"general": int(general.sum()), **{p: int(specific[i].sum()) for i, p in enumerate(pairs)}}
    return units, {"layers": layers, "relevance": relevance, "counts": counts, "pairs": pairs,
                   "awareness_per_pair": awareness.per_pair}
