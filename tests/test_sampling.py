"""The unit runner on a real (tiny) GPT-NeoX: save/restore mid-chain is a
bit-identical continuation, for plain and preconditioned SGLD; a chain's draws
do not depend on the chains it shares a unit with; seeds are per
(run seed, component, chain)."""

import io

import numpy as np
import pytest
import torch

from spectro.components import resolve_components
from spectro.sampling import UnitRunner, chain_seed
from tests.helpers import tiny_config, tiny_problem


def draws(runner, state, n):
    out = []
    for _ in range(n):
        state, d = runner.next_draw(state)
        out.append(d)
    return state, out


def same(a, b):
    for x, y in zip(a, b):
        for name in ("sampling_loss", "probe_loss"):
            assert getattr(x, name).tobytes() == getattr(y, name).tobytes(), name
        assert x.traces.keys() == y.traces.keys()
        for name in x.traces:
            assert x.traces[name].tobytes() == y.traces[name].tobytes(), name


@pytest.mark.parametrize("precondition", ["none", "rmsprop"])
def test_checkpoint_restore_is_bit_identical(precondition):
    problem = tiny_problem()
    config = tiny_config(precondition=precondition, burnin=3, steps_between_draws=2)
    comp = resolve_components(problem.model, ["l1h2"])[0]
    runner = UnitRunner(problem, comp, [0, 1], config.sampler, run_seed=7)
    _, straight = draws(runner, runner.start(), 6)

    state, first = draws(UnitRunner(problem, comp, [0, 1], config.sampler, 7), runner.start(), 3)
    buf = io.BytesIO()
    torch.save(runner.checkpoint(state), buf)                 # plain tensors only
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    fresh = UnitRunner(problem, comp, [0, 1], config.sampler, 7)   # a new process would build a new runner
    restored = fresh.restore(ckpt)
    assert restored.draw == 3 and restored.sgld.step == 3 + 3 * 2
    _, rest = draws(fresh, restored, 3)
    same(straight, first + rest)
    # and the chains really move: the continuation is not trivially equal
    assert straight[0].sampling_loss.tobytes() != straight[-1].sampling_loss.tobytes()


def test_chain_draws_independent_of_unit_grouping():
    problem = tiny_problem()
    config = tiny_config()
    comp = resolve_components(problem.model, ["l0.mlp"])[0]
    r01 = UnitRunner(problem, comp, [0, 1], config.sampler, run_seed=3)
    r1 = UnitRunner(problem, comp, [1], config.sampler, run_seed=3)
    _, a = draws(r01, r01.start(), 3)
    _, b = draws(r1, r1.start(), 3)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.sampling_loss[1], y.sampling_loss[0], rtol=1e-6)
        np.testing.assert_allclose(x.probe_loss[1], y.probe_loss[0], rtol=1e-5, atol=1e-6)


def test_seeds_are_per_component_and_chain():
    seeds = {chain_seed(0, c, k, s) for c in ("full", "l0h0") for k in range(3) for s in ("data", "noise")}
    assert len(seeds) == 12
    assert chain_seed(0, "l0h0", 1, "noise") == chain_seed(0, "l0h0", 1, "noise")
    assert chain_seed(1, "l0h0", 1, "noise") != chain_seed(0, "l0h0", 1, "noise")


def test_only_the_component_moves():
    problem = tiny_problem()
    config = tiny_config()
    comp = resolve_components(problem.model, ["l0h1"])[0]
    runner = UnitRunner(problem, comp, [0, 1], config.sampler, run_seed=0)
    state, _ = draws(runner, runner.start(), 2)
    params = dict(problem.model.named_parameters())
    assert set(state.sgld.params) == set(comp.masks)           # only the component's tensors are sampled
    assert any(m is not None for m in comp.masks.values())     # a head: part of its tensors is masked
    for name, w in state.sgld.params.items():
        mask = comp.masks[name]
        moved = (w[0] != params[name]).cpu()
        assert moved.any()
        if mask is not None:
            assert not moved[~mask.cpu()].any()                 # nothing outside the head's rows/columns
