"""The run's sample store: a chunked Zarr v3 group, `samples.zarr`.

This is the only module that touches Zarr. The store is the source of truth
for progress and resume: a unit of work (component, chain group) owns exactly
one chunk column of every per-draw array and writes it in whole chunks.

Layout (dims in brackets; every array carries `dimension_names`, so
`xarray.open_zarr(path, consolidated=False)` names them):

    sampling_loss  float64 [component, chain, draw]          chunks (1, G, Dc)
    probe_loss     float32 [component, chain, draw, token]   chunks (1, G, Dc, Tc)
    step_loss, grad_norm, noise_norm, distance
                   float64 [component, chain, draw]          chunks (1, G, Dc)
    diverged_at    int64   [component, chain]   -1 = healthy chunks (1, G)
    progress       int64   [component, chain]   draws committed (written last)
    component      str     [component]
    token_context, token_position, token_id   int [token];  token_text, token_source  str [token]
    probe_input_ids int64  [context, position]
    attrs: spectro_store (format version), config, fingerprint, model, data, layout, init_loss

Non-obvious choices:
- G = chains per unit, Dc = draws per checkpoint, Tc = tokens per chunk (sized
  so one probe chunk is about 4 MB uncompressed). A unit buffers Dc draws and
  writes each chunk once; `LocalStore` writes a chunk by temp file + rename, so
  a killed writer leaves the old chunk or the new one, never a torn one.
- No sharding: writers sharing a shard lose updates (DESIGN 3).
- Arrays are allocated at full shape with fill NaN (or -1 / 0); `progress`
  is written after the data and the unit's checkpoint, so a draw counted in
  `progress` is always on disk.
- Every chunk carries a crc32c checksum (zstd, then crc32c): a corrupted chunk
  raises on read instead of being read as data.
- A store made with a different config is refused, naming the keys that
  differ, unless the caller asks for a fresh start.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from spectro.config import flat_diff
from spectro.errors import StoreError

STORE_FORMAT = 1
TRACE_ARRAYS = ("step_loss", "grad_norm", "noise_norm", "distance")
PROBE_CHUNK_BYTES = 4 << 20


def _compressors():
    return [ZstdCodec(level=3), Crc32cCodec()]


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

    @staticmethod
    def plan(components: Sequence[str], n_chains: int, n_draws: int, n_contexts: int, seq_len: int,
             chain_group: int, checkpoint_every: int) -> "Layout":
        g = min(chain_group, n_chains)
        dc = min(checkpoint_every, n_draws)
        n_tokens = n_contexts * (seq_len - 1)
        tc = int(max(1, min(n_tokens, PROBE_CHUNK_BYTES // (4 * g * dc))))
        return Layout(tuple(components), n_chains, n_draws, n_tokens, n_contexts, seq_len, g, dc, tc)

    def units(self) -> list[tuple[str, tuple[int, ...]]]:
        """All (component, chain ids) units, component-major."""
        groups = [tuple(range(s, min(s + self.chain_group, self.n_chains)))
                  for s in range(0, self.n_chains, self.chain_group)]
        return [(c, g) for c in self.components for g in groups]


@dataclass(frozen=True)
class ProbeTable:
    """Probe provenance, one row per token, plus the contexts."""
    input_ids: np.ndarray      # (contexts, seq) int64
    context: np.ndarray        # (tokens,) int
    position: np.ndarray       # (tokens,) int
    token_id: np.ndarray       # (tokens,) int
    text: Sequence[str]
    source: Sequence[str]


class SampleStore:
    """Read/write access to one `samples.zarr`."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path = Path(path)
        self.group = group
        attrs = dict(group.attrs)
        self.layout = Layout(**{**attrs["layout"], "components": tuple(attrs["layout"]["components"])})
        self.init_loss = float(attrs["init_loss"])
        self._index = {c: i for i, c in enumerate(self.layout.components)}

    # ---- creation / opening

    @classmethod
    def create_or_open(cls, path: Path, layout: Layout, *, fingerprint: dict, config: dict, model: dict,
                       data: dict, init_loss: float, probe: ProbeTable, fresh: bool = False) -> "SampleStore":
        path = Path(path)
        if path.exists() and fresh:
            shutil.rmtree(path)
        if path.exists():
            store = cls.open(path, mode="r+")
            old = store.group.attrs["fingerprint"]
            new = json.loads(json.dumps(fingerprint))
            if old != new:
                keys = flat_diff(old, new)
                raise StoreError(
                    f"{path} was made with a different config (keys that differ: {', '.join(keys)}); "
                    f"rerun with the original settings to resume, pass fresh=true to discard it, "
                    f"or choose another run directory")
            if store.layout != layout:
                raise StoreError(f"{path} has layout {store.layout}, expected {layout}; pass fresh=true")
            return store
        tmp = path.with_name(path.name + ".creating")
        if tmp.exists():
            shutil.rmtree(tmp)
        cls._create(tmp, layout, fingerprint=fingerprint, config=config, model=model, data=data,
                    init_loss=init_loss, probe=probe)
        tmp.rename(path)          # the store appears whole or not at all
        return cls.open(path, mode="r+")

    @classmethod
    def _create(cls, path: Path, L: Layout, *, fingerprint, config, model, data, init_loss, probe: ProbeTable):
        g = zarr.open_group(str(path), mode="w")
        C, N, D, T = len(L.components), L.n_chains, L.n_draws, L.n_tokens
        G, Dc, Tc = L.chain_group, L.draw_chunk, L.token_chunk
        comp3 = ("component", "chain", "draw")
        g.create_array("sampling_loss", shape=(C, N, D), chunks=(1, G, Dc), dtype="float64", fill_value=np.nan,
                       dimension_names=comp3, compressors=_compressors())
        g.create_array("probe_loss", shape=(C, N, D, T), chunks=(1, G, Dc, Tc), dtype="float32",
                       fill_value=np.nan, dimension_names=comp3 + ("token",), compressors=_compressors())
        for name in TRACE_ARRAYS:
            g.create_array(name, shape=(C, N, D), chunks=(1, G, Dc), dtype="float64", fill_value=np.nan,
                           dimension_names=comp3, compressors=_compressors())
        g.create_array("diverged_at", shape=(C, N), chunks=(1, G), dtype="int64", fill_value=-1,
                       dimension_names=("component", "chain"), compressors=_compressors())
        g.create_array("progress", shape=(C, N), chunks=(1, G), dtype="int64", fill_value=0,
                       dimension_names=("component", "chain"), compressors=_compressors())
        comp = g.create_array("component", shape=(C,), dtype=str, dimension_names=("component",))
        comp[:] = np.array(L.components, dtype=object)
        for name, values, dtype in [("token_context", probe.context, "int32"), ("token_position", probe.position, "int32"),
                                    ("token_id", probe.token_id, "int64")]:
            a = g.create_array(name, shape=(T,), dtype=dtype, dimension_names=("token",), compressors=_compressors())
            a[:] = np.asarray(values, dtype=dtype)
        for name, values in [("token_text", probe.text), ("token_source", probe.source)]:
            a = g.create_array(name, shape=(T,), dtype=str, dimension_names=("token",))
            a[:] = np.array(list(values), dtype=object)
        ids = g.create_array("probe_input_ids", shape=probe.input_ids.shape, dtype="int64",
                             dimension_names=("context", "position"), compressors=_compressors())
        ids[:] = probe.input_ids
        g.attrs.update({
            "spectro_store": STORE_FORMAT,
            "layout": {**asdict(L), "components": list(L.components)},
            "fingerprint": json.loads(json.dumps(fingerprint)),
            "config": json.loads(json.dumps(config)),
            "model": json.loads(json.dumps(model)),
            "data": json.loads(json.dumps(data)),
            "init_loss": float(init_loss),
        })

    @classmethod
    def open(cls, path: Path, mode: str = "r") -> "SampleStore":
        path = Path(path)
        if not path.exists():
            raise StoreError(f"no sample store at {path}; run the sampling stage first")
        try:
            g = zarr.open_group(str(path), mode=mode)
            attrs = dict(g.attrs)
        except Exception as exc:  # zarr raises several types for non-stores
            raise StoreError(f"{path} is not a readable Zarr v3 store ({type(exc).__name__}: {exc})") from None
        if attrs.get("spectro_store") != STORE_FORMAT:
            raise StoreError(f"{path} is not a spectro sample store (format {attrs.get('spectro_store')!r}, "
                             f"expected {STORE_FORMAT}); point at a run directory's samples.zarr")
        missing = [a for a in ("sampling_loss", "probe_loss", "progress", "diverged_at") if a not in g]
        if missing:
            raise StoreError(f"{path} is truncated: arrays {missing} are missing; rerun with fresh=true")
        return cls(path, g)

    # ---- writing (one unit owns its chunk column)

    def component_index(self, component: str) -> int:
        if component not in self._index:
            raise StoreError(f"component {component!r} is not in this store ({list(self.layout.components)})")
        return self._index[component]

    def write_block(self, component: str, chains: Sequence[int], draw_start: int, *, sampling_loss: np.ndarray,
                    probe_loss: np.ndarray, traces: dict[str, np.ndarray], diverged_at: np.ndarray) -> None:
        """Write draws [draw_start, draw_start + n) of one unit: chunk-aligned.

        sampling_loss (chains, n), probe_loss (chains, n, tokens), traces[name] (chains, n), diverged_at (chains,)
        """
        ci = self.component_index(component)
        c0, c1 = chains[0], chains[-1] + 1
        n = sampling_loss.shape[1]
        if draw_start % self.layout.draw_chunk != 0 or (n != self.layout.draw_chunk and draw_start + n != self.layout.n_draws):
            raise StoreError(f"block at draw {draw_start} with {n} draws is not chunk-aligned")
        d = slice(draw_start, draw_start + n)
        self.group["sampling_loss"][ci, c0:c1, d] = sampling_loss
        self.group["probe_loss"][ci, c0:c1, d, :] = probe_loss
        for name in TRACE_ARRAYS:
            self.group[name][ci, c0:c1, d] = traces[name]
        self.group["diverged_at"][ci, c0:c1] = diverged_at

    def set_progress(self, component: str, chains: Sequence[int], n_draws: int) -> None:
        ci = self.component_index(component)
        self.group["progress"][ci, chains[0]:chains[-1] + 1] = n_draws

    # ---- reading

    def progress(self) -> np.ndarray:
        """(components, chains) draws committed."""
        return self.group["progress"][:]

    def unit_done(self, component: str, chains: Sequence[int]) -> bool:
        ci = self.component_index(component)
        return bool(np.all(self.group["progress"][ci, chains[0]:chains[-1] + 1] >= self.layout.n_draws))

    def complete(self) -> bool:
        return bool(np.all(self.progress() >= self.layout.n_draws))

    def diverged_at(self) -> np.ndarray:
        return self.group["diverged_at"][:]

    def read(self, name: str, selection=slice(None)) -> np.ndarray:
        return self.group[name][selection]

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)


# ---------------------------------------------------------------- susceptibilities.zarr

PROBE_COORDS = ("token_context", "token_position", "token_id", "token_text", "token_source")
DIAGNOSTICS = {"llc_mean": "float64", "llc_std": "float64", "mean_phi": "float64", "rhat": "float64",
               "ess_bulk": "float64", "n_chains_used": "int64", "n_diverged": "int64", "not_mixed": "bool"}


class SusceptibilityStore:
    """`susceptibilities.zarr`: chi (token, component) with standard errors,
    per-chain values, probe coordinates and per-component diagnostics.

    Written under `<name>.partial` by independent token-block writers and
    renamed into place by `commit()`, so a reader never sees a half-written one.
    """

    def __init__(self, path: Path, group: zarr.Group):
        self.path = Path(path)
        self.group = group

    @classmethod
    def create(cls, path: Path, samples: SampleStore, token_chunk: int, n_chains: int) -> "SusceptibilityStore":
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        g = zarr.open_group(str(tmp), mode="w")
        L = samples.layout
        C, T = len(L.components), L.n_tokens
        coords = " ".join(PROBE_COORDS)
        for name in ("chi", "chi_se"):
            a = g.create_array(name, shape=(T, C), chunks=(token_chunk, C), dtype="float64", fill_value=np.nan,
                               dimension_names=("token", "component"), compressors=_compressors())
            a.attrs["coordinates"] = coords
        a = g.create_array("chi_per_chain", shape=(n_chains, T, C), chunks=(n_chains, token_chunk, C), dtype="float64",
                           fill_value=np.nan, dimension_names=("chain", "token", "component"), compressors=_compressors())
        a.attrs["coordinates"] = coords
        comp = g.create_array("component", shape=(C,), dtype=str, dimension_names=("component",))
        comp[:] = np.array(L.components, dtype=object)
        tok = g.create_array("token", shape=(T,), dtype="int64", dimension_names=("token",), compressors=_compressors())
        tok[:] = np.arange(T)
        for name in PROBE_COORDS:
            src = samples.group[name]
            dst = g.create_array(name, shape=(T,), dtype=src.dtype if src.dtype != object else str,
                                 dimension_names=("token",))
            dst[:] = src[:]
        return cls(tmp, g)

    def write_block(self, t0: int, t1: int, chi: np.ndarray, chi_se: np.ndarray, chi_per_chain: np.ndarray) -> None:
        """chi, chi_se (t1-t0, C); chi_per_chain (chains, t1-t0, C)."""
        self.group["chi"][t0:t1] = chi
        self.group["chi_se"][t0:t1] = chi_se
        self.group["chi_per_chain"][:, t0:t1] = chi_per_chain

    def write_diagnostics(self, diagnostics: dict[str, np.ndarray], attrs: dict) -> None:
        C = self.group["component"].shape[0]
        for name, dtype in DIAGNOSTICS.items():
            a = self.group.create_array(name, shape=(C,), dtype=dtype, dimension_names=("component",),
                                        compressors=_compressors(), overwrite=True)
            a[:] = np.asarray(diagnostics[name], dtype=dtype)
        self.group.attrs.update(json.loads(json.dumps(attrs)))

    def commit(self, final_path: Path) -> Path:
        final_path = Path(final_path)
        if final_path.exists():
            shutil.rmtree(final_path)
        self.path.rename(final_path)
        self.path = final_path
        return final_path

    @classmethod
    def open_block_writer(cls, path: Path) -> "SusceptibilityStore":
        return cls(Path(path), zarr.open_group(str(path), mode="r+"))


def read_susceptibilities(path: Path):
    """The committed susceptibilities as an xarray Dataset (lazy)."""
    import xarray as xr

    path = Path(path)
    if not path.exists():
        raise StoreError(f"no susceptibilities at {path}; run the susceptibilities stage first")
    return xr.open_zarr(str(path), consolidated=False)
