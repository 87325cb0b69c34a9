"""Optimised paths (issue 7) give the same numbers as the plain ones.

- The lower-layer cache: evaluating layers L.. from the cached residual stream
  equals the full forward (logits, per-token losses, the SGLD loss and its
  gradient), and a unit sampled with the cache matches the same unit sampled
  without it, draw by draw, to float tolerance.
- Micro-batched SGLD gradients equal whole-batch gradients.
- Resume stays bit-identical with the cache on.
Speed itself is measured in benchmarks/bench_w1.py and bench_w2.py, not here.
"""

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad

from spectro.observables import (UpperStack, logits, mean_loss, mean_loss_from, residual_at, token_losses,
                                 token_losses_from)
from spectro.sampling import UnitRunner
from spectro.sgld import SGLDHyper, build
from tests.conftest import tiny_config, tiny_model, tiny_problem


@pytest.fixture(scope="module")
def model_and_ids():
    model = tiny_model(layers=3)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, model.config.vocab_size, (6, 12), generator=g)
    return model, ids


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_upper_stack_equals_full_forward(model_and_ids, layer):
    model, ids = model_and_ids
    full = logits(model, {}, ids)                                         # (6, 12, vocab)
    upper = UpperStack(model, layer)
    cached = upper(residual_at(model, ids, layer, chunk=4))               # chunked cache, 2 chunks
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_cached_losses_and_gradients_match(model_and_ids):
    model, ids = model_and_ids
    name = "gpt_neox.layers.1.attention.query_key_value.weight"
    g = torch.Generator().manual_seed(1)
    w = model.get_parameter(name)
    params = {name: w + 0.05 * torch.randn(w.shape, generator=g)}        # away from w*: the sampled weights matter
    upper = UpperStack(model, 1)
    hidden = residual_at(model, ids, 1)
    torch.testing.assert_close(token_losses_from(upper, params, hidden, ids, max_logit_elements=2 * 12 * 96),
                               token_losses(model, params, ids), rtol=1e-5, atol=1e-5)
    g_full = grad(lambda p: mean_loss(model, p, ids))(params)[name]
    g_cached = grad(lambda p: mean_loss_from(upper, p, (hidden, ids)))(params)[name]
    torch.testing.assert_close(g_cached, g_full, rtol=1e-4, atol=1e-6)
    assert g_full.abs().max() > 0
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
        np.testing.assert_allclose(b.step_loss, a.step_loss, rtol=1e-6)
    assert runs[True][1][-1].distance.min() > 0                          # the chains moved
    for n, p in runs[False][0].sgld.params.items():
        torch.testing.assert_close(runs[True][0].sgld.params[n], p, rtol=1e-5, atol=1e-6)


def test_cache_not_used_for_layer_zero_components():
    problem, cfg = tiny_problem(), tiny_config().sampler
    for name in ("full", "embed", "l0h0"):
        comp = problem.components(problem.model, [name])[0]
        assert not UnitRunner(problem, comp, [0], cfg, run_seed=0).cached


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


@pytest.mark.parametrize("chain_mode", ["vmap", "loop"])
def test_micro_batched_gradients_match(model_and_ids, chain_mode):
    model, ids = model_and_ids
    names = ["gpt_neox.layers.2.mlp.dense_h_to_4h.weight", "lm_head.weight"]
    anchor = {n: model.get_parameter(n).detach() for n in names}
    loss = lambda p, batch: mean_loss(model, p, batch)
    hyper = SGLDHyper(step_size=1e-3, nbeta=10.0, gamma=1.0)
    whole = build(hyper, anchor, {n: None for n in names}, loss, chain_mode)
    micro = build(hyper, anchor, {n: None for n in names}, loss, chain_mode, micro_batch=4)   # 6 rows: 4 + 2
    params = whole.init(2).params
    batch = torch.stack([ids, ids.flip(0)])                               # (chains, 6, seq)
    g1, v1 = whole.grads(params, batch)
    g2, v2 = micro.grads(params, batch)
    torch.testing.assert_close(v2, v1, rtol=1e-5, atol=1e-6)
    for n in names:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-7)
