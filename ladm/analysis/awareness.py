"""Neuron awareness Φ over any set of units (METHODS.md §3.2, §4.2), streamed batch by batch.

A unit is one coordinate of a module's input or output: the output units (rows of W) and input units
(columns of W) of a linear map for MLAS-LoRA, the FFN intermediate units (the input of `down_proj`,
a = act(gate(x))·up(x)) for LANDeRMT. Φ_j = mean over non-padding tokens of |∂L/∂a_j · a_j|, with L the
sum over the batch's sentences of each sentence's mean answer-token cross-entropy.
"""

from __future__ import annotations

import torch

from ladm.losses import answer_loss

Sources = dict[str, tuple[torch.nn.Module, tuple[str, ...]]]  # name → (module, sides: "in" and/or "out")


class UnitAwareness:
    """Running sums of |∂L/∂a · a| for every `(name, side)` source: side `in` is the module's first input,
    `out` its output. Use as a context manager around `add_batch` calls."""

    def __init__(self, sources: Sources):
        self.sources = sources
        self.sums: dict[tuple[str, str], torch.Tensor] = {}
        self.tokens = 0
        self._mask: torch.Tensor | None = None
        self._handles: list = []

    def _hook(self, name: str, sides: tuple[str, ...]):
        def hook(module, inputs, output):
            for side, tensor in (("in", inputs[0]), ("out", output)):
                if side in sides and tensor.requires_grad:
                    tensor.register_hook(self._grad_hook((name, side), tensor.detach()))
        return hook

    def _grad_hook(self, key: tuple[str, str], activation: torch.Tensor):
        def grad_hook(grad: torch.Tensor) -> None:
            taylor = ((grad.float() * activation.float()).abs() * self._mask.unsqueeze(-1)).sum((0, 1)).double()
            self.sums[key] = taylor if key not in self.sums else self.sums[key] + taylor  # on the device: no sync
        return grad_hook

    def __enter__(self) -> UnitAwareness:
        self._handles = [m.register_forward_hook(self._hook(name, sides)) for name, (m, sides) in self.sources.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def add_batch(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
        """One forward + backward; the activations of all non-padding tokens count."""
        self._mask = batch["attention_mask"].float()
        # Gradients reach the activations through the embeddings; the model's weights stay frozen.
        embeddings = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        answer_loss(model, batch, inputs_embeds=embeddings, per_sentence_mean=True).backward()
        self.tokens += int(batch["attention_mask"].sum())

    def scores(self) -> dict[tuple[str, str], torch.Tensor]:
        return {key: total.cpu() / max(self.tokens, 1) for key, total in self.sums.items()}


def awareness_per_pair(model: torch.nn.Module, examples: dict[str, list], sources: Sources, pad_token_id: int,
                       batch_size: int) -> dict[tuple[str, str], torch.Tensor]:
    """Φ of every source's units for every pair: `{(name, side): pairs × units}` in the order of `examples`."""
    from tqdm.auto import tqdm

    from ladm.data import collate

    device = next(model.parameters()).device
    phi: dict[tuple[str, str], list[torch.Tensor]] = {}
    for pair, pair_examples in examples.items():
        awareness = UnitAwareness(sources)
        with awareness:
            for start in tqdm(range(0, len(pair_examples), batch_size), desc=f"awareness {pair}", unit="batch"):
                batch = collate(pair_examples[start:start + batch_size], pad_token_id)
                awareness.add_batch(model, {k: v.to(device) for k, v in batch.items()})
        for key, score in awareness.scores().items():
            phi.setdefault(key, []).append(score)
    return {key: torch.stack(scores) for key, scores in phi.items()}
