"""Sparse autoencoder features as a check on susceptibility clusters (DESIGN 1.7).

Three parts, used in this order by the `sae` pipeline stage:

1. *Activations.* `collect_activations` runs the real transformers GPT-NeoX
   module with a forward hook on `gpt_neox.layers[L]` (site `resid_post`: the
   residual stream after block L) or on `gpt_neox.layers[L].mlp` (site
   `mlp_out`: the MLP's output, before it is added to the stream).
2. *The SAE.* `train_topk` trains a TopK autoencoder (Gao et al. 2024 recipe)
   on sampling-distribution activations; `load_sae`/`save_sae` read and write
   the SAELens on-disk layout (`cfg.json` + `sae_weights.safetensors` holding
   `W_enc (d_in, d_sae)`, `b_enc (d_sae)`, `W_dec (d_sae, d_in)`, `b_dec (d_in)`).
   `evaluate` reports the fraction of variance explained and the loss when the
   reconstruction is spliced into the model in place of the real activation.
3. *Matching.* `match_clusters` finds, for every cluster, the feature whose
   "active on this probe token" set has the best F1 against the cluster's
   members, and compares the matched fraction with random clusterings.

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
- A loaded SAE may be `topk`, `standard` (ReLU) or `jumprelu` (with a
  `threshold` tensor); only safetensors are read (nothing is unpickled).
- Which activation belongs to a probe token (x, y), with y at position p:
  `position: predicting` uses position p - 1, where the model computes its
  prediction of y (the loss that chi is a covariance of); `position: token`
  uses position p, where y is the input. Both are reported by the benchmark.
- Null: a random clustering is the cluster labels (noise included) permuted
  over all probe tokens, so random clusters have exactly the real sizes and
  are disjoint like the real ones. p-value = (1 + #{null >= observed}) /
  (1 + n_null).
- F1, precision and recall come from one sparse product
  `membership^T @ active` (clusters x features overlaps); the null reuses it
  for batches of permutations.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from spectro.errors import SAEError

SITES = ("resid_post", "mlp_out")
POSITIONS = ("predicting", "token")
ARCHITECTURES = ("topk", "standard", "jumprelu")
CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
_HOOK = re.compile(r"^blocks\.(\d+)\.hook_(resid_post|mlp_out)$")


def hook_name(site: str, layer: int) -> str:
    """SAELens/TransformerLens name of an activation site."""
    return f"blocks.{layer}.hook_{site}"


# --------------------------------------------------------------------------- #
# activations from the real model
# --------------------------------------------------------------------------- #


def _site_module(model: torch.nn.Module, site: str, layer: int) -> torch.nn.Module:
    if site not in SITES:
        raise SAEError(f"sae.site {site!r} is not one of {', '.join(SITES)}; pick one of those")
    layers = model.gpt_neox.layers
    if not 0 <= layer < len(layers):
        raise SAEError(f"sae.layer {layer} is out of range: the model has layers 0..{len(layers) - 1}; "
                       f"pick one of those")
    return layers[layer] if site == "resid_post" else layers[layer].mlp


class _Stop(Exception):
    """Raised by a capture hook to skip the rest of the forward pass (the unembedding dominates its cost)."""


@torch.no_grad()
def collect_activations(model: torch.nn.Module, input_ids: torch.Tensor, site: str, layer: int,
                        batch_size: int = 64) -> torch.Tensor:
    """(n_contexts, seq_len, d_model) float32 activations at `site` of `layer` for every position."""
    module = _site_module(model, site, layer)
    out: list[torch.Tensor] = []

    def grab(_mod, _inp, output):
        out.append((output[0] if isinstance(output, tuple) else output).detach().float())
        raise _Stop

    handle = module.register_forward_hook(grab)
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            try:
                model.gpt_neox(input_ids=input_ids[i:i + batch_size])
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(out)                                           # (n_ctx, seq, d)


# --------------------------------------------------------------------------- #
# the autoencoder
# --------------------------------------------------------------------------- #


@dataclass
class SAE:
    """Inference-time SAE in SAELens conventions: f = act((x - b_dec·a) W_enc + b_enc), x̂ = f W_dec + b_dec."""
    W_enc: torch.Tensor                 # (d_in, d_sae)
    b_enc: torch.Tensor                 # (d_sae,)
    W_dec: torch.Tensor                 # (d_sae, d_in)
    b_dec: torch.Tensor                 # (d_in,)
    architecture: str = "topk"          # "topk" | "standard" | "jumprelu"
    k: Optional[int] = None             # topk only
    threshold: Optional[torch.Tensor] = None   # jumprelu only, (d_sae,)
    apply_b_dec_to_input: bool = True
    hook_name: str = ""
    meta: dict = field(default_factory=dict)   # training settings and results, saved into cfg.json

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(n, d_in) -> (n, d_sae) non-negative feature activations (dense)."""
        x = x.to(self.W_enc.dtype)
        pre = (x - self.b_dec * float(self.apply_b_dec_to_input)) @ self.W_enc + self.b_enc   # (n, d_sae)
        if self.architecture == "topk":
            vals, idx = pre.topk(self.k, dim=-1)                                             # (n, k)
            return torch.zeros_like(pre).scatter_(-1, idx, vals.clamp_min(0))
        if self.architecture == "jumprelu":
            return pre * (pre > self.threshold)
        return pre.clamp_min(0)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec                                                   # (n, d_in)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass(frozen=True)
class TrainSettings:
    expansion: int = 8                  # d_sae = expansion * d_in
    k: int = 16                         # active latents per token
    steps: int = 3000
    batch_size: int = 1024
    max_epochs: float = math.inf        # steps are capped at this many passes over the data
    lr: float = 1e-3
    aux_k: int = 128                    # dead latents used by the AuxK loss
    aux_coef: float = 1 / 32
    dead_after: int = 200               # steps without activating before a latent counts as dead
    seed: int = 0


def train_topk(x: torch.Tensor, settings: TrainSettings = TrainSettings()) -> tuple[SAE, dict]:
    """Train a TopK SAE on activations x (n, d_in); returns the SAE (taking raw activations) and a log.

    Runs in one torch thread (restored afterwards): the matrices are small, and on a busy 2-core machine
    the intra-op thread pool made each step ~10x slower in CPU time than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_topk(x, settings)
    finally:
        torch.set_num_threads(threads)


def _train_topk(x: torch.Tensor, settings: TrainSettings) -> tuple[SAE, dict]:
    s = settings
    if x.ndim != 2 or x.shape[0] < 2:
        raise SAEError(f"SAE training needs a 2-D (tokens, d_in) activation matrix with >= 2 rows; got {tuple(x.shape)}")
    n, d = x.shape
    d_sae = s.expansion * d
    if not 1 <= s.k <= d_sae:
        raise SAEError(f"sae.k={s.k} must be between 1 and the dictionary size {d_sae}; lower sae.k")
    t0, c0 = time.perf_counter(), time.process_time()
    g = torch.Generator().manual_seed(s.seed)
    x64 = x.double()
    scale = float(torch.sqrt((x64 ** 2).sum(dim=1).mean() / d))    # E||x/scale||^2 = d
    xs = (x64 / scale).float()                                      # (n, d)
    W_dec = _unit_rows(torch.randn(d_sae, d, generator=g))          # (d_sae, d)
    W_dec.requires_grad_(True)
    W_enc = W_dec.detach().T.clone().requires_grad_(True)           # (d, d_sae)
    b_enc = torch.zeros(d_sae, requires_grad=True)
    b_dec = xs.double().mean(dim=0).float().requires_grad_(True)   # (d,)
    params = [W_enc, b_enc, W_dec, b_dec]
    m1 = [torch.zeros_like(p) for p in params]                      # Adam moments (written out: torch.optim's
    m2 = [torch.zeros_like(p) for p in params]                      # first step imports torch._dynamo, ~10 s here)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
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
        pre = (xb - b_dec) @ W_enc + b_enc                           # (B, d_sae)
        vals, idx = pre.topk(s.k, dim=-1)                            # (B, k)
        vals = vals.clamp_min(0)
        recon = torch.einsum("bk,bkd->bd", vals, W_dec[idx]) + b_dec  # (B, d): gather k rows, no dense f @ W_dec
        err = xb - recon
        total_var = ((xb - xb.mean(dim=0)) ** 2).sum(dim=-1).mean()
        mse = (err ** 2).sum(dim=-1).mean() / total_var              # normalised: 1 - FVE on the batch
        fired = torch.zeros(d_sae, dtype=torch.bool)
        fired[idx[vals > 0]] = True
        since_fired = torch.where(fired, 0, since_fired + 1)
        dead = since_fired > s.dead_after
        loss = mse
        if dead.any() and s.aux_k > 0:
            k_aux = min(s.aux_k, int(dead.sum()))
            aux_pre = pre.masked_fill(~dead, float("-inf"))
            a_vals, a_idx = aux_pre.topk(k_aux, dim=-1)              # (B, k_aux)
            e = err.detach()
            e_hat = torch.einsum("bk,bkd->bd", a_vals.clamp_min(0), W_dec[a_idx])   # (B, d)
            aux = ((e_hat - e) ** 2).sum(dim=-1).mean() / ((e - e.mean(dim=0)) ** 2).sum(dim=-1).mean().clamp_min(1e-12)
            if torch.isfinite(aux):
                loss = loss + s.aux_coef * aux
                aux_log.append(float(aux.detach()))
        for p in params:
            p.grad = None
        loss.backward()
        lr = s.lr * (s.steps - step) / max(1, s.steps - decay_from) if step >= decay_from else s.lr
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(dim=1, keepdim=True) * W_dec   # keep rows unit-norm:
            for p, a, b in zip(params, m1, m2):                                 # drop the radial gradient
                a.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                b.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                step_size = lr * math.sqrt(1 - beta2 ** (step + 1)) / (1 - beta1 ** (step + 1))
                p.addcdiv_(a, b.sqrt().add_(eps), value=-step_size)
            W_dec.copy_(_unit_rows(W_dec))
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


# --------------------------------------------------------------------------- #
# SAELens-style files
# --------------------------------------------------------------------------- #


def save_sae(sae: SAE, directory: Path) -> Path:
    """Write cfg.json + sae_weights.safetensors into `directory` (temp files, then rename)."""
    import safetensors.torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold
    cfg = {"architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32",
           "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": "none",
           "hook_name": sae.hook_name, "metadata": {"hook_name": sae.hook_name, **sae.meta}}
    if sae.architecture == "topk":
        cfg["k"] = sae.k
        cfg["activation_fn_kwargs"] = {"k": sae.k}
    wtmp, ctmp = directory / (WEIGHTS_FILE + ".tmp"), directory / (CFG_FILE + ".tmp")
    safetensors.torch.save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, str(wtmp))
    ctmp.write_text(json.dumps(cfg, indent=2))
    os.replace(wtmp, directory / WEIGHTS_FILE)
    os.replace(ctmp, directory / CFG_FILE)
    return directory


def load_sae(directory: Path, d_in: Optional[int] = None) -> SAE:
    """Read a SAELens-layout SAE directory; every problem is one SAEError saying what to fix."""
    import safetensors
    import safetensors.torch

    directory = Path(directory)
    where = f"SAE directory {directory}"
    if not directory.is_dir():
        raise SAEError(f"{where} does not exist; point sae.load at a directory with {CFG_FILE} and {WEIGHTS_FILE}")
    cfg_path, w_path = directory / CFG_FILE, directory / WEIGHTS_FILE
    if not w_path.exists():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt"))
        hint = (f" It holds {', '.join(pickles)}: pickle files are never loaded (they can run code); convert them "
                f"to safetensors (safetensors.torch.save_file)." if pickles else "")
        raise SAEError(f"{where} has no {WEIGHTS_FILE}.{hint}")
    if not cfg_path.exists():
        raise SAEError(f"{where} has no {CFG_FILE}; it must give at least d_in, d_sae and architecture")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SAEError(f"{cfg_path} is not valid JSON ({e}); fix or regenerate it") from None
    if not isinstance(cfg, dict):
        raise SAEError(f"{cfg_path} must hold a JSON object")
    try:
        with safetensors.safe_open(str(w_path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k).float() for k in fh.keys()}
    except Exception as e:   # safetensors raises several types for a non-safetensors file
        raise SAEError(f"{w_path} is not a readable safetensors file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                       f"pickled weights are refused: save them with safetensors.torch.save_file") from None
    arch = str(cfg.get("architecture", "standard"))
    if arch not in ARCHITECTURES:
        raise SAEError(f"{cfg_path}: architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    need = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if arch == "jumprelu" else [])
    missing = [k for k in need if k not in tensors]
    if missing:
        raise SAEError(f"{w_path} lacks tensor(s) {', '.join(missing)} (has {', '.join(sorted(tensors)) or 'none'}); "
                       f"a SAELens SAE stores W_enc (d_in, d_sae), b_enc (d_sae), W_dec (d_sae, d_in), b_dec (d_in)")
    W_enc = tensors["W_enc"]
    if W_enc.ndim != 2:
        raise SAEError(f"{w_path}: W_enc must be 2-D (d_in, d_sae), got shape {tuple(W_enc.shape)}")
    di, ds = (int(cfg.get("d_in", W_enc.shape[0])), int(cfg.get("d_sae", W_enc.shape[1])))
    want = {"W_enc": (di, ds), "b_enc": (ds,), "W_dec": (ds, di), "b_dec": (di,), "threshold": (ds,)}
    for k in need:
        if tuple(tensors[k].shape) != want[k]:
            raise SAEError(f"{w_path}: {k} has shape {tuple(tensors[k].shape)} but d_in={di}, d_sae={ds} "
                           f"({CFG_FILE}) need {want[k]}")
        if not torch.isfinite(tensors[k]).all():
            raise SAEError(f"{w_path}: {k} holds NaN or infinite values")
    if d_in is not None and di != d_in:
        raise SAEError(f"{where} takes d_in={di} activations but the model's width is {d_in}; "
                       f"use an SAE trained on this model")
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, "none"):
        raise SAEError(f"{cfg_path}: normalize_activations={norm!r} is not supported (its scale factor is not "
                       f"part of the files); fold the scale into the weights and set it to 'none'")
    k = None
    if arch == "topk":
        k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
        if not isinstance(k, int) or not 1 <= k <= ds:
            raise SAEError(f"{cfg_path}: a topk SAE needs an integer k in 1..{ds} (key 'k' or "
                           f"activation_fn_kwargs.k), got {k!r}")
    name = cfg.get("hook_name") or (cfg.get("metadata") or {}).get("hook_name") or ""
    return SAE(W_enc=W_enc, b_enc=tensors["b_enc"], W_dec=tensors["W_dec"], b_dec=tensors["b_dec"],
               architecture=arch, k=k, threshold=tensors.get("threshold"),
               apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), hook_name=str(name),
               meta=dict(cfg.get("metadata") or {}))


def parse_hook_name(name: str) -> Optional[tuple[str, int]]:
    """(site, layer) of a TransformerLens hook name like blocks.2.hook_resid_post, or None."""
    m = _HOOK.match(name or "")
    return (m.group(2), int(m.group(1))) if m else None


# --------------------------------------------------------------------------- #
# reconstruction quality
# --------------------------------------------------------------------------- #


def fve(sae: SAE, x: torch.Tensor, chunk: int = 8192) -> float:
    """Fraction of variance explained, 1 - sum||x - x̂||^2 / sum||x - mean x||^2, accumulated in float64."""
    x = x.reshape(-1, x.shape[-1])
    mean = x.double().mean(dim=0)
    resid = total = 0.0
    for i in range(0, x.shape[0], chunk):
        xb = x[i:i + chunk]
        resid += float(((xb.double() - sae.reconstruct(xb).double()) ** 2).sum())
        total += float(((xb.double() - mean) ** 2).sum())
    return 1.0 - resid / total if total > 0 else float("nan")


@torch.no_grad()
def spliced_losses(model: torch.nn.Module, input_ids: torch.Tensor, sae: SAE, site: str, layer: int,
                   mean_act: torch.Tensor, batch_size: int = 32) -> dict:
    """Mean next-token loss of the model as is, with the site's output replaced by the SAE reconstruction,
    and with it replaced by its mean (mean ablation); float64 sums."""
    module = _site_module(model, site, layer)
    mode = {"v": "clean"}

    def replace(_mod, _inp, output):
        h = output[0] if isinstance(output, tuple) else output          # (B, T, d)
        if mode["v"] == "sae":
            new = sae.reconstruct(h.reshape(-1, h.shape[-1])).reshape(h.shape).to(h.dtype)
        elif mode["v"] == "mean":
            new = mean_act.to(h.dtype).expand_as(h)
        else:
            return None
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    out = {}
    handle = module.register_forward_hook(replace)
    try:
        for m in ("clean", "sae", "mean"):
            mode["v"] = m
            total, count = 0.0, 0
            for i in range(0, input_ids.shape[0], batch_size):
                ids = input_ids[i:i + batch_size]
                logits = model(input_ids=ids).logits[:, :-1].double()  # (B, T-1, V)
                nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                        reduction="sum")
                total += float(nll)
                count += ids[:, 1:].numel()
            out[m] = total / count
    finally:
        handle.remove()
    gap = out["mean"] - out["clean"]
    return {"loss_clean": out["clean"], "loss_spliced": out["sae"], "loss_mean_ablation": out["mean"],
            "loss_increase": out["sae"] - out["clean"],
            "loss_recovered": 1.0 - (out["sae"] - out["clean"]) / gap if gap > 0 else float("nan")}


# --------------------------------------------------------------------------- #
# probe-token activations and matching
# --------------------------------------------------------------------------- #


def probe_features(sae: SAE, acts: torch.Tensor, token_context: np.ndarray, token_position: np.ndarray,
                   position: str = "predicting", active_threshold: float = 0.0, chunk: int = 4096) -> sp.csr_matrix:
    """Sparse (probe token, feature) activations, entries kept where activation > active_threshold.

    acts: (n_contexts, seq_len, d_in) activations of the probe contexts."""
    if position not in POSITIONS:
        raise SAEError(f"sae.position {position!r} is not one of {', '.join(POSITIONS)}")
    shift = 1 if position == "predicting" else 0
    ctx = np.asarray(token_context, dtype=np.int64)
    pos = np.asarray(token_position, dtype=np.int64) - shift
    if ctx.size and (pos.min() < 0 or ctx.max() >= acts.shape[0] or pos.max() >= acts.shape[1]):
        raise SAEError("probe token coordinates fall outside the probe contexts' activations; the run's probe "
                       "table and contexts disagree")
    x = acts[torch.from_numpy(ctx), torch.from_numpy(pos)]         # (n_tokens, d_in)
    blocks = []
    for i in range(0, x.shape[0], chunk):
        f = sae.encode(x[i:i + chunk])                              # (chunk, d_sae)
        f = torch.where(f > active_threshold, f, torch.zeros((), dtype=f.dtype))
        blocks.append(sp.csr_matrix(f.numpy().astype(np.float32)))
    if not blocks:
        return sp.csr_matrix((0, sae.d_sae), dtype=np.float32)
    return sp.vstack(blocks, format="csr")


def _best(overlap: np.ndarray, sizes: np.ndarray, n_active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of overlap (sets x features): the feature with the best F1 and that F1."""
    denom = sizes[:, None] + n_active[None, :]                      # (sets, features)
    f1 = np.divide(2.0 * overlap, denom, out=np.zeros(overlap.shape), where=denom > 0)
    best = f1.argmax(axis=1)
    return best, f1[np.arange(f1.shape[0]), best]


def _membership(labels: np.ndarray, ids: np.ndarray) -> sp.csr_matrix:
    """(tokens, clusters) 0/1 matrix; column j is cluster ids[j]."""
    col = {int(c): j for j, c in enumerate(ids)}
    rows = np.nonzero(np.isin(labels, ids))[0]
    cols = np.array([col[int(labels[r])] for r in rows], dtype=np.int64)
    return sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(labels.size, ids.size))


def match_clusters(active: sp.csr_matrix, labels: np.ndarray, threshold: float = 0.5, n_null: int = 200,
                   seed: int = 0, cluster_ids: Optional[Sequence[int]] = None) -> dict:
    """Best-F1 feature per cluster, the matched fraction, and its null from permuted labels.

    active: (tokens, features) sparse, nonzero where the feature is active; labels: (tokens,) cluster id, -1 noise."""
    labels = np.asarray(labels, dtype=np.int64)
    if active.shape[0] != labels.size:
        raise SAEError(f"{active.shape[0]} tokens have SAE activations but clusters.json labels {labels.size}; "
                       f"re-run the clusters stage on this run")
    A = (active != 0).astype(np.float64).tocsc()                    # (tokens, features)
    n_active = np.asarray(A.sum(axis=0)).ravel()                    # (features,)
    ids = np.asarray(sorted(set(labels[labels >= 0].tolist())) if cluster_ids is None else list(cluster_ids),
                     dtype=np.int64)
    sizes = np.array([(labels == c).sum() for c in ids], dtype=np.float64)
    if ids.size == 0:
        return {"n_clusters": 0, "matched_fraction": float("nan"), "clusters": [], "null": None}
    overlap = (_membership(labels, ids).T @ A).toarray()            # (clusters, features)
    best, f1 = _best(overlap, sizes, n_active)
    ov = overlap[np.arange(ids.size), best]
    precision = np.divide(ov, n_active[best], out=np.zeros(ids.size), where=n_active[best] > 0)
    recall = ov / np.maximum(sizes, 1)
    matched = f1 >= threshold
    observed = float(matched.mean())

    rng = np.random.default_rng(seed)
    per_batch = max(1, int(2e7 // max(1, ids.size * A.shape[1])))
    null_frac, null_f1 = [], []
    done = 0
    while done < n_null:
        b = min(per_batch, n_null - done)
        perms = [labels[rng.permutation(labels.size)] for _ in range(b)]
        M = sp.hstack([_membership(p, ids) for p in perms], format="csr")   # (tokens, b * clusters)
        o = (M.T @ A).toarray()                                     # (b * clusters, features)
        _, f = _best(o, np.tile(sizes, b), n_active)
        f = f.reshape(b, ids.size)
        null_frac += (f >= threshold).mean(axis=1).tolist()
        null_f1 += f.mean(axis=1).tolist()
        done += b
    null_frac, null_f1 = np.asarray(null_frac), np.asarray(null_f1)
    clusters = [{"id": int(c), "size": int(sizes[j]), "feature": int(best[j]), "f1": float(f1[j]),
                 "precision": float(precision[j]), "recall": float(recall[j]),
                 "feature_active": int(n_active[best[j]]), "matched": bool(matched[j])}
                for j, c in enumerate(ids)]
    null = None
    if n_null > 0:
        null = {"n": int(n_null), "seed": int(seed),
                "matched_fraction_mean": float(null_frac.mean()),
                "matched_fraction_q95": float(np.quantile(null_frac, 0.95)),
                "matched_fraction_max": float(null_frac.max()),
                "p_value": float((1 + (null_frac >= observed).sum()) / (1 + n_null)),
                "mean_best_f1_mean": float(null_f1.mean()),
                "mean_best_f1_q95": float(np.quantile(null_f1, 0.95)),
                "p_value_mean_best_f1": float((1 + (null_f1 >= f1.mean()).sum()) / (1 + n_null))}
    return {"n_clusters": int(ids.size), "threshold": float(threshold), "n_matched": int(matched.sum()),
            "matched_fraction": observed, "mean_best_f1": float(f1.mean()), "clusters": clusters, "null": null}


def top_tokens(active: sp.csr_matrix, feature: int, n: int) -> list[tuple[int, float]]:
    """The n probe tokens where `feature` is most active: (token index, activation)."""
    col = active[:, feature].tocoo()
    order = np.argsort(-col.data, kind="stable")[:n]
    return [(int(col.row[i]), float(col.data[i])) for i in order]


def cluster_examples(labels: np.ndarray, cluster_id: int, texts: Sequence[str], n: int, seed: int) -> list[int]:
    """n members of a cluster, seeded, distinct token texts first."""
    members = np.nonzero(np.asarray(labels) == cluster_id)[0]
    members = members[np.random.default_rng(seed + cluster_id).permutation(members.size)]
    picked, seen = [], set()
    for i in members:
        if len(picked) < n and texts[i] not in seen:
            seen.add(texts[i])
            picked.append(int(i))
    for i in members:
        if len(picked) < n and int(i) not in picked:
            picked.append(int(i))
    return picked


# --------------------------------------------------------------------------- #
# the stage
# --------------------------------------------------------------------------- #


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=True))
    os.replace(tmp, path)


def sae_stage(run_dir: Path, settings, model: torch.nn.Module, train_ids: torch.Tensor, probe_ids: torch.Tensor,
              token_context: np.ndarray, token_position: np.ndarray, token_text: Sequence[str],
              clusters: dict) -> dict:
    """Train (or load) the SAE, measure it, match it to clusters.json; write sae.json (+ sae/); return a summary.

    settings: spectro.config.SAEConfig; train_ids: (n, seq) sampling-distribution contexts; probe_ids:
    (n_probe_contexts, seq) the run's probe contexts; token_*: the run's probe table."""
    a = settings
    t0, c0 = time.perf_counter(), time.process_time()
    run_dir = Path(run_dir)
    d_model = int(model.config.hidden_size)
    labels = np.asarray(clusters.get("labels", []), dtype=np.int64)
    if labels.size != len(token_text):
        raise SAEError(f"clusters.json labels {labels.size} tokens but the run has {len(token_text)} probe tokens; "
                       f"re-run the clusters stage")
    site, layer = a.site, a.layer
    if a.load:
        sae = load_sae(Path(a.load), d_in=d_model)
        parsed = parse_hook_name(sae.hook_name)
        if parsed is not None and parsed != (site, layer):
            raise SAEError(f"the SAE in {a.load} was trained on {sae.hook_name} but sae.site={site}, sae.layer={layer}; "
                           f"set sae.site={parsed[0]} sae.layer={parsed[1]}")
    _site_module(model, site, layer)                                  # refuses a bad site/layer early
    train_acts = collect_activations(model, train_ids, site, layer)   # (n, seq, d)
    X = train_acts.reshape(-1, d_model)                               # (n * seq, d)
    train_log = None
    if not a.load:
        ts = TrainSettings(expansion=a.expansion, k=a.k, steps=a.steps, batch_size=a.batch_size,
                           max_epochs=a.max_epochs, lr=a.lr,
                           aux_k=a.aux_k, dead_after=a.dead_after, seed=a.seed)
        sae, train_log = train_topk(X, ts)
        sae.hook_name = hook_name(site, layer)
        sae.meta = {"trained_by": "spectro", "training": train_log, "settings": ts.__dict__}
        save_sae(sae, run_dir / "sae")
    probe_acts = collect_activations(model, probe_ids, site, layer)   # (n_probe_ctx, seq, d)
    quality = {"fve_probe": fve(sae, probe_acts), "fve_train": fve(sae, X),
               **spliced_losses(model, probe_ids, sae, site, layer, X.double().mean(dim=0).float())}
    active = probe_features(sae, probe_acts, token_context, token_position, a.position, a.active_threshold)
    n_active_feat = np.asarray((active != 0).sum(axis=0)).ravel()     # (features,)
    ids = [int(c["id"]) for c in clusters.get("clusters") or []]
    match = match_clusters(active, labels, a.match_threshold, a.n_null, a.seed, cluster_ids=ids)
    top_of = {int(c["id"]): c.get("top_tokens") or [] for c in clusters.get("clusters") or []}
    for c in match["clusters"]:
        c["feature_top"] = [[t, v] for t, v in top_tokens(active, c["feature"], a.top_contexts)]
        c["examples"] = cluster_examples(labels, c["id"], token_text, a.top_contexts, a.seed)
        c["top_tokens"] = top_of.get(c["id"], [])[:8]
    doc = {"site": site, "layer": layer, "hook_name": hook_name(site, layer), "position": a.position,
           "source": str(a.load) if a.load else "trained", "path": str(Path(a.load).resolve()) if a.load
           else str(run_dir / "sae"), "architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae,
           "k": sae.k, "training": train_log, "quality": quality,
           "l0_probe": float((active != 0).sum() / max(1, active.shape[0])),
           "features_never_active_on_probe": int((n_active_feat == 0).sum()),
           "active_threshold": a.active_threshold, "clustering_method": clusters.get("method"),
           "n_tokens": int(labels.size), **match, "seconds": round(time.perf_counter() - t0, 2),
           "cpu_seconds": round(time.process_time() - c0, 2)}
    _write_json(run_dir / "sae.json", doc)
    null = match["null"] or {}
    return {"path": str(run_dir / "sae.json"), "fve_probe": quality["fve_probe"],
            "loss_increase": quality["loss_increase"], "n_clusters": match["n_clusters"],
            "matched_fraction": match["matched_fraction"], "null_mean": null.get("matched_fraction_mean"),
            "p_value": null.get("p_value"), "seconds": doc["seconds"], "cpu_seconds": doc["cpu_seconds"]}
