"""benchmarks/bench_curvature.py: the Lanczos extremes of a component's Hessian block equal the dense ones.

The benchmark explains the sampler's mixing by the extreme eigenvalues of each component's Hessian block at w*
(docs/calibration.md); here they are checked against `torch.autograd.functional.hessian` of the same block on a
tiny GPT-NeoX, small enough for the dense matrix.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))          # the script imports its neighbour `common`, as when run
    spec = importlib.util.spec_from_file_location("bench_curvature", ROOT / "benchmarks" / "bench_curvature.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_curvature", mod)
    spec.loader.exec_module(mod)
    return mod


def test_lanczos_extremes_match_the_dense_hessian_block():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from spectro.components import resolve_components
    from spectro.observables import logits

    bench = _bench()
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, rotary_pct=0.25, max_position_embeddings=16,
                        tie_word_embeddings=False, attn_implementation="eager")
    model = GPTNeoXForCausalLM(cfg).float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 32, (4, 12), generator=torch.Generator().manual_seed(1))
    comp = resolve_components(model, ["l0h1"])[0]
    got = bench.curvature(model, comp, ids, k=1, tol=1e-8)

    names = sorted(comp.masks)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if n in comp.masks}
    masks = {n: torch.ones_like(base[n], dtype=torch.bool) if comp.masks[n] is None else comp.masks[n]
             for n in names}
    sizes = [int(masks[n].sum()) for n in names]

    def loss(v):
        params, off = {}, 0
        for n, size in zip(names, sizes):
            flat = base[n].clone()
            flat[masks[n]] = v[off:off + size]
            params[n] = flat
            off += size
        out = logits(model, params, ids[:, :-1])
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))

    w = torch.cat([base[n][masks[n]] for n in names])
    H = torch.autograd.functional.hessian(loss, w).double().numpy()
    eig = np.linalg.eigvalsh((H + H.T) / 2)
    assert got["dim"] == w.numel() == sum(sizes)
    assert got["lambda_min"] < 0 < got["lambda_max"]          # a random model sits on a saddle of its loss
    np.testing.assert_allclose([got["lambda_min"], got["lambda_max"]], [eig[0], eig[-1]], rtol=1e-3, atol=1e-5)


def test_regime_reads_the_extremes():
    bench = _bench()
    s = {"step_size": 1e-4, "gamma": 1e4, "nbeta": 1000.0, "steps_between_draws": 2}
    r = bench.regime({"lambda_min": -2.0, "lambda_max": 5.0}, s)
    assert r["kappa_min"] == 8000 and r["local"]
    assert np.isclose(r["relax_steps"], -1 / np.log(1 - 0.4)) and np.isclose(r["relax_draws"], r["relax_steps"] / 2)
    assert np.isclose(r["stability"], 1e-4 * 15000 / 2)
    assert not bench.regime({"lambda_min": -20.0, "lambda_max": 5.0}, s)["local"]     # nβ |λ_min| > γ
