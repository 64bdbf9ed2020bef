"""The translation loss (METHODS.md §5): next-token cross-entropy on the answer tokens only, computed
from the final hidden states in chunks, so the logits of the whole batch never exist at once (Llama-3
has 128,256, Qwen2.5 152,064 and Gemma-2 256,000 entries per position). Used by the trainer and by
the neuron-awareness analysis."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_BYTES = 256 * 2**20  # float32 logits of one chunk


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The PreTrainedModel inside DDP and PEFT wrappers (for its output layer and config)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ_i w_i·CE(cap·tanh(h_i Wᵀ / cap), y_i) chunk by chunk; the gradients are formed in the forward pass
    (softmax − one-hot, through the soft-cap), so backward keeps no logits either."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, softcap, chunk):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        for start in range(0, hidden.shape[0], chunk):
            h, y, w = hidden[start:start + chunk], targets[start:start + chunk], token_weights[start:start + chunk]
            logits = (h @ weight.T).float()
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            log_z = torch.logsumexp(logits, -1)
            total += ((log_z - logits.gather(1, y[:, None]).squeeze(1)) * w).sum()
            if want_hidden or want_weight:
                grad = torch.exp(logits.sub_(log_z[:, None]))  # softmax, in place of the logits
                grad[torch.arange(len(y), device=y.device), y] -= 1
                if softcap:
                    grad.mul_(1 - capped.square_())
                grad = grad.mul_(w[:, None]).to(hidden.dtype)
                if want_hidden:
                    grad_hidden[start:start + chunk] = grad @ weight
                if want_weight:
                    grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype), None, None, None, None)


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             token_weights: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """Σ_i token_weights_i · cross-entropy of `hidden_i @ weight.T` (optionally soft-capped, Gemma-2) against `targets_i`.

    The matrix product runs in the autocast dtype when autocast is on (as `lm_head` would), in the
    weight's dtype otherwise; the softmax always in float32."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    chunk = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(hidden.to(dtype), weight.to(dtype), targets, token_weights.float(), softcap, chunk)


def answer_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], inputs_embeds: torch.Tensor | None = None,
                per_sentence_mean: bool = False) -> torch.Tensor:
    """Next-token cross-entropy over the answer tokens of a batch (optionally fed as embeddings): summed over
    all answer tokens (the trainer divides by the global token count), or with `per_sentence_mean` the sum
    over sentences of each sentence's mean (METHODS.md §3.2: the awareness loss).

    The model runs without its output layer (`logits_to_keep` selects no position); the output layer
    and the final-logit soft-capping of the config are applied to the answer positions only."""
    inputs = {"input_ids": batch["input_ids"]} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    no_position = torch.zeros(0, dtype=torch.long, device=batch["attention_mask"].device)
    output = model(**inputs, attention_mask=batch["attention_mask"], output_hidden_states=True,
                   logits_to_keep=no_position, use_cache=False)
    hidden = output.hidden_states[-1][:, :-1]  # final (normed) hidden state; position t predicts t+1
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    weights = keep.float()
    if per_sentence_mean:
        weights = weights / keep.sum(1, keepdim=True).clamp_min(1)
    base = _unwrap(model)
    softcap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
    return linear_cross_entropy_sum(hidden[keep], base.get_output_embeddings().weight, labels[keep], weights[keep], softcap)


def full_logits_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The same loss through the model's own logits (every position, float32): the reference it must equal."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")
