"""Fixed-length token contexts and probe sets, cut from a corpus
(``spectro.corpus``).

``make_contexts`` cuts tokenized documents into windows; ``make_probe_set``
turns every position >= 1 of every window into one probe token (x, y) with
its provenance kept for the report. The corpus names are re-exported here
(``from spectro.data import load_corpus`` keeps working).

Non-obvious choices:

- Windows are non-overlapping and aligned at multiples of ``seq_len`` inside
  each document; the short tail is dropped. With ``balance_sources`` each
  source's windows are shuffled once and then taken round-robin over sorted
  source names (a source that runs out is skipped), so the first k contexts
  of a larger draw with the same seed equal a draw of k contexts.
- ``exclude`` drops every window that overlaps an excluded window of the same
  document (same source and name), which for equal ``seq_len`` means the same
  offset, and for different ``seq_len`` still guarantees disjoint tokens.
- Documents are tokenized without special tokens; a window never crosses a
  document boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from spectro.corpus import (Corpus, Document, content_hash, embedded_corpus, is_heldout, load_corpus,
                            read_hf_dataset, read_jsonl, read_parquet, read_text_files, stdlib_corpus)
from spectro.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import tokenizers

__all__ = ["ContextSet", "Corpus", "Document", "ProbeSet", "content_hash", "embedded_corpus", "is_heldout",
           "load_corpus", "make_contexts", "make_probe_set", "read_hf_dataset", "read_jsonl", "read_parquet",
           "read_text_files", "stdlib_corpus"]


# --------------------------------------------------------------------------- #
# Contexts
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class ContextSet:
    input_ids: torch.Tensor  # (n_contexts, seq_len) int64
    sources: tuple[str, ...]  # per context
    doc_names: tuple[str, ...]  # per context
    offsets: tuple[int, ...]  # per context: token offset of the window inside its document

    def __post_init__(self) -> None:
        ids = self.input_ids
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.dtype != torch.int64:
            raise DataError("ContextSet.input_ids must be a 2-D int64 tensor (n_contexts, seq_len)")
        n = ids.shape[0]
        if not len(self.sources) == len(self.doc_names) == len(self.offsets) == n:
            raise DataError(
                f"ContextSet has {n} rows but {len(self.sources)} sources, {len(self.doc_names)} doc_names "
                f"and {len(self.offsets)} offsets; they must match one per context"
            )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_contexts(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]


def _take_round_robin(per_source: list[np.ndarray], n: int) -> list[tuple[int, int]]:
    """(source index, position in its shuffled list) for n picks, cycling over sources."""
    picks: list[tuple[int, int]] = []
    depth = 0
    while len(picks) < n:
        for s, order in enumerate(per_source):
            if depth < len(order) and len(picks) < n:
                picks.append((s, int(order[depth])))
        depth += 1
    return picks


_TOKENIZED: dict[tuple[str, str], list[list[int]]] = {}
_TOKENIZED_KEEP = 4


def token_ids(corpus: Corpus, tokenizer: "tokenizers.Tokenizer") -> list[list[int]]:
    """Every document's token ids (no special tokens), cached per (corpus content, tokenizer): a run cuts the
    SGLD pool, the sampling set and the probe contexts from one tokenization instead of three."""
    import hashlib

    key = (corpus.content_hash, hashlib.sha256(tokenizer.to_str().encode()).hexdigest())
    if key not in _TOKENIZED:
        while len(_TOKENIZED) >= _TOKENIZED_KEEP:
            _TOKENIZED.pop(next(iter(_TOKENIZED)))
        encs = tokenizer.encode_batch([d.text for d in corpus.documents], add_special_tokens=False)
        _TOKENIZED[key] = [e.ids for e in encs]
    return _TOKENIZED[key]


def _windows(corpus: Corpus, encodings: list[list[int]], seq_len: int,
             exclude: ContextSet | None) -> dict[str, list[tuple[int, int]]]:
    """Every available window (doc index, offset), grouped by source, in corpus order: consecutive `seq_len`
    windows of each document's token ids that overlap no window of `exclude`."""
    excluded: dict[tuple[str, str], list[tuple[int, int]]] = {}      # excluded token ranges, per document
    if exclude is not None:
        ex_len = exclude.input_ids.shape[1]
        for src, name, off in zip(exclude.sources, exclude.doc_names, exclude.offsets):
            excluded.setdefault((src, name), []).append((off, off + ex_len))
    windows: dict[str, list[tuple[int, int]]] = {s: [] for s in corpus.sources}
    for i, (doc, ids) in enumerate(zip(corpus.documents, encodings)):
        blocked = excluded.get((doc.source, doc.name), [])
        for off in range(0, len(ids) - seq_len + 1, seq_len):
            if not any(off < end and start < off + seq_len for start, end in blocked):
                windows[doc.source].append((i, off))
    return windows


def make_contexts(
    corpus: Corpus,
    tokenizer: "tokenizers.Tokenizer",
    seq_len: int,
    n_contexts: int,
    seed: int,
    *,
    max_len: int | None = None,
    exclude: ContextSet | None = None,
    balance_sources: bool = True,
) -> ContextSet:
    """Pick ``n_contexts`` non-overlapping ``seq_len``-token windows, deterministically for a seed."""
    if not corpus.documents:
        raise DataError(f"the corpus is empty ({corpus.description}); point data at a non-empty corpus")
    if seq_len < 2:
        raise DataError(f"context length {seq_len} is too short: a probe token needs at least 2 tokens; "
                        f"raise data.seq_len")
    if max_len is not None and seq_len > max_len:
        raise DataError(
            f"context length {seq_len} exceeds the model's limit of {max_len} positions; lower data.seq_len"
        )
    if n_contexts < 1:
        raise DataError(f"n_contexts must be >= 1, got {n_contexts}")

    encodings = token_ids(corpus, tokenizer)
    sources = corpus.sources
    windows = _windows(corpus, encodings, seq_len, exclude)
    total = sum(len(w) for w in windows.values())
    if total < n_contexts:
        per = ", ".join(f"{s}: {len(windows[s])}" for s in sources)
        excl = " after excluding already-used windows" if exclude is not None else ""
        raise DataError(
            f"requested {n_contexts} contexts of {seq_len} tokens but the corpus has only {total}{excl} "
            f"({per}); lower n_contexts or seq_len, or use a larger corpus"
        )

    rng = np.random.default_rng(seed)
    if balance_sources:
        per_source = [rng.permutation(len(windows[s])) for s in sources]
        chosen = [windows[sources[s]][j] for s, j in _take_round_robin(per_source, n_contexts)]
    else:
        flat = [w for s in sources for w in windows[s]]
        chosen = [flat[j] for j in rng.choice(len(flat), size=n_contexts, replace=False)]

    input_ids = torch.tensor(
        [encodings[i][off : off + seq_len] for i, off in chosen], dtype=torch.int64
    )  # (n_contexts, seq_len)
    return ContextSet(
        input_ids=input_ids,
        sources=tuple(corpus.documents[i].source for i, _ in chosen),
        doc_names=tuple(corpus.documents[i].name for i, _ in chosen),
        offsets=tuple(off for _, off in chosen),
    )


# --------------------------------------------------------------------------- #
# Probe sets
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class ProbeSet:
    contexts: ContextSet
    # one row per probe token (x, y): every position >= 1 of every context, context-major
    token_context: np.ndarray  # (n_tokens,) int32 index into contexts
    token_position: np.ndarray  # (n_tokens,) int32 position of y in its context (1..seq_len-1)
    token_id: np.ndarray  # (n_tokens,) int64 id of y
    token_text: tuple[str, ...]  # decoded text of y alone
    token_source: tuple[str, ...]
    # Kept only to decode display snippets in context_text; not part of equality.
    tokenizer: Any = field(default=None, repr=False, compare=False)
    # what is known about each token (spectro.probes): (n_tokens, n_labels) bool, the labels' names and rules
    labels: np.ndarray | None = field(default=None, repr=False, compare=False)
    label_names: tuple[str, ...] = ()
    label_rules: tuple[str, ...] = ()

    @property
    def n_tokens(self) -> int:
        return int(self.token_id.shape[0])

    def context_text(self, token: int, width: int = 20) -> tuple[str, str, str]:
        """(left text, token text, right text) around probe token ``token``, ``width`` tokens each side."""
        if not 0 <= token < self.n_tokens:
            raise DataError(f"probe token {token} is out of range; the probe set has {self.n_tokens} tokens")
        if self.tokenizer is None:
            raise DataError("this probe set has no tokenizer attached; "
                            "build it with make_probe_set(contexts, tokenizer)")
        ids = self.contexts.input_ids[int(self.token_context[token])].tolist()  # (seq_len,)
        pos = int(self.token_position[token])
        left = self.tokenizer.decode(ids[max(0, pos - width) : pos], skip_special_tokens=False)
        right = self.tokenizer.decode(ids[pos + 1 : pos + 1 + width], skip_special_tokens=False)
        return left, self.token_text[token], right


def make_probe_set(contexts: ContextSet, tokenizer: "tokenizers.Tokenizer", *, labels: np.ndarray | None = None,
                   label_names: tuple[str, ...] = (), label_rules: tuple[str, ...] = ()) -> ProbeSet:
    """Every position >= 1 of every context as a probe token, context-major; `labels` (tokens, len(label_names))
    bool says what is known about each token (spectro.probes builds them)."""
    n_ctx, seq_len = contexts.input_ids.shape
    if n_ctx == 0 or seq_len < 2:
        raise DataError(f"a probe set needs >= 1 context of >= 2 tokens; got {n_ctx} of {seq_len}")
    n_tokens = n_ctx * (seq_len - 1)
    if labels is None:
        labels = np.zeros((n_tokens, 0), dtype=bool)
    if labels.shape != (n_tokens, len(label_names)) or len(label_rules) != len(label_names):
        raise DataError(f"labels of shape {labels.shape} with {len(label_names)} names and {len(label_rules)} rules "
                        f"do not fit {n_tokens} probe tokens")
    token_context = np.repeat(np.arange(n_ctx, dtype=np.int32), seq_len - 1)  # (n_tokens,)
    token_position = np.tile(np.arange(1, seq_len, dtype=np.int32), n_ctx)  # (n_tokens,)
    token_id = contexts.input_ids[:, 1:].reshape(-1).numpy().astype(np.int64)  # (n_tokens,)
    unique_ids = np.unique(token_id)
    texts = tokenizer.decode_batch([[int(i)] for i in unique_ids], skip_special_tokens=False)
    text_of = dict(zip(unique_ids.tolist(), texts))
    return ProbeSet(
        contexts=contexts,
        token_context=token_context,
        token_position=token_position,
        token_id=token_id,
        token_text=tuple(text_of[i] for i in token_id.tolist()),
        token_source=tuple(contexts.sources[c] for c in token_context.tolist()),
        tokenizer=tokenizer,
        labels=labels.astype(bool),
        label_names=tuple(label_names),
        label_rules=tuple(label_rules),
    )
