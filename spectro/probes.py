"""Labelled probe sets: which contexts' tokens are probed, and what is known
about each token.

    from spectro.probes import build_probe_set
    probe = build_probe_set(probe_config, corpus, tokenizer, seq_len, seed, exclude=sampling_windows)
    probe.labels          # (tokens, labels) bool
    probe.label_names     # ("induction", "induction_first", "closing_bracket", ...)

A probe set is the union of three parts, in this order of contexts:

1. **natural** contexts cut from a corpus (`data.n_probe_contexts` windows of
   `data.probe.corpus`, by default the sampling corpus `data.corpus`);
2. **built-in suites** (`data.probe.suites`) cut from the held-out split of
   the embedded corpus, each chosen to hold many tokens of one known kind;
3. a user's **labelled file** (`data.probe.file`, JSON Lines), whose own
   labels come with it.

Every token of every part is then labelled by the built-in rules
(`RULES`), so a label's positive set is complete across the whole probe set
(a closing bracket in a natural context is a closing bracket too); a file's
labels are added beside them.

Built-in rules, each decided from the token ids and texts alone:

    induction        the token and the 3 tokens before it occurred, in that order, earlier in the context:
                     a copy of an earlier span, predictable by looking back (second occurrence)
    induction_first  a token of a 4-token span that occurs again later in the context (first occurrence)
    closing_bracket  the token's text, spaces removed, starts with ) ] or }
    line_start       the first non-space token of a line: the token before it ends in a line break
                     followed only by spaces or tabs
    digit_run        the token is all digits and the token before it ends with a digit (a number continued)

Suites:

    induction    a held-out window with one of its spans (12-24 tokens, at most half the context) copied later
                 into the same window
    brackets     the held-out windows with the most closing_bracket tokens
    line_start   the held-out windows with the most line_start tokens
    digits       the held-out windows with the most digit_run tokens

Labelled files: one JSON object per line, ``{"text": "...", "spans": [[start,
end, "label"], ...], "tokens": [[index, "label"], ...]}``: ``spans`` are
character offsets into ``text`` (end exclusive) and label every token inside
them; ``tokens`` are indices into the tokenized text (token 0 is the first;
it is never a probe token, having no context). The text is tokenized with the
model's tokenizer and cut to ``seq_len`` tokens; it must have at least that
many. A span boundary inside a token, a token index outside the context, or a
label on token 0 is an error naming the line.

Non-obvious choices:
- The repeat rule looks at 4-token spans: a repeated single token or pair is
  common in code without any copying ("self", " ="), and 4 tokens in the same
  order are rarely repeated by chance.
- Suites read the embedded corpus's held-out split, so a suite's passages are
  text the shipped model was not trained on; they are cut with the same
  `exclude` as the natural part, so no probe window overlaps the SGLD data.
- Suite contexts are chosen deterministically from `seed`; "most tokens of a
  kind" ranks windows by count, ties broken by a seeded permutation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from spectro.config import PROBE_SUITES, DataConfig
from spectro.data import ContextSet, ProbeSet, embedded_corpus, make_contexts, make_probe_set
from spectro.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import tokenizers

REPEAT_SPAN = 4             # tokens that must match, ending at the token, for the induction rule
INDUCTION_SPAN = (12, 24)   # length of the span an induction-suite context repeats


# --------------------------------------------------------------------------- #
# rules: one boolean per token of a (contexts, seq) id matrix
# --------------------------------------------------------------------------- #


def _repeats(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(second, first): (n, seq) bool; second[c, p] when ids[c, p-3..p] occurred earlier in row c, first[c, q]
    when the 4-gram ending at q, or any 4-gram covering q, occurs again later."""
    n, T = ids.shape
    second = np.zeros((n, T), dtype=bool)
    first = np.zeros((n, T), dtype=bool)
    k = REPEAT_SPAN
    for c in range(n):
        seen: dict[tuple, int] = {}
        row = ids[c].tolist()
        for p in range(k - 1, T):
            gram = tuple(row[p - k + 1 : p + 1])
            if gram in seen:
                second[c, p] = True
                q = seen[gram]
                first[c, q - k + 1 : q + 1] = True
            else:
                seen[gram] = p
    return second, first & ~second


def _text_rule(pred: Callable[[str, str], bool]) -> Callable[[np.ndarray, Sequence[Sequence[str]]], np.ndarray]:
    def rule(ids: np.ndarray, texts: Sequence[Sequence[str]]) -> np.ndarray:
        out = np.zeros(ids.shape, dtype=bool)
        for c, row in enumerate(texts):
            for p in range(1, len(row)):
                out[c, p] = pred(row[p - 1], row[p])
        return out
    return rule


def _closing(prev: str, tok: str) -> bool:
    core = tok.replace(" ", "")
    return bool(core) and core[0] in ")]}"


def _line_start(prev: str, tok: str) -> bool:
    if not tok.strip() or "\n" not in prev:
        return False
    return prev.rsplit("\n", 1)[1].strip(" \t") == "" and "\n" not in tok


def _digit_run(prev: str, tok: str) -> bool:
    return tok.isdigit() and bool(prev) and prev[-1].isdigit()


RULE_TEXT = {
    "induction": "the token and the 3 tokens before it occurred, in that order, earlier in the context "
                 "(second occurrence of a repeated span)",
    "induction_first": "a token of a 4-token span that occurs again later in the context (first occurrence)",
    "closing_bracket": "the token's text, spaces removed, starts with ), ] or }",
    "line_start": "the first non-space token of a line (the token before it ends in a line break and indentation)",
    "digit_run": "the token is all digits and the token before it ends with a digit (a number continued)",
}
RULES = tuple(RULE_TEXT)
_TEXT_RULES = {"closing_bracket": _text_rule(_closing), "line_start": _text_rule(_line_start),
               "digit_run": _text_rule(_digit_run)}


def rule_labels(ids: np.ndarray, texts: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
    """Every built-in rule on a (contexts, seq) id matrix with the tokens' texts: {rule: (contexts, seq) bool}."""
    second, first = _repeats(ids)
    out = {"induction": second, "induction_first": first}
    for name, rule in _TEXT_RULES.items():
        out[name] = rule(ids, texts)
    return out


# --------------------------------------------------------------------------- #
# suites
# --------------------------------------------------------------------------- #

SUITES = PROBE_SUITES
_SUITE_RULE = {"brackets": "closing_bracket", "line_start": "line_start", "digits": "digit_run"}


def _decode_rows(ids: np.ndarray, tokenizer: "tokenizers.Tokenizer") -> list[list[str]]:
    vocab = np.unique(ids)
    texts = dict(zip(vocab.tolist(), tokenizer.decode_batch([[int(i)] for i in vocab], skip_special_tokens=False)))
    return [[texts[int(i)] for i in row] for row in ids]


def _induction_suite(pool: ContextSet, n: int, seed: int) -> ContextSet:
    """n windows of the pool, each with one span copied later into itself (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    T = pool.seq_len
    hi = min(INDUCTION_SPAN[1], T // 2)               # short contexts repeat shorter spans
    lo = min(INDUCTION_SPAN[0], hi)
    if hi <= REPEAT_SPAN:
        raise DataError(f"the induction suite needs contexts of at least {2 * REPEAT_SPAN + 2} tokens; raise "
                        f"data.seq_len (got {T}) or drop 'induction' from data.probe.suites")
    ids = pool.input_ids[:n].clone()  # (n, T)
    for r in range(ids.shape[0]):
        L = int(rng.integers(lo, hi + 1))
        s = int(rng.integers(0, T - 2 * L + 1))
        t = int(rng.integers(s + L, T - L + 1))
        ids[r, t : t + L] = ids[r, s : s + L]
    return ContextSet(input_ids=ids, sources=pool.sources[:n], doc_names=tuple(f"induction:{d}" for d in
                                                                             pool.doc_names[:n]),
                      offsets=pool.offsets[:n])


def _richest(pool: ContextSet, counts: np.ndarray, n: int, seed: int, suite: str) -> ContextSet:
    """The n windows of the pool with the most matches (ties broken by a seeded permutation)."""
    order = np.random.default_rng(seed).permutation(len(pool))
    ranked = order[np.argsort(-counts[order], kind="stable")][:n]
    ranked = np.sort(ranked)
    return ContextSet(input_ids=pool.input_ids[torch.from_numpy(ranked)],
                      sources=tuple(pool.sources[i] for i in ranked),
                      doc_names=tuple(f"{suite}:{pool.doc_names[i]}" for i in ranked),
                      offsets=tuple(pool.offsets[i] for i in ranked))


def suite_contexts(suites: Sequence[str], per_suite: int, tokenizer: "tokenizers.Tokenizer", seq_len: int,
                   seed: int, *, max_len: int | None = None, exclude: ContextSet | None = None) -> list[ContextSet]:
    """The contexts of each named suite, from the embedded corpus's held-out split."""
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise DataError(f"unknown probe suite(s) {unknown}; the built-in suites are {', '.join(SUITES)}")
    if not suites or per_suite == 0:
        return []
    held = embedded_corpus(split="heldout")
    # one shuffled draw of held-out windows, cut into one pool per suite, so suites never share a window
    sizes = [per_suite if suite == "induction" else per_suite * 8 for suite in suites]
    draw = make_contexts(held, tokenizer, seq_len, sum(sizes), seed + 101, max_len=max_len, exclude=exclude)
    out, start = [], 0
    for k, (suite, size) in enumerate(zip(suites, sizes)):
        sl = slice(start, start + size)
        pool = ContextSet(input_ids=draw.input_ids[sl], sources=draw.sources[sl], doc_names=draw.doc_names[sl],
                          offsets=draw.offsets[sl])
        start += size
        if suite == "induction":
            out.append(_induction_suite(pool, per_suite, seed + 202 + k))
        else:
            ids = pool.input_ids.numpy()
            counts = _TEXT_RULES[_SUITE_RULE[suite]](ids, _decode_rows(ids, tokenizer)).sum(axis=1)
            out.append(_richest(pool, counts, per_suite, seed + 303 + k, suite))
    return out


# --------------------------------------------------------------------------- #
# a user's labelled file
# --------------------------------------------------------------------------- #


def _file_error(path: Path, line: int, what: str) -> DataError:
    return DataError(f"{path} line {line}: {what}")


def read_labelled_file(path: str | Path, tokenizer: "tokenizers.Tokenizer", seq_len: int
                       ) -> tuple[ContextSet, dict[str, np.ndarray]]:
    """The contexts of a labelled JSON Lines file (module doc) and its labels: {label: (contexts, seq) bool}."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"probe file {p} does not exist; set data.probe.file to a JSON Lines file (spectro.probes)")
    rows, sources, names, labels = [], [], [], {}
    for no, line in enumerate(p.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        rec = _record(p, no, line)
        enc = tokenizer.encode(rec["text"], add_special_tokens=False)
        if len(enc.ids) < seq_len:
            raise _file_error(p, no, f"has {len(enc.ids)} tokens; a probe context needs data.seq_len = {seq_len} "
                                     f"(longer texts are cut to it)")
        row = len(rows)
        for name, tokens in _line_labels(p, no, rec, enc, seq_len).items():
            labels.setdefault(name, {})[row] = tokens
        rows.append(enc.ids[:seq_len])
        sources.append(str(rec.get("source", "file")))
        names.append(f"{p.name}:{no}")
    if not rows:
        raise DataError(f"probe file {p} holds no contexts")
    n = len(rows)
    out = {}
    for name, by_row in labels.items():
        m = np.zeros((n, seq_len), dtype=bool)
        for r, toks in by_row.items():
            m[r, sorted(toks)] = True
        out[name] = m
    ctx = ContextSet(input_ids=torch.tensor(rows, dtype=torch.int64), sources=tuple(sources), doc_names=tuple(names),
                     offsets=(0,) * n)
    return ctx, out


def _record(p: Path, no: int, line: str) -> dict:
    """One line of a labelled file, parsed and checked for its keys."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as err:
        raise _file_error(p, no, f"is not valid JSON ({err.msg})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
        raise _file_error(p, no, 'needs a "text" string, e.g. {"text": "...", "spans": [[0, 4, "name"]]}')
    unknown = sorted(set(rec) - {"text", "spans", "tokens", "source"})
    if unknown:
        raise _file_error(p, no, f"has unknown keys {unknown}; a line holds text, spans, tokens and source")
    return rec


def _line_labels(p: Path, no: int, rec: dict, enc, seq_len: int) -> dict[str, set[int]]:
    """{label: token indices} of one line's spans and tokens, each checked against the tokenized text."""
    marks: dict[str, set[int]] = {}
    for item in rec.get("spans") or []:
        _check_item(p, no, item, 3, "spans", "[start, end, label] with character offsets")
        start, end, name = item
        marks.setdefault(name, set()).update(_span_tokens(p, no, rec["text"], enc, start, end, name, seq_len))
    for item in rec.get("tokens") or []:
        _check_item(p, no, item, 2, "tokens", "[token index, label]")
        t, name = item
        if not 0 <= t < seq_len:
            raise _file_error(p, no, f"token index {t} ({name!r}) is outside the probed tokens 1..{seq_len - 1}")
        marks.setdefault(name, set()).add(t)
    for name, tokens in marks.items():
        if 0 in tokens:
            raise _file_error(p, no, f"label {name!r} is on token 0, which has no context and is not probed")
        if name in RULE_TEXT:
            raise _file_error(p, no, f"label {name!r} is the name of a built-in rule; rename it")
    return marks


def _span_tokens(p: Path, no: int, text: str, enc, start: int, end: int, name: str, seq_len: int) -> list[int]:
    """The tokens a character span [start, end) covers exactly; a span that cuts a token is an error."""
    if not 0 <= start < end <= len(text):
        raise _file_error(p, no, f"span [{start}, {end}) {name!r} is outside the text ({len(text)} characters) "
                                 "or empty")
    inside = []
    for t, (a, b) in enumerate(enc.offsets):
        if a < end and b > start:
            if a < start or b > end:
                raise _file_error(p, no, f"span [{start}, {end}) {name!r} cuts token {t} ({enc.tokens[t]!r} at "
                                         f"characters [{a}, {b})); move the span's ends to token boundaries")
            inside.append(t)
    if not inside:
        raise _file_error(p, no, f"span [{start}, {end}) {name!r} covers no token")
    if max(inside) >= seq_len:
        raise _file_error(p, no, f"span [{start}, {end}) {name!r} reaches token {max(inside)}, beyond the "
                                 f"first data.seq_len = {seq_len} tokens that are probed")
    return inside


def _check_item(path: Path, line: int, item, size: int, key: str, form: str) -> None:
    ok = isinstance(item, list) and len(item) == size and all(isinstance(v, int) for v in item[:-1]) \
        and isinstance(item[-1], str) and item[-1] != ""
    if not ok:
        raise _file_error(path, line, f"{key} entry {item!r} must be {form}")


def count_file_contexts(path: str | Path | None) -> int:
    """Non-blank lines of a labelled file (its contexts), 0 without one."""
    if not path or not Path(path).is_file():
        return 0
    return sum(1 for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip())


def probe_context_count(d: DataConfig) -> int:
    """Probe contexts of a data config: natural windows, suite contexts and the labelled file's lines."""
    return d.n_probe_contexts + len(d.probe.suites) * d.probe.suite_contexts + count_file_contexts(d.probe.file)


# --------------------------------------------------------------------------- #
# the probe set
# --------------------------------------------------------------------------- #


def _concat(parts: list[ContextSet]) -> ContextSet:
    return ContextSet(input_ids=torch.cat([c.input_ids for c in parts]),
                      sources=sum((c.sources for c in parts), ()), doc_names=sum((c.doc_names for c in parts), ()),
                      offsets=sum((c.offsets for c in parts), ()))


def build_probe_set(natural: ContextSet | None, suites: Sequence[ContextSet], file: str | Path | None,
                    tokenizer: "tokenizers.Tokenizer", seq_len: int) -> ProbeSet:
    """The probe set of natural contexts, suite contexts and a labelled file's contexts, every token labelled by
    the built-in rules and the file's own labels."""
    parts = ([natural] if natural is not None and len(natural) else []) + [s for s in suites if len(s)]
    file_labels: dict[str, np.ndarray] = {}
    if file:
        ctx, file_labels = read_labelled_file(file, tokenizer, seq_len)
        parts.append(ctx)
        n_before = sum(len(c) for c in parts[:-1])
        file_labels = {k: np.concatenate([np.zeros((n_before, seq_len), dtype=bool), v]) for k, v in
                       file_labels.items()}
    if not parts:
        raise DataError("the probe set is empty: set data.n_probe_contexts > 0, data.probe.suites or data.probe.file")
    contexts = _concat(parts)
    ids = contexts.input_ids.numpy()
    by_rule = rule_labels(ids, _decode_rows(ids, tokenizer))
    names = list(RULES) + sorted(file_labels)
    rules = [RULE_TEXT[n] for n in RULES] + [f"from {Path(file).name}" for n in sorted(file_labels)]
    per_ctx = [by_rule[n] for n in RULES] + [file_labels[n] for n in sorted(file_labels)]
    labels = np.stack([m[:, 1:].reshape(-1) for m in per_ctx], axis=1) if per_ctx else \
        np.zeros((ids.shape[0] * (seq_len - 1), 0), dtype=bool)           # (tokens, labels)
    return make_probe_set(contexts, tokenizer, labels=labels, label_names=tuple(names), label_rules=tuple(rules))
