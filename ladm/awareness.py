"""MLAS-LoRA's awareness stage (METHODS.md §3, steps 1–4): on the teacher, per-pair layer relevance
and the top-L_S layers, neuron awareness Φ (eq. 2), the λ split into language-general and
language-specific neurons (eq. 3), and the extracted student-shaped submatrices (eqs. 4–5), cached as
their teacher row/column indices and rank-R SVD factors (a 7B student's submatrices would be ~100 GB).

    python -m ladm.awareness method=mlas_lora method.pairs=[zh-lo,zh-km]
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ladm import LadmError
from ladm.activations import layer_relevance
from ladm.cli import cli_main
from ladm.data import SequenceFormat, collate, pair_config, read_split, training_max_length, truncate
from ladm.files import read_json, write_atomic, write_json_atomic
from ladm.losses import IGNORE_INDEX, target_token_loss_sum
from ladm.models import context_length, decoder_layers, load_model, load_tokenizer, model_config
from ladm.schema import validate

log = logging.getLogger("ladm.awareness")


def linear_maps(layer: torch.nn.Module, targets: list[str]) -> dict[str, torch.nn.Linear]:
    """The targeted linear maps of one decoder layer, by their path inside it (e.g. `self_attn.q_proj`)."""
    return {name: module for name, module in layer.named_modules()
            if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in targets}


class NeuronAwareness:
    """Accumulates Φ_{l,j} = mean over tokens |∂L/∂h_{l,j} · h_{l,j}| (eq. 2) for the output units
    (rows of W) and input units (columns of W) of every targeted linear map, batch by batch."""

    def __init__(self, maps: dict[str, torch.nn.Linear]):
        self.maps = maps
        self.sums = {(name, side): torch.zeros(m.out_features if side == "out" else m.in_features, dtype=torch.float64,
                                               device=m.weight.device)
                     for name, m in maps.items() for side in ("out", "in")}
        self.tokens = 0
        self._mask: torch.Tensor | None = None
        self._handles: list = []

    def _hook(self, name: str):
        def hook(module, inputs, output):
            for side, tensor in (("in", inputs[0]), ("out", output)):
                if tensor.requires_grad:
                    tensor.register_hook(self._grad_hook(name, side, tensor.detach()))
        return hook

    def _grad_hook(self, name: str, side: str, activation: torch.Tensor):
        def grad_hook(grad: torch.Tensor) -> None:
            taylor = (grad.float() * activation.float()).abs() * self._mask.unsqueeze(-1)
            self.sums[(name, side)] += taylor.sum((0, 1)).double()  # stays on the device: no sync per map
        return grad_hook

    def __enter__(self) -> NeuronAwareness:
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in self.maps.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def add_batch(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
        """One forward + backward with the loss on the target tokens; activations of all non-padding tokens count."""
        self._mask = batch["attention_mask"].float()
        # Gradients reach the activations through the embeddings; the teacher's weights stay frozen.
        embeddings = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        loss = target_token_loss_sum(model, batch, inputs_embeds=embeddings)
        (loss / (batch["labels"][:, 1:] != IGNORE_INDEX).sum()).backward()
        self.tokens += int(batch["attention_mask"].sum())

    def scores(self) -> dict[tuple[str, str], torch.Tensor]:
        return {key: total.cpu() / max(self.tokens, 1) for key, total in self.sums.items()}


def classify(phi: torch.Tensor, lam: float, norm: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3 / A.6: λ_i = Φ(p_i) / Σ_n Φ(p_n) per unit (phi: pairs × units). A unit whose largest
    share exceeds λ is specific to that pair, otherwise general. Returns (general mask, owner pair).

    `norm=per_pair` first divides each pair's Φ by its mean over the units, so a pair whose loss
    (hence every Φ) is larger does not claim every neuron; `none` is the paper's rule."""
    if norm == "per_pair":
        phi = phi / phi.mean(1, keepdim=True).clamp_min(torch.finfo(phi.dtype).tiny)
    share = phi / phi.sum(0).clamp_min(torch.finfo(phi.dtype).tiny)
    top_share, owner = share.max(0)
    return top_share <= lam, owner


def pick(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """The k units of highest score among `candidates` (topped up with the best others if there
    are fewer), returned in their original order."""
    order = torch.argsort(scores, descending=True, stable=True)
    preferred = order[candidates[order]]
    chosen = torch.cat([preferred, order[~candidates[order]]])[:k]
    return chosen.sort().values


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


def awareness_key(cfg: DictConfig) -> str:
    identity = {k: OmegaConf.to_container(cfg.method[k], resolve=True) if OmegaConf.is_config(cfg.method[k]) else cfg.method[k]
                for k in ("teacher", "pairs", "lambda", "layers", "target_modules", "phi_norm")}
    identity["rank"] = max(cfg.method.r_gen, cfg.method.r_spe)
    identity |= {"student": OmegaConf.to_container(cfg.model, resolve=True), "seed": cfg.train.seed,
                 "probe": {k: cfg.probe[k] for k in ("split", "n_sentences", "input", "batch_size")},
                 "files": [OmegaConf.to_container(pair_config(cfg, p).data.train, resolve=True) for p in cfg.method.pairs]}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def select_layers(relevance: dict[str, list[float]], n_student: int, mode: str, seed: int) -> list[int]:
    """Top-L_S teacher layers by relevance averaged over the pairs (or L_S random ones), in depth order."""
    mean = torch.tensor(list(relevance.values())).mean(0)
    if mode == "random":
        chosen = torch.randperm(len(mean), generator=torch.Generator().manual_seed(seed))[:n_student]
    else:
        chosen = torch.argsort(mean, descending=True, stable=True)[:n_student]
    return sorted(chosen.tolist())


def compute_awareness(cfg: DictConfig, student_tokenizer, device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """Run the whole stage on the teacher. Returns, per `layer{k}.{map}.{source}`, the chosen teacher `rows` and
    `cols` of W_s and its rank-R factors `B`, `A` (R = max(r_gen, r_spe)), and a JSON summary."""
    from ladm.probe import probe_inputs

    pairs, lam, targets = list(cfg.method.pairs), cfg.method["lambda"], list(cfg.method.target_modules)
    teacher_tokenizer = load_tokenizer(cfg.method.teacher)
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise LadmError(f"the teacher {cfg.method.teacher.name} and the student {cfg.model.name} use different "
                        "tokenizers: MLAS-LoRA needs a shared vocabulary")
    teacher = load_model(cfg.method.teacher, teacher_tokenizer).to(device).eval().requires_grad_(False)
    n_student, student_shapes = model_shapes(cfg.model, targets)

    fmt = SequenceFormat.from_cfg(teacher_tokenizer, cfg.model)
    relevance = {p: layer_relevance(teacher, probe_inputs(pair_config(cfg, p), fmt),
                                    teacher_tokenizer.pad_token_id, cfg.probe.batch_size, desc=f"relevance {p}").tolist()
                 for p in pairs}
    layers = select_layers(relevance, n_student, cfg.method.layers, cfg.train.seed)
    teacher_layers = decoder_layers(teacher)
    maps = {f"{k}.{name}": module for k, l in enumerate(layers)
            for name, module in linear_maps(teacher_layers[l], targets).items()}

    encoded = {p: fmt.encode(read_split(pair_config(cfg, p).data[cfg.probe.split]).head(cfg.probe.n_sentences),
                             pair_config(cfg, p).pair) for p in pairs}
    max_length = training_max_length(cfg.train.max_length, cfg.train.length_coverage,
                                     context_length(cfg.method.teacher), encoded)
    phi: dict[tuple[str, str], list[torch.Tensor]] = {}
    for p in pairs:
        examples, _ = truncate(encoded[p], max_length)
        awareness = NeuronAwareness(maps)
        with awareness:
            for start in tqdm(range(0, len(examples), cfg.probe.batch_size), desc=f"awareness {p}", unit="batch"):
                batch = collate(examples[start:start + cfg.probe.batch_size], teacher_tokenizer.pad_token_id)
                awareness.add_batch(teacher, {k: v.to(device) for k, v in batch.items()})
        for key, score in awareness.scores().items():
            phi.setdefault(key, []).append(score)

    rank = max(cfg.method.r_gen, cfg.method.r_spe)
    factors, counts = {}, {}
    for key, module in maps.items():
        k, name = key.split(".", 1)
        m, n = student_shapes[name]
        weight = module.weight.detach().float().cpu()
        side_phi = {side: torch.stack(phi[(key, side)]) for side in ("out", "in")}
        split = {side: classify(side_phi[side], lam, cfg.method.phi_norm) for side in side_phi}
        counts[key] = {side: {"general": int(general.sum()),
                              **{p: int(((owner == i) & ~general).sum()) for i, p in enumerate(pairs)}}
                       for side, (general, owner) in split.items()}
        mean = {side: side_phi[side].mean(0) for side in side_phi}
        sources = {"all": ({s: torch.ones_like(split[s][0]) for s in side_phi}, mean),
                   "gen": ({s: split[s][0] for s in side_phi}, mean)}
        for i, p in enumerate(pairs):
            sources[f"spe.{p}"] = ({s: (split[s][1] == i) & ~split[s][0] for s in side_phi},
                                   {s: side_phi[s][i] for s in side_phi})
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
    summary = {"teacher": cfg.method.teacher.name, "student": cfg.model.name, "pairs": pairs, "lambda": lam,
               "teacher_layers": layers, "relevance": relevance, "counts": counts}
    return factors, summary


def load_or_compute(cfg: DictConfig, student_tokenizer, device: torch.device, is_main: bool = True,
                    barrier=lambda: None) -> tuple[dict[str, torch.Tensor], dict]:
    """The stage's output from `cache_dir/awareness/<key>/`, computed (on the main rank) when absent or
    unreadable (a corrupt cache is computed again, with a warning)."""
    folder = Path(cfg.cache_dir) / "awareness" / awareness_key(cfg)
    if is_main:
        try:
            cached = _read_cache(folder) if (folder / "awareness.json").is_file() else None
        except (LadmError, OSError, SafetensorError) as err:
            log.warning("awareness cache %s is unreadable (%s): computing it again", folder, err)
            cached = None
        if cached is None:
            factors, summary = compute_awareness(cfg, student_tokenizer, device)
            write_atomic(folder / "factors.safetensors", lambda tmp: save_file(factors, tmp))
            write_json_atomic(folder / "awareness.json", summary)  # written last: marks the folder complete
    barrier()
    return _read_cache(folder)


def _read_cache(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    summary = read_json(folder / "awareness.json", "the awareness summary", "it is computed again")
    factors = load_file(folder / "factors.safetensors")
    if not isinstance(summary, dict) or not all(torch.isfinite(t).all() for t in factors.values()):
        raise LadmError(f"{folder} holds a malformed summary or non-finite factors")
    return factors, summary


def run_awareness(cfg: DictConfig, out_dir: Path) -> dict:
    """`python -m ladm.awareness`: compute (or reuse) the stage and copy its summary into the run folder."""
    from ladm.methods.mlas_lora import check_mlas_cfg

    validate(cfg)
    check_mlas_cfg(cfg)
    tokenizer = load_tokenizer(cfg.model)
    _, summary = load_or_compute(cfg, tokenizer, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    write_json_atomic(out_dir / "awareness.json", summary)
    log.info("teacher layers %s → student layers 0..%d", summary["teacher_layers"], len(summary["teacher_layers"]) - 1)
    return summary


main = cli_main("ladm-awareness", "awareness", run_awareness)


if __name__ == "__main__":
    main()
