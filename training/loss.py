"""Causal-LM loss on response positions only: logits are computed just where labels are set.

The logits over a 49k vocabulary dominate memory for full sequences; projecting only the response
positions (a few dozen per example) keeps batch 4 x 512 well within a CPU's memory.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

IGNORE_INDEX = -100
"""Label of positions the loss ignores (prompt and padding)."""


def mean_token_kl(log_p: torch.Tensor, log_q: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean over (unmasked) positions of KL(p || q) between next-token log-distributions (..., V)."""
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (...)
    if mask is not None:
        return float((kl * mask).sum() / mask.sum().clamp(min=1))
    return float(kl.mean())


class ResponseLoss(nn.Module):
    """Wraps a causal LM so that `forward(batch)` returns (summed response loss, response token count).

    Wrapping (rather than calling submodules from the loop) lets DistributedDataParallel hook its forward.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return response_loss(self.model, batch)


def response_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over response tokens and their count (a 0-d tensor).

    batch: input_ids (B, T), attention_mask (B, T), labels (B, T) with IGNORE_INDEX on prompt/padding.
    """
    body, lm_head = model.model, model.lm_head  # a causal LM's decoder stack and output projection
    assert isinstance(body, nn.Module) and isinstance(lm_head, nn.Module)
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]  # (B, T-1) token t+1 is predicted at position t
    positions = targets != IGNORE_INDEX  # (B, T-1)
    selected = hidden[:, :-1][positions]  # (N, d)
    logits = lm_head(selected).float()  # (N, V)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma2
        logits = torch.tanh(logits / cap) * cap
    loss = F.cross_entropy(logits, targets[positions], reduction="sum")
    return loss, positions.sum()
