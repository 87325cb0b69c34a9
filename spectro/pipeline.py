"""The run, stage by stage: config -> model/data -> sampling -> store -> ...

`prepare(config)` does every check that can fail on user input (model,
components, corpus, context lengths) before anything is written; `run(config,
run_dir)` then creates the run directory's contents and executes the stages.

Run location (`storage.uri` when set, e.g. s3://bucket/prefix; else Hydra's
output directory, or any path; spectro.rundir.Location):

    config.json        the resolved config (nbeta filled in)
    provenance.json    model source/revision/file hashes, corpus hash, versions
    samples.zarr/      the sample store (spectro.store)
    checkpoints/       per-unit chain checkpoints for resume

Hydra's own files (.hydra/, spectro.log) and wandb's offline files stay in
the local run directory.

Non-obvious choices:
- The SGLD pool, the sampling set and the natural probe contexts are disjoint
  windows of the same corpus (unless `data.probe.corpus` names another),
  drawn with seeds derived from `data.seed`; the labelled suites and file
  come after them (spectro.probes).
- `full` (every parameter) is always sampled, first, because the default
  estimator centres on it.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from spectro import __version__, console, rundir
from spectro.components import Component, resolve_components, weight_norm
from spectro.config import RESUME_NEUTRAL_KEYS, SpectroConfig, as_dict
from spectro.data import ContextSet, ProbeSet, load_corpus, make_contexts
from spectro.probes import build_probe_set, suite_contexts
from spectro.device import resolve_device
from spectro.errors import ConfigError, SAEError, StoreError
from spectro.model import LoadedModel, load_model
from spectro.sampling import Problem, make_problem
from spectro.store import Layout, ProbeTable, SampleStore

log = logging.getLogger("spectro")


@dataclass(frozen=True)
class Prepared:
    config: SpectroConfig
    loaded: LoadedModel
    components: list[Component]    # `full` first
    probe: ProbeSet
    problem: Problem
    corpus_info: dict


def fingerprint(config: SpectroConfig) -> dict:
    """The part of the config that determines stored numbers."""
    d = as_dict(config)
    for key in RESUME_NEUTRAL_KEYS:
        parts = key.split(".")
        node = d
        for p in parts[:-1]:
            node = node[p]
        node.pop(parts[-1], None)
    return d


def prepare(config: SpectroConfig) -> Prepared:
    """Load and check everything; raises a SpectroError subclass on bad input."""
    loaded = load_model(config.model.source, config.model.revision, allow_download=config.model.allow_download)
    names = [n for n in config.components if n != "full"]
    components = resolve_components(loaded.model, ["full"] + names)
    d = config.data
    corpus = load_corpus(dict(d.corpus))
    tok = loaded.tokenizer
    kw = dict(max_len=loaded.max_positions)
    train = make_contexts(corpus, tok, d.seq_len, d.n_train_contexts, d.seed, **kw)
    sampling = make_contexts(corpus, tok, d.seq_len, d.n_sampling_contexts, d.seed + 1, exclude=train, **kw)
    both = _union(train, sampling)
    probe_corpus = corpus if d.probe.corpus is None else load_corpus(dict(d.probe.corpus))
    natural = make_contexts(probe_corpus, tok, d.seq_len, d.n_probe_contexts, d.seed + 2, exclude=both, **kw) \
        if d.n_probe_contexts else None
    suites = suite_contexts(d.probe.suites, d.probe.suite_contexts, tok, d.seq_len, d.seed,
                            exclude=_union(both, natural) if natural is not None else both, **kw)
    probe = build_probe_set(natural, suites, d.probe.file, tok, d.seq_len)
    problem = make_problem(loaded.model, train.input_ids, sampling.input_ids, probe.contexts.input_ids,
                           device=driver_device(config.device))
    if not np.isfinite(problem.init_loss):
        raise ConfigError(f"the model's loss at its own weights is {problem.init_loss}; check the model files")
    corpus_info = {"description": corpus.description, "content_hash": corpus.content_hash,
                   "n_documents": len(corpus.documents), "sources": sorted({x.source for x in corpus.documents})}
    if corpus.asset is not None:                        # the shipped corpus file: name, sha256, Python it came from
        corpus_info["asset"] = corpus.asset
    return Prepared(config, loaded, components, probe, problem, corpus_info)


def driver_device(device: str) -> str:
    """Where the driver evaluates init_loss: the GPU if it has one and the run uses GPUs, else the CPU
    (a driver on a GPU-less head node must not fail a device=cuda run; the actors check their own device)."""
    return "cpu" if device == "cpu" else resolve_device("auto")


def _union(a: ContextSet, b: ContextSet) -> ContextSet:
    return ContextSet(input_ids=torch.cat([a.input_ids, b.input_ids]), sources=a.sources + b.sources,
                      doc_names=a.doc_names + b.doc_names, offsets=a.offsets + b.offsets)


def layout_for(p: Prepared) -> Layout:
    s, d = p.config.sampler, p.config.data
    return Layout.plan([c.name for c in p.components], s.num_chains, s.num_draws, p.probe.contexts.n_contexts,
                       d.seq_len, s.chain_group, s.checkpoint_every, p.config.store.probe, s.probe_shards)


def provenance(p: Prepared) -> dict:
    import transformers

    from spectro.service import ray_version
    from spectro.store import zarr_version
    norms = {c.name: weight_norm(c, p.loaded.model) for c in p.components}     # for the displacement figure
    return {"spectro": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "ray": ray_version(), "zarr": zarr_version(),
            "model": {**p.loaded.provenance, "weight_norms": norms}, "data": p.corpus_info,
            "init_loss": p.problem.init_loss,
            "n_probe_tokens": p.probe.n_tokens}


def open_store(p: Prepared, run_dir: rundir.PathLike, prov: dict, fresh: Optional[bool] = None) -> SampleStore:
    probe = p.probe
    table = ProbeTable(input_ids=probe.contexts.input_ids.numpy(), context=probe.token_context,
                       position=probe.token_position, token_id=probe.token_id, text=probe.token_text,
                       source=probe.token_source, labels=probe.labels, label_names=probe.label_names,
                       label_rules=probe.label_rules)
    return SampleStore.create_or_open(rundir.location(run_dir) / rundir.SAMPLES, layout_for(p),
                                      fingerprint=fingerprint(p.config),
                                      config=as_dict(p.config), model=prov["model"], data=prov["data"],
                                      init_loss=p.problem.init_loss, probe=table,
                                      fresh=p.config.fresh if fresh is None else fresh)


def run(config: SpectroConfig, run_dir: Path, prepared: Optional[Prepared] = None) -> dict:
    """Execute the configured stages; returns a summary dict. The artifacts go to `storage.uri` when set,
    else to `run_dir` (the local Hydra directory, which keeps the wandb files either way).

    `stage=all` runs sample -> susceptibilities -> clusters -> sae -> report
    (sae only with `sae.enabled`); a single stage runs alone on an existing run
    directory (`sample` and `sae` need the model).
    """

    from spectro import rounds, service

    console.route_third_party()             # importing Ray gave its loggers a terminal handler of their own
    local_dir = Path(run_dir)
    if config.stage == "plan":              # one owner: the plan stage is spectro.plan.run_plan (the CLI calls it)
        raise ConfigError("stage=plan is not a pipeline stage: call spectro.plan.run_plan (the command line does)")
    run_dir = rundir.run_location(config.storage.uri, local_dir)
    run_dir.check_writable()                # an unreachable bucket fails here, before any sampling
    stages = ("sample", "susceptibilities", "clusters", "sae", "report") if config.stage == "all" else (config.stage,)
    if config.stage == "all" and not config.sae.enabled:
        stages = tuple(s for s in stages if s != "sae")
    started = start_ray(config)
    summary: dict = {"run_dir": str(run_dir)}
    try:
        if "sample" in stages and "susceptibilities" in stages and rounds.enabled(config.sampler.until):
            prepared = prepared or prepare(config)
            summary.update(run_in_rounds(config, run_dir, prepared, local_dir))   # sample, estimate, judge
            _update_summary(run_dir, summary)
            stages = tuple(s for s in stages if s not in ("sample", "susceptibilities"))
        if "sample" in stages:
            prepared = prepared or prepare(config)
            summary["sample"] = run_sampling(config, run_dir, prepared, local_dir=local_dir)
            summary.update(rounds.forget(run_dir))      # no rounds now: an earlier rounds.json no longer holds
            _update_summary(run_dir, summary)
        if "susceptibilities" in stages:
            summary["susceptibilities"] = run_susceptibilities(config, run_dir)
            _update_summary(run_dir, summary)
    finally:
        if started:
            service.shutdown_ray()
    if "clusters" in stages:
        summary["clusters"] = run_clusters(config, run_dir)
        summary["verdict"] = summary["clusters"]["verdict"]
        _update_summary(run_dir, summary)
    if "sae" in stages:
        summary["sae"] = run_sae(config, run_dir, prepared)
        _update_summary(run_dir, summary)
    if "report" in stages:
        summary["report"] = run_report(config, run_dir)
        _update_summary(run_dir, summary)
    return summary


def start_ray(config: SpectroConfig) -> bool:
    """Join `ray.address`, or start a local instance with CPUs for every actor; True if this call started it."""
    import os

    from spectro import service

    need = int(np.ceil(config.ray.num_actors * config.ray.num_cpus_per_actor))
    return service.ensure_ray(config.ray.address,
                              num_cpus=None if config.ray.address else max(os.cpu_count() or 1, need))


def _update_summary(run_dir: rundir.Location, summary: dict) -> None:
    """Merge this invocation's results into summary.json (each stage's entry replaces the previous one), so
    every later stage, the report included, reads the figures of the stages before it."""
    path = run_dir / rundir.SUMMARY
    previous = rundir.read_json(path) if path.exists() else {}
    rundir.write_json(path, {**previous, **summary})


def run_clusters(config: SpectroConfig, run_dir: rundir.PathLike) -> dict:
    """The clusters stage (spectro.trust.clusters_stage): clusters.json with its trust figures, and modes.json."""
    from spectro.clusters import ClusterParams
    from spectro.trust import clusters_stage

    return clusters_stage(run_dir, ClusterParams.from_config(config.clustering))


def run_sae(config: SpectroConfig, run_dir: rundir.PathLike, prepared: Optional[Prepared] = None) -> dict:
    """Train (or load) a sparse autoencoder and match its features to the clusters (docs/method.md).

    Model and data come from the run's own config.json (the run is defined by it), the SAE settings from
    `config.sae`; the SAE trains on the run's sampling-distribution contexts (SGLD pool + sampling set)."""
    import dataclasses

    from spectro.config import to_config
    from spectro.sae.stage import sae_stage
    from spectro.store import read_susceptibilities

    run_dir = rundir.location(run_dir)
    for name, stage in (("clusters.json", "clusters"), ("config.json", "sample"),
                        ("susceptibilities.zarr", "susceptibilities")):
        if not (run_dir / name).exists():
            raise SAEError(f"{run_dir / name} not found; run the {stage} stage first (stage=all does every stage)")
    ds = read_susceptibilities(run_dir / "susceptibilities.zarr")     # the tokens the clusters label
    ctx = np.asarray(ds["token_context"].values, dtype=np.int64)
    pos = np.asarray(ds["token_position"].values, dtype=np.int64)
    if prepared is None:
        stored = rundir.read_json(run_dir / rundir.CONFIG)
        run_config = to_config({"model": stored["model"], "data": stored["data"]})   # nested dicts -> dataclasses
        prepared = prepare(dataclasses.replace(config, model=run_config.model, data=run_config.data))
    probe_ids = prepared.problem.probe_ids.cpu()
    inside = ctx.size == 0 or (ctx.max() < probe_ids.shape[0] and pos.max() < probe_ids.shape[1])
    if not inside or not np.array_equal(probe_ids.numpy()[ctx, pos], np.asarray(ds["token_id"].values)):
        raise SAEError(f"the model/data in {run_dir / 'config.json'} no longer reproduce the run's probe tokens "
                       "(corpus or tokenizer changed?); the SAE stage cannot align activations with probe tokens")
    clusters = rundir.read_json(run_dir / rundir.CLUSTERS)
    train_ids = torch.cat([prepared.problem.train_ids, prepared.problem.sampling_ids]).cpu()
    out = sae_stage(run_dir, config.sae, prepared.loaded.model.cpu(), train_ids, probe_ids, ctx, pos,
                     [str(t) for t in ds["token_text"].values.tolist()], clusters)
    log.info("sae: FVE %.3f, %s of %d clusters matched by a feature (null mean %s, p %s)", out["fve_probe"],
             _share(out["matched_fraction"]), out["n_clusters"], _share(out["null_mean"]), out["p_value"])
    return out


def _share(x: Optional[float]) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def run_report(config: SpectroConfig, run_dir: rundir.PathLike) -> dict:
    from spectro.report import write_report

    r = config.report
    path = write_report(run_dir, max_contexts=r.max_contexts, page_size=r.page_size, map_method=r.map,
                        control=r.control)
    return {"path": str(path)}


def open_monitor(config: SpectroConfig, run_dir: rundir.PathLike, local_dir: Optional[Path] = None):
    """The wandb monitor of the run (spectro.monitor); its files go to `local_dir` (default: `run_dir`, when
    local)."""
    from spectro.monitor import Monitor

    run_dir = rundir.location(run_dir)
    wandb_dir = local_dir or run_dir.path or Path.cwd()         # wandb writes local files only
    return Monitor(config.wandb, wandb_dir, as_dict(config), nbeta=config.sampler.nbeta, name=run_dir.name)


def run_sampling(config: SpectroConfig, run_dir: rundir.PathLike, p: Prepared,
                 local_dir: Optional[Path] = None, stop_at: Optional[int] = None, monitor=None,
                 fresh: Optional[bool] = None) -> dict:
    """The sample stage into `run_dir`; wandb's files go to `local_dir` (default: `run_dir`, when local).
    `stop_at`: sample every chain to that many draws only (a round, spectro.rounds); `monitor`: a monitor that
    outlives this call (the rounds'), else one is opened and finished here; `fresh`: discard the samples
    (default: `fresh` of the config; a round after the first keeps them)."""
    from spectro import service

    run_dir = rundir.location(run_dir)
    run_dir.mkdir()
    prov = provenance(p)
    fresh = p.config.fresh if fresh is None else fresh
    store = open_store(p, run_dir, prov, fresh)    # refuses a store made with another config
    rundir.write_json(run_dir / rundir.CONFIG, as_dict(p.config))
    rundir.write_json(run_dir / rundir.PROVENANCE, prov)
    if fresh:
        (run_dir / rundir.CHECKPOINTS).rmtree()
    own = monitor is None
    monitor = open_monitor(p.config, run_dir, local_dir) if own else monitor
    cpu0 = time.process_time()
    report = service.sample(p.problem, store, p.config, run_dir / rundir.CHECKPOINTS, on_poll=monitor.poll,
                            view=console.progress_view(config.console.progress), stop_at=stop_at)
    driver_cpu = time.process_time() - cpu0        # the driver's own CPU while actors sampled (it shares the machine)
    per_component = monitor.finish(store) if own else monitor.summarise(store)
    diverged = store.diverged_at()
    n_div = int((diverged >= 0).sum())
    if n_div:
        comps = store.layout.components
        where = [f"{comps[c]} chain {k} at draw {diverged[c, k]}" for c, k in zip(*np.nonzero(diverged >= 0))]
        log.warning("%d chain(s) diverged and will be excluded from estimates: %s", n_div, "; ".join(where))
    log.info("sampling: %d unit(s) run, %d already stored, in %.0f s (%.2f chain-draws/s), %d diverged chain(s)",
             len(report.units_run), report.units_skipped, report.seconds, report.draws_per_second, n_div)
    return {"units_run": len(report.units_run), "units_skipped": report.units_skipped,
            "units_repaired": report.units_repaired,
            "actor_failures": report.actor_failures, "seconds": round(report.seconds, 2),
            "draws_per_second": round(report.draws_per_second, 3),
            "actor_utilisation": round(report.actor_utilisation, 3), "diverged_chains": n_div,
            "driver_cpu_seconds": round(driver_cpu, 2),
            "init_loss": p.problem.init_loss, "complete": store.complete(), "components": per_component}


def run_susceptibilities(config: SpectroConfig, run_dir: rundir.PathLike, draws: Optional[int] = None) -> dict:
    """The covariance job; nβ is the one the samples were drawn with (from the store). `draws`: on every chain's
    first `draws` draws (a round, spectro.rounds); default: those the run's rounds stopped at if it ran in
    rounds (rounds.json), else all."""
    import time

    from spectro import rounds, susceptibilities

    run_dir = rundir.location(run_dir)
    if draws is None and rounds.enabled(config.sampler.until):
        draws = rounds.final_draws(run_dir)
    store = SampleStore.open(run_dir / rundir.SAMPLES)
    bad = store.verify()                 # never read a corrupted or missing chunk as data
    if bad:
        where = "; ".join(f"{u['component']} chains {u['chains']}: {u['problem']}" for u in bad[:3])
        raise StoreError(f"{len(bad)} unit(s) of {store.path} have damaged chunks ({where}); rerun the sample "
                         f"stage (the same command with stage=sample or stage=all) to recompute them")
    susceptibilities.require_full(store)     # every chain of `full` diverged: say so instead of an all-NaN chi
    nbeta = float(store.attrs["config"]["sampler"]["nbeta"])
    e = config.estimator
    t0 = time.perf_counter()
    out = susceptibilities.compute(run_dir, form=e.form, nbeta=nbeta, rhat_threshold=e.rhat_threshold,
                                   partial=e.partial, tokens_per_block=e.tokens_per_block or None, draws=draws)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    rhat = out.get("rhat_max")
    log.info("susceptibilities: chi of %d components%s in %.1f s (%d Ray Data task(s)), R-hat max %s",
             len(out["locality"]), f" on {draws} draws" if draws else "", out["seconds"], out["blocks"],
             "–" if rhat is None else f"{rhat:.3f}")
    if out["not_mixed"]:
        log.warning("chains have not mixed (R-hat > %s, beyond its null) for: %s", e.rhat_threshold,
                    ", ".join(out["not_mixed"]))
    if out["rhat_within_chance"]:
        log.info("R-hat > %s within what perfectly mixing chains of this layout give (null p), not flagged: %s",
                 e.rhat_threshold, ", ".join(f"{c} (p {p:.2g})" for c, p in out["rhat_within_chance"].items()))
    if out["not_local"]:
        log.warning("chains are not local (E[phi] or displacement above the thresholds) for: %s",
                    ", ".join(out["not_local"]))
    return out


def run_in_rounds(config: SpectroConfig, run_dir: rundir.PathLike, p: Prepared,
                  local_dir: Optional[Path] = None) -> dict:
    """The sample and susceptibilities stages in rounds until `sampler.until`'s targets are met or a budget is
    spent (spectro.rounds); returns the summary's "sample" (this invocation's rounds: the last round's entry with
    the summed seconds), "susceptibilities" (the final round's estimate) and "rounds" entries."""
    from spectro import rounds

    run_dir = rundir.location(run_dir)
    monitor = open_monitor(p.config, run_dir, local_dir)      # one wandb run for every round
    out: dict = {}

    def sample_to(draws: int) -> dict:
        first = "sample" not in out                            # fresh=true discards the samples once, not each round
        s = run_sampling(config, run_dir, p, local_dir, stop_at=draws, monitor=monitor,
                         fresh=p.config.fresh and first)
        if not first:
            s.update({k: round(out["sample"][k] + s[k], 2) for k in ("seconds", "driver_cpu_seconds")})
            s["units_run"] += out["sample"]["units_run"]
        out["sample"] = s
        return s

    def estimate(draws: int) -> dict:
        out["susceptibilities"] = run_susceptibilities(config, run_dir, draws=draws)
        return out["susceptibilities"]

    try:
        doc = rounds.run_rounds(config, run_dir, sample_to, estimate, on_round=monitor.log_round)
    finally:
        samples = run_dir / rundir.SAMPLES
        if samples.exists():
            monitor.finish(SampleStore.open(samples))
    out["rounds"] = {k: doc[k] for k in ("stopped_because", "draws", "seconds")} | {
        "n_rounds": len(doc["rounds"]), "path": str(run_dir / rundir.ROUNDS),
        **{k: doc["rounds"][-1][k] for k in ("reliability_median", "reliability_min", "rhat_max")}}
    return out
