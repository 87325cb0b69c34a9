"""The susceptibilities store, `susceptibilities.zarr`: chi, its standard errors,
per-chain and split-half estimates, each probe token's mean loss under the
`full` posterior (`token_loss`), diagnostics and reliability per component,
written block by block by the susceptibilities job, and its reader
(`read_susceptibilities`, an xarray Dataset).

Non-obvious choices:
- Commit: the group is made with the attribute `spectro_partial: true`, which
  `commit()` sets to false after every array and diagnostic is written (one
  write of the group's metadata). Locally the group is also built as
  `<name>.partial` and renamed into place, so the previous result stays
  readable until then; object storage has no rename, so it is written in
  place and the reader refuses a group still marked partial.
"""

from __future__ import annotations

import json

import numpy as np
import zarr

from spectro.errors import StoreError
from spectro.rundir import Location, PathLike
from spectro.store.samples import SampleStore, _compressors, zarr_store

PROBE_COORDS = ("token_context", "token_position", "token_id", "token_text", "token_source")
DIAGNOSTICS = {"llc_mean": "float64", "llc_std": "float64", "mean_phi": "float64", "rhat": "float64",
               "rhat_p": "float64", "ess_bulk": "float64", "n_chains_used": "int64", "n_diverged": "int64",
               "not_mixed": "bool", "displacement": "float64", "not_local": "bool"}


class SusceptibilityStore:
    """`susceptibilities.zarr`: chi (token, component) with standard errors,
    per-chain values, probe coordinates and per-component diagnostics.

    Written by independent token-block writers (under `<name>.partial` on
    local disk, in place on object storage) and committed by `commit()`, so a
    reader never reads a half-written one (module doc).
    """

    def __init__(self, path: PathLike, group: zarr.Group):
        self.path = Location.of(path)
        self.group = group

    @classmethod
    def create(cls, path: PathLike, samples: SampleStore, token_chunk: int, n_chains: int) -> "SusceptibilityStore":
        path = Location.of(path)
        tmp = path.with_name(path.name + ".partial") if path.local else path     # object storage: no rename
        tmp.rmtree()
        g = zarr.open_group(zarr_store(tmp), mode="w", attributes={"spectro_partial": True})
        L = samples.layout
        C, T = len(L.components), L.n_tokens
        coords = " ".join(PROBE_COORDS)
        for name in ("chi", "chi_se"):
            a = g.create_array(name, shape=(T, C), chunks=(token_chunk, C), dtype="float64", fill_value=np.nan,
                               dimension_names=("token", "component"), compressors=_compressors())
            a.attrs["coordinates"] = coords
        a = g.create_array("chi_per_chain", shape=(n_chains, T, C), chunks=(n_chains, token_chunk, C), dtype="float64",
                           fill_value=np.nan, dimension_names=("chain", "token", "component"),
                           compressors=_compressors())
        a.attrs["coordinates"] = coords
        a = g.create_array("chi_half", shape=(2, T, C), chunks=(2, token_chunk, C), dtype="float64",
                           fill_value=np.nan, dimension_names=("half", "token", "component"),
                           compressors=_compressors())
        a.attrs["coordinates"] = coords
        a = g.create_array("token_loss", shape=(T,), chunks=(token_chunk,), dtype="float64", fill_value=np.nan,
                           dimension_names=("token",), compressors=_compressors())
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
        if "token_labels" in samples.group:                 # the probe set's labels (spectro.probes)
            lab = samples.group["label"]
            dst = g.create_array("label", shape=lab.shape, dtype=str, dimension_names=("label",))
            dst[:] = lab[:]
            dst = g.create_array("token_labels", shape=(T, lab.shape[0]), dtype="bool",
                                 dimension_names=("token", "label"), compressors=_compressors())
            dst[:] = samples.group["token_labels"][:]
            g.attrs["label_rules"] = dict(samples.group.attrs.get("label_rules", {}))
        return cls(tmp, g)

    def write_block(self, t0: int, t1: int, chi: np.ndarray, chi_se: np.ndarray, chi_per_chain: np.ndarray,
                    chi_half: np.ndarray, token_loss: np.ndarray | None = None) -> None:
        """chi, chi_se (t1-t0, C); chi_per_chain (chains, t1-t0, C); chi_half (2, t1-t0, C); token_loss
        (t1-t0,), each token's loss averaged over the `full` draws (left NaN when not given)."""
        self.group["chi"][t0:t1] = chi
        self.group["chi_se"][t0:t1] = chi_se
        self.group["chi_per_chain"][:, t0:t1] = chi_per_chain
        self.group["chi_half"][:, t0:t1] = chi_half
        if token_loss is not None:
            self.group["token_loss"][t0:t1] = token_loss

    def write_reliability(self, rel: dict) -> None:
        """Per-component split-half reliability (raw chi and features) as arrays over `component`; NaN for
        `full` and for components without an estimate."""
        names = [str(c) for c in self.group["component"][:]]
        for key, name in (("raw", "reliability_raw"), ("features_reliability", "reliability_features")):
            values = np.full(len(names), np.nan)
            for c, v in zip(rel["components"], rel[key]):
                values[names.index(c)] = v
            a = self.group.create_array(name, shape=(len(names),), dtype="float64", dimension_names=("component",),
                                        compressors=_compressors(), overwrite=True)
            a[:] = values

    def write_diagnostics(self, diagnostics: dict[str, np.ndarray], attrs: dict) -> None:
        C = self.group["component"].shape[0]
        for name, dtype in DIAGNOSTICS.items():
            a = self.group.create_array(name, shape=(C,), dtype=dtype, dimension_names=("component",),
                                        compressors=_compressors(), overwrite=True)
            a[:] = np.asarray(diagnostics[name], dtype=dtype)
        self.group.attrs.update(json.loads(json.dumps(attrs)))

    def commit(self, final_path: PathLike) -> Location:
        """Mark the group complete (its last write), then, on local disk, rename it into place."""
        final_path = Location.of(final_path)
        self.group.attrs.update({"spectro_partial": False})
        if final_path != self.path:
            final_path.rmtree()
            self.path.path.rename(final_path.path)
        self.path = final_path
        return final_path

    @classmethod
    def open_block_writer(cls, path: PathLike) -> "SusceptibilityStore":
        return cls(path, zarr.open_group(zarr_store(path), mode="r+"))


def read_susceptibilities(path: PathLike):
    """The committed susceptibilities as an xarray Dataset (lazy); `path` may be a URL (s3://...)."""
    import xarray as xr

    path = Location.of(path)
    if not path.exists():
        raise StoreError(f"no susceptibilities at {path}; run the susceptibilities stage first")
    ds = xr.open_zarr(zarr_store(path, read_only=True), consolidated=False)
    if ds.attrs.get("spectro_partial"):
        raise StoreError(f"{path} is incomplete (its writer stopped before the commit); rerun the "
                         f"susceptibilities stage")
    return ds
