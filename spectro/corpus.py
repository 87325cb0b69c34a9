"""Corpora: ordered tuples of documents, each with a provenance label
(``source``) and a stable id (``name``), read from the embedded standard
library, text files, JSONL, Parquet or a Hugging Face dataset
(``load_corpus`` dispatches on the config's ``data.corpus.kind``).
``spectro.data`` cuts them into token contexts.

Non-obvious choices:

- Content hash: sha256 over every document in order, each of its three fields
  (source, name, text) fed as an 8-byte little-endian length followed by the
  UTF-8 bytes, so that no two different corpora share a byte stream.
- Embedded corpus: built at run time from the running interpreter's standard
  library, so it changes with the Python version (the description says which).
  Code files are chosen by the sha256 of their relative path (a stable
  pseudo-random subset that does not favour any package); ``encodings/`` is
  skipped because its codec tables are long, repetitive number tables rather
  than code anyone writes. Prose is ``pydoc_data.topics`` (the language
  reference sections that ``help()`` shows).
- Splits are decided per document by the sha256 of ``source + "\\0" + name``
  (about 1 in 10 is held out), so a document's split does not depend on which
  other documents were selected.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
import sysconfig
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spectro.errors import DataError


# --------------------------------------------------------------------------- #
# Documents and corpora
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Document:
    source: str  # provenance label, e.g. "code", "prose"
    name: str  # stable id inside the source, e.g. "json/decoder.py" or "topic:assert"
    text: str


@dataclass(frozen=True)
class Corpus:
    documents: tuple[Document, ...]
    content_hash: str  # sha256 hex over (source, name, text) of every doc, in order
    description: str

    def __len__(self) -> int:
        return len(self.documents)

    @property
    def sources(self) -> tuple[str, ...]:
        """Sorted distinct source labels."""
        return tuple(sorted({d.source for d in self.documents}))


def content_hash(documents: Iterable[Document]) -> str:
    """sha256 hex over (source, name, text) of every document, in order."""
    h = hashlib.sha256()
    for doc in documents:
        for part in (doc.source, doc.name, doc.text):
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def _corpus(documents: Iterable[Document], description: str) -> Corpus:
    docs = tuple(documents)
    return Corpus(documents=docs, content_hash=content_hash(docs), description=description)


def _digest(text: str) -> int:
    """First 8 bytes of sha256(text) as an integer: a stable pseudo-random key."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


# --------------------------------------------------------------------------- #
# The embedded corpus (Python standard library)
# --------------------------------------------------------------------------- #

# Directories (any path component) whose files are not taken as code documents.
_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "__pycache__",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "encodings",
        "pydoc_data",  # the prose, taken separately
    }
)
_MAX_CODE_BYTES = 200_000
_HELDOUT_ONE_IN = 10
_SPLITS = ("all", "train", "heldout")


def is_heldout(source: str, name: str) -> bool:
    """Whether a document goes to the held-out split (about 1 in 10)."""
    return _digest(f"{source}\0{name}") % _HELDOUT_ONE_IN == 0


def _stdlib_code_paths() -> list[tuple[str, Path]]:
    """(relative posix path, absolute path) of every eligible stdlib .py file, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if set(rel.parts[:-1]) & _SKIP_DIRS or rel.name.startswith("test_"):
            continue
        if path.stat().st_size > _MAX_CODE_BYTES:
            continue
        found.append((rel.as_posix(), path))
    found.sort()
    return found


def embedded_corpus(
    max_code_files: int = 400, max_prose_topics: int | None = None, split: str = "all"
) -> Corpus:
    """Python standard-library source (label "code") plus pydoc topics (label "prose").

    Deterministic for a given Python installation. ``split`` picks "all",
    "train" or "heldout" documents (about 10% held out, decided per document).
    """
    if split not in _SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(_SPLITS)}")
    if max_code_files < 0 or (max_prose_topics is not None and max_prose_topics < 0):
        raise DataError("max_code_files and max_prose_topics must be >= 0")

    # Code: a stable pseudo-random subset (by hash of the relative path), kept in path order.
    candidates = _stdlib_code_paths()
    chosen = sorted(sorted(candidates, key=lambda rp: _digest(rp[0]))[:max_code_files])
    code = []
    for rel, path in chosen:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:  # a stdlib file with a legacy encoding: leave it out
            continue
        code.append(Document("code", rel, text))

    # Prose: the language-reference topics shown by help(), in name order.
    from pydoc_data.topics import topics

    names = sorted(topics)
    if max_prose_topics is not None:
        names = sorted(sorted(names, key=_digest)[:max_prose_topics])
    prose = [Document("prose", f"topic:{n}", topics[n]) for n in names]

    docs = code + prose
    if split != "all":
        want_heldout = split == "heldout"
        docs = [d for d in docs if is_heldout(d.source, d.name) == want_heldout]
    n_code = sum(d.source == "code" for d in docs)
    version = ".".join(str(v) for v in sys.version_info[:3])
    description = (
        f"embedded stdlib corpus (python {version}): {n_code} code files, "
        f"{len(docs) - n_code} prose topics, split={split}"
    )
    return _corpus(docs, description)


# --------------------------------------------------------------------------- #
# Readers for user data
# --------------------------------------------------------------------------- #


def _decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{where} is not valid UTF-8 (bad byte 0x{data[err.start]:02x} at byte offset "
            f"{err.start}); convert it to UTF-8, e.g. `iconv -f latin1 -t utf-8`"
        ) from None


def read_text_files(paths: str | Path | Iterable[str | Path], source: str = "text") -> Corpus:
    """One document per .txt file; a directory contributes its .txt files (recursively).

    Names are the file name for files given directly and the path relative to
    the directory for directory members.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    named: list[tuple[str, Path]] = []
    for given in paths:
        p = Path(given)
        if p.is_dir():
            members = sorted(q for q in p.rglob("*.txt") if q.is_file())
            if not members:
                raise DataError(f"directory {p} has no .txt files; point data at .txt files")
            named.extend((q.relative_to(p).as_posix(), q) for q in members)
        elif p.is_file():
            named.append((p.name, p))
        else:
            raise DataError(f"text file {p} does not exist; check the path")
    if not named:
        raise DataError("no text files given; pass at least one .txt file or directory")
    seen: dict[str, Path] = {}
    for name, p in named:
        if name in seen:
            raise DataError(
                f"two text files share the name {name!r} ({seen[name]} and {p}); "
                "pass their common directory instead so names stay unique"
            )
        seen[name] = p
    docs = [Document(source, name, _decode_utf8(p.read_bytes(), f"text file {p}")) for name, p in named]
    return _corpus(docs, f"{len(docs)} text files (source {source!r})")


def read_jsonl(path: str | Path, field: str = "text", source: str | None = None) -> Corpus:
    """One document per non-blank line of a JSON Lines file.

    Source label: ``source`` if given; otherwise the line's own "source" key if
    present; otherwise the file stem. Names are "<file name>:<line number>".
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"jsonl file {p} does not exist; check the path")
    text = _decode_utf8(p.read_bytes(), f"jsonl file {p}")
    docs = []
    # split on "\n" only: str.splitlines would also split inside JSON strings holding U+2028
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{p} line {line_no} is not valid JSON ({err.msg}); fix or remove it") from None
        if not isinstance(record, dict) or field not in record:
            keys = sorted(record) if isinstance(record, dict) else []
            raise DataError(
                f"{p} line {line_no} has no {field!r} field (keys: {keys}); "
                f"set the field name with field=..."
            )
        value = record[field]
        if not isinstance(value, str):
            raise DataError(f"{p} line {line_no}: field {field!r} is {type(value).__name__}, expected a string")
        label = source if source is not None else str(record.get("source", p.stem))
        docs.append(Document(label, f"{p.name}:{line_no}", value))
    return _corpus(docs, f"{len(docs)} documents from {p.name} (field {field!r})")


def read_parquet(path: str | Path, column: str = "text", source: str | None = None) -> Corpus:
    """One document per row of a Parquet file.

    Source label: ``source`` if given; otherwise the row's "source" column if
    the file has one; otherwise the file stem. Names are "<file name>:<row>".
    """
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise DataError(f"parquet file {p} does not exist; check the path")
    try:
        schema = pq.read_schema(p)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise DataError(f"cannot read {p} as Parquet ({err}); check the file") from None
    if column not in schema.names:
        raise DataError(f"{p} has no column {column!r} (columns: {schema.names}); set column=...")
    use_source_column = source is None and "source" in schema.names
    table = pq.read_table(p, columns=[column, "source"] if use_source_column else [column])
    texts = table.column(column).to_pylist()
    labels = table.column("source").to_pylist() if use_source_column else [source or p.stem] * len(texts)
    docs = []
    for row, (value, label) in enumerate(zip(texts, labels)):
        if not isinstance(value, str):
            raise DataError(
                f"{p} row {row}: column {column!r} holds {type(value).__name__}, expected a string; "
                "drop null or non-text rows"
            )
        docs.append(Document(str(label), f"{p.name}:{row}", value))
    return _corpus(docs, f"{len(docs)} documents from {p.name} (column {column!r})")


def read_hf_dataset(
    name: str,
    split: str = "train",
    field: str = "text",
    revision: str | None = None,
    max_documents: int = 1000,
) -> Corpus:
    """The first ``max_documents`` records of a Hugging Face dataset (streamed)."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            "reading a Hugging Face dataset needs the `datasets` package; "
            "`pip install datasets`, or export the data to jsonl/parquet and use kind 'jsonl'/'parquet'"
        ) from None
    try:
        stream = datasets.load_dataset(name, split=split, revision=revision, streaming=True)
        records = []
        for record in stream:
            if len(records) >= max_documents:
                break
            records.append(record)
    except Exception as err:  # network, auth, missing dataset: all surface the same way
        raise DataError(
            f"could not load dataset {name!r} (split {split!r}) from the Hugging Face hub: {err}. "
            "If this machine is offline, export the data to jsonl/parquet and use kind 'jsonl'/'parquet'"
        ) from None
    docs = []
    for i, record in enumerate(records):
        if field not in record or not isinstance(record[field], str):
            raise DataError(f"dataset {name!r} record {i} has no text field {field!r}; set field=...")
        docs.append(Document(name, f"{split}:{i}", record[field]))
    rev = f"@{revision}" if revision else ""
    return _corpus(docs, f"{len(docs)} documents from hf dataset {name}{rev} (split {split!r})")


_KINDS = {
    "embedded": embedded_corpus,
    "text": read_text_files,
    "jsonl": read_jsonl,
    "parquet": read_parquet,
    "hf": read_hf_dataset,
}


def load_corpus(spec: Mapping[str, Any]) -> Corpus:
    """Build a corpus from ``{"kind": ..., **kwargs}``; kwargs go to the matching reader."""
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise DataError(f"a corpus spec needs a 'kind' key, one of {sorted(_KINDS)}; got {spec!r}")
    kind = spec["kind"]
    if kind not in _KINDS:
        raise DataError(f"unknown corpus kind {kind!r}; valid kinds: {', '.join(sorted(_KINDS))}")
    reader = _KINDS[kind]
    kwargs = {k: v for k, v in spec.items() if k != "kind"}
    params = inspect.signature(reader).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise DataError(f"corpus kind {kind!r} does not take {unknown}; it takes {list(params)}")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise DataError(f"corpus kind {kind!r} needs {missing}")
    return reader(**kwargs)
