"""The clustering settings as the library takes them, checked on construction.

`ClusterParams` has the fields of the config schema's `ClusterConfig`
(`spectro.config`, where every default and its meaning is written once);
`ClusterParams()` is the schema's defaults and `ClusterParams.from_config`
takes a validated `clustering` section. Construction re-checks types and
ranges, because the library is also called directly, without a config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from spectro.config import ClusterConfig
from spectro.errors import ConfigError
from spectro.features import KINDS as FEATURES

METHODS = ("conductance", "leiden", "spectral")
DEFAULTS = ClusterConfig()      # the schema's defaults: the one place they are written


@dataclass(frozen=True)
class ClusterParams:
    """One clustering's settings; fields and meanings as `spectro.config.ClusterConfig`."""
    method: str = DEFAULTS.method
    features: str = DEFAULTS.features
    k: int = DEFAULTS.k
    alpha: float = DEFAULTS.alpha
    epsilon: float = DEFAULTS.epsilon               # push tolerance (ACL): push while r(u) >= epsilon * deg(u)
    max_conductance: float = DEFAULTS.max_conductance
    min_size: int = DEFAULTS.min_size
    max_size: int = DEFAULTS.max_size
    resolution: float = DEFAULTS.resolution
    n_clusters: int = DEFAULTS.n_clusters
    seed: int = DEFAULTS.seed
    exact_knn_below: int = DEFAULTS.exact_knn_below
    outlier_ratio: float = DEFAULTS.outlier_ratio
    attach_share: float = DEFAULTS.attach_share
    scales: tuple[float, ...] = tuple(DEFAULTS.scales)   # resolutions of the scales table (spectro.clusters.scales)
    scales_max_tokens: int = DEFAULTS.scales_max_tokens

    @classmethod
    def from_config(cls, config: ClusterConfig) -> "ClusterParams":
        """The params of a config's `clustering` section."""
        return cls(**{**dataclasses.asdict(config), "scales": tuple(config.scales)})

    def __post_init__(self):
        def integer(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ConfigError(f"ClusterParams.{name} must be an integer >= {lo}, got {v!r}")

        def number(name, lo, hi, lo_open=True, hi_open=True):
            v = getattr(self, name)
            ok = isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and np.isfinite(v)
            ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
            if not ok:
                left, right = "(" if lo_open else "[", ")" if hi_open else "]"
                raise ConfigError(f"ClusterParams.{name} must be a number in {left}{lo}, {hi}{right}, got {v!r}")

        if self.method not in METHODS:
            raise ConfigError(f"ClusterParams.method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.features not in FEATURES:
            raise ConfigError(f"ClusterParams.features must be one of {', '.join(FEATURES)}; got {self.features!r}")
        integer("k", 1)
        number("alpha", 0.0, 1.0)
        number("epsilon", 0.0, 1.0)
        number("max_conductance", 0.0, 1.0, hi_open=False)
        integer("min_size", 1)
        integer("max_size", 0)
        if self.max_size and self.max_size < self.min_size:
            raise ConfigError(f"ClusterParams.max_size ({self.max_size}) is below min_size ({self.min_size}); "
                              f"raise it or set 0 for no limit")
        number("resolution", 0.0, np.inf)
        integer("n_clusters", 0)
        integer("seed", 0)
        integer("exact_knn_below", 0)
        number("outlier_ratio", 0.0, 1.0, lo_open=False)
        number("attach_share", 0.0, 1.0)
        integer("scales_max_tokens", 0)
        scales = self.scales
        if not isinstance(scales, (tuple, list)) or not all(
                isinstance(r, (int, float, np.number)) and not isinstance(r, bool) and np.isfinite(r) and r > 0
                for r in scales) or len(set(scales)) != len(scales):
            raise ConfigError(f"ClusterParams.scales must be distinct positive resolutions, got {scales!r}")
        object.__setattr__(self, "scales", tuple(float(r) for r in scales))

