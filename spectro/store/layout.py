"""The sample store's layout: shapes and chunk sizes of `samples.zarr`, and its units of work.

A unit of work is (component, chain group, probe shard). `sampler.probe_shards=S`
cuts the probe contexts into S contiguous ranges (`np.array_split`: sizes differ
by at most one); every shard unit of a chain group replays the same SGLD
trajectory (seeds depend only on the config) and evaluates only its own
contexts' tokens, so one chain's evaluations are shared by S actors.

Non-obvious choices:
- Zarr has a regular chunk grid, so with S > 1 the token chunk Tc is a
  multiple of (seq_len - 1) tokens (whole contexts) that divides every shard's
  first context: k contexts, k the largest divisor of the gcd of the shards'
  starts whose chunk stays within the ~4 MB budget (at least one context).
  So every token chunk lies inside one shard and no two writers share a chunk.
  The consequence: uneven shards can mean small chunks (101 contexts in 3
  shards start at 0, 34 and 68, gcd 34; 100 contexts start at 0, 34, 67,
  gcd 1: one context per chunk), more files and more requests per draw
  chunk. With S = 1 the chunk is the unsharded one (any token count), so
  stores made before the option keep their layout.
- The per-draw scalars (sampling_loss and the traces) and `diverged_at` are
  the same for every shard of a chain (same trajectory); shard 0 alone writes
  them. `progress` has a shard axis (S > 1: [component, chain, shard], chunks
  (1, G, 1)); a chain's committed draws are the minimum over its shards
  (`SampleStore.progress`), which is what every reader uses.
- `store.probe=moments` with S > 1: each shard unit keeps its chains' sums
  of its own tokens (`moment_phiD`, `moment_D`: its token chunks) and its
  own copy of the scalar sums (`moment_n`, `moment_phi`, `moment_phi2` get a
  shard axis, chunks (1, G, 1, 1), like `progress`). The scalars are the same
  for every shard of a chain (same trajectory), but the shards commit at
  different paces, and two alternating slots cannot serve them all with one
  copy. A reader takes a token's sums from its shard's slot at that shard's
  committed draws, so with partial=true tokens of different shards may rest
  on different draw counts (spectro.susceptibilities).
- `store.probe=moments` keeps, instead of `probe_loss`, each chain's float64
  `estimator.ChainMoments` sums over its draws so far (n, sum phi, sum phi^2,
  and per token sum phi*D, sum D): storage no longer grows with draws. Each
  unit writes them at every checkpoint into one of two slots, alternating
  (block j of Dc draws -> slot j % 2, `Layout.moment_slot`), so the slot that
  `progress` points at is never the one being overwritten: a writer killed
  mid-write leaves the committed sums whole, and a partial read sees sums of
  exactly `progress` draws (each slot also carries its own n, checked on
  read). The mode is part of the layout; a store is never reopened in the
  other mode. Format 2 still: moments are additive, draws-mode stores are
  unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from spectro.errors import StoreError
from spectro.traces import TRACE_NAMES

TRACE_ARRAYS = TRACE_NAMES                                           # the per-draw observables (spectro.traces)
UNIT_ARRAYS = ("sampling_loss", "probe_loss", *TRACE_ARRAYS)          # (component, chain, draw[, token])
MOMENT_ARRAYS = ("moment_n", "moment_phi", "moment_phi2", "moment_phiD", "moment_D")   # (component, chain, slot[, tok])
MOMENT_TOKEN_ARRAYS = ("moment_phiD", "moment_D")
STATE_ARRAYS = ("diverged_at", "progress")                            # (component, chain)
PROBE_ARRAYS = ("token_context", "token_position", "token_id", "token_text", "token_source", "probe_input_ids")
LABEL_ARRAYS = ("label", "token_labels")                              # only when the probe set has labels


@dataclass(frozen=True)
class ProbeTable:
    """Probe provenance, one row per token, plus the contexts."""
    input_ids: np.ndarray      # (contexts, seq) int64
    context: np.ndarray        # (tokens,) int
    position: np.ndarray       # (tokens,) int
    token_id: np.ndarray       # (tokens,) int
    text: Sequence[str]
    source: Sequence[str]
    labels: np.ndarray | None = None      # (tokens, labels) bool: what is known about each token (spectro.probes)
    label_names: Sequence[str] = ()
    label_rules: Sequence[str] = ()       # how each label was decided


def probe_arrays(probe: ProbeTable) -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
    """The probe table as stored: name -> (values, dimension names); strings as object arrays, labels only when
    the probe set has them."""
    text = lambda v: np.array(list(v), dtype=object)  # noqa: E731
    out = {"token_context": (np.asarray(probe.context, dtype="int32"), ("token",)),
           "token_position": (np.asarray(probe.position, dtype="int32"), ("token",)),
           "token_id": (np.asarray(probe.token_id, dtype="int64"), ("token",)),
           "token_text": (text(probe.text), ("token",)), "token_source": (text(probe.source), ("token",)),
           "probe_input_ids": (np.asarray(probe.input_ids, dtype="int64"), ("context", "position"))}
    if len(probe.label_names):
        out["label"] = (text(probe.label_names), ("label",))
        out["token_labels"] = (np.asarray(probe.labels, dtype=bool), ("token", "label"))
    return out


PROBE_CHUNK_BYTES = 4 << 20
PROBE_MODES = ("draws", "moments")


def shard_contexts(n_contexts: int, shards: int) -> list[tuple[int, int]]:
    """The S contiguous context ranges [c0, c1) of the probe shards, as even as possible (larger first)."""
    if not 1 <= shards <= n_contexts:
        raise StoreError(f"probe shards must be between 1 and the number of probe contexts ({n_contexts}), "
                         f"got {shards}")
    q, r = divmod(n_contexts, shards)                       # np.array_split's ranges, without the index arrays
    return [(i * q + min(i, r), (i + 1) * q + min(i + 1, r)) for i in range(shards)]


@dataclass(frozen=True)
class Layout:
    components: tuple[str, ...]
    n_chains: int
    n_draws: int
    n_tokens: int
    n_contexts: int
    seq_len: int
    chain_group: int      # G
    draw_chunk: int       # Dc
    token_chunk: int      # Tc
    probe: str = "draws"  # "draws" | "moments" (spectro.store.samples); stores made before the option are "draws"
    probe_shards: int = 1  # S (module doc); stores made before the option have 1

    @staticmethod
    def plan(components: Sequence[str], n_chains: int, n_draws: int, n_contexts: int, seq_len: int,
             chain_group: int, checkpoint_every: int, probe: str = "draws", probe_shards: int = 1) -> "Layout":
        if probe not in PROBE_MODES:
            raise StoreError(f"unknown probe store mode {probe!r}; use one of {PROBE_MODES}")
        g = min(chain_group, n_chains)
        dc = min(checkpoint_every, n_draws)
        per_ctx = seq_len - 1
        n_tokens = n_contexts * per_ctx
        budget = PROBE_CHUNK_BYTES // (4 * g * dc)                      # tokens per ~4 MB probe chunk
        if probe_shards == 1:
            tc = int(max(1, min(n_tokens, budget)))
        else:
            common = 0
            for c0, _ in shard_contexts(n_contexts, probe_shards):
                common = math.gcd(common, c0)
            k = max([d for d in range(1, common + 1) if common % d == 0 and d * per_ctx <= budget] or [1])
            tc = k * per_ctx
        return Layout(tuple(components), n_chains, n_draws, n_tokens, n_contexts, seq_len, g, dc, tc, probe,
                      probe_shards)

    def moment_slot(self, committed: int) -> int:
        """The moments slot holding a unit's sums over its first `committed` (> 0) draws (store module doc)."""
        return ((committed - 1) // self.draw_chunk) % 2

    def moment_array(self, name: str) -> tuple[tuple, tuple, tuple]:
        """(shape, chunks, dimension names) of moments array `name` (module doc): the per-token sums
        [component, chain, slot, token]; the scalar sums [component, chain, slot(, shard)], shard axis when S > 1."""
        C, N, G, dims = len(self.components), self.n_chains, self.chain_group, ("component", "chain", "slot")
        if name in MOMENT_TOKEN_ARRAYS:
            return (C, N, 2, self.n_tokens), (1, G, 1, self.token_chunk), dims + ("token",)
        if self.probe_shards > 1:
            return (C, N, 2, self.probe_shards), (1, G, 1, 1), dims + ("shard",)
        return (C, N, 2), (1, G, 1), dims

    def moment_at(self, name: str, ci: int, chains: slice, slot, shard: int, tokens: slice | None = None) -> tuple:
        """The selection of one shard unit's `name` sums in `slot` (an int or a slice): `tokens` (default all the
        shard's), or its copy of the scalars (the shard index only when S > 1)."""
        if name in MOMENT_TOKEN_ARRAYS:
            return ci, chains, slot, tokens if tokens is not None else slice(*self.shard_tokens(shard))
        return (ci, chains, slot) + ((shard,) if self.probe_shards > 1 else ())

    def units(self) -> list[tuple[str, tuple[int, ...]]]:
        """All (component, chain ids) chain groups, component-major."""
        groups = [tuple(range(s, min(s + self.chain_group, self.n_chains)))
                  for s in range(0, self.n_chains, self.chain_group)]
        return [(c, g) for c in self.components for g in groups]

    def shard_units(self) -> list[tuple[str, tuple[int, ...], int]]:
        """All units of work (component, chain ids, probe shard): each chain group's shards in a row."""
        return [(c, g, s) for c, g in self.units() for s in range(self.probe_shards)]

    def shard_contexts(self, shard: int) -> tuple[int, int]:
        """Probe contexts [c0, c1) of one shard."""
        return shard_contexts(self.n_contexts, self.probe_shards)[shard]

    def shard_tokens(self, shard: int) -> tuple[int, int]:
        """Probe tokens [t0, t1) of one shard: its contexts' tokens, a whole number of token chunks."""
        c0, c1 = self.shard_contexts(shard)
        return c0 * (self.seq_len - 1), c1 * (self.seq_len - 1)

    def shard_of(self, token: int) -> int:
        """The probe shard holding token `token`."""
        return next(s for s in range(self.probe_shards) if token < self.shard_tokens(s)[1])
