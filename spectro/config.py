"""Typed run configuration, validated once, before any work starts.

Hydra composes YAML from `conf/`; `to_config` merges it onto the dataclass
schema below (OmegaConf rejects wrong types and unknown keys there) and then
`validate` checks ranges and cross-field rules. Every failure is one
`ConfigError` naming the key, the bad value and a fix.

Non-obvious choices:
- The dataclasses below hold every default, and nowhere else does: they are
  stored in Hydra's ConfigStore as `spectro_defaults`, which `conf/config.yaml`
  lists first, so every key exists on the command line and the YAML files hold
  only overrides (`tests/test_config.py` refuses a YAML value equal to the
  default). The defaults go in as a plain, untyped node: type and range errors
  are then all found by `to_config` and reported as one ConfigError, not by
  Hydra's composition.
- `sampler.nbeta: null` means the common default `B / ln B` for batch size B
  (devinterp's `default_nbeta`); it is resolved here so the stored config says
  the number that was used. nβ = 0 (no loss term, only the localisation) is
  the control run and is accepted only with `sampler.control=true`
  (`experiment=control`), never by accident; the control sets nβ to 0 whatever
  `sampler.nbeta` says, and its stored config says 0.
- `components` lists names or group keywords ("all", "heads", "mlps"); the
  unrestricted run `full` is always sampled as well, because the default
  estimator centres on it (docs/method.md).
- Model, component and data *names* are checked against the real model and
  corpus later (their modules own that knowledge); only their shape is checked
  here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from spectro.errors import ConfigError


@dataclass
class ModelConfig:
    source: str = "embedded"            # "embedded", a local snapshot dir, or a hub id
    revision: Optional[str] = None      # hub revision, e.g. "step143000"
    allow_download: bool = True         # False: use only the local HF cache


@dataclass
class ProbeConfig:
    """What is probed besides natural windows of the corpus (spectro.probes): labelled suites and a labelled file."""
    corpus: Optional[dict[str, Any]] = None   # the natural probe contexts' corpus; null: data.corpus
    suites: list[str] = field(default_factory=list)   # built-in labelled suites (data=embedded names all four)
    suite_contexts: int = 16            # contexts per built-in suite (held-out embedded text)
    file: Optional[str] = None          # JSON Lines of labelled contexts: {"text", "spans", "tokens"}


@dataclass
class DataConfig:
    corpus: dict[str, Any] = field(default_factory=lambda: {"kind": "embedded"})   # SGLD pool and sampling set
    seq_len: int = 64                   # tokens per context (probe, sampling and SGLD data)
    n_train_contexts: int = 512         # pool that SGLD minibatches are drawn from
    n_sampling_contexts: int = 32       # fixed set for sampling_loss at every draw
    n_probe_contexts: int = 64          # natural probe contexts (from data.probe.corpus); each gives seq_len - 1 tokens
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    seed: int = 0


@dataclass
class UntilConfig:
    """Sample in rounds until the features are reliable (spectro.rounds); no target: one run of num_draws."""
    reliability: Optional[float] = None  # target for the features' split-half reliability, summarised by `over`
    over: str = "median"                # "median" over components (the verdict's figure) | "min" (every component)
    rhat: Optional[float] = None        # target for the largest R-hat over components
    round_draws: int = 0                # draws added per round: a positive multiple of checkpoint_every with a target
    max_minutes: Optional[float] = None  # wall-time budget: no round starts after it is spent


@dataclass
class SamplerConfig:
    step_size: float = 1e-4             # epsilon; with gamma: chains stay local (docs/calibration.md)
    nbeta: Optional[float] = 1000.0     # inverse temperature; null -> B / ln B (devinterp's default)
    gamma: float = 10000.0              # localization strength
    noise_level: float = 1.0            # sigma
    batch_size: int = 16
    num_chains: int = 4
    num_draws: int = 40
    burnin: int = 20
    steps_between_draws: int = 2
    precondition: str = "none"          # "none" | "rmsprop"
    rmsprop_alpha: float = 0.99
    rmsprop_eps: float = 0.1
    chain_group: int = 4                # chains run together in one unit of work
    chain_mode: str = "vmap"            # "vmap" (stacked, one batched call) | "loop"
    divergence_bound: float = 10.0      # a chain diverges when its loss exceeds init_loss + bound (or is NaN/inf)
    checkpoint_every: int = 10          # draws between chain checkpoints
    seed: int = 0
    antithetic: bool = True             # chains in mirrored-noise pairs (2p, 2p+1): same law, far less noise in chi
    control: bool = False               # the nβ = 0 control: no loss term in any run (only the localisation)
    probe_dtype: str = "float32"        # "float32" | "bfloat16": autocast dtype of probe/sampling-loss evaluation
    tf32: bool = False                  # CUDA only: allow TF32 matmuls (SGLD steps and probes)
    probe_shards: int = 1               # units per chain group, each evaluating a contiguous range of probe contexts
    until: UntilConfig = field(default_factory=UntilConfig)   # rounds until reliable; num_draws is then the budget


@dataclass
class EstimatorConfig:
    form: str = "peer"                  # "peer" (devinterp-compatible) | "covariance"
    rhat_threshold: float = 1.1         # components above it are flagged "not mixed"
    partial: bool = False               # True: estimate from an unfinished store (explicitly marked partial)
    tokens_per_block: int = 0           # 0: one store token chunk per Ray Data task


@dataclass
class ClusterConfig:
    """The clustering defaults (spectro.clusters.ClusterParams takes them from here); measured in docs/clustering.md."""
    method: str = "conductance"         # "conductance" | "leiden" | "spectral"
    features: str = "centred"           # "centred" (z-score, minus each token's mean) | "zscore"
    k: int = 10                         # nearest neighbours per token (cosine)
    alpha: float = 0.15                 # personalised-PageRank teleport probability
    epsilon: float = 1e-4               # push tolerance
    max_conductance: float = 0.5        # accept a local cluster at or below this conductance
    min_size: int = 20                  # smaller clusters are noise (all methods)
    max_size: int = 0                   # largest local cluster; 0: no limit
    resolution: float = 2.0             # Leiden
    n_clusters: int = 0                 # spectral; 0: by eigengap
    seed: int = 0
    exact_knn_below: int = 50000        # exact kNN below this many tokens, approximate (faiss IVF) above
    outlier_ratio: float = 0.0          # noise if mean kNN similarity < ratio x densest neighbour's; 0: off
    attach_share: float = 0.2           # a free token joins the cluster holding over this share of its edges
    scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])  # Leiden, the scales table; []: off
    scales_max_tokens: int = 200000     # no scales table above this many probe tokens (its cost); 0: no limit


@dataclass
class SAEConfig:
    """Sparse-autoencoder check of the clusters (docs/method.md; spectro.sae)."""
    enabled: bool = True                # stage=all runs the sae stage (after clusters, before report)
    load: Optional[str] = None          # SAELens-layout dir (cfg.json + sae_weights.safetensors): use it, train nothing
    site: str = "resid_post"            # "resid_post" (residual stream after block `layer`) | "mlp_out"
    layer: int = 2
    expansion: int = 8                  # dictionary size = expansion * d_model
    k: int = 16                         # TopK: active latents per token
    steps: int = 2000
    max_epochs: float = 30.0            # caps steps at max_epochs passes over the training tokens (small runs)
    batch_size: int = 512
    lr: float = 1e-3
    aux_k: int = 128                    # AuxK: dead latents that model the residual error
    dead_after: int = 200               # steps without firing before a latent is dead
    position: str = "predicting"        # probe token y at p: "predicting" = activation at p-1 | "token" = at p
    active_threshold: float = 0.0       # a feature is active on a token when its activation exceeds this
    match_threshold: float = 0.5        # a cluster matches when its best feature's F1 >= this
    n_null: int = 200                   # random clusterings (permuted labels) for the null
    top_contexts: int = 6               # report: contexts per feature and per cluster
    seed: int = 0


@dataclass
class ReportConfig:
    max_contexts: int = 8               # example contexts per cluster card
    page_size: int = 25                 # cluster cards per page
    map: str = "umap"                   # token map: "umap" | "pca" (of the clustering features)
    control: Optional[str] = None       # run directory of the nβ = 0 control (experiment=control) to compare with


@dataclass
class RayConfig:
    address: Optional[str] = None       # None: start a local instance; "auto" or "ray://..." to join
    num_actors: int = 2
    num_cpus_per_actor: float = 1.0
    # None: 1 per actor (shared if fewer GPUs) when the cluster has GPUs, else 0
    num_gpus_per_actor: Optional[float] = None
    torch_threads: int = 0              # 0: match num_cpus_per_actor
    gpu_memory_fraction: float = 0.0    # CUDA only: cap each actor at this share of its GPU's memory; 0: no cap


@dataclass
class WandbConfig:
    mode: str = "disabled"              # "offline" | "online" | "disabled"
    project: str = "spectro"
    entity: Optional[str] = None
    group: Optional[str] = None


@dataclass
class PlanConfig:
    """`stage=plan` (spectro.plan): the cost of the run, computed before it runs."""
    gpu: Optional[str] = None           # also predict on this GPU: h100 | h200 | a100 | l4
    calibration_draws: int = 3          # timed SGLD steps and evaluations per calibrated component; 0: no timing
    calibrate_on: Optional[str] = None  # the component timed besides `full`; null: the median one by step FLOPs
    pilot: bool = False                 # with a sampler.until target: sample round 1 for real, predict the rounds


@dataclass
class StoreConfig:
    """How `samples.zarr` keeps the probe losses (spectro.store.samples)."""
    probe: str = "draws"                # "draws": probe_loss per draw and token | "moments": per-chain float64 sums


STORE_PROBE_MODES = ("draws", "moments")
PROBE_SUITES = ("induction", "brackets", "line_start", "digits")     # built in: spectro.probes


@dataclass
class StorageConfig:
    """Where the run's artifacts go (spectro.rundir.Location); Hydra's .hydra/ and spectro.log stay local."""
    uri: Optional[str] = None           # null: the Hydra run directory; s3://bucket/prefix, a URL fsspec opens, a path


@dataclass
class ConsoleConfig:
    """What the terminal shows (spectro.console); spectro.log and summary.json keep everything either way."""
    progress: str = "auto"              # "auto": a live bar when stderr is a terminal, else plain lines | bar | plain
    summary: str = "short"              # "short": verdict, its figures, file paths | "full": summary.json first, too


@dataclass
class SpectroConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    components: list[str] = field(default_factory=lambda: ["all"])
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    clustering: ClusterConfig = field(default_factory=ClusterConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    device: str = "auto"                # "auto" | "cpu" | "cuda" | "cuda:N"
    stage: str = "all"                  # "all" | "sample" | "susceptibilities" | "clusters" | "report" | "plan"
    fresh: bool = False                 # True: discard an existing run directory's samples


# Keys whose change alters no stored number, so a resumed run may differ in them. `store` (its probe mode) and
# `sampler.probe_shards` are recorded in the store's layout, which refuses a resume with another value with its own
# message (spectro.store.samples); leaving them out of the fingerprint keeps older stores resumable.
# `sampler.until` only says where sampling stops: a run stopped by one target or budget continues with another.
RESUME_NEUTRAL_KEYS = ("ray", "wandb", "fresh", "device", "stage", "estimator", "clustering", "report", "sae", "plan",
                       "store", "storage", "console", "sampler.probe_shards", "sampler.until")
CONSOLE_PROGRESS = ("auto", "bar", "plain")
CONSOLE_SUMMARY = ("short", "full")
STAGES = ("all", "sample", "susceptibilities", "clusters", "sae", "report", "plan")
DEFAULTS_NAME = "spectro_defaults"      # the ConfigStore entry conf/config.yaml starts from


def register_defaults() -> None:
    """Store the schema's defaults in Hydra's ConfigStore (idempotent; done when this module is imported)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=DEFAULTS_NAME, node=OmegaConf.create(dataclasses.asdict(SpectroConfig())))


register_defaults()


def to_config(cfg: DictConfig | dict | SpectroConfig | None = None) -> SpectroConfig:
    """Merge user config onto the schema, then validate. Raises ConfigError."""
    if isinstance(cfg, SpectroConfig):
        return validate(cfg)
    schema = OmegaConf.structured(SpectroConfig)
    try:
        merged = OmegaConf.merge(schema, cfg or {})
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        detail = str(exc.msg if hasattr(exc, "msg") else exc).strip().splitlines()[0]   # one line, no OmegaConf dump
        raise ConfigError(f"invalid config{f' at {key!r}' if key else ''}: {detail}") from None
    return validate(obj)


def _require(ok: bool, key: str, value: Any, rule: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {rule} (got {value!r})" + (f"; {fix}" if fix else ""))


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check_model_and_sampler(c: SpectroConfig) -> None:
    """model.source and the sampler's ranges and cross-field rules."""
    s = c.sampler
    _require(bool(c.model.source), "model.source", c.model.source, "must be non-empty",
             "use 'embedded', a local snapshot directory or a hub id like EleutherAI/pythia-14m")
    _require(_finite(s.step_size) and s.step_size > 0, "sampler.step_size", s.step_size,
             "must be a positive finite number", "e.g. sampler.step_size=1e-4")
    if not s.control:                   # the control replaces nβ by 0 whatever it was (validate below)
        _require(s.nbeta is None or (_finite(s.nbeta) and s.nbeta > 0), "sampler.nbeta", s.nbeta,
                 "must be positive" + (" (nβ = 0 is the control run: experiment=control)" if s.nbeta == 0 else ""),
                 "e.g. sampler.nbeta=1000, or null for batch_size/ln(batch_size)")
    _require(_finite(s.gamma) and s.gamma >= 0, "sampler.gamma", s.gamma,
             "must be >= 0", "e.g. sampler.gamma=300")
    _require(_finite(s.noise_level) and s.noise_level >= 0, "sampler.noise_level", s.noise_level,
             "must be >= 0", "keep sampler.noise_level=1 for a correct posterior")
    _require(s.batch_size >= 2, "sampler.batch_size", s.batch_size, "must be >= 2",
             "nbeta defaults to B/ln B, undefined for B < 2")
    for key in ("num_chains", "num_draws", "steps_between_draws", "chain_group", "checkpoint_every"):
        v = getattr(s, key)
        _require(v >= 1, f"sampler.{key}", v, "must be >= 1", f"set sampler.{key} to a positive integer")
    _require(s.num_chains >= 2, "sampler.num_chains", s.num_chains, "must be >= 2",
             "standard errors and R-hat need at least two chains")
    _require(s.burnin >= 0, "sampler.burnin", s.burnin, "must be >= 0", "e.g. sampler.burnin=0")
    if s.antithetic:
        _require(s.num_chains % 2 == 0 and s.num_chains >= 4, "sampler.num_chains", s.num_chains,
                 "must be even and >= 4 with sampler.antithetic=true (pairs; R-hat and errors need two pairs)",
                 "e.g. sampler.num_chains=4, or sampler.antithetic=false")
        _require(s.chain_group % 2 == 0, "sampler.chain_group", s.chain_group,
                 "must be even with sampler.antithetic=true (a pair runs in one unit)", "e.g. sampler.chain_group=4")
    _require(s.precondition in ("none", "rmsprop"), "sampler.precondition", s.precondition,
             "must be 'none' or 'rmsprop'", "")
    _require(0 < s.rmsprop_alpha < 1, "sampler.rmsprop_alpha", s.rmsprop_alpha, "must be in (0, 1)", "e.g. 0.99")
    _require(s.rmsprop_eps > 0, "sampler.rmsprop_eps", s.rmsprop_eps, "must be > 0", "e.g. 0.1")
    _require(s.chain_mode in ("vmap", "loop"), "sampler.chain_mode", s.chain_mode, "must be 'vmap' or 'loop'", "")
    _require(_finite(s.divergence_bound) and s.divergence_bound > 0, "sampler.divergence_bound",
             s.divergence_bound, "must be positive", "e.g. sampler.divergence_bound=10 (nats above init loss)")
    _check_until(s)


def _check_until(s: SamplerConfig) -> None:
    """sampler.until (spectro.rounds): the targets' ranges; rounds that end on a checkpoint, within the budget."""
    u = s.until
    for key, ok, rule, example in (("reliability", lambda v: 0 < v < 1, "in (0, 1)", 0.8),
                                   ("rhat", lambda v: v > 1, "> 1", 1.1), ("max_minutes", lambda v: v > 0, "> 0", 60)):
        v = getattr(u, key)
        _require(v is None or (_finite(v) and ok(v)), f"sampler.until.{key}", v, f"must be {rule} or null",
                 f"e.g. sampler.until.{key}={example}")
    _require(u.over in ("median", "min"), "sampler.until.over", u.over, "must be 'median' or 'min'", "")
    rule = f"a positive multiple of sampler.checkpoint_every ({s.checkpoint_every}) up to sampler.num_draws"
    _require(u.round_draws >= 0 and (u.reliability is None and u.rhat is None or 0 < u.round_draws <= s.num_draws
             and u.round_draws % s.checkpoint_every == 0), "sampler.until.round_draws", u.round_draws,
             f"must be {rule} ({s.num_draws}, the draw budget) with a target set", "e.g. sampler.until.round_draws="
             f"{s.checkpoint_every * max(1, s.num_draws // (4 * s.checkpoint_every))}, or raise sampler.num_draws")


def _check_data(c: SpectroConfig) -> None:
    """The data's sizes, the probe set's sources, the corpus."""
    s, d = c.sampler, c.data
    _require(d.seq_len >= 2, "data.seq_len", d.seq_len, "must be >= 2", "a probe token needs a context")
    for key in ("n_train_contexts", "n_sampling_contexts"):
        v = getattr(d, key)
        _require(v >= 1, f"data.{key}", v, "must be >= 1", f"set data.{key} to a positive integer")
    pr = d.probe
    _require(d.n_probe_contexts >= 0, "data.n_probe_contexts", d.n_probe_contexts, "must be >= 0",
             "0 probes only the suites and the file")
    _require(pr.suite_contexts >= 0, "data.probe.suite_contexts", pr.suite_contexts, "must be >= 0",
             "e.g. data.probe.suite_contexts=16")
    bad = [x for x in pr.suites if x not in PROBE_SUITES]
    _require(not bad, "data.probe.suites", list(pr.suites), f"names unknown suites {bad}",
             f"pick from {', '.join(PROBE_SUITES)}, or data.probe.suites=[] for none")
    _require(pr.corpus is None or "kind" in pr.corpus, "data.probe.corpus", pr.corpus, "needs a 'kind'",
             "e.g. data.probe.corpus={kind: jsonl, path: probes.jsonl}, or null for data.corpus")
    _require(pr.file is None or Path(pr.file).is_file(), "data.probe.file", pr.file,
             "must be an existing JSON Lines file or null", "see docs/method.md for its format")
    _require(d.n_probe_contexts + (len(pr.suites) * pr.suite_contexts) + (1 if pr.file else 0) >= 1,
             "data.n_probe_contexts", d.n_probe_contexts, "leaves nothing to probe (no suites, no file)",
             "raise data.n_probe_contexts or name data.probe.suites")
    _require(d.n_train_contexts >= s.batch_size, "data.n_train_contexts", d.n_train_contexts,
             f"must be >= sampler.batch_size ({s.batch_size})", "raise data.n_train_contexts")
    _require("kind" in d.corpus, "data.corpus", dict(d.corpus), "needs a 'kind'",
             "e.g. data.corpus={kind: embedded} or {kind: text, paths: [...]}")


def _check_components_and_estimator(c: SpectroConfig) -> None:
    """The component list and the estimator's settings."""
    comps = list(c.components)
    _require(len(comps) > 0, "components", comps, "must name at least one component", "e.g. components=[all]")
    dup = sorted({n for n in comps if comps.count(n) > 1})
    _require(not dup, "components", comps, f"lists {dup} more than once", "list each component once")
    _require(c.estimator.form in ("peer", "covariance"), "estimator.form", c.estimator.form,
             "must be 'peer' or 'covariance'", "")
    _require(c.estimator.rhat_threshold > 1, "estimator.rhat_threshold", c.estimator.rhat_threshold,
             "must be > 1", "e.g. estimator.rhat_threshold=1.1")
    _require(c.estimator.tokens_per_block >= 0, "estimator.tokens_per_block", c.estimator.tokens_per_block,
             "must be >= 0", "0 uses one store chunk per task")


def _check_clustering(c: SpectroConfig) -> None:
    """The clustering's method and its parameters."""
    k = c.clustering
    _require(k.method in ("conductance", "leiden", "spectral"), "clustering.method", k.method,
             "must be conductance, leiden or spectral", "")
    _require(k.features in ("centred", "zscore"), "clustering.features", k.features, "must be centred or zscore", "")
    _require(k.k >= 2, "clustering.k", k.k, "must be >= 2", "e.g. clustering.k=10")
    _require(0 < k.alpha < 1, "clustering.alpha", k.alpha, "must be in (0, 1)", "e.g. clustering.alpha=0.15")
    _require(k.epsilon > 0, "clustering.epsilon", k.epsilon, "must be > 0", "e.g. clustering.epsilon=1e-4")
    _require(0 < k.max_conductance <= 1, "clustering.max_conductance", k.max_conductance, "must be in (0, 1]",
             "e.g. clustering.max_conductance=0.5")
    _require(k.min_size >= 1, "clustering.min_size", k.min_size, "must be >= 1", "e.g. clustering.min_size=20")
    _require(k.max_size >= 0, "clustering.max_size", k.max_size, "must be >= 0", "0 means no limit")
    _require(k.resolution > 0, "clustering.resolution", k.resolution, "must be > 0", "e.g. 1.0")
    _require(0 <= k.outlier_ratio < 1, "clustering.outlier_ratio", k.outlier_ratio, "must be in [0, 1)",
             "e.g. clustering.outlier_ratio=0.7, or 0 to turn the outlier step off")
    _require(all(_finite(r) and r > 0 for r in k.scales) and len(set(k.scales)) == len(k.scales), "clustering.scales",
             k.scales, "must be distinct positive Leiden resolutions", "e.g. clustering.scales=[1,2,4,8]; [] for none")
    _require(_finite(k.attach_share) and 0 < k.attach_share < 1, "clustering.attach_share", k.attach_share,
             "must be in (0, 1)", "e.g. 0.2; lower attaches more tokens to clusters")
    _require(k.scales_max_tokens >= 0, "clustering.scales_max_tokens", k.scales_max_tokens, "must be >= 0", "0: none")
    _require(k.n_clusters >= 0, "clustering.n_clusters", k.n_clusters, "must be >= 0", "0 picks by eigengap")


def _check_sae(c: SpectroConfig) -> None:
    """The SAE check's settings."""
    a = c.sae
    _require(a.site in ("resid_post", "mlp_out"), "sae.site", a.site, "must be resid_post or mlp_out", "")
    _require(a.layer >= 0, "sae.layer", a.layer, "must be >= 0", "e.g. sae.layer=2")
    for key in ("expansion", "k", "steps", "batch_size", "dead_after", "top_contexts"):
        v = getattr(a, key)
        _require(v >= 1, f"sae.{key}", v, "must be >= 1", f"set sae.{key} to a positive integer")
    _require(_finite(a.max_epochs) and a.max_epochs > 0, "sae.max_epochs", a.max_epochs, "must be > 0",
             "e.g. sae.max_epochs=30")
    _require(_finite(a.lr) and a.lr > 0, "sae.lr", a.lr, "must be a positive finite number", "e.g. sae.lr=1e-3")
    _require(a.aux_k >= 0 and a.n_null >= 0, "sae", {"aux_k": a.aux_k, "n_null": a.n_null},
             "needs aux_k >= 0 and n_null >= 0", "e.g. sae.aux_k=128 sae.n_null=200")
    _require(a.position in ("predicting", "token"), "sae.position", a.position, "must be 'predicting' or 'token'", "")
    _require(_finite(a.active_threshold) and a.active_threshold >= 0, "sae.active_threshold", a.active_threshold,
             "must be >= 0", "e.g. sae.active_threshold=0")
    _require(_finite(a.match_threshold) and 0 < a.match_threshold <= 1, "sae.match_threshold", a.match_threshold,
             "must be in (0, 1]", "e.g. sae.match_threshold=0.5")
    _require(a.load is None or bool(str(a.load).strip()), "sae.load", a.load, "must be a directory or null",
             "e.g. sae.load=/path/to/sae_dir")


def _check_outputs(c: SpectroConfig) -> None:
    """The report, the probe store mode and the storage location."""
    _require(c.report.max_contexts >= 1 and c.report.page_size >= 1, "report", dataclasses.asdict(c.report),
             "needs max_contexts >= 1 and page_size >= 1", "e.g. report.page_size=25")
    _require(c.report.map in ("umap", "pca"), "report.map", c.report.map, "must be 'umap' or 'pca'", "")
    _require(c.report.control is None or (bool(str(c.report.control).strip()) and Path(c.report.control).is_dir()),
             "report.control", c.report.control, "must be an existing run directory or null",
             "run the control first (experiment=control hydra.run.dir=...) and pass its directory")
    _require(c.store.probe in STORE_PROBE_MODES, "store.probe", c.store.probe,
             f"must be one of {', '.join(STORE_PROBE_MODES)}",
             "store.probe=draws keeps every draw's probe losses; store.probe=moments keeps only per-chain sums")
    _require(c.storage.uri is None or bool(str(c.storage.uri).strip()), "storage.uri", c.storage.uri,
             "must be a URL, a directory or null", "e.g. storage.uri=s3://bucket/run1, or null for the run directory")
    if c.storage.uri:
        from spectro.rundir import check_uri
        check_uri(str(c.storage.uri))           # the scheme only; reachability is checked before sampling


def _check_run(c: SpectroConfig) -> None:
    """How the run executes: probe shards, stage, plan, Ray actors, precision, wandb, device."""
    s, d = c.sampler, c.data
    pr = d.probe
    n_probe = d.n_probe_contexts + len(pr.suites) * pr.suite_contexts + (1 if pr.file else 0)   # at least
    _require(isinstance(s.probe_shards, int) and 1 <= s.probe_shards <= n_probe, "sampler.probe_shards",
             s.probe_shards, f"must be between 1 and the number of probe contexts ({n_probe})",
             "a shard is a contiguous range of probe contexts, e.g. sampler.probe_shards=4")
    _require(c.console.progress in CONSOLE_PROGRESS, "console.progress", c.console.progress,
             f"must be one of {', '.join(CONSOLE_PROGRESS)}", "auto picks the bar on a terminal, plain lines elsewhere")
    _require(c.console.summary in CONSOLE_SUMMARY, "console.summary", c.console.summary,
             f"must be one of {', '.join(CONSOLE_SUMMARY)}", "full also prints summary.json at the end")
    _require(c.stage in STAGES, "stage", c.stage, f"must be one of {', '.join(STAGES)}", "e.g. stage=all")
    from spectro.gpus import GPUS
    _require(c.plan.gpu is None or c.plan.gpu in GPUS, "plan.gpu", c.plan.gpu, f"must be one of {', '.join(GPUS)}",
             "e.g. plan.gpu=h100, or leave it out for this machine only")
    _require(c.plan.calibration_draws >= 0, "plan.calibration_draws", c.plan.calibration_draws, "must be >= 0",
             "e.g. plan.calibration_draws=3, or 0 to skip the timing")
    _require(not c.plan.pilot or s.until.reliability is not None or s.until.rhat is not None, "plan.pilot",
             c.plan.pilot, "needs a sampler.until target (the pilot is its round 1)",
             "e.g. sampler.until.reliability=0.8 sampler.until.round_draws=10")
    _require(c.ray.num_actors >= 1, "ray.num_actors", c.ray.num_actors, "must be >= 1", "e.g. ray.num_actors=2")
    _require(c.ray.num_cpus_per_actor > 0, "ray.num_cpus_per_actor", c.ray.num_cpus_per_actor, "must be > 0", "e.g. 1")
    _require(c.ray.num_gpus_per_actor is None or c.ray.num_gpus_per_actor >= 0, "ray.num_gpus_per_actor",
             c.ray.num_gpus_per_actor, "must be >= 0 or null", "e.g. 0, 1, 0.5, or null to use GPUs when present")
    _require(0 <= c.ray.gpu_memory_fraction <= 1, "ray.gpu_memory_fraction", c.ray.gpu_memory_fraction,
             "must be in [0, 1]", "e.g. ray.gpu_memory_fraction=0.45 for two actors per GPU, or 0 for no cap")
    _require(s.probe_dtype in ("float32", "bfloat16"), "sampler.probe_dtype", s.probe_dtype,
             "must be float32 or bfloat16", "e.g. sampler.probe_dtype=bfloat16 (see README: effect on chi)")
    _require(c.ray.torch_threads >= 0, "ray.torch_threads", c.ray.torch_threads, "must be >= 0",
             "0 matches num_cpus_per_actor")
    _require(c.wandb.mode in ("offline", "online", "disabled"), "wandb.mode", c.wandb.mode,
             "must be offline, online or disabled", "offline needs no account")
    _require(c.device == "auto" or c.device == "cpu" or c.device.startswith("cuda"), "device", c.device,
             "must be auto, cpu, cuda or cuda:N", "e.g. device=cpu")


def validate(c: SpectroConfig) -> SpectroConfig:
    """Range and cross-field checks, in a fixed order (the first failure is raised). Returns the config
    with nbeta resolved."""
    for check in (_check_model_and_sampler, _check_data, _check_components_and_estimator, _check_clustering,
                  _check_sae, _check_outputs, _check_run):
        check(c)
    s = c.sampler
    if s.control:
        c = dataclasses.replace(c, sampler=dataclasses.replace(s, nbeta=0.0))
    elif s.nbeta is None:
        c = dataclasses.replace(c, sampler=dataclasses.replace(s, nbeta=s.batch_size / math.log(s.batch_size)))
    return c


def as_dict(c: SpectroConfig) -> dict:
    """Plain nested dict (JSON-serialisable) of a config."""
    return dataclasses.asdict(c)
