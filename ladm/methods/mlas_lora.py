"""MLAS-LoRA (METHODS.md §3): a language-general LoRA plus one language-specific LoRA per pair on the
student, initialised by SVD from submatrices of a teacher's language-aware neurons (eqs. 7–8);
per batch the general and that pair's specific LoRA are active and trained (eq. 9).

The awareness stage (steps 1–4) composes the shared analysis: teacher relevance R and its top-L_S layers,
Φ of the output and input units of every targeted map, the λ split, and the extracted submatrices, cached
as their teacher row/column indices and rank-R SVD factors (a 7B student's submatrices would be ~100 GB)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from peft import LoraConfig, get_peft_model

from ladm import LadmError
from ladm.analysis.awareness import awareness_per_pair
from ladm.analysis.relevance import analysis_examples, analysis_identity, pair_relevance, top_layers
from ladm.analysis.split import lambda_split, pick
from ladm.analysis.stage import cached_stage, stage_key
from ladm.data import SequenceFormat, pair_config
from ladm.distributed import DistEnv
from ladm.methods.base import Method
from ladm.methods.lora import lora_config, text_only
from ladm.models import context_length, decoder_layers, load_model, load_tokenizer, model_config

log = logging.getLogger(__name__)
OFFSET = "_offset"


def linear_maps(layer: torch.nn.Module, targets: list[str]) -> dict[str, torch.nn.Linear]:
    """The targeted linear maps of one decoder layer, by their path inside it (e.g. `self_attn.q_proj`)."""
    return {name: module for name, module in layer.named_modules()
            if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in targets}


def extract(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Eqs. 4–5: the submatrix of `weight` (out × in) on the chosen output rows and input columns."""
    return weight[rows][:, cols]


def model_shapes(model_cfg: DictConfig, targets: list[str]) -> tuple[int, dict[str, tuple[int, int]]]:
    """Layer count and the (out, in) shape of every targeted map of a layer, without loading weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(model_cfg))
    layers = decoder_layers(model)
    return len(layers), {name: tuple(m.weight.shape) for name, m in linear_maps(layers[0], targets).items()}


def check_teacher(cfg: DictConfig) -> None:
    """Teacher at least as deep and as wide as the student on every targeted map; ranks that fit."""
    targets = list(cfg.method.target_modules)
    n_student, student = model_shapes(cfg.model, targets)
    n_teacher, teacher = model_shapes(cfg.method.teacher, targets)
    if n_teacher < n_student:
        raise LadmError(f"the teacher {cfg.method.teacher.name} has {n_teacher} layers, fewer than the student's "
                        f"{n_student}: choose a deeper teacher")
    for name, (m, n) in student.items():
        if name not in teacher or teacher[name][0] < m or teacher[name][1] < n:
            raise LadmError(f"the teacher's {name} is {teacher.get(name)}, narrower than the student's {(m, n)}: "
                            "choose a wider teacher")
        for key in ("r_gen", "r_spe"):
            if cfg.method[key] > min(m, n):
                raise LadmError(f"method.{key}={cfg.method[key]} exceeds the rank of the {m}×{n} {name} submatrix")


def stage_identity(cfg: DictConfig) -> dict[str, Any]:
    """Everything that changes the awareness stage's output (its cache key)."""
    keys = ("teacher", "pairs", "lambda", "layers", "target_modules", "phi_norm", "phi_estimate")
    return {"method": {k: cfg.method[k] for k in keys}, "rank": max(cfg.method.r_gen, cfg.method.r_spe),
            "student": cfg.model, "seed": cfg.train.seed, **analysis_identity(cfg, list(cfg.method.pairs))}


def compute_awareness(cfg: DictConfig, student_tokenizer, device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """The awareness stage on the teacher (METHODS.md §3, steps 1–4). Returns, per `layer{k}.{map}.{source}`, the
    chosen teacher `rows` and `cols` of W_s and its rank-R factors `B`, `A` (R = max(r_gen, r_spe)), and a summary."""
    pairs, targets = list(cfg.method.pairs), list(cfg.method.target_modules)
    teacher_tokenizer = load_tokenizer(cfg.method.teacher)
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise LadmError(f"the teacher {cfg.method.teacher.name} and the student {cfg.model.name} use different "
                        "tokenizers: MLAS-LoRA needs a shared vocabulary")
    teacher = load_model(cfg.method.teacher, teacher_tokenizer).to(device).eval().requires_grad_(False)
    n_student, student_shapes = model_shapes(cfg.model, targets)
    fmt = SequenceFormat.from_cfg(teacher_tokenizer, cfg)
    examples = analysis_examples(cfg, pairs, fmt, context_length(cfg.method.teacher))
    relevance = pair_relevance(teacher, examples, cfg.probe, teacher_tokenizer.pad_token_id)
    layers = top_layers(relevance, n_student, cfg.method.layers, cfg.train.seed)
    teacher_layers = decoder_layers(teacher)
    maps = {f"{k}.{name}": module for k, l in enumerate(layers)
            for name, module in linear_maps(teacher_layers[l], targets).items()}
    awareness = awareness_per_pair(teacher, examples, {key: (m, ("out", "in")) for key, m in maps.items()},
                                   teacher_tokenizer.pad_token_id, cfg.probe.batch_size, cfg.method.phi_estimate)
    phi = awareness.phi

    rank = max(cfg.method.r_gen, cfg.method.r_spe)
    factors, counts = {}, {}
    for key, module in maps.items():
        k, name = key.split(".", 1)
        m, n = student_shapes[name]
        weight = module.weight.detach().float().cpu()
        side_phi = {side: phi[(key, side)] for side in ("out", "in")}
        split = {side: lambda_split(side_phi[side], cfg.method["lambda"], cfg.method.phi_norm) for side in side_phi}
        counts[key] = {side: {"general": int(general.sum()), **{p: int(specific[i].sum()) for i, p in enumerate(pairs)}}
                       for side, (general, specific) in split.items()}
        mean = {side: side_phi[side].mean(0) for side in side_phi}
        sources = {"all": ({s: torch.ones_like(split[s][0]) for s in side_phi}, mean),
                   "gen": ({s: split[s][0] for s in side_phi}, mean)}
        for i, p in enumerate(pairs):
            sources[f"spe.{p}"] = ({s: split[s][1][i] for s in side_phi}, {s: side_phi[s][i] for s in side_phi})
        for source, (candidates, score) in sources.items():
            rows = pick(score["out"], candidates["out"], m)
            cols = pick(score["in"], candidates["in"], n)
            # Eqs. 7–8 need only the top singular triplets of W_s: keep B = UΣ and A = Vᵀ at rank R
            # (float64 SVD), not the student-sized W_s itself.
            u, sigma, vh = torch.linalg.svd(extract(weight, rows, cols).double(), full_matrices=False)
            prefix = f"layer{k}.{name}.{source}"
            factors |= {f"{prefix}.rows": rows, f"{prefix}.cols": cols,
                        f"{prefix}.B": (u[:, :rank] * sigma[:rank]).float().contiguous(),
                        f"{prefix}.A": vh[:rank].float().contiguous()}
    summary = {"teacher": cfg.method.teacher.name, "student": cfg.model.name, "pairs": pairs,
               "lambda": cfg.method["lambda"], "phi_estimate": cfg.method.phi_estimate, "teacher_layers": layers,
               "relevance": relevance, "counts": counts, "awareness_per_pair": awareness.per_pair}
    return factors, summary


def load_or_compute(cfg: DictConfig, student_tokenizer, device: torch.device, is_main: bool = True,
                    barrier=lambda: None) -> tuple[dict[str, torch.Tensor], dict]:
    """The stage's output from `cache_dir/awareness/<key>/`, computed (on the main rank) when absent."""
    return cached_stage(Path(cfg.cache_dir) / "awareness" / stage_key(stage_identity(cfg)),
                        lambda: compute_awareness(cfg, student_tokenizer, device), is_main, barrier)


def check_mlas_cfg(cfg: DictConfig) -> None:
    """Reject impossible combinations before anything is loaded (teacher shapes from configs only); each
    value on its own is checked by `ladm.schema`."""
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
        return lora_config(self.cfg.method, r=rank, lora_alpha=alpha)

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
        device = next(model.parameters()).device
        names = self.adapter_names
        model = get_peft_model(model, text_only(self._lora_config(names[0]), model), adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, text_only(self._lora_config(name), model))
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
                model.add_adapter(name + OFFSET, text_only(self._lora_config(name), model))
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
        keys = ("pairs", "lambda", "phi_norm", "phi_estimate", "r_gen", "r_spe",
                "adapters", "init", "layers", "neurons", "init_offset")
        return {k: (list(self.cfg.method[k]) if k == "pairs" else self.cfg.method[k]) for k in keys} | {
            "teacher": self.cfg.method.teacher.name, "adapter_names": self.adapter_names,
            **{k: self.summary[k] for k in ("teacher_layers", "relevance", "counts", "awareness_per_pair") if k in self.summary}}
