"""Corpora: ordered tuples of documents, each with a provenance label
(``source``) and a stable id (``name``), read from the embedded corpus asset,
the running interpreter's standard library, text files, JSONL, Parquet or a
Hugging Face dataset (``load_corpus`` dispatches on the config's
``data.corpus.kind``). ``spectro.data`` cuts them into token contexts.

Non-obvious choices:

- Content hash: sha256 over every document in order, each of its three fields
  (source, name, text) fed as an 8-byte little-endian length followed by the
  UTF-8 bytes, so that no two different corpora share a byte stream.
- Embedded corpus (kind ``embedded``, the default): read from a data asset
  shipped in ``spectro/assets/corpus/`` (xz-compressed JSON Lines, one object
  per document, made once by ``jobs/build_corpus_asset.py`` from CPython
  3.11.7's standard library), so its documents, content hash and therefore the
  default run's contexts are the same on every Python. The asset's sha256 is
  checked against its manifest on every read and recorded on the corpus
  (``Corpus.asset``) for the run's provenance.
- Live standard library (kind ``stdlib``): the same selection built at run
  time from the running interpreter, so it changes with the Python version
  (the description says which); on 3.11.7 it equals the asset. Code files are
  chosen by the sha256 of their relative path (a stable pseudo-random subset
  that does not favour any package); ``encodings/`` is skipped because its
  codec tables are long, repetitive number tables rather than code anyone
  writes. Prose is ``pydoc_data.topics`` (the language reference sections
  that ``help()`` shows). The embedded corpus selects from the asset by the
  same keys, so ``max_code_files``/``max_prose_topics`` mean the same in both.
- Splits are decided per document by the sha256 of ``source + "\\0" + name``
  (about 1 in 10 is held out), so a document's split does not depend on which
  other documents were selected.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import lzma
import sys
import sysconfig
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
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
    # the shipped asset the documents come from (file, sha256, python), for provenance; None for other corpora
    asset: dict[str, str] | None = field(default=None, compare=False)

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
# The embedded corpus (Python standard library, shipped as a data asset)
# --------------------------------------------------------------------------- #

# The shipped asset: manifest.json (file name, sha256, content hashes), the
# xz-compressed JSON Lines file it names, and the licence of its texts.
CORPUS_ASSET_DIR = Path(__file__).resolve().parent / "assets" / "corpus"
_MANIFEST = "manifest.json"

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
_DEFAULT_CODE_FILES = 400


def is_heldout(source: str, name: str) -> bool:
    """Whether a document goes to the held-out split (about 1 in 10)."""
    return _digest(f"{source}\0{name}") % _HELDOUT_ONE_IN == 0


def _check_selection(max_code_files: int, max_prose_topics: int | None, split: str) -> None:
    if split not in _SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(_SPLITS)}")
    if max_code_files < 0 or (max_prose_topics is not None and max_prose_topics < 0):
        raise DataError("max_code_files and max_prose_topics must be >= 0")


def _first_by_digest(names: Iterable[str], n: int | None) -> set[str]:
    """The ``n`` names with the smallest sha256 key (all of them for None): a stable pseudo-random subset."""
    ranked = sorted(names, key=_digest)
    return set(ranked if n is None else ranked[:n])


def _split(docs: list[Document], split: str, origin: str) -> Corpus:
    """The documents of ``split`` (in their order) as a corpus described by ``origin``."""
    if split != "all":
        want_heldout = split == "heldout"
        docs = [d for d in docs if is_heldout(d.source, d.name) == want_heldout]
    n_code = sum(d.source == "code" for d in docs)
    description = f"{origin}: {n_code} code files, {len(docs) - n_code} prose topics, split={split}"
    return _corpus(docs, description)


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


def stdlib_corpus(
    max_code_files: int = _DEFAULT_CODE_FILES, max_prose_topics: int | None = None, split: str = "all"
) -> Corpus:
    """The embedded corpus built live from the running interpreter's standard library.

    Python source (label "code") plus pydoc topics (label "prose"); deterministic
    for a given Python installation, different between Python versions. On the
    Python the shipped asset was built from it equals ``embedded_corpus``.
    """
    _check_selection(max_code_files, max_prose_topics, split)
    # Code: a stable pseudo-random subset (by hash of the relative path), kept in path order.
    candidates = dict(_stdlib_code_paths())
    chosen = sorted(_first_by_digest(candidates, max_code_files))
    code = []
    for rel in chosen:
        try:
            text = candidates[rel].read_bytes().decode("utf-8")
        except UnicodeDecodeError:  # a stdlib file with a legacy encoding: leave it out
            continue
        code.append(Document("code", rel, text))

    # Prose: the language-reference topics shown by help(), in name order.
    from pydoc_data.topics import topics

    names = sorted(_first_by_digest(topics, max_prose_topics))
    prose = [Document("prose", f"topic:{n}", topics[n]) for n in names]
    version = ".".join(str(v) for v in sys.version_info[:3])
    return _split(code + prose, split, f"stdlib corpus read from the running python {version}")


def read_corpus_asset(directory: str | Path = CORPUS_ASSET_DIR) -> tuple[dict[str, Any], list[Document]]:
    """(manifest, documents) of a corpus asset directory, after checking the file's sha256."""
    directory = Path(directory)
    fix = "reinstall spectro, or rebuild the asset with `python jobs/build_corpus_asset.py` on its Python version"
    try:
        manifest = json.loads((directory / _MANIFEST).read_text(encoding="utf-8"))
        lacking = [k for k in ("file", "sha256", "python") if k not in manifest]
        if lacking:
            raise ValueError(f"{_MANIFEST} has no {lacking}")
        data = (directory / manifest["file"]).read_bytes()
    except (OSError, ValueError, TypeError) as err:
        raise DataError(f"the corpus asset in {directory} cannot be read ({err}); {fix}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest["sha256"]:
        raise DataError(
            f"the corpus asset {directory / manifest['file']} is damaged: its sha256 is {digest[:12]}..., "
            f"its manifest records {str(manifest['sha256'])[:12]}...; {fix}"
        )
    try:
        lines = lzma.decompress(data).decode("utf-8").split("\n")  # "\n" only: JSON strings may hold U+2028
        docs = [Document(r["source"], r["name"], r["text"]) for r in map(json.loads, filter(None, lines))]
    except (lzma.LZMAError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"the corpus asset {directory / manifest['file']} is malformed ({err}); {fix}") from None
    return manifest, docs


def embedded_corpus(
    max_code_files: int = _DEFAULT_CODE_FILES,
    max_prose_topics: int | None = None,
    split: str = "all",
    asset_dir: str | Path | None = None,
) -> Corpus:
    """The default corpus: Python standard-library source (label "code") plus pydoc
    topics (label "prose"), read from the shipped asset, so the same on every Python.

    ``max_code_files`` and ``max_prose_topics`` choose the same documents as
    ``stdlib_corpus`` does on the asset's Python; the asset holds the 400 code
    files of the default. ``split`` picks "all", "train" or "heldout"
    documents (about 10% held out, decided per document). ``asset_dir`` reads
    another asset directory (default: the shipped one).
    """
    _check_selection(max_code_files, max_prose_topics, split)
    directory = Path(asset_dir) if asset_dir is not None else CORPUS_ASSET_DIR
    manifest, docs = read_corpus_asset(directory)
    n_shipped = sum(d.source == "code" for d in docs)
    if max_code_files > n_shipped:
        raise DataError(
            f"the shipped corpus holds {n_shipped} code files, fewer than max_code_files={max_code_files}; "
            "for more, build the corpus from this Python's standard library with data.corpus.kind=stdlib"
        )
    code = _first_by_digest((d.name for d in docs if d.source == "code"), max_code_files)
    topics = _first_by_digest((d.name.removeprefix("topic:") for d in docs if d.source == "prose"), max_prose_topics)
    chosen = [d for d in docs if (d.name in code if d.source == "code" else d.name.removeprefix("topic:") in topics)]
    corpus = _split(chosen, split, f"embedded corpus (shipped asset, built from the python {manifest['python']} "
                                   "standard library)")
    asset = {"file": manifest["file"], "sha256": manifest["sha256"], "python": manifest["python"]}
    return Corpus(corpus.documents, corpus.content_hash, corpus.description, asset=asset)


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
    "stdlib": stdlib_corpus,
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
