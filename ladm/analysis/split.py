"""General / language-specific splits of units by their awareness Φ (pairs × units).

Both rules return `general` (bool, units) and `specific` (bool, pairs × units): unit j is specific to
pair p where `specific[p, j]`; a general unit is specific to no pair.
"""

from __future__ import annotations

import torch


def lambda_split(phi: torch.Tensor, lam: float, norm: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """MLAS-LoRA eq. 3 / A.6 (METHODS.md §3.3, LANDeRMT `split=lambda`): λ_i = Φ(p_i) / Σ_n Φ(p_n) per unit; a unit
    whose largest share exceeds λ is specific to that pair, otherwise general.

    `norm=per_pair` first divides each pair's Φ by its mean over the units, so a pair whose loss (hence every Φ)
    is larger does not claim every unit; `none` is the paper's rule."""
    if norm == "per_pair":
        phi = phi / phi.mean(1, keepdim=True).clamp_min(torch.finfo(phi.dtype).tiny)
    share = phi / phi.sum(0).clamp_min(torch.finfo(phi.dtype).tiny)
    top_share, owner = share.max(0)
    general = top_share <= lam
    specific = torch.zeros_like(phi, dtype=torch.bool)
    specific[owner, torch.arange(phi.shape[1])] = True
    return general, specific & ~general


def ratio_split(phi: torch.Tensor, general_ratio: float, partition: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Xie et al. 2021 (METHODS.md §4.3, `split=ratio`): the top `general_ratio` of units by Φ summed over pairs
    are general; every other unit belongs to each pair whose Φ is at least `partition` × its largest Φ."""
    n_general = round(general_ratio * phi.shape[1])
    order = torch.argsort(phi.sum(0), descending=True, stable=True)
    general = torch.zeros(phi.shape[1], dtype=torch.bool)
    general[order[:n_general]] = True
    specific = phi >= partition * phi.max(0).values
    return general, specific & ~general


def pick(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """The k units of highest score among `candidates` (topped up with the best others if there are fewer),
    in their original order (MLAS-LoRA eqs. 4–5)."""
    order = torch.argsort(scores, descending=True, stable=True)
    preferred = order[candidates[order]]
    chosen = torch.cat([preferred, order[~candidates[order]]])[:k]
    return chosen.sort().values
