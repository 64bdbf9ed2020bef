"""Neuron awareness Φ over any set of units (METHODS.md §3.2, §4.2), streamed batch by batch.

A unit is one coordinate of a linear map's input or output: the output units (rows of W) and input units
(columns of W) of a targeted map for MLAS-LoRA, the FFN intermediate units (the input of `down_proj`,
a = act(gate(x))·up(x)) for LANDeRMT. The pair's loss is L_p = (1/N) Σ_n ℓ_n, ℓ_n the mean answer-token
cross-entropy of sentence n, and g = ∂L_p/∂h. Two estimates (`phi_estimate`), both summed over a sentence's
tokens and never divided by a token count:

- `taylor`: Φ_j = | Σ_n Σ_t g_{n,t,j} · h_{n,t,j} |, the first-order loss change of zeroing unit j everywhere;
- `abs`:    Φ_j = Σ_n Σ_t | g_{n,t,j} · h_{n,t,j} |.

An input unit's gradient is the map's own, g_out · W, so maps that share an input get their own scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ladm.losses import IGNORE_INDEX, answer_loss

Sources = dict[str, tuple[torch.nn.Linear, tuple[str, ...]]]  # name → (linear map, sides: "in" and/or "out")
ESTIMATES = ("taylor", "abs")


class UnitAwareness:
    """Running sums of g·h (signed, and absolute) for every `(name, side)` source of linear maps: side `in` is
    the map's input with the map's own gradient g_out·W, `out` its output. Use as a context manager around
    `add_batch` calls."""

    def __init__(self, sources: Sources):
        self.sources = sources
        self.signed: dict[tuple[str, str], torch.Tensor] = {}
        self.absolute: dict[tuple[str, str], torch.Tensor] = {}
        self.n_sentences = 0
        self._mask: torch.Tensor | None = None
        self._handles: list = []

    def _hook(self, name: str, sides: tuple[str, ...]):
        def hook(module, inputs, output):
            if output.requires_grad:
                output.register_hook(self._grad_hook(name, sides, module.weight, inputs[0].detach(), output.detach()))
        return hook

    def _grad_hook(self, name: str, sides: tuple[str, ...], weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
        def grad_hook(grad_out: torch.Tensor) -> None:
            grad_out = grad_out.float()
            for side in sides:
                # y = x Wᵀ + b: the map's own gradient of its input is g_out · W
                product = grad_out * y.float() if side == "out" else (grad_out @ weight.float()) * x.float()
                product = product * self._mask.unsqueeze(-1)
                key = (name, side)
                signed, absolute = product.sum((0, 1)).double(), product.abs().sum((0, 1)).double()
                if key in self.signed:  # stays on the device: no sync
                    signed, absolute = self.signed[key] + signed, self.absolute[key] + absolute
                self.signed[key], self.absolute[key] = signed, absolute
        return grad_hook

    def __enter__(self) -> UnitAwareness:
        self._handles = [m.register_forward_hook(self._hook(name, sides)) for name, (m, sides) in self.sources.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def add_batch(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
        """One forward + backward of Σ_n ℓ_n over the batch; the activations of all non-padding tokens count."""
        self._mask = batch["attention_mask"].float()
        # Gradients reach the activations through the embeddings; the model's weights stay frozen.
        embeddings = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        answer_loss(model, batch, inputs_embeds=embeddings, per_sentence_mean=True).backward()
        self.n_sentences += int(batch["input_ids"].shape[0])

    def scores(self, estimate: str = "taylor") -> dict[tuple[str, str], torch.Tensor]:
        """Φ of every source's units; the 1/N of L_p is applied here, so the batch size does not matter."""
        if estimate not in ESTIMATES:
            raise ValueError(f"phi_estimate must be one of {ESTIMATES}, got {estimate!r}")
        n = max(self.n_sentences, 1)
        if estimate == "taylor":
            return {key: total.abs().cpu() / n for key, total in self.signed.items()}
        return {key: total.cpu() / n for key, total in self.absolute.items()}


@dataclass
class PairAwareness:
    """Φ of every source for every pair, and what a reader needs to see whether length drives the split."""

    phi: dict[tuple[str, str], torch.Tensor]  # (name, side) → pairs × units, pairs in the order of the examples
    per_pair: dict[str, dict[str, float]]  # pair → phi_mean, tokens_per_sentence, target_tokens_per_sentence


def awareness_per_pair(model: torch.nn.Module, examples: dict[str, list], sources: Sources, pad_token_id: int,
                       batch_size: int, estimate: str = "taylor") -> PairAwareness:
    """Φ (`estimate`: taylor | abs) of every source's units for every pair of `examples`."""
    from tqdm.auto import tqdm

    from ladm.data import collate

    device = next(model.parameters()).device
    phi: dict[tuple[str, str], list[torch.Tensor]] = {}
    per_pair = {}
    for pair, pair_examples in examples.items():
        awareness = UnitAwareness(sources)
        with awareness:
            for start in tqdm(range(0, len(pair_examples), batch_size), desc=f"awareness {pair}", unit="batch"):
                batch = collate(pair_examples[start:start + batch_size], pad_token_id)
                awareness.add_batch(model, {k: v.to(device) for k, v in batch.items()})
        scores = awareness.scores(estimate)
        for key, score in scores.items():
            phi.setdefault(key, []).append(score)
        n = max(len(pair_examples), 1)
        per_pair[pair] = {
            "phi_mean": float(torch.cat([s.flatten() for s in scores.values()]).mean()) if scores else 0.0,
            "tokens_per_sentence": sum(len(e.input_ids) for e in pair_examples) / n,
            "target_tokens_per_sentence": sum(sum(label != IGNORE_INDEX for label in e.labels) for e in pair_examples) / n,
        }
    return PairAwareness({key: torch.stack(scores) for key, scores in phi.items()}, per_pair)
