"""The run's stores, and the only place that touches Zarr.

    samples            `samples.zarr`: the per-draw losses of every chain, progress, the probe table
    susceptibilities   `susceptibilities.zarr`: chi and its diagnostics, and its reader

The public names are re-exported here (`from spectro.store import SampleStore`).
"""

from spectro.store.samples import (DISK_FULL, MOMENT_ARRAYS, PROBE_ARRAYS, PROBE_MODES, STATE_ARRAYS, STORE_FORMAT,
                                   TRACE_ARRAYS, UNIT_ARRAYS, Layout, ProbeTable, SampleStore, confined, disk_full,
                                   zarr_store, zarr_version)
from spectro.store.layout import shard_contexts
from spectro.store.susceptibilities import DIAGNOSTICS, PROBE_COORDS, SusceptibilityStore, read_susceptibilities

__all__ = ["DIAGNOSTICS", "DISK_FULL", "MOMENT_ARRAYS", "PROBE_ARRAYS", "PROBE_COORDS", "PROBE_MODES", "STATE_ARRAYS",
           "STORE_FORMAT", "TRACE_ARRAYS", "UNIT_ARRAYS", "Layout", "ProbeTable", "SampleStore", "SusceptibilityStore",
           "confined", "disk_full", "shard_contexts", "read_susceptibilities", "zarr_store", "zarr_version"]
