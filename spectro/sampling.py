"""One unit of sampling work: SGLD chains of one component, draw by draw.

A `Problem` bundles what every unit shares: the frozen model at w*, the SGLD
data pool, the fixed sampling set and the probe contexts, and `init_loss`.
A `UnitRunner` samples one (component, chain group): `start()` gives the state
at w*, `next_draw(state)` runs `steps_between_draws` SGLD steps (after
`burnin` for the first draw) and evaluates the observables, `checkpoint` /
`restore` move the whole state through plain tensors so a restored unit
continues bit-identically.

Non-obvious choices:
- Every chain has two generators, for minibatch indices and for noise,
  seeded from sha256(run seed, component, chain, stream): a chain's draws do
  not depend on which actor ran it or which chains shared its unit.
- Antithetic pairs (`sampler.antithetic`, the default): chains 2p and 2p+1
  use chain 2p's streams, so they see the same minibatches, and chain 2p+1's
  injected noise is negated. Each chain is still an exact SGLD chain (-ξ has
  the law of ξ), so every estimate keeps its expectation; near w* the dynamics
  is close to linear, the pair moves as w* + m ± η, and in a pair's mean every
  term odd in η cancels. The per-token loss's first-order term, which
  dominates the noise of chi, is such a term (docs/method.md, measured in
  docs/calibration.md). Chain 2p is the chain a non-antithetic run would draw.
- Minibatches are drawn with replacement from the pool; the data position
  is therefore the data generator's state, saved with the checkpoint.
- Lower-layer cache: for a GPT-NeoX problem with the standard LM
  losses and a component in layer L >= 1, the residual stream entering layer
  L is computed once at w* for the SGLD pool, the sampling set and the probe
  contexts; SGLD steps (minibatch = rows of the cached pool) and evaluations
  run layers L.. only (`observables.Body`). Same maths as the full
  forward to float tolerance (tests/test_performance.py); it is rebuilt
  identically on restore, so resumes stay bit-identical.
  `cache_lower_layers=False` gives the plain path.
- The head and cross-entropy are fused and chunked (`observables.
  linear_cross_entropy`): no step or evaluation holds a (batch, seq, vocab)
  tensor, so even Pythia's 50k vocabulary needs no micro-batching.
- A chain diverges when its minibatch or sampling loss is NaN/inf or exceeds
  init_loss + divergence_bound. It stops moving; its later draws are NaN and
  flagged in `Draw.diverged`, and `diverged_at` records the first such draw so
  downstream estimates exclude it (never averaged in).
- Probe shards (`sampler.probe_shards`): a runner given `probe_contexts`
  = [c0, c1) evaluates only those probe contexts (their residual cache too).
  Its SGLD trajectory and sampling-set losses do not depend on the range, so
  the S shard units of a chain group replay the same chains; evaluating a
  slice batches contexts from c0 on (`observables.BODY_ROWS` rows a batch), so
  a shard's losses are bit-identical to the unsharded run's where c0 falls on
  a batch boundary, and equal to float32 rounding elsewhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from spectro import neox
from spectro.components import Component, resolve_components
from spectro.config import SamplerConfig
from spectro.device import eval_autocast
from spectro.observables import Body, mean_loss, mean_loss_from, residual_at, token_losses, token_losses_from
from spectro.sgld import SGLD, SGLDHyper, SGLDState, build
from spectro.traces import TRACE_NAMES

STREAMS = ("data", "noise")


def chain_seed(run_seed: int, component: str, chain: int, stream: str) -> int:
    """A 63-bit seed for one (run seed, component, chain, stream)."""
    digest = hashlib.sha256(f"spectro:{run_seed}:{component}:{chain}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _is_lm(problem: "Problem") -> bool:
    """A GPT-NeoX problem with the standard LM losses (the lower-layer cache applies)."""
    return problem.loss is mean_loss and problem.per_token is token_losses and neox.is_neox(problem.model)


def lm_components(model: torch.nn.Module, names: Sequence[str]) -> list[Component]:
    return resolve_components(model, list(names))


@dataclass(frozen=True)
class Problem:
    """What every unit of a run shares. For a language model the data are
    token ids (contexts, seq) and the losses are `observables.mean_loss` /
    `observables.token_losses`; tests plug in other models (e.g. linear
    regression, whose posterior is known in closed form) through the same
    fields, so the service, store and estimator are exercised unchanged."""

    model: torch.nn.Module          # frozen at w*, eval mode, requires_grad False
    train_ids: torch.Tensor         # (n_train, ...) SGLD minibatch pool
    sampling_ids: torch.Tensor      # (n_sampling, ...) fixed set for sampling_loss
    probe_ids: torch.Tensor         # (n_probe, ...) probe examples
    init_loss: float                # mean sampling-set loss at w*
    n_probe_tokens: int
    loss: Callable = mean_loss                   # (model, params, batch) -> scalar mean loss
    per_token: Callable = token_losses           # (model, params, data) -> (n, k) per-token losses
    components: Callable = lm_components         # (model, names) -> list[Component]

    @property
    def device(self) -> torch.device:
        return self.train_ids.device

    def to(self, device: str | torch.device) -> "Problem":
        return dataclasses.replace(self, model=self.model.to(device), train_ids=self.train_ids.to(device),
                                   sampling_ids=self.sampling_ids.to(device), probe_ids=self.probe_ids.to(device))


def make_problem(model: torch.nn.Module, train_ids: torch.Tensor, sampling_ids: torch.Tensor,
                 probe_ids: torch.Tensor, device: str | torch.device = "cpu", *, loss: Callable = mean_loss,
                 per_token: Callable = token_losses, components: Callable = lm_components) -> Problem:
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    sampling_ids = sampling_ids.to(device)
    probe_ids = probe_ids.to(device)
    init = per_token(model, {}, sampling_ids).double().mean().item()
    n_probe = int(per_token(model, {}, probe_ids[:1]).numel()) * probe_ids.shape[0]
    return Problem(model=model, train_ids=train_ids.to(device), sampling_ids=sampling_ids, probe_ids=probe_ids,
                   init_loss=init, n_probe_tokens=n_probe, loss=loss, per_token=per_token, components=components)


@dataclass
class UnitState:
    sgld: SGLDState
    data_gens: list[torch.Generator]
    noise_gens: list[torch.Generator]
    draw: int                        # draws produced so far
    diverged_at: np.ndarray          # (chains,) int64, -1 = healthy


@dataclass(frozen=True)
class Draw:
    index: int
    sampling_loss: np.ndarray        # (chains,) float64, NaN where diverged
    probe_loss: np.ndarray           # (chains, tokens) float32, NaN where diverged
    traces: dict[str, np.ndarray]    # name -> (chains,): one per entry of spectro.traces.TRACES
    diverged: np.ndarray             # (chains,) bool

    def __post_init__(self):
        if set(self.traces) != set(TRACE_NAMES):
            raise ValueError(f"a draw records the traces {sorted(TRACE_NAMES)} (spectro.traces), got "
                             f"{sorted(self.traces)}")


class UnitRunner:
    def __init__(self, problem: Problem, component: Component, chain_ids: Sequence[int],
                 config: SamplerConfig, run_seed: int, cache_lower_layers: bool = True,
                 probe_contexts: tuple[int, int] | None = None):
        if config.nbeta is None:
            raise ValueError("config.nbeta must be resolved (spectro.config.validate does this)")
        self.problem = problem
        self.component = component
        self.chain_ids = tuple(int(c) for c in chain_ids)
        self.config = config
        self.run_seed = run_seed
        self.antithetic = bool(getattr(config, "antithetic", False))
        if self.antithetic and any(c % 2 == 0 and c + 1 not in self.chain_ids for c in self.chain_ids):
            raise ValueError(f"antithetic chains run in pairs (2p, 2p+1) in one unit; got chains {self.chain_ids}")
        self.signs = [(-1.0 if c % 2 else 1.0) for c in self.chain_ids] if self.antithetic else None
        n_probe = problem.probe_ids.shape[0]
        c0, c1 = probe_contexts or (0, n_probe)
        if not 0 <= c0 < c1 <= n_probe:
            raise ValueError(f"probe contexts [{c0}, {c1}) are not a range of the {n_probe} probe contexts")
        self.probe_contexts = (int(c0), int(c1))
        self._probe_ids = problem.probe_ids[c0:c1]
        self.n_probe_tokens = problem.n_probe_tokens * (c1 - c0) // n_probe
        model_params = dict(problem.model.named_parameters())
        anchor = {n: model_params[n].detach() for n in component.masks}
        masks = {n: (None if m is None else m.to(problem.device)) for n, m in component.masks.items()}
        hyper = SGLDHyper(step_size=config.step_size, nbeta=config.nbeta, gamma=config.gamma,
                          noise_level=config.noise_level, precondition=config.precondition,
                          rmsprop_alpha=config.rmsprop_alpha, rmsprop_eps=config.rmsprop_eps)
        model, loss = problem.model, problem.loss
        self.cached = cache_lower_layers and _is_lm(problem) and component.layer >= 1
        if self.cached:
            # the residual stream entering the component's layer never changes: compute it once (at w*)
            # for the SGLD pool, the sampling set and the probe contexts, and evaluate from there up
            L = component.layer
            self._upper = Body(model, L)
            self._train_h = residual_at(model, problem.train_ids, L)               # (n_train, seq, hidden)
            self._sampling_h = residual_at(model, problem.sampling_ids, L)         # (n_sampling, seq, hidden)
            self._probe_h = residual_at(model, self._probe_ids, L)                 # (shard contexts, seq, hidden)
            upper = self._upper
            loss_fn = lambda p, batch: mean_loss_from(upper, p, batch)
        elif _is_lm(problem):
            loss_fn = lambda p, batch: mean_loss(model, p, batch)
        else:
            loss_fn = lambda p, batch: loss(model, p, batch)
        self.sgld: SGLD = build(hyper, anchor, masks, loss_fn, config.chain_mode)

    def _per_token(self, params: dict, which: str) -> torch.Tensor:
        """Per-token losses on the sampling set or the probe contexts: (contexts, seq - 1)."""
        ids = self.problem.sampling_ids if which == "sampling" else self._probe_ids
        if self.cached:
            hidden = self._sampling_h if which == "sampling" else self._probe_h
            return token_losses_from(self._upper, params, hidden, ids)
        return self.problem.per_token(self.problem.model, params, ids)

    @property
    def n_chains(self) -> int:
        return len(self.chain_ids)

    def _gens(self, stream: str) -> list[torch.Generator]:
        gens = []
        for c in self.chain_ids:
            g = torch.Generator(device=self.problem.device)
            seed_chain = c - c % 2 if self.antithetic else c       # a pair shares its even chain's streams
            # the nβ = 0 control draws its own streams: sharing a real run's noise would make the two agree
            # for that reason alone
            tag = stream + ":control" if getattr(self.config, "control", False) else stream
            g.manual_seed(chain_seed(self.run_seed, self.component.name, seed_chain, tag))
            gens.append(g)
        return gens

    def start(self) -> UnitState:
        return UnitState(sgld=self.sgld.init(self.n_chains), data_gens=self._gens("data"),
                         noise_gens=self._gens("noise"), draw=0,
                         diverged_at=np.full(self.n_chains, -1, dtype=np.int64))

    def _step(self, sg: SGLDState, state: UnitState, diverged_at: np.ndarray):
        """One SGLD step on fresh minibatches; diverged chains stay put."""
        pool = self.problem.train_ids
        idx = torch.stack([torch.randint(pool.shape[0], (self.config.batch_size,), generator=g, device=pool.device)
                           for g in state.data_gens])                      # (chains, batch)
        batch = pool[idx]                                                   # (chains, batch, seq)
        if self.cached:
            batch = (self._train_h[idx], batch)                             # (chains, batch, seq, hidden), ids
        active = torch.as_tensor(diverged_at < 0, device=pool.device)
        return self.sgld.update(sg, batch, state.noise_gens, active=active, signs=self.signs)

    def next_draw(self, state: UnitState) -> tuple[UnitState, Draw]:
        cfg, bound = self.config, self.problem.init_loss + self.config.divergence_bound
        n_steps = cfg.steps_between_draws + (cfg.burnin if state.draw == 0 else 0)
        sg, diverged_at = state.sgld, state.diverged_at.copy()
        step_losses = np.zeros(self.n_chains, dtype=np.float64)
        info = None
        for _ in range(n_steps):
            sg, info = self._step(sg, state, diverged_at)
            loss = info.loss.double().cpu().numpy()
            step_losses += loss
            bad = (~np.isfinite(loss) | (loss > bound)) & (diverged_at < 0)
            diverged_at[bad] = state.draw
        probe_tokens = self.n_probe_tokens
        sampling = np.full(self.n_chains, np.nan)
        probe = np.full((self.n_chains, probe_tokens), np.nan, dtype=np.float32)
        for c in range(self.n_chains):
            if diverged_at[c] >= 0:
                continue
            params = {n: p[c] for n, p in sg.params.items()}
            with eval_autocast(self.problem.device, cfg.probe_dtype):
                s = self._per_token(params, "sampling").double().mean().item()
                if not np.isfinite(s) or s > bound:
                    diverged_at[c] = state.draw
                    continue
                sampling[c] = s
                probe[c] = self._per_token(params, "probe").float().reshape(-1).cpu().numpy()
        diverged = diverged_at >= 0
        sampling[diverged] = np.nan
        probe[diverged] = np.nan
        traces = {"step_loss": step_losses / n_steps,              # the per-draw observables (spectro.traces)
                  "grad_norm": info.grad_norm.numpy(), "noise_norm": info.noise_norm.numpy(),
                  "distance": info.distance.numpy()}
        draw = Draw(index=state.draw, sampling_loss=sampling, probe_loss=probe, traces=traces, diverged=diverged)
        return UnitState(sg, state.data_gens, state.noise_gens, state.draw + 1, diverged_at), draw

    # ---- checkpoints: plain tensors only, loadable with torch.load(weights_only=True)

    def checkpoint(self, state: UnitState) -> dict:
        return {
            "component": self.component.name,
            "chain_ids": list(self.chain_ids),
            "probe_contexts": list(self.probe_contexts),
            "draw": state.draw,
            "step": state.sgld.step,
            "params": {n: p.detach().cpu().clone() for n, p in state.sgld.params.items()},
            "sq_avg": None if state.sgld.sq_avg is None else {n: v.cpu().clone() for n, v in state.sgld.sq_avg.items()},
            "data_gens": [g.get_state() for g in state.data_gens],
            "noise_gens": [g.get_state() for g in state.noise_gens],
            "diverged_at": torch.from_numpy(state.diverged_at.copy()),
        }

    def restore(self, ckpt: dict) -> UnitState:
        if ckpt["component"] != self.component.name or list(ckpt["chain_ids"]) != list(self.chain_ids):
            raise ValueError(f"checkpoint is for {ckpt['component']} chains {ckpt['chain_ids']}, "
                             f"not {self.component.name} chains {list(self.chain_ids)}")
        if list(ckpt.get("probe_contexts", self.probe_contexts)) != list(self.probe_contexts):
            raise ValueError(f"checkpoint is for probe contexts {ckpt['probe_contexts']}, "
                             f"not {list(self.probe_contexts)}")
        dev = self.problem.device
        params = {n: p.to(dev) for n, p in ckpt["params"].items()}
        sq = None if ckpt["sq_avg"] is None else {n: v.to(dev) for n, v in ckpt["sq_avg"].items()}
        data_gens, noise_gens = self._gens("data"), self._gens("noise")
        for g, s in zip(data_gens, ckpt["data_gens"]):
            g.set_state(s)
        for g, s in zip(noise_gens, ckpt["noise_gens"]):
            g.set_state(s)
        return UnitState(sgld=SGLDState(params=params, sq_avg=sq, step=int(ckpt["step"])), data_gens=data_gens,
                         noise_gens=noise_gens, draw=int(ckpt["draw"]),
                         diverged_at=ckpt["diverged_at"].numpy().copy())
