"""The unit runner on a real (tiny) GPT-NeoX: save/restore mid-chain is a
bit-identical continuation, for plain and preconditioned SGLD; a chain's draws
do not depend on the chains it shares a unit with; seeds are per
(run seed, component, chain); every draw records the per-draw observables
of the registry (spectro.traces), and the store keeps each as its array."""

import io

import numpy as np
import pytest
import torch

from spectro.components import resolve_components
from spectro.sampling import Draw, UnitRunner, chain_seed
from spectro.traces import TRACE_NAMES, TRACES
from tests.helpers import make_store, tiny_config, tiny_problem


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


def test_draws_and_the_store_follow_the_trace_registry(tmp_path):
    """Each entry of spectro.traces is in every draw record, (chains,) of its dtype, and is an array of the store
    [component, chain, draw] with its dtype and fill; a draw record that lacks one is refused."""
    problem = tiny_problem()
    config = tiny_config()
    runner = UnitRunner(problem, resolve_components(problem.model, ["l1h2"])[0], [0, 1], config.sampler, 7)
    _, d = runner.next_draw(runner.start())
    assert set(d.traces) == set(TRACE_NAMES) and len(TRACES) == len(TRACE_NAMES)
    for t in TRACES:
        assert d.traces[t.name].shape == (2,) and d.traces[t.name].dtype == np.dtype(t.dtype), t
    store = make_store(tmp_path / "samples.zarr", problem, config)
    L = store.layout
    for t in TRACES:
        arr = store.group[t.name]
        assert arr.shape == (len(L.components), L.n_chains, L.n_draws) and arr.dtype == np.dtype(t.dtype), t
        np.testing.assert_array_equal(arr[0, 0, :1], np.full(1, t.fill, dtype=t.dtype))
    fewer = {k: v for k, v in d.traces.items() if k != TRACE_NAMES[-1]}
    with pytest.raises(ValueError, match=TRACE_NAMES[-1]):
        Draw(index=0, sampling_loss=d.sampling_loss, probe_loss=d.probe_loss, traces=fewer, diverged=d.diverged)
