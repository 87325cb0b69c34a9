"""Susceptibilities from `samples.zarr`, as a Ray Data job, plus diagnostics.

The job (docs/method.md, docs/architecture.md):
1. The driver plans token blocks aligned with the store's token chunks.
2. A Ray Data pipeline (`from_items(blocks).map_batches(...)`) reduces each
   block: it reads `probe_loss` one Zarr chunk (component, chain group, draw
   chunk, token block) at a time, accumulates float64 per-chain moments
   (`estimator.ChainMoments`), forms chi, its standard error and per-chain
   values for every component, and writes them into its own token rows of
   `susceptibilities.zarr.partial`.
3. The driver computes per-component diagnostics from the small
   (component, chain, draw) `sampling_loss` array, writes them, and renames
   the output into place.

Non-obvious choices:
- Memory is bounded by one Zarr chunk plus (components x chains x block)
  float64 accumulators per task, whatever the number of probe tokens; the
  driver never holds a token-sized array. `ray.data.read_zarr` is not used: it
  reads only Zarr v2 (docs/architecture.md).
- A chain that diverged is excluded entirely (all its draws), listed in the
  output's attrs, and counted in the diagnostics. A component left with no
  usable chain gets chi = NaN *and* `n_chains_used = 0`, with a warning, and
  is listed in the attrs and the summary (`components_without_chains`). If
  every chain of `full` diverged nothing can be estimated: the pipeline stops
  with DivergenceError before the job (`require_full`). Any other non-finite
  chi value is an error, never written.
- A run still in progress is refused unless `partial=True`, which uses each
  chain's committed draws and marks the output `partial` with the progress.
- `draws=D` estimates on every chain's first D draws: the complete estimate
  of a run D draws long (not partial; attrs record `draws`), which is what a
  round of `spectro.rounds` needs. A chain that diverged after draw D enters
  it. With store.probe=moments only D = the committed draws works (the sums
  are kept at the committed draws only).
- R-hat (rank-normalised, split) and bulk ESS come from arviz-stats, on
  phi = sampling_loss - init_loss per (chain, draw). A component above
  `rhat_threshold` gets `rhat_p`, the share of R-hats of independent AR(1)
  traces at its own lag-1 autocorrelation that reach its R-hat
  (`spectro.reliability.rhat_null_p`); it is `not_mixed` only if rhat_p is
  below 0.05 / (components with an R-hat): R-hat beyond what its noise at
  this layout gives, with a run-wide false alarm rate of about 5%.
- A `store.probe=moments` store holds each chain's sums already: a task reads
  the slot that `progress` points at (spectro.store.samples) for its tokens
  instead of reducing `probe_loss`, and everything after that (chi, chi_se,
  chi_per_chain, chi_half, reliability) is the same code. With partial=true
  the sums cover each chain's committed draws, as the draws path does.
- With moments and probe shards (`sampler.probe_shards` S > 1) a token's sums
  are its shard's: the slot that shard's progress points at, with that
  shard's copy of the scalar sums, for the component and for `full` alike; a
  block that spans shards is estimated shard by shard. A complete run has
  every shard at n_draws, so this is the unsharded estimate. With
  partial=true the shards may have committed different draw counts, so tokens
  of different shards may rest on different draws: the selection keeps them
  (`Selection.shard_draws`) and the output's attrs list them
  (`shard_draws`, [component][chain][shard]) next to `progress`.
- Locality per component: E[phi] in nats (the sampled models' mean loss
  rise) and the relative displacement RMS(w - w*) / RMS(w*) over the
  component's sampled entries (the `distance` trace against the weight norm
  recorded in provenance). A component above `LOCAL_MAX_PHI` or
  `LOCAL_MAX_DISPLACEMENT` is flagged `not_local`: its chains left the
  neighbourhood of w* where nβ E[phi] reads as a local learning coefficient
  (docs/method.md, "Locality").
"""

from __future__ import annotations

import logging
import resource
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np

from spectro import console, rundir
from spectro.config import EstimatorConfig
from spectro.errors import DivergenceError, StoreError
from spectro.estimator import ChainMoments, mean_loss, susceptibility
from spectro.reliability import not_mixed, rank_rhat, rhat_null_p, split_half
from spectro.store import SampleStore, SusceptibilityStore

_E = EstimatorConfig()    # the schema's defaults: the one place they are written

log = logging.getLogger("spectro.susceptibilities")

RHAT_NULL_SEED = 0          # R-hat's null for component ci draws from default_rng([RHAT_NULL_SEED, ci])

FULL = "full"
LOCAL_MAX_PHI = 0.5            # nats: mean loss rise of the sampled models above which a run is not local
LOCAL_MAX_DISPLACEMENT = 0.5   # RMS(w - w*) / RMS(w*) above which the chains wander as far as the weights are large


@dataclass(frozen=True)
class Selection:
    use: np.ndarray          # (components, chains) bool: chain enters the estimate
    draws: np.ndarray        # (components, chains) int: draws used from each chain
    excluded: list           # [{"component", "chain", "diverged_at"}]
    partial: bool
    shard_draws: Optional[np.ndarray] = None   # moments with probe shards: (components, chains, shards) draws used


def select_chains(store: SampleStore, partial: bool = _E.partial, draws: Optional[int] = None) -> Selection:
    """The chains and draws that enter the estimate. `draws`: use each chain's first `draws` draws only, the
    complete estimate of a run that long (a round of spectro.rounds; every chain must have them committed, and a
    chain that diverged after them counts as not diverged); default: the store's n_draws."""
    L = store.layout
    raw = store.read("progress")                                    # with probe shards: (components, chains, shards)
    if draws is not None:
        _check_draws(store, raw, draws)
        raw = np.minimum(raw, draws)
    progress = raw.min(axis=2) if raw.ndim == 3 else raw            # the draws every shard of a chain has
    running = bool((progress < (draws or L.n_draws)).any())
    if not partial and running:
        done, total = int(progress.sum()), progress.size * (draws or L.n_draws)
        raise StoreError(f"the run in {store.path.parent} is still in progress ({done}/{total} chain-draws "
                         f"committed); finish sampling (rerun the same command), or ask for an explicit "
                         f"partial estimate with partial=true")
    if FULL not in L.components:
        raise StoreError(f"{store.path} has no '{FULL}' run; the estimator centres on it. Resample with it.")
    diverged = store.diverged_at()
    if draws is not None:
        diverged = np.where(diverged >= draws, -1, diverged)        # diverged later: fine for its first draws
    use = (diverged < 0) & (progress > 0)
    excluded = [{"component": L.components[c], "chain": int(k), "diverged_at": int(diverged[c, k])}
                for c, k in zip(*np.nonzero(diverged >= 0))]
    shard_draws = None
    if L.probe == "moments" and L.probe_shards > 1:                 # each shard's sums: its own committed draws
        shard_draws = np.where(use[:, :, None], raw, 0)
    return Selection(use=use, draws=np.where(use, progress, 0), excluded=excluded, partial=running,
                     shard_draws=shard_draws)


def _check_draws(store: SampleStore, progress: np.ndarray, draws: int) -> None:
    """StoreError unless an estimate on the first `draws` draws can be made: 0 < draws <= n_draws, every chain has
    them, and (store.probe=moments) the sums cover exactly them (the store keeps sums at the committed draws only)."""
    L = store.layout
    if not 0 < draws <= L.n_draws:
        raise StoreError(f"cannot estimate on the first {draws} draws: {store.path} holds 1 to {L.n_draws} draws")
    if L.probe == "moments" and (progress != draws).any():
        raise StoreError(f"{store.path} keeps moment sums (store.probe=moments) at each chain's committed draws "
                         f"only, so it cannot estimate on the first {draws} draws while chains have "
                         f"{int(progress.min())} to {int(progress.max())}; use store.probe=draws for that")
    if (progress < draws).any():
        raise StoreError(f"cannot estimate on the first {draws} draws: some chains of {store.path} have only "
                         f"{int(progress.min())} committed; sample to {draws} draws first")


def require_full(store: SampleStore) -> None:
    """DivergenceError if every chain of `full` diverged: every estimate is centred on it, so chi would be
    all NaN. The pipeline calls this before the job; `compute` itself writes the flagged all-NaN output."""
    L = store.layout
    if FULL not in L.components:
        return
    diverged = store.diverged_at()[L.components.index(FULL)]
    if (diverged >= 0).all():
        sampler = store.attrs["config"]["sampler"]
        raise DivergenceError(
            f"every chain of '{FULL}' diverged (at draws {diverged.tolist()}), and every estimate is centred "
            f"on it, so no susceptibility can be computed. Lower sampler.step_size (now {sampler['step_size']}), "
            f"raise sampler.gamma (now {sampler['gamma']}) or sampler.divergence_bound, and resample "
            f"(fresh=true)")


def antithetic(store: SampleStore) -> bool:
    """Whether the store's chains come in antithetic pairs (2p, 2p+1)."""
    return bool(store.attrs["config"]["sampler"].get("antithetic", False))


def units(chains: list[int], paired: bool) -> list[list[int]]:
    """Independent units as positions in `chains` (the usable chain ids, sorted): antithetic pairs stay
    together, a pair that lost a chain is a unit of one."""
    if not paired:
        return [[i] for i in range(len(chains))]
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(chains):
        groups.setdefault(k // 2, []).append(i)
    return [groups[p] for p in sorted(groups)]


def plan_blocks(store: SampleStore, tokens_per_block: Optional[int] = None) -> list[dict]:
    L = store.layout
    step = tokens_per_block or L.token_chunk
    step = max(L.token_chunk, (step // L.token_chunk) * L.token_chunk)   # aligned with chunks
    return [{"t0": t0, "t1": min(t0 + step, L.n_tokens)} for t0 in range(0, L.n_tokens, step)]


def block_estimate(store: SampleStore, sel: Selection, t0: int, t1: int, form: str):
    """chi, chi_se (tokens, components), chi_per_chain (chains, tokens, components), chi_half
    (2, tokens, components) and token_loss (tokens,) for tokens [t0, t1). token_loss is each token's loss
    averaged over the used `full` draws (`spectro.estimator.mean_loss`)."""
    L = store.layout
    if L.probe == "moments" and L.shard_of(t0) != L.shard_of(t1 - 1):     # each shard's tokens on its own draws
        cuts = sorted({t0, t1} | {a for a, _ in map(L.shard_tokens, range(L.probe_shards)) if t0 < a < t1})
        parts = [block_estimate(store, sel, a, b, form) for a, b in zip(cuts, cuts[1:])]
        return tuple(np.concatenate([p[i] for p in parts], axis=1 if i in (2, 3) else 0) for i in range(5))
    C, N, T = len(L.components), L.n_chains, t1 - t0
    moments = [[ChainMoments(T) for _ in range(N)] for _ in range(C)]
    if L.probe == "moments":
        _stored_moments(store, sel, t0, t1, moments)
    else:
        _reduce_draws(store, sel, t0, t1, moments)
    chi = np.full((T, C), np.nan)
    se = np.full((T, C), np.nan)
    per_chain = np.full((N, T, C), np.nan)
    half = np.full((2, T, C), np.nan)
    paired = antithetic(store)
    fi = L.components.index(FULL)
    full_chains = [k for k in range(N) if sel.use[fi, k]]
    full = [moments[fi][k] for k in full_chains]
    for ci in range(C):
        chains = [k for k in range(N) if sel.use[ci, k]]
        if not chains or not full:
            continue
        est = susceptibility([moments[ci][k] for k in chains], full, form, units(chains, paired),
                             units(full_chains, paired))
        chi[:, ci] = est.chi
        se[:, ci] = est.chi_se
        per_chain[chains, :, ci] = est.chi_per_chain
        half[:, :, ci] = est.chi_half
    token_loss = mean_loss(full, store.init_loss) if full else np.full(T, np.nan)     # (tokens,)
    return chi, se, per_chain, half, token_loss


def _reduce_draws(store: SampleStore, sel: Selection, t0: int, t1: int, moments: list) -> None:
    """Add every used chain's committed draws of `probe_loss`, tokens [t0, t1), to `moments[ci][k]`, one Zarr
    chunk at a time."""
    L = store.layout
    C, N = len(L.components), L.n_chains
    s = store.read("sampling_loss")                                          # (C, N, D)
    init = store.init_loss
    for ci in range(C):
        for g0 in range(0, N, L.chain_group):
            g1 = min(g0 + L.chain_group, N)
            for d0 in range(0, L.n_draws, L.draw_chunk):
                d1 = min(d0 + L.draw_chunk, L.n_draws)
                wanted = [k for k in range(g0, g1) if sel.use[ci, k] and sel.draws[ci, k] > d0]
                if not wanted:
                    continue
                block = store.read("probe_loss", (ci, slice(g0, g1), slice(d0, d1), slice(t0, t1)))  # (G, Dc, T)
                for k in wanted:
                    n = min(d1, int(sel.draws[ci, k])) - d0
                    moments[ci][k].add(s[ci, k, d0:d0 + n], block[k - g0, :n], init)


def _stored_moments(store: SampleStore, sel: Selection, t0: int, t1: int, moments: list) -> None:
    """Fill `moments[ci][k]` of every used chain from its committed moments slot, tokens [t0, t1) (inside one
    probe shard: that shard's slot and copy of the scalar sums, at its own committed draws)."""
    L = store.layout
    shard = L.shard_of(t0)
    for ci in range(len(L.components)):
        for g0 in range(0, L.n_chains, L.chain_group):
            g1 = min(g0 + L.chain_group, L.n_chains)
            wanted = [k for k in range(g0, g1) if sel.use[ci, k]]
            if not wanted:
                continue
            a = store.read_moments(ci, slice(g0, g1), slice(t0, t1), shard)
            for k in wanted:
                n = int(sel.draws[ci, k] if sel.shard_draws is None else sel.shard_draws[ci, k, shard])
                slot = L.moment_slot(n)
                if int(a["n"][k - g0, slot]) != n:
                    raise StoreError(f"{store.path}: the moment sums of {L.components[ci]} chain {k} cover "
                                     f"{int(a['n'][k - g0, slot])} draws, but its progress says {n}; the store "
                                     f"changed while it was read (a sampler is writing) or is damaged: rerun the "
                                     f"sampling stage (it verifies and repairs), then this one")
                moments[ci][k] = ChainMoments(t1 - t0, n=n, s_phi=float(a["phi"][k - g0, slot]),
                                              s_phi2=float(a["phi2"][k - g0, slot]),
                                              s_phiD=a["phiD"][k - g0, slot].astype(np.float64),
                                              s_D=a["D"][k - g0, slot].astype(np.float64))


def _reduce_batch(batch: dict, samples_path: str, out_path: str, sel: Selection, form: str) -> dict:
    """Ray Data map_batches function: one or more token blocks per call."""
    store = SampleStore.open(samples_path)
    out = SusceptibilityStore.open_block_writer(out_path)
    t0s, t1s, finite = [], [], []
    for t0, t1 in zip(batch["t0"], batch["t1"]):
        chi, se, per_chain, half, token_loss = block_estimate(store, sel, int(t0), int(t1), form)
        out.write_block(int(t0), int(t1), chi, se, per_chain, half, token_loss)
        t0s.append(int(t0))
        t1s.append(int(t1))
        finite.append(int(np.isfinite(chi).sum()))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {"t0": np.array(t0s), "t1": np.array(t1s), "finite": np.array(finite),
            "peak_rss_mb": np.full(len(t0s), rss_mb)}


def unit_phi(s: np.ndarray, init_loss: float, sel: Selection, ci: int,
             paired: bool) -> tuple[np.ndarray, int, Optional[np.ndarray]]:
    """Component `ci`'s usable chains, the draws they all have (n), and phi per independent unit (units, n);
    phi is None when no chain is usable. `s`: the store's (C, N, D) `sampling_loss`. Antithetic pairs are one
    unit: the linear part of their phi cancels in the pair's mean, so R-hat, ESS and the LLC spread are taken over
    pair means (counting both chains would overstate the evidence)."""
    chains = np.nonzero(sel.use[ci])[0]
    if len(chains) == 0:
        return chains, 0, None
    n = int(sel.draws[ci, chains].min())
    phi = s[ci, chains, :n] - init_loss                                      # (chains, draws)
    return chains, n, np.stack([phi[u].mean(0) for u in units(list(chains), paired)])


def diagnostics(store: SampleStore, sel: Selection, nbeta: float, rhat_threshold: float) -> dict[str, np.ndarray]:
    from arviz_stats.base import array_stats

    L = store.layout
    C = len(L.components)
    s = store.read("sampling_loss")                                          # (C, N, D)
    out = {k: np.full(C, np.nan) for k in ("llc_mean", "llc_std", "mean_phi", "rhat", "rhat_p", "ess_bulk",
                                           "displacement")}
    dist = store.read("distance")                                            # (C, N, D) ||w - w*||
    norms = (store.attrs.get("model") or {}).get("weight_norms") or {}
    out["n_chains_used"] = sel.use.sum(1)
    out["n_diverged"] = (store.diverged_at() >= 0).sum(1)
    paired = antithetic(store)
    for ci in range(C):
        chains, n, phi = unit_phi(s, store.init_loss, sel, ci, paired)       # phi: (units, draws)
        if len(chains) == 0:
            continue
        llc = nbeta * phi.mean(1)
        out["llc_mean"][ci] = llc.mean()
        out["llc_std"][ci] = llc.std(ddof=1) if len(chains) > 1 else np.nan
        out["mean_phi"][ci] = phi.mean()
        norm = norms.get(L.components[ci])
        if norm:                                                             # RMS(w - w*) / RMS(w*) over its entries
            out["displacement"][ci] = float(np.sqrt(np.mean(dist[ci, chains, :n] ** 2))) / norm
        if len(chains) >= 2 and n >= 4:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out["rhat"][ci] = rank_rhat(phi)                             # the statistic its null is drawn for
                out["ess_bulk"][ci] = float(array_stats.ess(phi, chain_axis=0, draw_axis=1, method="bulk"))
            if out["rhat"][ci] > rhat_threshold:                             # is it beyond R-hat's own noise?
                out["rhat_p"][ci] = rhat_null_p(phi, out["rhat"][ci], np.random.default_rng([RHAT_NULL_SEED, ci]))
    out["not_mixed"] = not_mixed(out["rhat"], out["rhat_p"], rhat_threshold)
    out["not_local"] = (out["mean_phi"] > LOCAL_MAX_PHI) | (out["displacement"] > LOCAL_MAX_DISPLACEMENT)
    return out


def compute(run_dir: rundir.PathLike, *, form: str = _E.form, nbeta: float,
            rhat_threshold: float = _E.rhat_threshold,
            partial: bool = _E.partial, tokens_per_block: Optional[int] = None,
            concurrency: Optional[int] = None, draws: Optional[int] = None) -> dict:
    """Run the covariance job over `run_dir/samples.zarr`; writes `run_dir/susceptibilities.zarr`. `draws`: on
    each chain's first `draws` draws (`select_chains`), recorded in the output's attrs; default: all."""
    import ray

    run_dir = rundir.location(run_dir)
    store = SampleStore.open(run_dir / rundir.SAMPLES)
    sel = select_chains(store, partial, draws)
    L = store.layout
    for e in sel.excluded:
        log.warning("excluding %s chain %d (diverged at draw %d) from the estimates",
                    e["component"], e["chain"], e["diverged_at"])
    blocks = plan_blocks(store, tokens_per_block)
    out = SusceptibilityStore.create(run_dir / rundir.SUSCEPTIBILITIES, store, blocks[0]["t1"] - blocks[0]["t0"],
                                     L.n_chains)
    ray.data.DataContext.get_current().enable_progress_bars = False    # the pipeline logs one line for the job
    console.route_third_party()          # importing Ray Data gave its logger a terminal handler of its own
    ds = ray.data.from_items(blocks, override_num_blocks=len(blocks))
    kwargs = dict(samples_path=str(store.path), out_path=str(out.path), sel=sel, form=form)
    ds = ds.map_batches(_reduce_batch, batch_size=1, fn_kwargs=kwargs, num_cpus=1,
                        **({"concurrency": concurrency} if concurrency else {}))
    results = ds.take_all()
    if sorted((r["t0"], r["t1"]) for r in results) != [(b["t0"], b["t1"]) for b in blocks]:
        raise StoreError("the covariance job did not return every token block; rerun the susceptibilities stage")
    diag = diagnostics(store, sel, nbeta, rhat_threshold)
    empty = [L.components[c] for c in range(len(L.components)) if diag["n_chains_used"][c] == 0]
    estimated = 0 if FULL in empty else len(L.components) - len(empty)     # every estimate is centred on full
    expected_finite = L.n_tokens * estimated
    if sum(int(r["finite"]) for r in results) != expected_finite:     # never a silent NaN/inf in chi
        out.path.rmtree()
        raise DivergenceError(f"chi has {expected_finite - sum(int(r['finite']) for r in results)} non-finite values "
                              f"for components whose chains did not diverge: their probe losses hold inf/NaN. "
                              f"Lower sampler.step_size or raise sampler.gamma and resample (fresh=true)")
    if empty:
        log.warning("components with no usable chain (chi is NaN for them): %s", ", ".join(empty))
    reliability = run_reliability(out, L.components)
    attrs = {"form": form, "partial": sel.partial, "excluded_chains": sel.excluded, "nbeta": nbeta,
             "antithetic": antithetic(store), "reliability": reliability,
             "init_loss": store.init_loss, "rhat_threshold": rhat_threshold,
             "progress": store.progress().tolist() if sel.partial else None,
             **({"shard_draws": sel.shard_draws.tolist()} if sel.partial and sel.shard_draws is not None else {}),
             "components_without_chains": empty, "local_max_phi": LOCAL_MAX_PHI,
             "local_max_displacement": LOCAL_MAX_DISPLACEMENT, **({"draws": int(draws)} if draws else {})}
    out.write_diagnostics(diag, attrs)
    out.commit(run_dir / rundir.SUSCEPTIBILITIES)
    return {"blocks": len(blocks), "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "reliability": None if reliability is None else
            {k: reliability[k] for k in ("raw_median", "features_median", "features_min", "least_reliable",
                                          "components", "features_reliability")},
            "excluded_chains": len(sel.excluded), "partial": sel.partial, "components_without_chains": empty,
            "not_mixed": [L.components[c] for c in np.nonzero(diag["not_mixed"])[0]],
            "rhat_within_chance": _within_chance(diag, L.components, rhat_threshold),
            "not_local": [L.components[c] for c in np.nonzero(diag["not_local"])[0]],
            "rhat_max": _num(np.max(diag["rhat"], initial=-np.inf, where=np.isfinite(diag["rhat"]))),
            "rhat": {c: _num(diag["rhat"][i]) for i, c in enumerate(L.components)},
            "locality": {c: {"mean_phi": _num(diag["mean_phi"][i]), "displacement": _num(diag["displacement"][i])}
                         for i, c in enumerate(L.components)}}


def _within_chance(diag: dict, components: list[str], rhat_threshold: float) -> dict[str, Optional[float]]:
    """Components above the R-hat threshold but within its null (not flagged), with their null p."""
    idx = np.nonzero((diag["rhat"] > rhat_threshold) & ~diag["not_mixed"])[0]
    return {components[c]: _num(diag["rhat_p"][c]) for c in idx}


def _num(x: float) -> Optional[float]:
    return round(float(x), 5) if np.isfinite(x) else None


def run_reliability(out: SusceptibilityStore, components: list[str]) -> dict | None:
    """Split-half reliability of every component but `full` (spectro.reliability), from `chi_half`."""
    keep = [i for i, c in enumerate(components) if c != FULL]
    half = np.asarray(out.group["chi_half"][:], dtype=np.float64)[:, :, keep]      # (2, tokens, components)
    rel = split_half(half, [components[i] for i in keep])
    if rel is not None:
        out.write_reliability(rel)
    return rel


def online_estimate(store: SampleStore, form: str = _E.form) -> dict:
    """Running chi from the chunks committed so far, in the driver (for monitoring small runs)."""
    sel = select_chains(store, partial=True)
    chi, se = block_estimate(store, sel, 0, store.layout.n_tokens, form)[:2]
    return {"chi": chi, "chi_se": se, "draws": sel.draws, "partial": sel.partial}
