"""Optimised paths give the same numbers as the plain ones.

- The lower-layer cache: evaluating layers L.. from the cached residual stream
  equals the full forward (logits, per-token losses, the SGLD loss and its
  gradient), and a unit sampled with the cache matches the same unit sampled
  without it, draw by draw, to float tolerance.
- The fused, chunked head + cross-entropy gives the plain path's values and
  gradients (under vmap over chains, batched or shared head, bf16 autocast).
- Resume stays bit-identical with the cache on.
Speed itself is measured in benchmarks/bench_w1.py and bench_w2.py, not here.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from spectro.observables import (Body, linear_cross_entropy, linear_cross_entropy_mean, logits, token_cross_entropy, mean_loss, mean_loss_from, residual_at,
                                 token_losses, token_losses_from)
from spectro.sampling import UnitRunner
from tests.helpers import tiny_config, tiny_model, tiny_problem


@pytest.fixture(scope="module")
def model_and_ids():
    model = tiny_model(layers=3)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, model.config.vocab_size, (6, 12), generator=g)
    return model, ids


def plain_token_losses(model, params, ids):
    """The reference: materialised logits and F.cross_entropy."""
    z = logits(model, params, ids)[:, :-1]                                # (n, seq-1, vocab)
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), ids[:, 1:].reshape(-1), reduction="none").view(ids.shape[0], -1)


@pytest.mark.parametrize("layer", [None, 1, 2, 3])
def test_body_equals_full_forward(model_and_ids, layer):
    model, ids = model_and_ids
    full = logits(model, {}, ids)                                         # (6, 12, vocab)
    x = ids if layer is None else residual_at(model, ids, layer, chunk=4)  # chunked cache, 2 chunks
    cached = model.lm_head(Body(model, layer)(x))
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight_batched", [True, False])
def test_linear_cross_entropy_matches_plain_under_vmap(weight_batched):
    g = torch.Generator().manual_seed(0)
    chains, n, d, vocab = 3, 50, 8, 37                                    # 50 rows in blocks of 7: a ragged last block
    h = torch.randn(chains, n, d, generator=g, dtype=torch.float64)
    w = torch.randn(chains, vocab, d, generator=g, dtype=torch.float64)
    y = torch.randint(vocab, (chains, n), generator=g)
    plain = lambda h, w, y: F.cross_entropy(h @ w.T, y)
    fused = lambda h, w, y: linear_cross_entropy(h, w, y, rows=7).mean()
    dims = (0, 0 if weight_batched else None, 0)
    w_in = w if weight_batched else w[0]
    torch.testing.assert_close(vmap(fused, in_dims=dims)(h, w_in, y), vmap(plain, in_dims=dims)(h, w_in, y),
                               rtol=1e-12, atol=1e-12)
    for arg in (0, 1):
        a = vmap(grad(plain, argnums=arg), in_dims=dims)(h, w_in, y)
        b = vmap(grad(fused, argnums=arg), in_dims=dims)(h, w_in, y)
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
        assert a.abs().max() > 1e-3
    # float32 in, float32 out; bf16 autocast rounds the matmul but the loss is still computed in float32
    h32, w32 = h[0].float(), w[0].float()
    ref = F.cross_entropy(h32 @ w32.T, y[0], reduction="none")
    assert linear_cross_entropy(h32, w32, y[0]).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = linear_cross_entropy(h32, w32, y[0], rows=16)
    assert low.dtype == torch.float32
    assert 0 < (low - ref).abs().max() < 0.05


@pytest.mark.parametrize("weight_batched", [True, False])
def test_linear_cross_entropy_mean_gradients_from_the_forward_pass(weight_batched):
    """The SGLD loss forms its gradients in the forward pass; under vmap and an outer scale they equal the
    plain path's, and asking for a gradient it was told not to form is an error, not a silent zero."""
    g = torch.Generator().manual_seed(1)
    chains, n, d, vocab = 3, 50, 8, 37
    h = torch.randn(chains, n, d, generator=g, dtype=torch.float64)
    w = torch.randn(chains, vocab, d, generator=g, dtype=torch.float64)
    y = torch.randint(vocab, (chains, n), generator=g)
    plain = lambda h, w, y: 2.5 * F.cross_entropy(h @ w.T, y)
    fused = lambda h, w, y: 2.5 * linear_cross_entropy_mean(h, w, y, rows=7)
    dims = (0, 0 if weight_batched else None, 0)
    w_in = w if weight_batched else w[0]
    torch.testing.assert_close(vmap(fused, in_dims=dims)(h, w_in, y), vmap(plain, in_dims=dims)(h, w_in, y),
                               rtol=1e-12, atol=1e-12)
    a = vmap(grad(plain, argnums=(0, 1)), in_dims=dims)(h, w_in, y)
    b = vmap(grad(fused, argnums=(0, 1)), in_dims=dims)(h, w_in, y)
    for x, ref in zip(b, a):
        torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-12)
        assert ref.abs().max() > 1e-3
    only_h = lambda h, w, y: linear_cross_entropy_mean(h, w, y, 7, need_hidden=True, need_weight=False)
    torch.testing.assert_close(vmap(grad(only_h), in_dims=dims)(h, w_in, y), a[0] / 2.5, rtol=1e-10, atol=1e-12)
    neither = lambda h, w, y: linear_cross_entropy_mean(h, w, y, 7, need_hidden=False, need_weight=False)
    torch.testing.assert_close(vmap(neither, in_dims=dims)(h, w_in, y), vmap(plain, in_dims=dims)(h, w_in, y) / 2.5,
                               rtol=1e-12, atol=1e-12)                               # the loss-only branch
    only_w = lambda h, w, y: linear_cross_entropy_mean(h, w, y, 7, need_hidden=False, need_weight=True)
    with pytest.raises(RuntimeError, match="gradient for hidden is needed but need_hidden=False"):
        vmap(grad(only_w, argnums=(0, 1)), in_dims=dims)(h, w_in, y)


def test_fused_float32_losses_and_gradients_at_the_pythia_vocabulary():
    """float32 at the Pythia vocabulary (the in-place softmax / log_softmax kernels sum a 50k row in float32)
    against float64: losses to 2e-6 relative, gradients to 1e-5 in norm (F.cross_entropy in float32, which uses
    the same kernels, measured 5.6e-7 and 2.3e-6 here); rows whose target probability underflows float32
    (loss > 104) still give the exact loss (logsumexp from the max's probability, not from the target's)."""
    g = torch.Generator().manual_seed(3)
    n, d, vocab = 96, 16, 50304
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    h[:8] *= 30                                                                       # extreme rows
    w = torch.randn(vocab, d, generator=g, dtype=torch.float64)
    y = torch.randint(vocab, (n,), generator=g)
    ref = F.cross_entropy(h @ w.T, y, reduction="none")                               # (n,) float64
    assert ref[:8].max() > 104                                                        # exp(-104) is 0 in float32
    got = token_cross_entropy(h.float(), w.float(), y, rows=32)
    torch.testing.assert_close(got.double(), ref, rtol=2e-6, atol=0)
    mean_ref = ref.mean()
    dh_ref, dw_ref = grad(lambda h, w: F.cross_entropy(h @ w.T, y), argnums=(0, 1))(h, w)
    val = linear_cross_entropy_mean(h.float(), w.float(), y, rows=32)
    dh, dw = grad(lambda h, w: linear_cross_entropy_mean(h, w, y, rows=32), argnums=(0, 1))(h.float(), w.float())
    assert abs(val.double() - mean_ref) / mean_ref < 1e-6
    for x, r in ((dh, dh_ref), (dw, dw_ref)):
        assert (x.double() - r).norm() / r.norm() < 1e-5


def test_token_cross_entropy_for_evaluations_matches_plain():
    """The evaluation path (one reused block buffer, head cast once under autocast) gives the plain losses, and
    under bf16 autocast exactly what autocast's own per-block product gives."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(50, 8, generator=g, dtype=torch.float64)
    w = torch.randn(37, 8, generator=g, dtype=torch.float64)
    y = torch.randint(37, (50,), generator=g)
    ref = F.cross_entropy(h @ w.T, y, reduction="none")
    torch.testing.assert_close(token_cross_entropy(h, w, y, rows=7), ref, rtol=1e-12, atol=1e-12)   # ragged
    h32, w32 = h.float(), w.float()
    assert token_cross_entropy(h32, w32, y).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = token_cross_entropy(h32, w32, y, rows=16)
        autocast_logits = (h32 @ w32.T).float()                                   # autocast's own bf16 product
    autocast_ref = -torch.log_softmax(autocast_logits, 1).gather(1, y.unsqueeze(1)).squeeze(1)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, autocast_ref, rtol=0, atol=0)
    assert 0 < (low - ref.float()).abs().max() < 0.05


def test_cached_losses_and_gradients_match(model_and_ids):
    model, ids = model_and_ids
    name = "gpt_neox.layers.1.attention.query_key_value.weight"
    g = torch.Generator().manual_seed(1)
    w = model.get_parameter(name)
    params = {name: w + 0.05 * torch.randn(w.shape, generator=g)}        # away from w*: the sampled weights matter
    upper = Body(model, 1)
    hidden = residual_at(model, ids, 1)
    reference = plain_token_losses(model, params, ids)
    torch.testing.assert_close(token_losses_from(upper, params, hidden, ids, rows=2 * 12), reference,
                               rtol=1e-5, atol=1e-5)                       # 3 chunks of 2 contexts
    torch.testing.assert_close(token_losses(model, params, ids), reference, rtol=1e-5, atol=1e-5)
    g_plain = grad(lambda p: plain_token_losses(model, p, ids).mean())(params)[name]
    g_full = grad(lambda p: mean_loss(model, p, ids))(params)[name]
    g_cached = grad(lambda p: mean_loss_from(upper, p, (hidden, ids)))(params)[name]
    torch.testing.assert_close(g_full, g_plain, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_cached, g_plain, rtol=1e-4, atol=1e-6)
    assert g_plain.abs().max() > 0
    # the substitution really reaches the upper stack: different weights, different losses
    assert not torch.allclose(token_losses_from(upper, {}, hidden, ids), token_losses_from(upper, params, hidden, ids))


@pytest.mark.parametrize("component", ["l1h2", "l1.mlp", "unembed"])
def test_unit_with_cache_matches_plain_unit(component):
    problem, cfg = tiny_problem(), tiny_config().sampler
    comp = problem.components(problem.model, [component])[0]
    runs = {}
    for cache in (False, True):
        runner = UnitRunner(problem, comp, [0, 1], cfg, run_seed=3, cache_lower_layers=cache)
        assert runner.cached == cache
        state, draws = runner.start(), []
        for _ in range(4):
            state, d = runner.next_draw(state)
            draws.append(d)
        runs[cache] = (state, draws)
    for a, b in zip(runs[False][1], runs[True][1]):
        np.testing.assert_allclose(b.probe_loss, a.probe_loss, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b.sampling_loss, a.sampling_loss, rtol=1e-6)
        np.testing.assert_allclose(b.traces["step_loss"], a.traces["step_loss"], rtol=1e-6)
    assert runs[True][1][-1].traces["distance"].min() > 0                          # the chains moved
    for n, p in runs[False][0].sgld.params.items():
        torch.testing.assert_close(runs[True][0].sgld.params[n], p, rtol=1e-5, atol=1e-6)


def test_cache_not_used_for_layer_zero_components():
    problem, cfg = tiny_problem(), tiny_config().sampler
    for name in ("full", "embed", "l0h0"):
        comp = problem.components(problem.model, [name])[0]
        assert not UnitRunner(problem, comp, [0, 1], cfg, run_seed=0).cached


def test_resume_bit_identical_with_cache():
    problem, cfg = tiny_problem(), tiny_config().sampler
    comp = problem.components(problem.model, ["l1h0"])[0]
    runner = UnitRunner(problem, comp, [0, 1], cfg, run_seed=7)
    assert runner.cached
    state, straight = runner.start(), []
    for _ in range(4):
        state, d = runner.next_draw(state)
        straight.append(d)
    state = runner.start()
    for _ in range(2):
        state, _ = runner.next_draw(state)
    ckpt = runner.checkpoint(state)
    fresh = UnitRunner(problem, comp, [0, 1], cfg, run_seed=7)            # a new actor rebuilds the cache
    state = fresh.restore(ckpt)
    for k in range(2, 4):
        state, d = fresh.next_draw(state)
        np.testing.assert_array_equal(d.probe_loss, straight[k].probe_loss)
        np.testing.assert_array_equal(d.sampling_loss, straight[k].sampling_loss)
