"""Layer relevance R and Activation Disparity ΔR (METHODS.md §1), streamed with forward hooks."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from ladm.data import left_pad
from ladm.models import decoder_layers


class LayerRelevance:
    """Accumulates `R_l = 1/N · Σ_x mean_t ||A_{l+1}(x)_t − A_l(x)_t||_1` batch by batch.

    Forward hooks on the decoder layers see each layer's input `A_l` and output `A_{l+1}`;
    only per-layer running sums (float64) are kept, never the hidden states of the set.
    """

    def __init__(self, model: torch.nn.Module):
        self.layers = decoder_layers(model)
        self.sums = torch.zeros(len(self.layers), dtype=torch.float64, device=next(model.parameters()).device)
        self.n_sentences = 0
        self._mask: torch.Tensor | None = None

    def _hook(self, index: int):
        def hook(module, args, kwargs, output):
            layer_in = args[0] if args else kwargs["hidden_states"]
            layer_out = output[0] if isinstance(output, tuple) else output
            l1 = (layer_out.float() - layer_in.float()).abs().sum(-1)  # (batch, tokens)
            mask = self._mask.to(l1.dtype)
            token_mean = (l1 * mask).sum(-1) / mask.sum(-1)  # mean over non-padding tokens
            self.sums[index] += token_mean.sum().double()  # stays on the device: no sync per layer

        return hook

    @contextmanager
    def hooked(self):
        handles = [layer.register_forward_hook(self._hook(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def add_batch(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """One forward pass; position ids follow the mask so left and right padding agree."""
        self._mask = attention_mask
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
              logits_to_keep=1)  # the hooks need the layers, not the vocabulary-sized logits
        self.n_sentences += input_ids.shape[0]

    @property
    def relevance(self) -> torch.Tensor:
        return self.sums.cpu() / max(self.n_sentences, 1)


def layer_relevance(model: torch.nn.Module, token_ids: list[list[int]], pad_token_id: int, batch_size: int,
                    desc: str = "probe") -> torch.Tensor:
    """R_l of every decoder layer over a probe set of tokenised inputs."""
    device = next(model.parameters()).device
    relevance = LayerRelevance(model)
    was_training = model.training
    model.eval()
    with relevance.hooked():
        for start in tqdm(range(0, len(token_ids), batch_size), desc=desc, unit="batch"):
            input_ids, attention_mask = left_pad(token_ids[start:start + batch_size], pad_token_id)
            relevance.add_batch(model, input_ids.to(device), attention_mask.to(device))
    model.train(was_training)
    return relevance.relevance


def normalise(relevance: torch.Tensor, mode: str) -> torch.Tensor:
    """R̃ per pair: `none`, `sum` (R_l / Σ_k R_k, the default) or `zscore` over layers."""
    if mode == "none":
        return relevance.clone()
    if mode == "sum":
        return relevance / relevance.sum()
    if mode == "zscore":
        return (relevance - relevance.mean()) / relevance.std()
    raise ValueError(f"unknown normalisation '{mode}': none | sum | zscore")


def activation_disparity(r_hi: torch.Tensor, r_lo: torch.Tensor, normalisation: str = "sum",
                         sign: str = "hi_minus_lo") -> torch.Tensor:
    """ΔR_l = R̃_l(p_hi) − R̃_l(p_lo) (`hi_minus_lo`, the default) or its negation (`lo_minus_hi`)."""
    delta = normalise(r_hi, normalisation) - normalise(r_lo, normalisation)
    if sign == "hi_minus_lo":
        return delta
    if sign == "lo_minus_hi":
        return -delta
    raise ValueError(f"unknown sign '{sign}': hi_minus_lo | lo_minus_hi")
