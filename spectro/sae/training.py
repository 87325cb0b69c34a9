"""Training a TopK sparse autoencoder (Gao et al. 2024 recipe) on
sampling-distribution activations (`train_topk`).

`TrainSettings` takes its defaults from the config schema
(`spectro.config.SAEConfig`); `TrainSettings.from_config` builds it from a
run's `sae` section.

Non-obvious choices:
- Training recipe: inputs are divided by one scalar so that E||x||^2 = d_in
  (lr then means the same at every site); `b_dec` starts at the data mean,
  decoder rows start random unit vectors and `W_enc` starts as `W_dec^T`;
  decoder rows are kept unit-norm (the gradient component along each row is
  removed before the Adam step and rows are renormalised after it); Adam with
  a linear decay to 0 over the last 20% of steps. Dead features (no activation
  for `dead_after` steps) are trained by the AuxK loss: the top `aux_k` dead
  latents reconstruct the main reconstruction's error, weighted 1/32. Adam
  is written out (torch.optim's first step imports torch._dynamo: seconds)
  and training runs in one torch thread (see `train_topk`). The
  input scale is folded into the saved weights, so a saved SAE takes raw
  activations (SAELens `normalize_activations: "none"`).
- `max_epochs` is unbounded when not given: a direct call trains exactly
  `steps` steps; the sae stage passes `sae.max_epochs`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from spectro.config import SAEConfig
from spectro.errors import SAEError
from spectro.sae.model import SAE


_D = SAEConfig()       # the schema's defaults: the one place they are written
_AUX_COEF = 1 / 32     # weight of the AuxK loss (Gao et al.)


@dataclass(frozen=True)
class TrainSettings:
    """Training settings; fields and meanings as `spectro.config.SAEConfig` (module notes on max_epochs)."""
    expansion: int = _D.expansion
    k: int = _D.k
    steps: int = _D.steps
    batch_size: int = _D.batch_size
    max_epochs: float = math.inf        # steps are capped at this many passes over the data; unbounded if not given
    lr: float = _D.lr
    aux_k: int = _D.aux_k
    aux_coef: float = _AUX_COEF
    dead_after: int = _D.dead_after
    seed: int = _D.seed

    @classmethod
    def from_config(cls, config: SAEConfig) -> "TrainSettings":
        """The training settings of a config's `sae` section."""
        return cls(expansion=config.expansion, k=config.k, steps=config.steps, batch_size=config.batch_size,
                   max_epochs=config.max_epochs, lr=config.lr, aux_k=config.aux_k, dead_after=config.dead_after,
                   seed=config.seed)


def train_topk(x: torch.Tensor, settings: TrainSettings = TrainSettings()) -> tuple[SAE, dict]:
    """Train a TopK SAE on activations x (n, d_in); returns the SAE (taking raw activations) and a log.

    Runs in one torch thread (restored afterwards): the matrices are small, and on a busy machine the
    intra-op thread pool made each step far slower in CPU time than one thread (docs/performance.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_topk(x, settings)
    finally:
        torch.set_num_threads(threads)


def _train_topk(x: torch.Tensor, settings: TrainSettings) -> tuple[SAE, dict]:
    s = settings
    if x.ndim != 2 or x.shape[0] < 2:
        raise SAEError(f"SAE training needs a 2-D (tokens, d_in) activation matrix with >= 2 rows; "
                       f"got {tuple(x.shape)}")
    n, d = x.shape
    d_sae = s.expansion * d
    if not 1 <= s.k <= d_sae:
        raise SAEError(f"sae.k={s.k} must be between 1 and the dictionary size {d_sae}; lower sae.k")
    t0, c0 = time.perf_counter(), time.process_time()
    g = torch.Generator().manual_seed(s.seed)
    x64 = x.double()
    scale = float(torch.sqrt((x64 ** 2).sum(dim=1).mean() / d))    # E||x/scale||^2 = d
    xs = (x64 / scale).float()                                      # (n, d)
    params = _init_params(xs, d_sae, g)
    W_enc, b_enc, W_dec, b_dec = params
    m1 = [torch.zeros_like(p) for p in params]                      # Adam moments (`_adam_step`)
    m2 = [torch.zeros_like(p) for p in params]
    since_fired = torch.zeros(d_sae, dtype=torch.int64)
    batch = min(s.batch_size, n)
    if math.isfinite(s.max_epochs):
        s = dataclasses.replace(s, steps=max(1, min(s.steps, math.ceil(s.max_epochs * n / batch))))
    decay_from = int(0.8 * s.steps)
    order, pos = torch.randperm(n, generator=g), 0
    mse_log, aux_log = [], []
    for step in range(s.steps):
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=g), 0
        xb = xs[order[pos:pos + batch]]                              # (B, d)
        pos += batch
        pre, vals, idx, err, mse = _forward(xb, params, s.k)
        fired = torch.zeros(d_sae, dtype=torch.bool)
        fired[idx[vals > 0]] = True
        since_fired = torch.where(fired, 0, since_fired + 1)
        dead = since_fired > s.dead_after
        loss = mse
        if dead.any() and s.aux_k > 0:
            aux = _aux_loss(pre, err, dead, W_dec, s.aux_k)
            if torch.isfinite(aux):
                loss = loss + s.aux_coef * aux
                aux_log.append(float(aux.detach()))
        for p in params:
            p.grad = None
        loss.backward()
        lr = s.lr * (s.steps - step) / max(1, s.steps - decay_from) if step >= decay_from else s.lr
        _adam_step(params, m1, m2, lr, step)
        mse_log.append(float(mse.detach()))
        if not math.isfinite(mse_log[-1]):
            raise SAEError(f"SAE training diverged at step {step} (loss {mse_log[-1]}); lower sae.lr")
    with torch.no_grad():                                            # fold the input scale into the weights
        sae = SAE(W_enc=(W_enc / scale).detach().clone(), b_enc=b_enc.detach().clone(),
                  W_dec=(W_dec * scale).detach().clone(), b_dec=(b_dec * scale).detach().clone(),
                  architecture="topk", k=s.k, apply_b_dec_to_input=True)
    tail = mse_log[-max(1, s.steps // 20):]
    log = {"steps": s.steps, "batch_size": batch, "n_tokens": n, "d_in": d, "d_sae": d_sae, "k": s.k,
           "input_scale": scale, "train_fve_last5pct": 1.0 - float(np.mean(tail)),
           "dead_at_end": int((since_fired > s.dead_after).sum()), "aux_steps": len(aux_log),
           "seconds": round(time.perf_counter() - t0, 2), "cpu_seconds": round(time.process_time() - c0, 2)}
    return sae, log


def _init_params(xs: torch.Tensor, d_sae: int, g: torch.Generator) -> list[torch.Tensor]:
    """[W_enc, b_enc, W_dec, b_dec] to train: random unit-norm decoder rows, the encoder their transpose, no
    encoder bias, the decoder bias at the data's mean."""
    W_dec = _unit_rows(torch.randn(d_sae, xs.shape[1], generator=g))   # (d_sae, d)
    W_dec.requires_grad_(True)
    W_enc = W_dec.detach().T.clone().requires_grad_(True)           # (d, d_sae)
    b_enc = torch.zeros(d_sae, requires_grad=True)
    b_dec = xs.double().mean(dim=0).float().requires_grad_(True)   # (d,)
    return [W_enc, b_enc, W_dec, b_dec]


def _forward(xb: torch.Tensor, params: list[torch.Tensor], k: int) -> tuple:
    """(pre-activations, top-k values (clamped at 0), their latents, reconstruction error, normalised MSE) of a
    batch (B, d): the MSE over the batch's total variance, i.e. 1 - FVE on the batch."""
    W_enc, b_enc, W_dec, b_dec = params
    pre = (xb - b_dec) @ W_enc + b_enc                           # (B, d_sae)
    vals, idx = pre.topk(k, dim=-1)                              # (B, k)
    vals = vals.clamp_min(0)
    recon = torch.einsum("bk,bkd->bd", vals, W_dec[idx]) + b_dec  # (B, d): gather k rows, no dense f @ W_dec
    err = xb - recon
    total_var = ((xb - xb.mean(dim=0)) ** 2).sum(dim=-1).mean()
    return pre, vals, idx, err, (err ** 2).sum(dim=-1).mean() / total_var


def _aux_loss(pre: torch.Tensor, err: torch.Tensor, dead: torch.Tensor, W_dec: torch.Tensor,
              aux_k: int) -> torch.Tensor:
    """The dead latents' auxiliary loss: how far the top `aux_k` of them (by pre-activation) are from
    reconstructing the batch's error, over the error's variance."""
    k_aux = min(aux_k, int(dead.sum()))
    aux_pre = pre.masked_fill(~dead, float("-inf"))
    a_vals, a_idx = aux_pre.topk(k_aux, dim=-1)              # (B, k_aux)
    e = err.detach()
    e_hat = torch.einsum("bk,bkd->bd", a_vals.clamp_min(0), W_dec[a_idx])   # (B, d)
    return ((e_hat - e) ** 2).sum(dim=-1).mean() / ((e - e.mean(dim=0)) ** 2).sum(dim=-1).mean().clamp_min(1e-12)


def _adam_step(params: list[torch.Tensor], m1: list[torch.Tensor], m2: list[torch.Tensor], lr: float,
               step: int, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
    """One Adam step of (W_enc, b_enc, W_dec, b_dec) in place, W_dec's rows kept unit-norm. Written out:
    torch.optim's first step imports torch._dynamo, ~10 s here."""
    W_dec = params[2]
    with torch.no_grad():
        W_dec.grad -= (W_dec.grad * W_dec).sum(dim=1, keepdim=True) * W_dec   # keep rows unit-norm:
        for p, a, b in zip(params, m1, m2):                                 # drop the radial gradient
            a.mul_(beta1).add_(p.grad, alpha=1 - beta1)
            b.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            step_size = lr * math.sqrt(1 - beta2 ** (step + 1)) / (1 - beta1 ** (step + 1))
            p.addcdiv_(a, b.sqrt().add_(eps), value=-step_size)
        W_dec.copy_(_unit_rows(W_dec))


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
