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
- Lower-layer cache (issue 7): a component in layer L leaves the residual
  stream entering layer L unchanged, so `residual_at(model, ids, L)` computes
  it once at w* and `UpperStack(model, L)` evaluates layers L.. + final
  LayerNorm + head from it. `UpperStack` holds the model as its child `m`, so
  `functional_call` substitutes parameters named `"m." + name`; it builds the
  causal mask and rotary embeddings exactly as `GPTNeoXModel.forward` does,
  and a test checks it against the full forward to float tolerance.
  L = n_layers (the unembedding) runs no layer at all: only the head changes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.func import functional_call
from transformers.masking_utils import create_causal_mask

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


# ---- evaluation from a cached residual stream (components in layer L >= 1)


def _mask_and_rotary(base: torch.nn.Module, hidden: torch.Tensor):
    pos = torch.arange(hidden.shape[-2], device=hidden.device).unsqueeze(0)          # (1, seq)
    mask = create_causal_mask(config=base.config, inputs_embeds=hidden, attention_mask=None,
                              past_key_values=None, position_ids=pos)
    return pos, mask, base.rotary_emb(hidden, position_ids=pos)


@torch.no_grad()
def residual_at(model: torch.nn.Module, input_ids: torch.Tensor, layer: int, chunk: int = 64) -> torch.Tensor:
    """(n, seq) ids -> (n, seq, hidden) residual stream entering layer `layer`, at the model's own weights."""
    base = model.gpt_neox
    outs = []
    for start in range(0, input_ids.shape[0], chunk):
        h = base.embed_in(input_ids[start:start + chunk])                            # (chunk, seq, hidden)
        pos, mask, rot = _mask_and_rotary(base, h)
        for blk in base.layers[:layer]:
            h = blk(h, attention_mask=mask, position_ids=pos, position_embeddings=rot)
        outs.append(h)
    return torch.cat(outs)


class UpperStack(torch.nn.Module):
    """Layers `start..` of a GPT-NeoX causal LM, its final LayerNorm and head."""

    def __init__(self, model: torch.nn.Module, start: int):
        super().__init__()
        self.m = model
        self.start = start

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        base = self.m.gpt_neox
        pos, mask, rot = _mask_and_rotary(base, hidden)
        for blk in base.layers[self.start:]:
            hidden = blk(hidden, attention_mask=mask, position_ids=pos, position_embeddings=rot)
        return self.m.lm_head(base.final_layer_norm(hidden))                          # (batch, seq, vocab)


def _prefixed(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"m." + n: p for n, p in params.items()}


def mean_loss_from(upper: UpperStack, params: dict[str, torch.Tensor], batch) -> torch.Tensor:
    """Mean next-token CE from a cached residual: batch = (hidden (b, seq, d), input_ids (b, seq))."""
    hidden, ids = batch
    z = functional_call(upper, _prefixed(params), args=(hidden,))                     # (b, seq, vocab)
    return F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), ids[:, 1:].reshape(-1))


@torch.no_grad()
def token_losses_from(upper: UpperStack, params: dict[str, torch.Tensor], hidden: torch.Tensor,
                      input_ids: torch.Tensor, max_logit_elements: int = MAX_LOGIT_ELEMENTS) -> torch.Tensor:
    """`token_losses` from a cached residual (n, seq, d): (n, seq - 1) float32."""
    n, seq = input_ids.shape
    vocab = upper.m.config.vocab_size
    chunk = max(1, max_logit_elements // (seq * vocab))
    out = torch.empty(n, seq - 1, dtype=torch.float32, device=input_ids.device)
    p = _prefixed(params)
    for start in range(0, n, chunk):
        ids = input_ids[start:start + chunk]                                          # (chunk, seq)
        z = functional_call(upper, p, args=(hidden[start:start + chunk],))[:, :-1]    # (chunk, seq-1, vocab)
        loss = F.cross_entropy(z.reshape(-1, z.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="none")
        out[start:start + chunk] = loss.view(ids.shape[0], seq - 1)
    return out
