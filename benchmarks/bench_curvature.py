"""The loss curvature each component's chains feel at w*, and what it means for the sampler.

SGLD on a component samples p(w) ∝ exp(-nβ L(w) - γ/2 ||w - w*||²). Near w*
a direction of loss curvature λ has total curvature κ = γ + nβ λ, and one
step contracts the distance from the posterior mean by (1 - εκ/2). Two ends
of the Hessian's spectrum set the regime:

- the largest eigenvalue λ_max bounds the step (stability: ε κ_max / 2 < 2);
- the smallest, λ_min, sets the slowest relaxation. If w* is a minimum of the
  sampling loss, λ_min ≥ 0 and no direction relaxes slower than the
  localisation's 1 - εγ/2. A negative λ_min (w* on a saddle of the sampling
  loss: the shipped weights were trained on another objective, with weight
  decay and another batch) leaves κ_min = γ + nβ λ_min, which nβ pushes down:
  relaxation takes about 2 / (ε κ_min) steps, and at nβ |λ_min| ≥ γ the
  posterior is no longer local in that direction at all.

This script computes, per component, λ_max and λ_min of the Hessian of the mean
SGLD loss (the training contexts the chains draw their minibatches from) in
that component's entries only, at w*, with Lanczos (scipy's `eigsh` on
Hessian-vector products; a library routine rather than our own iteration),
and the gradient's norm there. For each requested sampler setting it then
prints κ_min, the relaxation time in draws, and whether the posterior is local.

    python benchmarks/bench_curvature.py --components all --settings "" "nbeta=3000,step_size=5e-5"

The figures in docs/calibration.md ("Why the chains mix slowly at a larger nβ") come from this script.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import parse_setting  # noqa: E402
from spectro.config import to_config  # noqa: E402
from spectro.observables import logits  # noqa: E402
from spectro.pipeline import prepare  # noqa: E402


def curvature(model, comp, ids: torch.Tensor, k: int, tol: float) -> dict:
    """λ_max, λ_min of the component's Hessian block of the mean loss on `ids`, and |∇L| there."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    names = sorted(comp.masks)
    base = {n: p.detach() for n, p in model.named_parameters() if n in comp.masks}
    masks = {n: (torch.ones_like(base[n], dtype=torch.bool) if comp.masks[n] is None else comp.masks[n])
             for n in names}
    sizes = [int(masks[n].sum()) for n in names]
    dim = sum(sizes)

    def loss_of(flat: dict[str, torch.Tensor]) -> torch.Tensor:
        out = logits(model, flat, ids[:, :-1])                                   # (contexts, seq-1, vocab)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), ids[:, 1:].reshape(-1))

    params = {n: base[n].clone().requires_grad_(True) for n in names}
    loss = loss_of(params)                                                    # scalar, graph kept for the HVPs
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
    gnorm = float(torch.sqrt(sum((g.detach()[masks[n]].double() ** 2).sum() for g, n in zip(grads, names))))
    calls = [0]

    def hvp(v: np.ndarray) -> np.ndarray:
        calls[0] += 1
        parts, off = [], 0
        for n, size in zip(names, sizes):
            full = torch.zeros_like(base[n])
            full[masks[n]] = torch.as_tensor(v[off:off + size], dtype=full.dtype)
            parts.append(full)
            off += size
        hv = torch.autograd.grad(grads, [params[n] for n in names], grad_outputs=parts, retain_graph=True)
        return np.concatenate([h[masks[n]].double().numpy() for h, n in zip(hv, names)])

    op = LinearOperator((dim, dim), matvec=hvp, dtype=np.float64)
    start = np.random.default_rng(0).standard_normal(dim)
    lam_max = float(eigsh(op, k=k, which="LA", tol=tol, v0=start, return_eigenvectors=False).max())
    lam_min = float(eigsh(op, k=k, which="SA", tol=tol, v0=start, return_eigenvectors=False).min())
    return {"dim": dim, "lambda_max": lam_max, "lambda_min": lam_min, "grad_norm": gnorm, "hvps": calls[0],
            "loss": float(loss.detach())}


def regime(c: dict, s: dict) -> dict:
    """κ_min, steps and draws to relax (e-fold) in the slowest direction, the stability figure."""
    eps, gamma, nbeta, spacing = s["step_size"], s["gamma"], s["nbeta"], s["steps_between_draws"]
    k_min = gamma + nbeta * min(c["lambda_min"], 0.0)
    k_max = gamma + nbeta * c["lambda_max"]
    local = k_min > 0
    steps = (-1.0 / np.log(abs(1 - eps * k_min / 2))) if local else float("inf")
    return {"kappa_min": k_min, "relax_steps": steps, "relax_draws": steps / spacing,
            "stability": eps * k_max / 2, "local": local}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--components", default="l0h3,l1h2,l2h3,l1h1,l2h1,l3h0,l0.mlp",
                    help="comma-separated, or 'all': the embedding, every head and MLP (the unembedding's block "
                         "is positive semi-definite, cross-entropy being convex in it; full is too large here)")
    ap.add_argument("--settings", nargs="+", default=["", "nbeta=3000,step_size=5e-5"],
                    help="sampler overrides on the default, comma-separated (empty: the default)")
    ap.add_argument("--contexts", type=int, default=64, help="SGLD training contexts the Hessian averages over")
    ap.add_argument("--k", type=int, default=1, help="eigenvalues per end (the extreme one is reported)")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the table here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = prepare(to_config({}))
    model = base.problem.model
    ids = base.problem.train_ids[:args.contexts]
    settings = []
    for setting in args.settings:
        s = vars(to_config({"sampler": parse_setting(setting)}).sampler)
        settings.append((setting or "default", s))
    rows = {}
    print(f"{len(ids)} training contexts of {ids.shape[1]} tokens; loss at w* on them computed per component")
    head = " ".join(f"| {name}: κ_min, draws to relax, εκ_max/2" for name, _ in settings)
    print(f"| component | entries | λ_min | λ_max | |∇L| | HVPs | seconds {head} |")
    names = args.components.split(",")
    if names == ["all"]:
        names = [c.name for c in base.components if c.name not in ("full", "unembed")]
    for name in names:
        comp = next((c for c in base.components if c.name == name), None)
        if comp is None:
            raise SystemExit(f"unknown component {name!r}; the default run has "
                             f"{', '.join(c.name for c in base.components)}")
        t0 = time.perf_counter()
        c = curvature(model, comp, ids, args.k, args.tol)
        c["seconds"] = time.perf_counter() - t0
        c["regimes"] = {label: regime(c, s) for label, s in settings}
        rows[name] = c
        cells = " ".join(f"| {r['kappa_min']:.0f}, {r['relax_draws']:.1f}, {r['stability']:.2f}"
                         if r["local"] else f"| {r['kappa_min']:.0f} (not local), -, {r['stability']:.2f}"
                         for r in c["regimes"].values())
        print(f"| {name} | {c['dim']} | {c['lambda_min']:.3f} | {c['lambda_max']:.3f} | {c['grad_norm']:.4f} | "
              f"{c['hvps']} | {c['seconds']:.0f} {cells} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
