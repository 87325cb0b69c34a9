"""The run's sample store: a chunked Zarr v3 group, `samples.zarr`.

The store package (this module and `spectro.store.susceptibilities`) is the
only place that touches Zarr. The store is the source of truth
for progress and resume: a unit of work (component, chain group, probe shard) owns
its chunks of every per-draw array (the token chunks of its shard; shard 0 also
the per-draw scalars: `spectro.store.layout`) and writes them in whole chunks.

Layout (dims in brackets; every array carries `dimension_names`, so
`xarray.open_zarr(path, consolidated=False)` names them):

    sampling_loss  float64 [component, chain, draw]          chunks (1, G, Dc)
    probe_loss     float32 [component, chain, draw, token]   chunks (1, G, Dc, Tc)   (store.probe=draws)
    moment_n       int64   [component, chain, slot(, shard)] chunks (1, G, 1(, 1))   (store.probe=moments)
    moment_phi, moment_phi2
                   float64 [component, chain, slot(, shard)] chunks (1, G, 1(, 1))   (shard axis when S > 1)
    moment_phiD, moment_D
                   float64 [component, chain, slot, token]   chunks (1, G, 1, Tc)
    the traces     [component, chain, draw]                  chunks (1, G, Dc)
                   one array per per-draw observable of `spectro.traces.TRACES`, with its dtype and fill
    diverged_at    int64   [component, chain]   -1 = healthy chunks (1, G)
    progress       int64   [component, chain(, shard)]   draws committed (written last; shard axis when S > 1)
    component      str     [component]
    token_context, token_position, token_id   int [token];  token_text, token_source  str [token]
    probe_input_ids int64  [context, position]
    label str [label];  token_labels bool [token, label]      (probe sets with labels: spectro.probes)
    attrs: spectro_store (format version), config, fingerprint, model, data, layout, init_loss, label_rules

Non-obvious choices:
- G = chains per unit, Dc = draws per checkpoint, Tc = tokens per chunk (sized
  so one probe chunk is about 4 MB uncompressed). A unit buffers Dc draws and
  writes each chunk once; `LocalStore` writes a chunk by temp file + rename,
  `FsspecStore` (object storage, `zarr_store`) by one PUT, so a killed writer
  leaves the old chunk or the new one, never a torn one.
- No Zarr sharding: writers sharing a Zarr shard lose updates (docs/architecture.md). Probe shards
  (`sampler.probe_shards`, `spectro.store.layout`) are units of work, each owning whole token chunks.
- Arrays are allocated at full shape with fill NaN (or -1 / 0); `progress`
  is written after the data and the unit's checkpoint, so a draw counted in
  `progress` is always on disk.
- Every chunk carries a crc32c checksum (zstd, then crc32c): a corrupted chunk
  raises on read instead of being read as data.
- Every chunk a unit commits is written, even when it holds only the fill
  value (`write_empty_chunks`; zarr skips those by default): so "committed
  but absent" always means a chunk was lost. `verify()` reads every committed
  chunk of every unit and returns the units with a missing, truncated or
  corrupted one; `reset_unit()` deletes that unit's chunks so it is sampled
  again from its first draw (bit-identical: its seeds depend only on the
  config). Nothing half-written is read: on local disk zarr writes a chunk to
  `<chunk>.<uuid>.partial` and renames it, and `verify()` removes the
  `.partial` leftovers of a killed writer; on object storage a chunk is one
  PUT, which leaves nothing behind. Chunk presence is checked through the
  location (a listing per unit directory on object storage), never by a
  file call. Format 2 = this invariant.
- The store lives at a `spectro.rundir.Location` (a local path or a URL).
  Creation commits last: the group is made with a `spectro_creating` mark and
  the `spectro_store` format attribute replaces it after every array is
  written. Locally the store is also built as `samples.zarr.creating` and
  renamed; object storage has no rename, so a store still marked creating is
  taken as absent and made again.
- A store made with a different config is refused, naming the keys that
  differ, unless the caller asks for a fresh start. A directory that is not
  ours (no or another format version, missing arrays, wrong shapes, unsafe
  component names) is refused with what is wrong.
- Disk full (ENOSPC/EDQUOT/EFBIG) while creating the store removes the partial
  store and raises StoreError saying so.
- `store.probe=moments`: two alternating slots of per-chain sums instead of
  `probe_loss` (`spectro.store.layout` says why).
"""

from __future__ import annotations

import errno
import json
import re
from dataclasses import asdict
from typing import Optional, Sequence

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from spectro.errors import DiskFullError, StoreError, UnsafePathError
from spectro.rundir import Location, PathLike, flat_diff
from spectro.store.layout import (MOMENT_ARRAYS, MOMENT_TOKEN_ARRAYS, PROBE_ARRAYS, PROBE_CHUNK_BYTES,  # noqa: F401
                                  PROBE_MODES, STATE_ARRAYS, TRACE_ARRAYS, UNIT_ARRAYS, Layout, ProbeTable,
                                  probe_arrays)
from spectro.traces import TRACES

STORE_FORMAT = 2
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def zarr_version() -> str:
    """The zarr library's version, for a run's provenance."""
    return zarr.__version__


def disk_full(exc: BaseException) -> bool:
    """Whether an exception (or its cause chain) is a full disk or quota."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def confined(root: PathLike, name: str) -> Location:
    """`root / name` for a plain file name derived from config or store contents;
    refuses anything that could write outside `root` (separators, `..`, absolute)."""
    root = Location.of(root)
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise UnsafePathError(f"refusing to write {name!r} under {root}: a name taken from a config or store may "
                              f"only hold letters, digits, '_', '.', '-' (no path separators or '..')")
    path = root / name
    if root.local and root.path.resolve() not in path.path.resolve().parents:
        raise UnsafePathError(f"refusing to write {path}: it resolves outside {root.path.resolve()}")
    return path


def zarr_store(location: PathLike, read_only: bool = False):
    """The Zarr store object for a location: `LocalStore` for a local path, `FsspecStore` (async, e.g. s3fs)
    for a URL; credentials and endpoint come from the environment (spectro.rundir)."""
    loc = Location.of(location)
    if loc.local:
        return zarr.storage.LocalStore(loc.path, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(loc.uri, read_only=read_only)


def _compressors():
    return [ZstdCodec(level=3), Crc32cCodec()]


def _still_creating(path: Location) -> bool:
    """Whether the store at `path` carries the creation mark and no format yet (its writer stopped)."""
    try:
        attrs = dict(zarr.open_group(zarr_store(path, read_only=True), mode="r").attrs)
    except Exception:  # not a readable group: open() says what is wrong with it
        return False
    return bool(attrs.get("spectro_creating")) and "spectro_store" not in attrs


class SampleStore:
    """Read/write access to one `samples.zarr`."""

    def __init__(self, path: PathLike, group: zarr.Group):
        self.path = Location.of(path)
        self.group = group
        attrs = dict(group.attrs)
        self.layout = Layout(**{**attrs["layout"], "components": tuple(attrs["layout"]["components"])})
        self.init_loss = float(attrs["init_loss"])
        self._index = {c: i for i, c in enumerate(self.layout.components)}
        self._handles: dict[str, zarr.Array] = {}

    # ---- creation / opening

    @classmethod
    def create_or_open(cls, path: PathLike, layout: Layout, *, fingerprint: dict, config: dict, model: dict,
                       data: dict, init_loss: float, probe: ProbeTable, fresh: bool = False) -> "SampleStore":
        path = Location.of(path)
        if path.exists() and (fresh or _still_creating(path)):
            path.rmtree()
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
            if store.layout.probe != layout.probe:
                raise StoreError(
                    f"{path} keeps probe losses as store.probe={store.layout.probe}, but this run asks for "
                    f"store.probe={layout.probe}; rerun with store.probe={store.layout.probe} to resume, pass "
                    f"fresh=true to discard it, or choose another run directory")
            if store.layout.probe_shards != layout.probe_shards:
                raise StoreError(
                    f"{path} was sampled with sampler.probe_shards={store.layout.probe_shards}, but this run asks "
                    f"for {layout.probe_shards}; its token chunks and progress follow the shards: rerun with "
                    f"sampler.probe_shards={store.layout.probe_shards} to resume, pass fresh=true to discard it, "
                    f"or choose another run directory")
            if store.layout != layout:
                raise StoreError(f"{path} has layout {store.layout}, expected {layout}; pass fresh=true")
            store.verify_probe(probe)      # rewrites probe coordinates that were corrupted
            return store
        tmp = path.with_name(path.name + ".creating") if path.local else path    # object storage: no rename
        tmp.rmtree()
        try:
            cls._create(tmp, layout, fingerprint=fingerprint, config=config, model=model, data=data,
                        init_loss=init_loss, probe=probe)
        except OSError as exc:
            tmp.rmtree()
            if disk_full(exc):
                raise DiskFullError(f"no space left on the device while creating {path} ({exc.strerror}); free space "
                                 f"or choose a run directory on a larger disk, then rerun") from None
            raise
        if tmp != path:
            tmp.path.rename(path.path)          # the store appears whole or not at all
        return cls.open(path, mode="r+")

    @classmethod
    def _create(cls, path: Location, L: Layout, *, fingerprint, config, model, data, init_loss, probe: ProbeTable):
        g = zarr.open_group(zarr_store(path), mode="w", attributes={"spectro_creating": True})
        C, N, D, T = len(L.components), L.n_chains, L.n_draws, L.n_tokens
        G, Dc, Tc = L.chain_group, L.draw_chunk, L.token_chunk
        comp3 = ("component", "chain", "draw")
        g.create_array("sampling_loss", shape=(C, N, D), chunks=(1, G, Dc), dtype="float64", fill_value=np.nan,
                       dimension_names=comp3, compressors=_compressors())
        if L.probe == "draws":
            g.create_array("probe_loss", shape=(C, N, D, T), chunks=(1, G, Dc, Tc), dtype="float32",
                           fill_value=np.nan, dimension_names=comp3 + ("token",), compressors=_compressors())
        else:
            for name in MOMENT_ARRAYS:
                shape, chunks, dims = L.moment_array(name)
                g.create_array(name, shape=shape, chunks=chunks, dtype="int64" if name == "moment_n" else "float64",
                               fill_value=0 if name == "moment_n" else np.nan, dimension_names=dims,
                               compressors=_compressors())
        for t in TRACES:
            g.create_array(t.name, shape=(C, N, D), chunks=(1, G, Dc), dtype=t.dtype, fill_value=t.fill,
                           dimension_names=comp3, compressors=_compressors())
        g.create_array("diverged_at", shape=(C, N), chunks=(1, G), dtype="int64", fill_value=-1,
                       dimension_names=("component", "chain"), compressors=_compressors())
        sharded = L.probe_shards > 1
        g.create_array("progress", shape=(C, N, L.probe_shards) if sharded else (C, N),
                       chunks=(1, G, 1) if sharded else (1, G), dtype="int64", fill_value=0,
                       dimension_names=("component", "chain", "shard") if sharded else ("component", "chain"),
                       compressors=_compressors())
        comp = g.create_array("component", shape=(C,), dtype=str, dimension_names=("component",))
        comp[:] = np.array(L.components, dtype=object)
        for name, (values, dims) in probe_arrays(probe).items():
            text = values.dtype == object
            arr = g.create_array(name, shape=values.shape, dtype=str if text else values.dtype, dimension_names=dims,
                                 compressors="auto" if text else _compressors())
            arr[...] = values
        g.attrs.update({                  # last: one write of the group's metadata commits the store
            "label_rules": dict(zip(probe.label_names, probe.label_rules)),
            "spectro_store": STORE_FORMAT,
            "spectro_creating": False,
            # a draws-mode layout is written as before the option existed, so those stores stay unchanged
            "layout": {k: v for k, v in {**asdict(L), "components": list(L.components)}.items()
                       if not ((k == "probe" and v == "draws") or (k == "probe_shards" and v == 1))},
            "fingerprint": json.loads(json.dumps(fingerprint)),
            "config": json.loads(json.dumps(config)),
            "model": json.loads(json.dumps(model)),
            "data": json.loads(json.dumps(data)),
            "init_loss": float(init_loss),
        })

    @classmethod
    def open(cls, path: PathLike, mode: str = "r") -> "SampleStore":
        path = Location.of(path)
        if not path.exists():
            raise StoreError(f"no sample store at {path}; run the sampling stage first")
        try:
            g = zarr.open_group(zarr_store(path, read_only=mode == "r"), mode=mode)
            attrs = dict(g.attrs)
        except Exception as exc:  # zarr raises several types for non-stores
            raise StoreError(f"{path} is not a readable Zarr v3 store ({type(exc).__name__}: {exc})") from None
        version = attrs.get("spectro_store")
        if version is None and attrs.get("spectro_creating"):
            raise StoreError(f"{path} was still being created when its writer stopped; rerun the sample stage "
                             f"(it is made again)")
        if version is None:
            raise StoreError(f"{path} is not a spectro sample store (it has no 'spectro_store' format attribute); "
                             f"point at a run directory's samples.zarr")
        if version != STORE_FORMAT:
            raise StoreError(f"{path} is a spectro sample store of format {version!r}, but this version reads format "
                             f"{STORE_FORMAT}; rerun with fresh=true (or the spectro version that wrote it)")
        absent = [k for k in ("layout", "init_loss", "fingerprint", "config") if k not in attrs]
        if absent:
            raise StoreError(f"{path} is truncated: attributes {absent} are missing; rerun with fresh=true")
        try:
            store = cls(path, g)
        except (TypeError, ValueError, KeyError) as exc:
            raise StoreError(f"{path} has a malformed layout attribute ({exc}); rerun with fresh=true") from None
        L = store.layout
        for name in L.components:
            if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
                raise StoreError(f"{path} names a component {name!r} that is not a valid component name; "
                                 f"this store was not written by spectro")
        C, N, D, T = len(L.components), L.n_chains, L.n_draws, L.n_tokens
        if L.probe not in PROBE_MODES:
            raise StoreError(f"{path} has an unknown probe mode {L.probe!r} in its layout; rerun with fresh=true")
        expected = {**{a: (C, N, D) for a in UNIT_ARRAYS}, "probe_loss": (C, N, D, T),
                    **{a: (C, N) for a in STATE_ARRAYS}, "component": (C,),
                    **({"progress": (C, N, L.probe_shards)} if L.probe_shards > 1 else {}),
                    **{a: (T,) for a in PROBE_ARRAYS}, "probe_input_ids": (L.n_contexts, L.seq_len)}
        if L.probe == "moments":
            del expected["probe_loss"]
            expected.update({a: L.moment_array(a)[0] for a in MOMENT_ARRAYS})
        present = set(g.array_keys())
        missing = [a for a in expected if a not in present]
        if missing:
            raise StoreError(f"{path} is truncated: arrays {missing} are missing; rerun with fresh=true")
        wrong = [f"{a} {g[a].shape} (expected {shape})" for a, shape in expected.items() if g[a].shape != shape]
        if wrong:
            raise StoreError(f"{path} does not match its own layout: {', '.join(wrong)}; rerun with fresh=true")
        return store

    # ---- writing (one unit owns its chunk column)

    def component_index(self, component: str) -> int:
        if component not in self._index:
            raise StoreError(f"component {component!r} is not in this store ({list(self.layout.components)})")
        return self._index[component]

    def write_block(self, component: str, chains: Sequence[int], draw_start: int, *, sampling_loss: np.ndarray,
                    probe_loss: np.ndarray | None = None, traces: dict[str, np.ndarray], diverged_at: np.ndarray,
                    moments: dict[str, np.ndarray] | None = None, shard: int = 0) -> None:
        """Write draws [draw_start, draw_start + n) of one unit: chunk-aligned. With probe shards, probe_loss
        holds the shard's tokens only, and only shard 0 writes the per-draw scalars (spectro.store.layout).

        sampling_loss (chains, n), probe_loss (chains, n, tokens), traces[name] (chains, n), diverged_at (chains,);
        in moments mode `moments` instead of probe_loss: the chains' sums over draws [0, draw_start + n),
        {"n", "phi", "phi2"} (chains,) and {"phiD", "D"} (chains, shard's tokens), into slot `moment_slot` (with
        probe shards the unit's own copy of the scalars).
        """
        mode = self.layout.probe
        if (probe_loss is None) != (mode == "moments") or (moments is None) != (mode == "draws"):
            raise StoreError(f"{self.path} keeps probe losses as store.probe={mode}: write "
                             f"{'probe_loss' if mode == 'draws' else 'moments'} blocks to it")
        ci = self.component_index(component)
        c0, c1 = chains[0], chains[-1] + 1
        n = sampling_loss.shape[1]
        aligned = draw_start % self.layout.draw_chunk == 0
        if not aligned or (n != self.layout.draw_chunk and draw_start + n != self.layout.n_draws):
            raise StoreError(f"block at draw {draw_start} with {n} draws is not chunk-aligned")
        d = slice(draw_start, draw_start + n)
        t = slice(*self.layout.shard_tokens(shard))
        if shard == 0:
            self._array("sampling_loss")[ci, c0:c1, d] = sampling_loss
        if mode == "draws":
            self._array("probe_loss")[ci, c0:c1, d, t] = probe_loss
        else:
            slot = self.layout.moment_slot(draw_start + n)
            for name in MOMENT_ARRAYS:
                self._array(name)[self.layout.moment_at(name, ci, slice(c0, c1), slot, shard)] = \
                    moments[name.removeprefix("moment_")]
        if shard == 0:
            for name in TRACE_ARRAYS:
                self._array(name)[ci, c0:c1, d] = traces[name]
            self._array("diverged_at")[ci, c0:c1] = diverged_at

    def _progress_at(self, ci: int, chains: Sequence[int], shard: int) -> tuple:
        """The `progress` selection of one unit (the shard axis exists only with probe shards)."""
        return (ci, slice(chains[0], chains[-1] + 1)) + ((shard,) if self.layout.probe_shards > 1 else ())

    def set_progress(self, component: str, chains: Sequence[int], n_draws: int, shard: int = 0) -> None:
        self._array("progress")[self._progress_at(self.component_index(component), chains, shard)] = n_draws

    def unit_progress(self, component: str, chains: Sequence[int], shard: int = 0) -> np.ndarray:
        """(chains,) draws one unit has committed."""
        return self.group["progress"][self._progress_at(self.component_index(component), chains, shard)]

    def _handle(self, name: str) -> zarr.Array:
        """An array that writes every chunk, also one holding only the fill value (see module doc). Opened once
        per array: its metadata never changes, and on object storage each opening is a request."""
        if name not in self._handles:
            self._handles[name] = self.group[name].with_config({"write_empty_chunks": True})
        return self._handles[name]

    def _array(self, name: str) -> zarr.Array:
        """The array to write `name` through (every write goes through here; reads use `_handle`)."""
        return self._handle(name)

    # ---- integrity (resume)

    def _chunk_key(self, name: str, coords: tuple[int, ...]) -> str:
        """The chunk's key relative to the store root, e.g. `probe_loss/c/1/0/1/0`."""
        return f"{name}/{self._handle(name).metadata.encode_chunk_key(coords)}"

    def _unit_chunks(self, ci: int, g: int, committed: int, every_slot: bool = False,
                     shard: int = 0) -> list[tuple[str, tuple]]:
        """(array, chunk coords) of every chunk unit (component ci, chain group g, probe shard) has committed; in
        moments mode the slot holding its sums over `committed` draws (both slots with `every_slot`). Shard 0
        owns the per-draw scalars; every shard its own token chunks, progress chunk and copy of the scalar sums."""
        L = self.layout
        n_dchunks = -(-committed // L.draw_chunk)
        t0, t1 = L.shard_tokens(shard)
        tchunks = range(t0 // L.token_chunk, -(-t1 // L.token_chunk))
        out = [("progress", (ci, g) + ((shard,) if L.probe_shards > 1 else ()))]
        out += [("diverged_at", (ci, g))] if shard == 0 else []
        for j in range(n_dchunks):
            out += [(a, (ci, g, j)) for a in UNIT_ARRAYS if a != "probe_loss" and shard == 0]
            if L.probe == "draws":
                out += [("probe_loss", (ci, g, j, t)) for t in tchunks]
        if L.probe == "moments" and committed > 0:
            for slot in ((0, 1) if every_slot else (L.moment_slot(committed),)):
                out += [(a, (ci, g, slot) + ((shard,) if L.probe_shards > 1 else ()))
                        for a in MOMENT_ARRAYS if a not in MOMENT_TOKEN_ARRAYS]
                out += [(a, (ci, g, slot, t)) for a in MOMENT_TOKEN_ARRAYS for t in tchunks]
        return out

    def verify(self, *, remove_partial: bool = False) -> list[dict]:
        """Read every committed chunk of every unit; return the units with a chunk that is
        missing, truncated or fails its crc32c checksum, as {"component", "chains", "shard", "problem"}.

        `remove_partial` also deletes `*.partial` files (a killed writer's temp chunks); only
        call it with it set when no writer is running.
        """
        L = self.layout
        if remove_partial and self.path.local:          # object storage writes whole objects: no temp files
            for leftover in self.path.rglob("*.partial"):
                leftover.unlink(missing_ok=True)
        bad = []
        for component, chains, shard in L.shard_units():
            ci, g = self.component_index(component), chains[0] // L.chain_group
            problem = None
            try:
                committed = int(self.unit_progress(component, chains, shard).min())
            except Exception as exc:  # crc32c mismatch (ValueError), truncated zstd frame, ...
                committed, problem = 0, f"progress chunk unreadable ({exc})"
            if problem is None and committed > 0:
                problem = self._check_chunks(self._unit_chunks(ci, g, committed, shard=shard))
            if problem is not None:
                bad.append({"component": component, "chains": list(chains), "shard": shard, "problem": problem})
        return bad

    def check_unit(self, component: str, chains: Sequence[int], committed: int, shard: int = 0) -> str | None:
        """The first problem among one unit's chunks for draws [0, committed), else None."""
        ci = self.component_index(component)
        chunks = self._unit_chunks(ci, chains[0] // self.layout.chain_group, committed, shard=shard)
        return self._check_chunks([c for c in chunks if c[0] != "progress"])   # progress may lag the checkpoint

    def _check_chunks(self, chunks: list[tuple[str, tuple[int, ...]]]) -> str | None:
        """The first problem among these chunks (absent, or fails to decode), else None. Reads one chunk at a time."""
        present = self.path.existing(self._chunk_key(n, c) for n, c in chunks)
        for name, coords in chunks:
            if self._chunk_key(name, coords) not in present:
                return f"{name} chunk {coords} is missing"
            arr = self._handle(name)
            region = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(coords, arr.chunks, arr.shape))
            try:
                arr[region]
            except Exception as exc:  # crc32c mismatch (ValueError), truncated zstd frame, ...
                return f"{name} chunk {coords} fails its checksum or is truncated ({type(exc).__name__}: {exc})"
        return None

    def reset_unit(self, component: str, chains: Sequence[int], shard: int = 0) -> None:
        """Delete every chunk of one unit (progress first), so it is sampled again from draw 0."""
        ci = self.component_index(component)
        g = chains[0] // self.layout.chain_group
        chunks = self._unit_chunks(ci, g, self.layout.n_draws, every_slot=True, shard=shard)
        self.path.delete([self._chunk_key(n, c) for n, c in chunks if n == "progress"])     # progress first
        self.path.delete([self._chunk_key(n, c) for n, c in chunks if n != "progress"])

    def verify_probe(self, probe: ProbeTable) -> list[str]:
        """Rewrite probe coordinate arrays that are unreadable or differ from `probe`; returns their names."""
        want = {name: values for name, (values, _) in probe_arrays(probe).items()}
        fixed = []
        for name, values in want.items():
            try:
                ok = np.array_equal(self.group[name][:], values)
            except Exception:  # unreadable chunk: rewrite it
                ok = False
            if not ok:
                self._array(name)[...] = values
                fixed.append(name)
        return fixed

    # ---- reading

    def progress(self) -> np.ndarray:
        """(components, chains) draws committed: with probe shards, the draws every shard of the chain has."""
        p = self.group["progress"][:]
        return p.min(axis=2) if p.ndim == 3 else p

    def unit_done(self, component: str, chains: Sequence[int], shard: int = 0, draws: Optional[int] = None) -> bool:
        """Whether the unit's chains have `draws` (default: all n_draws) draws committed."""
        return bool(np.all(self.unit_progress(component, chains, shard) >= (draws or self.layout.n_draws)))

    def complete(self) -> bool:
        return bool(np.all(self.progress() >= self.layout.n_draws))

    def diverged_at(self) -> np.ndarray:
        return self.group["diverged_at"][:]

    def read(self, name: str, selection=slice(None)) -> np.ndarray:
        if name == "probe_loss" and self.layout.probe == "moments":
            raise StoreError(f"{self.path} was sampled with store.probe=moments: it keeps per-chain sums "
                             f"(moment_* arrays), not each draw's probe losses; resample with store.probe=draws "
                             f"(fresh=true) for those")
        return self.group[name][selection]

    def read_moments(self, ci: int, chains: slice, tokens: slice, shard: int = 0) -> dict[str, np.ndarray]:
        """Both moment slots of component index `ci`'s chains, tokens `tokens` of probe shard `shard` (and its copy of
        the scalars): {"n", "phi", "phi2"} (chains, 2), {"phiD", "D"} (chains, 2, tokens); slot: `moment_slot`."""
        return {name.removeprefix("moment_"): self.group[name][self.layout.moment_at(name, ci, chains, slice(None),
                                                                                     shard, tokens)]
                for name in MOMENT_ARRAYS}

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)
