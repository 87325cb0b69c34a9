"""Stochastic-gradient Langevin dynamics over a masked subset of parameters.

The sampler is a pure `build -> init / update` transform over a small state,
in the style of `posteriors`: `build(...)` fixes the hyperparameters, anchor
`w*`, masks and per-chain loss; `init(num_chains)` gives the state at `w*`;
`update(state, batch, generators)` takes one step for every chain. It targets

    p(w) ∝ exp( -nβ · L(w) - (γ/2) · ||w - w*||² )       (docs/method.md)

with the step, for masked entries only,

    w ← w - (ε/2) · P · ( nβ · ∇L_batch(w) + γ (w - w*) ) + sqrt(ε · P) · σ · N(0, I)

where P = 1 (plain SGLD) or the RMSProp preconditioner P = 1 / (sqrt(v) + eps),
v ← α v + (1-α) (∇L_batch)² (devinterp's `RMSpropPreconditioner`, without its
optional gradient correction term).

Non-obvious choices:
- Chains are stacked on a leading axis of every sampled tensor:
  `params[name]` has shape (chains, *param_shape). `chain_mode="vmap"` computes
  all chains' gradients in one `torch.func.vmap(grad)` call; `"loop"` calls
  `torch.func.grad` per chain. Both are the same maths (a test checks they agree).
- Randomness comes only from the generators passed to `update`, one per chain,
  so a chain's trajectory does not depend on which other chains share its unit.
  Noise is drawn for each sampled tensor in sorted name order, full shape, then
  masked: the draw count per step is fixed, which keeps restores bit-identical.
- A mask is a bool tensor of the parameter's shape, or None for the whole
  tensor. Entries outside the mask never move (their gradient and noise are
  zeroed), so `w - w*` is zero there and the localization term needs no mask.
- Only the sampled tensors are differentiated; the rest of the model is a
  constant closed over by `loss_fn`, so autograd builds no graph for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch.func import grad_and_value, vmap

from spectro.config import SamplerConfig

_S = SamplerConfig()      # the schema's defaults: the one place they are written

Params = dict[str, torch.Tensor]
# loss_fn(params_one_chain, batch_one_chain) -> scalar tensor (mean loss L_batch)
LossFn = Callable[[Params, Any], torch.Tensor]


@dataclass(frozen=True)
class SGLDHyper:
    step_size: float                 # ε
    nbeta: float                     # nβ
    gamma: float                     # γ, localization
    noise_level: float = _S.noise_level         # σ
    precondition: str = _S.precondition         # "none" | "rmsprop"
    rmsprop_alpha: float = _S.rmsprop_alpha
    rmsprop_eps: float = _S.rmsprop_eps


class SGLDState(NamedTuple):
    params: Params                   # name -> (chains, *shape) current sample
    sq_avg: Optional[Params]         # name -> (chains, *shape) RMSProp second moment, or None
    step: int                        # steps taken so far


class StepInfo(NamedTuple):
    loss: torch.Tensor               # (chains,) minibatch loss at the pre-step weights
    grad_norm: torch.Tensor          # (chains,) ||nβ ∇L|| over masked entries
    noise_norm: torch.Tensor         # (chains,) ||sqrt(εP) σ ξ|| over masked entries
    distance: torch.Tensor           # (chains,) ||w - w*|| after the step


@dataclass(frozen=True)
class SGLD:
    hyper: SGLDHyper
    anchor: Params                   # name -> (*shape) w*
    masks: dict[str, Optional[torch.Tensor]]
    loss_fn: LossFn
    chain_mode: str = _S.chain_mode

    def init(self, num_chains: int) -> SGLDState:
        params = {n: w.detach().unsqueeze(0).repeat(num_chains, *([1] * w.dim())) for n, w in self.anchor.items()}
        sq_avg = None
        if self.hyper.precondition == "rmsprop":
            sq_avg = {n: torch.zeros_like(p) for n, p in params.items()}
        return SGLDState(params=params, sq_avg=sq_avg, step=0)

    def grads(self, params: Params, batch: Any) -> tuple[Params, torch.Tensor]:
        """Per-chain gradients and losses: ({name: (chains, *shape)}, (chains,)).

        With nβ = 0 (the control run) the loss term has no weight: the gradient is zero and is not computed;
        the minibatch loss still is (it is traced and checked for divergence)."""
        if self.hyper.nbeta == 0:
            with torch.no_grad():
                if self.chain_mode == "vmap":
                    loss = vmap(self.loss_fn, in_dims=(0, 0))(params, batch)
                else:
                    n = next(iter(params.values())).shape[0]
                    loss = torch.stack([self.loss_fn({k: p[c] for k, p in params.items()}, _index(batch, c))
                                        for c in range(n)])
            return {n: torch.zeros_like(p) for n, p in params.items()}, loss
        g_and_v = grad_and_value(self.loss_fn)
        if self.chain_mode == "vmap":
            return vmap(g_and_v, in_dims=(0, 0))(params, batch)
        n_chains = next(iter(params.values())).shape[0]
        outs = [g_and_v({n: p[c] for n, p in params.items()}, _index(batch, c)) for c in range(n_chains)]
        grads = {n: torch.stack([g[n] for g, _ in outs]) for n in params}
        return grads, torch.stack([v for _, v in outs])

    def update(self, state: SGLDState, batch: Any, generators: Sequence[torch.Generator],
               active: Optional[torch.Tensor] = None,
               signs: Optional[Sequence[float]] = None) -> tuple[SGLDState, StepInfo]:
        """One SGLD step for every chain. `batch` has a leading chains axis.

        `active` (chains,) bool: chains set False keep their weights (diverged
        chains); their noise is still drawn so every generator advances alike.
        """
        h = self.hyper
        n_chains = len(generators)
        grads, loss = self.grads(state.params, batch)
        new_params: Params = {}
        new_sq: Optional[Params] = {} if state.sq_avg is not None else None
        device = next(iter(state.params.values())).device                # norms accumulate where the weights are
        grad_sq = torch.zeros(n_chains, dtype=torch.float64, device=device)
        noise_sq = torch.zeros(n_chains, dtype=torch.float64, device=device)
        dist_sq = torch.zeros(n_chains, dtype=torch.float64, device=device)
        with torch.no_grad():
            # memory: the `full` component of a 50k-vocab model has 2 x 6.4M-entry matrices per chain,
            # so every full-size temporary costs 25 MB per chain. Per tensor this loop holds the chain-stacked
            # gradient (popped, so it is freed once used, and reused as scratch), one noise buffer and the new
            # weights; norms never square into a new tensor (`_sq_norms`).
            for name in sorted(state.params):
                w = state.params[name]                                   # (chains, *shape)
                g = grads.pop(name)                                      # (chains, *shape), ours to modify
                mask = self.masks.get(name)
                xi = torch.empty_like(w)                                 # (chains, *shape)
                for c, gen in enumerate(generators):
                    torch.randn(w.shape[1:], generator=gen, dtype=w.dtype, device=w.device, out=xi[c])
                    if signs is not None and signs[c] < 0:
                        xi[c].neg_()
                if mask is not None:
                    g.mul_(mask)
                    xi.mul_(mask)
                if new_sq is not None:
                    v = state.sq_avg[name] * h.rmsprop_alpha + (1 - h.rmsprop_alpha) * g * g
                    new_sq[name] = v
                    precond = 1.0 / (torch.sqrt(v) + h.rmsprop_eps)
                    if mask is not None:
                        precond = precond * mask
                else:
                    precond = None
                grad_sq += _sq_norms(g) * h.nbeta ** 2
                w_new = torch.sub(w, self.anchor[name]).mul_(h.gamma).add_(g, alpha=h.nbeta)   # the drift
                noise = xi.mul_(h.noise_level * math.sqrt(h.step_size))
                if precond is not None:
                    w_new.mul_(precond)
                    noise.mul_(torch.sqrt(precond))
                w_new.mul_(-0.5 * h.step_size).add_(w).add_(noise)      # w - (ε/2) drift + noise
                if active is not None and not bool(active.all()):
                    w_new[~active] = w[~active]                          # diverged chains stay put
                new_params[name] = w_new
                noise_sq += _sq_norms(noise)
                del noise, xi
                dist_sq += _sq_norms(torch.sub(w_new, self.anchor[name], out=g))   # g's memory as scratch
                del g
        info = StepInfo(loss=loss.detach(), grad_norm=grad_sq.sqrt().cpu(), noise_norm=noise_sq.sqrt().cpu(),
                        distance=dist_sq.sqrt().cpu())                    # (chains,) float64 on the host
        return SGLDState(params=new_params, sq_avg=new_sq, step=state.step + 1), info


def build(hyper: SGLDHyper, anchor: Params, masks: dict[str, Optional[torch.Tensor]], loss_fn: LossFn,
          chain_mode: str = _S.chain_mode) -> SGLD:
    """Fix the sampler's hyperparameters, anchor w*, masks and loss."""
    return SGLD(hyper=hyper, anchor={n: a.detach() for n, a in anchor.items()}, masks=dict(masks),
                loss_fn=loss_fn, chain_mode=chain_mode)


def _sq_norms(x: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """(chains, *shape) -> (chains,) float64 squared norms without a full-size temporary: float32 norms of
    `block`-entry slices (a fused reduction, relative error ~1e-7), squared and summed in float64. (A plain
    `x.square().sum(dtype=torch.float64)` allocates the squares and then a float64 copy: 3x the tensor.)"""
    flat = x.reshape(x.shape[0], -1)                                       # (chains, n), a view
    n = flat.shape[1]
    main = n - n % block
    out = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    if main:
        parts = torch.linalg.vector_norm(flat[:, :main].unflatten(1, (main // block, block)), dim=-1)
        out += parts.double().square().sum(1)                              # (chains, n // block) -> (chains,)
    if n > main:
        out += torch.linalg.vector_norm(flat[:, main:], dim=-1).double().square()
    return out


def _index(batch: Any, c: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[c]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_index(b, c) for b in batch)
    if isinstance(batch, dict):
        return {k: _index(v, c) for k, v in batch.items()}
    raise TypeError(f"unsupported batch type {type(batch).__name__}")
