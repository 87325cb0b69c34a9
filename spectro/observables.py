"""Per-token losses of a causal LM at given weights (docs/method.md).

`token_losses(model, params, input_ids)` returns -log p_w(y | x) for every
position after the first of every context, with the parameters in `params`
substituted into `model` (torch.func.functional_call; parameters not named
keep the model's own values, i.e. w*). `mean_loss` is their mean over a
minibatch, differentiable for SGLD.

Non-obvious choices:
- Fused, chunked head + cross-entropy. For a GPT-NeoX model the
  body gives the final hidden states (after the final LayerNorm) and the head
  and the loss are computed a block of token rows at a time: a (rows, vocab)
  block of logits is reduced to logsumexp and the target logit at once and
  never written out in full. A block has `CE_ROWS` = 128 rows (per chain):
  fewer make the (rows, d) @ (d, vocab) product memory-bound on the head
  (docs/performance.md). The fused path cuts the cost of the head's
  cross-entropy well below that of `F.cross_entropy` on
  materialised logits (which also copies the non-contiguous `logits[:, :-1]`
  slice, forward and backward). Two variants, each checked against the plain
  path (values and gradients, under vmap) by a test:
  * `token_cross_entropy`, per-token losses for evaluations (no autograd):
    one (rows, vocab) buffer for all blocks, and under bf16 autocast the
    head is cast once per call instead of once per block.
    `linear_cross_entropy` is the same, differentiable (its backward
    recomputes each block's logits from the saved hidden states).
  * `linear_cross_entropy_mean`, the SGLD loss. Its output is a scalar, so
    its gradients are known in the forward pass up to the incoming gradient:
    each block's logits become softmax - onehot in place and are multiplied
    into d_hidden and d_weight at once, and backward only scales them. One
    head product per needed gradient instead of the recompute, one exp pass
    instead of two, and only the gradients that are needed (a sampled head:
    d_weight; any sampled body weight: d_hidden). Its own vmap rule runs the
    vmapped chains as one stacked computation with one (chains, rows, vocab)
    buffer and d_weight accumulated in place (baddbmm_). Step times before
    and after are measured in docs/performance.md.
- Softmax in place: a block's float32 logits go through torch's
  fused `log_softmax` (evaluations) / `softmax` (SGLD loss) kernels with
  `out=` the block itself. They work a row at a time while it is in cache
  (max, exp-sum, write), where amax / sub_ / exp_ / sum / div_ are each a
  pass over the whole block (25.7 MB on Pythia); the kernel times are
  measured in docs/performance.md. The
  SGLD loss takes logsumexp = max - log(p at the max) (p_max = 1 / sum exp(z
  - max) >= 1 / vocab never underflows; the target's probability can). The
  kernels sum a row in float32 lanes, so the losses and gradients are as
  accurate as `F.cross_entropy` in float32 (same kernels: 5.6e-7 and 2.3e-6
  relative at the Pythia vocabulary, test) rather than the 1.6e-7 and
  0.7e-6 of the pairwise sums used before. `out=` has no vmap batching
  rule: the SGLD loss's own vmap rule calls the kernels on stacked (chains,
  rows, vocab) blocks, evaluations run chain by chain (as their torch.mm
  out= already required), and `linear_cross_entropy` (vmap-able, the tests'
  differentiable reference) keeps the elementwise form.
- Host memory of the fused path: the SGLD loss and evaluations allocate one
  block buffer per call and reuse it in place for every block;
  `linear_cross_entropy` uses one buffer per block, freed before the next
  block allocates. Outputs are allocated once. Small tensors kept
  alive between the big blocks pinned glibc's heap, which then grew by
  hundreds of MB per draw (docs/performance.md).
- Cross-entropy is computed from float32 logits (float64 inputs stay
  float64; bf16 autocast for evaluation rounds the matmul only); means over
  tokens are taken in float64 (by the callers of `token_losses`, and inside
  `linear_cross_entropy_mean`).
- Lower-layer cache: a component in layer L leaves the residual
  stream entering layer L unchanged, so `residual_at(model, ids, L)` computes
  it once at w* and `Body(model, L)` evaluates layers L.. + final LayerNorm
  from it. `Body` holds the model as its child `m`, so `functional_call`
  substitutes parameters named `"m." + name`; the layers run through the
  architecture adapter (`spectro.neox.run_layers`), and a test checks the
  result against the full forward to float tolerance. `Body(model, None)` is the
  whole model from token ids. L = n_layers (the unembedding) runs no layer at
  all: only the head changes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.func import functional_call

from spectro import neox

CE_ROWS = 128          # token rows (per chain) per block of logits in the fused head + cross-entropy
BODY_ROWS = 4096       # token rows per forward chunk when evaluating many contexts (bounds activation memory)
HEAD = neox.UNEMBED_PARAM


def logits(model: torch.nn.Module, params: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq) int64 -> (batch, seq, vocab) logits at the substituted weights (the plain reference path)."""
    out = functional_call(model, params, args=(input_ids,), kwargs={"use_cache": False})
    return out.logits


# ---- fused, chunked unembedding + cross-entropy


def _float(z: torch.Tensor) -> torch.Tensor:
    return z.float() if z.dtype in (torch.bfloat16, torch.float16) else z


def _block_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    """(rows, d), (vocab, d), (rows,) -> losses (rows,), logsumexp (rows,). Elementwise and in place (vmap-able,
    unlike the softmax kernels' out=; no second vocab-sized buffer, as torch.logsumexp would allocate)."""
    z = _float(hidden @ weight.T)                                                  # (rows, vocab)
    target = z.gather(1, targets.unsqueeze(1)).squeeze(1)                          # (rows,)
    top = z.amax(dim=1, keepdim=True)                                              # (rows, 1)
    lse = z.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))                # (rows,)
    return lse - target, lse


@torch.no_grad()
def token_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        rows: int = CE_ROWS) -> torch.Tensor:
    """(n, d), (vocab, d), (n,) -> (n,) per-row losses, no gradient (evaluations). One (rows, vocab) buffer
    for all blocks (torch.mm(out=)); under autocast the head is cast to its dtype once per call, not once per
    block as `hidden @ weight.T` would, and the losses are computed from float32 logits as everywhere."""
    dev = hidden.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    n, V = hidden.shape[0], weight.shape[0]
    with torch.autocast(dev, enabled=False):
        w_t, h_all = weight.to(dt).T, hidden.to(dt)                                 # (d, vocab), (n, d)
        ft = _float(h_all[:1, :1]).dtype
        out = torch.empty(n, dtype=ft, device=hidden.device)
        buf = zf = None
        for s in range(0, n, rows):
            h, t = h_all[s:s + rows], targets[s:s + rows].unsqueeze(1)               # (r, d), (r, 1)
            r = h.shape[0]
            if buf is None or buf.shape[0] != r:                                     # once, and the ragged tail
                buf = torch.empty((r, V), dtype=dt, device=hidden.device)
                zf = buf if ft == dt else torch.empty((r, V), dtype=ft, device=hidden.device)
            torch.mm(h, w_t, out=buf)                                                # (r, vocab)
            z = zf if zf is buf else zf.copy_(buf)                                   # float32 logits
            torch.log_softmax(z, 1, out=z)                                           # in place (module docstring)
            out[s:s + r] = z.gather(1, t).squeeze(1).neg_()
    return out


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-row -log softmax(hidden @ weight.T)[target], a block of rows at a time (see the module docstring)."""

    generate_vmap_rule = True          # torch.func.vmap over chains (batched hidden and/or weight)

    @staticmethod
    def forward(hidden, weight, targets, rows):
        # no_grad: under torch.func.grad the ops in here would otherwise be recorded, saving every block's
        # logits (measured, 50k head, peak over the step's start: 1 chain x 1,024 rows +862 -> +434 MB,
        # 2 vmapped chains +1,105 -> +418 MB); only setup_context's tensors are meant to be kept
        with torch.no_grad():
            n = hidden.shape[0]
            loss = lse = None
            for s in range(0, n, rows):
                l_blk, lse_blk = _block_ce(hidden[s:s + rows], weight, targets[s:s + rows])
                if loss is None:        # new_empty of a block: batched under vmap whenever any input is
                    loss, lse = l_blk.new_empty((n,)), lse_blk.new_empty((n,))
                loss[s:s + rows] = l_blk
                lse[s:s + rows] = lse_blk
                del l_blk, lse_blk      # freed before the next block's buffer is allocated (module docstring)
            return loss, lse                                                        # (n,), (n,)

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, targets, rows = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(hidden, weight, targets, output[1])
        ctx.rows = rows

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        with torch.no_grad():                       # first derivatives only
            return _LinearCrossEntropy._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        d_hidden = d_weight = None
        for s in range(0, hidden.shape[0], ctx.rows):
            h, t = hidden[s:s + ctx.rows], targets[s:s + ctx.rows]                 # (rows, d), (rows,)
            p = _float(h @ weight.T).sub_(lse[s:s + ctx.rows].unsqueeze(1)).exp_()  # softmax (rows, vocab)
            p.scatter_add_(1, t.unsqueeze(1), -torch.ones_like(p[:, :1]))          # softmax - onehot
            dz = (p * grad_loss[s:s + ctx.rows].unsqueeze(1)).to(hidden.dtype)
            del p
            if need_h:
                dh = dz @ weight                                                    # (rows, d)
                if d_hidden is None:
                    d_hidden = dh.new_empty(hidden.shape)
                d_hidden[s:s + ctx.rows] = dh
                del dh
            if need_w:
                if d_weight is None:
                    d_weight = dz.T @ h                                             # (vocab, d)
                else:
                    d_weight.add_(dz.T @ h)                                         # accumulate in place
            del dz
        return d_hidden, d_weight, None, None


def _ce_sum_and_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int,
                      need_hidden: bool, need_weight: bool):
    """Chains stacked: hidden (C, n, d), weight (C, V, d) per chain or (V, d) shared, targets (C, n) ->
    float64 sums of the rows' losses (C,), and their gradients d_hidden (C, n, d) and d_weight (C, V, d)
    (None where not needed). `rows` rows per chain and block; the (C, rows, V) block buffer is allocated
    once and reused in place, d_weight accumulates in place (baddbmm_): no allocation per block."""
    C, n, d = hidden.shape
    shared = weight.dim() == 2
    V = weight.shape[-2]
    total = torch.zeros(C, dtype=torch.float64, device=hidden.device)                  # (C,)
    d_hidden = hidden.new_empty((C, n, d)) if need_hidden else None
    d_weight = hidden.new_zeros((C, V, d)) if need_weight else None
    buf = None
    for s in range(0, n, rows):
        h = hidden[:, s:s + rows]                                                      # (C, r, d)
        t = targets[:, s:s + rows].unsqueeze(-1)                                       # (C, r, 1)
        r = h.shape[1]
        if buf is None or buf.shape[1] != r:                                           # once, and the ragged tail
            buf = torch.empty((C, r, V), dtype=hidden.dtype, device=hidden.device)
        if shared:
            torch.mm(h.reshape(C * r, d), weight.T, out=buf.view(C * r, V))          # chains folded into rows
        else:
            torch.bmm(h, weight.transpose(1, 2), out=buf)                             # (C, r, V)
        z = _float(buf)                                                                # a copy only for bf16/fp16
        if not (need_hidden or need_weight):
            torch.log_softmax(z, -1, out=z)                                            # in place (module docstring)
            total -= z.gather(-1, t).sum(dim=(1, 2), dtype=torch.float64)
            continue
        target = z.gather(-1, t).squeeze(-1)                                           # (C, r)
        top = z.amax(dim=-1)                                                           # (C, r)
        torch.softmax(z, -1, out=z)                                                    # in place (module docstring)
        lse = top.sub_(z.amax(dim=-1).log_())                    # the max's probability is 1 / sum exp(z - top)
        total += (lse - target).sum(dim=1, dtype=torch.float64)
        z.scatter_add_(2, t, torch.full_like(t, -1, dtype=z.dtype))                   # softmax - onehot
        dz = z.to(hidden.dtype)                                                        # (C, r, V)
        if need_hidden:
            if shared:
                d_hidden[:, s:s + r] = torch.mm(dz.view(C * r, V), weight).view(C, r, d)
            else:
                d_hidden[:, s:s + r] = torch.bmm(dz, weight)                          # (C, r, d)
        if need_weight:
            d_weight.baddbmm_(dz.transpose(1, 2), h)                                   # += (C, V, r) @ (C, r, d)
    return total, d_hidden, d_weight


class _LinearCrossEntropyMean(torch.autograd.Function):
    """Mean over rows of -log softmax(hidden @ weight.T)[target], with its gradients computed in the same pass.

    The output is a scalar, so d(mean)/d(hidden) and d(mean)/d(weight) are known in the forward pass up to the
    incoming gradient, which backward only multiplies in. Each block's logits are computed once, turned into
    softmax - onehot in place and multiplied into the gradients right away: one head product per needed
    gradient instead of the recompute of `_LinearCrossEntropy`, one exp pass instead of two. Under vmap over
    chains its own rule (`vmap` below) runs all chains as one stacked computation."""

    @staticmethod
    def forward(hidden, weight, targets, rows, need_hidden, need_weight):
        with torch.no_grad():                                                       # see _LinearCrossEntropy
            total, dh, dw = _ce_sum_and_grads(hidden.unsqueeze(0), weight, targets.unsqueeze(0), rows,
                                              need_hidden, need_weight)
            n, empty = hidden.shape[0], hidden.new_zeros(0)
            return ((total[0] / n).to(_float(hidden).dtype), empty if dh is None else dh[0],
                    empty if dw is None else dw[0])

    @staticmethod
    def vmap(info, in_dims, hidden, weight, targets, rows, need_hidden, need_weight):
        C = info.batch_size
        hd, wd, td = in_dims[:3]
        hidden = hidden.movedim(hd, 0) if hd is not None else hidden.expand(C, *hidden.shape)
        targets = targets.movedim(td, 0) if td is not None else targets.expand(C, *targets.shape)
        weight = weight.movedim(wd, 0) if wd is not None else weight                 # (C, V, d) or shared (V, d)
        with torch.no_grad():
            total, dh, dw = _ce_sum_and_grads(hidden, weight, targets, rows, need_hidden, need_weight)
            empty = hidden.new_zeros(0)
            out = ((total / hidden.shape[1]).to(_float(hidden[:1, :1]).dtype),
                   empty if dh is None else dh, empty if dw is None else dw)
        return out, (0, None if dh is None else 0, None if dw is None else 0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, _, _, _, need_hidden, need_weight = inputs
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.save_for_backward(output[1], output[2])
        ctx.n, ctx.need = inputs[0].shape[0], (need_hidden, need_weight)

    @staticmethod
    def backward(ctx, grad, _g_hidden, _g_weight):
        for i, what in enumerate(("hidden", "weight")):
            if ctx.needs_input_grad[i] and not ctx.need[i]:
                raise RuntimeError(f"linear_cross_entropy_mean: a gradient for {what} is needed but "
                                   f"need_{what}=False was passed")
        d_hidden, d_weight = ctx.saved_tensors
        scale = grad / ctx.n                                                        # () incoming gradient / rows
        return (d_hidden * scale.to(d_hidden.dtype) if ctx.need[0] else None,
                d_weight * scale.to(d_weight.dtype) if ctx.need[1] else None, None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         rows: Optional[int] = None) -> torch.Tensor:
    """(n, d) hidden, (vocab, d) head, (n,) targets -> (n,) losses (float32 at least); differentiable, vmap-able."""
    return _LinearCrossEntropy.apply(hidden, weight, targets, rows or CE_ROWS)[0]


def linear_cross_entropy_mean(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              rows: Optional[int] = None, need_hidden: bool = True,
                              need_weight: bool = True) -> torch.Tensor:
    """Scalar mean of `linear_cross_entropy` (summed in float64), its gradients computed in the forward pass:
    differentiable for the inputs flagged `need_*` only (backward raises if another one needs a gradient)."""
    return _LinearCrossEntropyMean.apply(hidden, weight, targets, rows or CE_ROWS, need_hidden, need_weight)[0]


# ---- the body: final hidden states from token ids, or from a cached residual stream


@torch.no_grad()
def residual_at(model: torch.nn.Module, input_ids: torch.Tensor, layer: int, chunk: int = 64) -> torch.Tensor:
    """(n, seq) ids -> (n, seq, hidden) residual stream entering layer `layer`, at the model's own weights."""
    outs = []
    for start in range(0, input_ids.shape[0], chunk):
        h = neox.embed(model, input_ids[start:start + chunk])                        # (chunk, seq, hidden)
        outs.append(neox.run_layers(model, h, 0, layer))
    return torch.cat(outs)


class Body(torch.nn.Module):
    """A GPT-NeoX causal LM up to its final LayerNorm: from token ids (`start=None`) or from the residual
    stream entering layer `start` (layers `start..` only). Output (batch, seq, hidden)."""

    def __init__(self, model: torch.nn.Module, start: Optional[int] = None):
        super().__init__()
        self.m = model
        self.start = start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            return neox.final_hidden(self.m, x)                                      # (batch, seq, hidden)
        return neox.final_norm(self.m, neox.run_layers(self.m, x, self.start))      # (batch, seq, hidden)


def _head_inputs(body: Body, params: dict[str, torch.Tensor], x: torch.Tensor, ids: torch.Tensor):
    """Body input x (ids or cached residual) -> hidden rows (b * (seq - 1), d), head (vocab, d), targets."""
    h = functional_call(body, {"m." + n: p for n, p in params.items()}, args=(x,))[:, :-1]   # (b, seq-1, hidden)
    weight = params.get(HEAD, body.m.lm_head.weight)                                        # (vocab, hidden)
    return h.reshape(-1, h.shape[-1]), weight, ids[:, 1:].reshape(-1)


def _losses(body: Body, params: dict[str, torch.Tensor], x: torch.Tensor, ids: torch.Tensor,
            rows: Optional[int] = None) -> torch.Tensor:
    """Per-token losses (b, seq - 1) of a body's input x (ids or cached residual); evaluations, no gradient."""
    return token_cross_entropy(*_head_inputs(body, params, x, ids), rows or CE_ROWS).view(ids.shape[0], -1)


def _mean(body: Body, params: dict[str, torch.Tensor], x: torch.Tensor, ids: torch.Tensor,
          rows: Optional[int] = None) -> torch.Tensor:
    """Mean next-token loss of a body's input x, differentiable for `params` (gradients formed in the forward
    pass: the head's weight if it is sampled, the hidden states if any body parameter is)."""
    return linear_cross_entropy_mean(*_head_inputs(body, params, x, ids), rows,
                                     need_hidden=any(n != HEAD for n in params), need_weight=HEAD in params)


def mean_loss(model: torch.nn.Module, params: dict[str, torch.Tensor], input_ids: torch.Tensor,
              rows: Optional[int] = None) -> torch.Tensor:
    """Mean next-token cross-entropy over a (batch, seq) block: scalar, differentiable for `params` (the SGLD
    loss; see `linear_cross_entropy_mean`). `rows`: rows per chain and block of the fused head."""
    if not neox.is_neox(model):
        z = logits(model, params, input_ids)                                     # (batch, seq, vocab)
        return F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), input_ids[:, 1:].reshape(-1))
    return _mean(Body(model), params, input_ids, input_ids, rows)


def mean_loss_from(body: Body, params: dict[str, torch.Tensor], batch, rows: Optional[int] = None) -> torch.Tensor:
    """Mean next-token CE from a cached residual: batch = (hidden (b, seq, d), input_ids (b, seq))."""
    hidden, ids = batch
    return _mean(body, params, hidden, ids, rows)


@torch.no_grad()
def token_losses(model: torch.nn.Module, params: dict[str, torch.Tensor], input_ids: torch.Tensor,
                 rows: int = BODY_ROWS) -> torch.Tensor:
    """(contexts, seq) -> (contexts, seq - 1) float32 per-token losses."""
    if not neox.is_neox(model):
        z = logits(model, params, input_ids)[:, :-1]
        return F.cross_entropy(z.reshape(-1, z.shape[-1]).float(), input_ids[:, 1:].reshape(-1),
                               reduction="none").view(input_ids.shape[0], -1)
    return token_losses_from(Body(model), params, input_ids, input_ids, rows)


@torch.no_grad()
def token_losses_from(body: Body, params: dict[str, torch.Tensor], x: torch.Tensor, input_ids: torch.Tensor,
                      rows: int = BODY_ROWS) -> torch.Tensor:
    """`token_losses` from the body's input x (token ids, or a cached residual (n, seq, d)): (n, seq - 1)."""
    n, seq = input_ids.shape
    chunk = max(1, rows // seq)
    return torch.cat([_losses(body, params, x[s:s + chunk], input_ids[s:s + chunk]).float()
                      for s in range(0, n, chunk)])
