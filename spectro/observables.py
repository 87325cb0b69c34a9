"""Per-token losses of a causal LM at given weights (DESIGN 1.2).

`token_losses(model, params, input_ids)` returns -log p_w(y | x) for every
position after the first of every context, with the parameters in `params`
substituted into `model` (torch.func.functional_call; parameters not named
keep the model's own values, i.e. w*).

Non-obvious choices:
- Logits are materialised one chunk of contexts at a time, sized so a chunk
  holds at most `max_logit_elements` floats (the unembedding dominates memory
  on a 50k vocabulary: 64 contexts x 64 positions x 50304 is 800 MB in fp32).
- Cross-entropy is computed from float32 logits; means over tokens are taken
  in float64 by the callers.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.func import functional_call

MAX_LOGIT_ELEMENTS = 1 << 24  # 16M floats = 64 MB per chunk


def logits(model: torch.nn.Module, params: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq) int64 -> (batch, seq, vocab) logits at the substituted weights."""
    out = functional_call(model, params, args=(input_ids,), kwargs={"use_cache": False})
    return out.logits


def mean_loss(model: torch.nn.Module, params: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over a (batch, seq) block: scalar (differentiable)."""
    z = logits(model, params, input_ids)                                   # (batch, seq, vocab)
    return F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), input_ids[:, 1:].reshape(-1))


@torch.no_grad()
def token_losses(model: torch.nn.Module, params: dict[str, torch.Tensor], input_ids: torch.Tensor,
                 max_logit_elements: int = MAX_LOGIT_ELEMENTS, vocab_size: Optional[int] = None) -> torch.Tensor:
    """(contexts, seq) -> (contexts, seq - 1) float32 per-token losses."""
    n, seq = input_ids.shape
    vocab = vocab_size or model.config.vocab_size
    chunk = max(1, max_logit_elements // (seq * vocab))
    out = torch.empty(n, seq - 1, dtype=torch.float32, device=input_ids.device)
    for start in range(0, n, chunk):
        ids = input_ids[start:start + chunk]                               # (chunk, seq)
        z = logits(model, params, ids)[:, :-1]                             # (chunk, seq-1, vocab)
        loss = F.cross_entropy(z.reshape(-1, z.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="none")
        out[start:start + chunk] = loss.view(ids.shape[0], seq - 1)
    return out
