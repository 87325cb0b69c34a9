"""The run's location (a local directory or a URL on object storage), its file
names, and the one writer for whole files.

A run's artifacts (config, provenance, samples.zarr, checkpoints,
susceptibilities.zarr, clusters, modes, SAE, report, summary) live under one
`Location`: `storage.uri` when set (`s3://bucket/prefix`, or any URL fsspec
opens, or a plain path), else Hydra's run directory. Everything that writes or
reads run files goes through it; only `spectro.store` turns one into a Zarr
store (`spectro.store.zarr_store`).

Non-obvious choices:
- A `Location` reads like a `pathlib.Path` (`/`, `name`, `exists()`,
  `read_text()`, ...), so a stage is written once for both kinds; a local one
  still uses plain file calls (`path`), a URL one an fsspec file system.
- Commit without rename: object storage has none, but writes an object whole
  (one PUT is atomic), so `write_bytes` is one PUT there; on local disk it is a
  temporary file beside the target and one rename, so a reader never sees
  half a file and a crash leaves the previous version on both.
- Credentials and endpoint are not options here: s3fs/botocore read the AWS
  environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) in every process that
  opens the location, so no secret is written to a config, a store or a Ray
  payload (docs/architecture.md says where actors get them).
- Listings skip fsspec's cache: another process (an actor, a block writer)
  may have added or deleted objects since the last listing.
- A remote failure that is not a missing object (no credentials, endpoint
  down, access denied) is one StoreError naming the location, also in an
  actor, whose constructor then fails with it.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
from pathlib import Path
from typing import Any, Union

from spectro.errors import ConfigError, StoreError

CONFIG = "config.json"
PROVENANCE = "provenance.json"
SAMPLES = "samples.zarr"
CHECKPOINTS = "checkpoints"
SUSCEPTIBILITIES = "susceptibilities.zarr"
CLUSTERS = "clusters.json"
MODES = "modes.json"
SAE = "sae.json"
SAE_DIR = "sae"
REPORT = "report.html"
SUMMARY = "summary.json"
PLAN = "plan.json"
ROUNDS = "rounds.json"


def _split(uri: str) -> tuple[str, str]:
    """(protocol, rest) of a URL; ("", uri) for a plain path. `file://` is a plain path."""
    if "://" not in uri:
        return "", uri
    proto, rest = uri.split("://", 1)
    return ("", rest) if proto == "file" else (proto, rest)


def check_uri(uri: str) -> None:
    """ConfigError unless `uri` is a plain path or a URL whose scheme fsspec knows and can import (no I/O)."""
    import fsspec

    proto, rest = _split(uri)
    if not proto:
        return
    try:
        fsspec.get_filesystem_class(proto)
    except ValueError:
        raise ConfigError(f"storage.uri {uri!r} has the unknown scheme {proto!r}; use s3://bucket/prefix, a local "
                          f"directory, or a URL fsspec opens") from None
    except ImportError as exc:
        raise ConfigError(f"storage.uri {uri!r} needs a package that is not installed ({exc}); install it "
                          f"(e.g. s3fs for s3://) or use another location") from None
    if not rest.strip("/"):
        raise ConfigError(f"storage.uri {uri!r} names no bucket or path; e.g. s3://bucket/run1")


PathLike = Union["Location", Path, str]


class Location:
    """A file or directory of a run: a local path, or a key prefix on a file system fsspec opens."""

    def __init__(self, uri: PathLike, _fs=None, _key: str | None = None):
        uri = str(uri)
        proto, rest = _split(uri)
        self.protocol = proto
        self.local = not proto
        self.path: Path | None = Path(rest) if self.local else None
        self.uri = f"{proto}://{rest.rstrip('/')}" if proto else str(self.path)
        self._fs, self._key = _fs, _key

    @classmethod
    def of(cls, x: PathLike) -> "Location":
        return x if isinstance(x, Location) else cls(x)

    # ---- path-like

    @property
    def fs(self):
        """The fsspec file system (synchronous); a connection failure is a StoreError."""
        if self._fs is None:
            from fsspec.core import url_to_fs
            try:
                self._fs, key = url_to_fs(str(self.path) if self.local else self.uri)
                self._key = self._key or key.rstrip("/")
            except Exception as exc:     # connection refused, bad endpoint, ... (ftp connects here)
                raise StoreError(f"cannot reach {self.uri} ({type(exc).__name__}: {exc}); check the URL and the "
                                 f"endpoint/credentials in the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
                                 f"...)") from None
        return self._fs

    @property
    def key(self) -> str:
        """The path on the file system (`bucket/prefix/...` on S3)."""
        if self._key is None and self._fs is not None:
            self._key = self._fs._strip_protocol(self.uri).rstrip("/")
        elif self._key is None:
            self.fs                                  # sets it from the URL
        return self._key

    def __truediv__(self, name: str) -> "Location":
        if self.local:
            return Location(self.path / name)
        return Location(f"{self.uri}/{name}", self._fs, None if self._key is None else f"{self._key}/{name}")

    @property
    def name(self) -> str:
        return self.path.name if self.local else posixpath.basename(self.uri)

    @property
    def parent(self) -> "Location":
        if self.local:
            return Location(self.path.parent)
        key = None if self._key is None else posixpath.dirname(self._key)
        return Location(self.uri.rsplit("/", 1)[0], self._fs, key)

    def with_name(self, name: str) -> "Location":
        return self.parent / name

    def resolve(self) -> "Location":
        """The absolute location (local paths resolved; a URL is already absolute)."""
        return Location(self.path.resolve()) if self.local else self

    def as_uri(self) -> str:
        """A URL for it: `file://...` for a local path."""
        return self.path.resolve().as_uri() if self.local else self.uri

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __eq__(self, other) -> bool:
        """Equal to a Location with the same URI, and (local ones) to the same `pathlib.Path`."""
        if isinstance(other, Path):
            return self.local and self.path == other
        return isinstance(other, Location) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.path) if self.local else hash(self.uri)

    def __fspath__(self) -> str:
        if not self.local:
            raise TypeError(f"{self.uri} is not a local path")
        return str(self.path)

    # ---- queries

    def _remote(self, op, *args):
        """`op(*args)` on the remote file system, after dropping fsspec's listing cache; a failure other than
        a missing object (no credentials, endpoint down, access denied) is one StoreError naming the location."""
        fs = self.fs
        fs.invalidate_cache()
        try:
            return op(*args)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise StoreError(f"cannot access {self.uri} ({type(exc).__name__}: {exc}); check the endpoint and the "
                             f"credentials in this process's environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
                             f"...)") from None

    def exists(self) -> bool:
        return self.path.exists() if self.local else self._remote(self.fs.exists, self.key)

    def is_dir(self) -> bool:
        """A local directory; on object storage, a prefix with at least one object under it."""
        return self.path.is_dir() if self.local else self._remote(self.fs.isdir, self.key)

    def find(self) -> set[str]:
        """Every file below this directory, as keys relative to it ('' parts joined by '/')."""
        if self.local:
            if not self.path.is_dir():
                return set()
            return {p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()}
        n = len(self.key) + 1
        return {k[n:] for k in self._remote(self.fs.find, self.key)}

    def existing(self, keys) -> set[str]:
        """Which of these keys (relative to this directory) exist: one check each on local disk; on object
        storage one listing per parent directory of the keys (a request per key would cost far more, and
        listing the whole store would read every other unit's chunks too)."""
        keys = set(keys)
        if self.local:
            return {k for k in keys if (self.path / k).is_file()}
        present = set()
        for parent in {posixpath.dirname(k) for k in keys}:
            below = (self / parent).find() if parent else self.find()
            present |= {posixpath.join(parent, k) for k in below if "/" not in k}
        return present & keys

    def rglob(self, pattern: str) -> list["Location"]:
        """Files below this directory whose name matches `pattern` (fnmatch)."""
        import fnmatch
        if self.local:
            return [Location(p) for p in self.path.rglob(pattern) if p.is_file()]
        return [self / k for k in sorted(self.find()) if fnmatch.fnmatch(posixpath.basename(k), pattern)]

    def glob(self, pattern: str) -> list["Location"]:
        """Files directly in this directory whose name matches `pattern`."""
        return [x for x in self.rglob(pattern) if x.parent == self]

    # ---- whole objects

    def read_bytes(self) -> bytes:
        return self.path.read_bytes() if self.local else self._remote(self.fs.cat_file, self.key)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> "Location":
        """Write `data` whole: local, a temporary file beside the target then one rename; object storage,
        one PUT. A reader sees the old object or the new one, never a part."""
        if not self.local:
            self._remote(self.fs.pipe_file, self.key, bytes(data))
            return self
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(data)
            tmp.replace(self.path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return self

    def write_text(self, text: str, encoding: str = "utf-8") -> "Location":
        return self.write_bytes(text.encode(encoding))

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        """Create the directory (local only: object storage has no directories)."""
        if self.local:
            self.path.mkdir(parents=parents, exist_ok=exist_ok)

    def unlink(self, missing_ok: bool = True) -> None:
        if self.local:
            self.path.unlink(missing_ok=missing_ok)
            return
        try:
            self.fs.rm_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def delete(self, keys) -> None:
        """Delete these files below this directory (relative keys); absent ones are skipped."""
        keys = list(keys)
        if self.local:
            for k in keys:
                (self.path / k).unlink(missing_ok=True)
        elif keys:
            gone = [posixpath.join(self.key, k) for k in self.existing(keys)]
            if gone:
                self._remote(self.fs.rm, gone)

    def rmtree(self) -> None:
        """Delete this directory and everything below it; nothing if absent."""
        if self.local:
            import shutil
            shutil.rmtree(self.path, ignore_errors=True)
        elif self.exists():
            self.fs.rm(self.key, recursive=True)

    def check_writable(self) -> None:
        """StoreError unless this location can be written (a small object written and deleted); on object
        storage it names a missing bucket. Call it before any sampling."""
        if self.local:
            return
        try:
            bucket = self.key.split("/", 1)[0]
            if self.protocol in ("s3", "s3a", "gs", "gcs") and not self.fs.exists(bucket):
                raise StoreError(f"storage.uri {self.uri}: the bucket {bucket!r} does not exist (or these "
                                 f"credentials cannot see it); create it or fix storage.uri")
            probe = self / f".spectro-write-check.{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"cannot write to {self.uri} ({type(exc).__name__}: {exc}); check the bucket, "
                             f"AWS_ENDPOINT_URL and the credentials in the environment") from None


def location(x: PathLike) -> Location:
    """`x` (a Location, a Path or a URL string) as a Location."""
    return Location.of(x)


def run_location(uri: str | None, run_dir: PathLike) -> Location:
    """Where a run's artifacts go: `storage.uri` when set, else the (Hydra) run directory."""
    return Location(uri) if uri else Location.of(run_dir)


def clean(obj: Any) -> Any:
    """JSON-ready copy: numpy scalars and arrays to Python, non-finite floats to None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return clean(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_text(path: PathLike, text: str) -> Location:
    """Write `text` (UTF-8) to `path` whole (`Location.write_bytes`: one rename locally, one PUT on object
    storage); returns its Location."""
    return Location.of(path).write_text(text)


def write_json(path: PathLike, obj: Any, *, indent: int | None = 2, allow_nan: bool = False) -> Location:
    """Write `obj` as JSON to `path` whole (`write_text`); non-finite numbers become null unless
    `allow_nan` (then they are written as NaN/Infinity, which Python's json reads back)."""
    return write_text(path, json.dumps(obj if allow_nan else clean(obj), indent=indent, allow_nan=allow_nan))


def read_json(path: PathLike) -> Any:
    return json.loads(Location.of(path).read_text())


def flat_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        path = f"{prefix}{k}"
        va, vb = a.get(k, "<missing>"), b.get(k, "<missing>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += flat_diff(va, vb, path + ".")
        elif va != vb:
            out.append(path)
    return out
