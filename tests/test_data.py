"""Corpora, contexts and probe sets (spectro.data).

Uses the shipped default tokenizer (a real byte-level BPE) and small slices of
the embedded corpus so the file runs in a few seconds.
"""

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer

import spectro
from spectro.data import (
    ContextSet,
    Corpus,
    Document,
    content_hash,
    embedded_corpus,
    load_corpus,
    make_contexts,
    make_probe_set,
    read_hf_dataset,
    read_jsonl,
    read_parquet,
    read_text_files,
)
from spectro.errors import DataError

TOKENIZER_PATH = Path(spectro.__file__).parent / "assets" / "default_model" / "tokenizer.json"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(str(TOKENIZER_PATH))


@pytest.fixture(scope="module")
def small() -> Corpus:
    return embedded_corpus(max_code_files=12, max_prose_topics=12)


def corpus_of(*docs: Document) -> Corpus:
    return Corpus(docs, content_hash(docs), "test corpus")


# --------------------------------------------------------------------------- #
# Embedded corpus
# --------------------------------------------------------------------------- #


def test_embedded_corpus_is_deterministic_and_mixed(small):
    again = embedded_corpus(max_code_files=12, max_prose_topics=12)
    assert again.content_hash == small.content_hash
    assert again.documents == small.documents
    assert len(small.content_hash) == 64
    assert small.sources == ("code", "prose")
    assert sum(d.source == "code" for d in small.documents) == 12
    assert sum(d.source == "prose" for d in small.documents) == 12
    # read from the shipped asset, not the running interpreter (tests/test_corpus_asset.py has the rest)
    assert re.search(r"shipped asset, built from the python \d+\.\d+\.\d+ standard library", small.description)
    assert "12 code files, 12 prose topics" in small.description
    code_names = [d.name for d in small.documents if d.source == "code"]
    assert all(n.endswith(".py") and "__pycache__" not in n for n in code_names)
    assert all(not n.startswith(("test/", "idlelib/", "lib2to3/")) for n in code_names)
    assert all(d.name.startswith("topic:") for d in small.documents if d.source == "prose")
    # a subset is a prefix-stable choice: more files keeps the smaller selection
    bigger = {d.name for d in embedded_corpus(max_code_files=24, max_prose_topics=0).documents}
    assert set(code_names) <= bigger


def test_embedded_splits_are_disjoint_and_cover_everything():
    full = embedded_corpus(max_code_files=60)
    train = embedded_corpus(max_code_files=60, split="train")
    heldout = embedded_corpus(max_code_files=60, split="heldout")
    key = lambda c: {(d.source, d.name) for d in c.documents}  # noqa: E731
    assert key(train) & key(heldout) == set()
    assert key(train) | key(heldout) == key(full)
    assert len(train) + len(heldout) == len(full)
    assert 0.03 < len(heldout) / len(full) < 0.2
    assert "split=heldout" in heldout.description
    assert len({train.content_hash, heldout.content_hash, full.content_hash}) == 3
    with pytest.raises(DataError, match="unknown split 'test'; use one of all, train, heldout"):
        embedded_corpus(split="test")


def test_content_hash_sees_every_field():
    a = Document("code", "a.py", "x = 1\n")
    base = content_hash([a])
    assert content_hash([Document("prose", "a.py", "x = 1\n")]) != base
    assert content_hash([Document("code", "b.py", "x = 1\n")]) != base
    assert content_hash([Document("code", "a.py", "x = 2\n")]) != base
    # field boundaries matter: moving a character between name and text changes the hash
    assert content_hash([Document("code", "ab", "c")]) != content_hash([Document("code", "a", "bc")])


# --------------------------------------------------------------------------- #
# Contexts
# --------------------------------------------------------------------------- #


def test_make_contexts_shapes_and_windows(small, tok):
    ctx = make_contexts(small, tok, seq_len=32, n_contexts=12, seed=3, max_len=256)
    assert ctx.input_ids.shape == (12, 32)
    assert ctx.input_ids.dtype == torch.int64
    assert len(ctx.sources) == len(ctx.doc_names) == len(ctx.offsets) == 12
    assert (ctx.n_contexts, ctx.seq_len) == (12, 32)
    texts = {(d.source, d.name): d.text for d in small.documents}
    for row, src, name, off in zip(ctx.input_ids, ctx.sources, ctx.doc_names, ctx.offsets):
        assert off % 32 == 0
        ids = tok.encode(texts[(src, name)], add_special_tokens=False).ids
        assert len(ids) >= off + 32  # the window lies wholly inside its document
        assert row.tolist() == ids[off : off + 32]


def test_make_contexts_is_deterministic_per_seed(small, tok):
    a = make_contexts(small, tok, 32, 10, seed=7)
    b = make_contexts(small, tok, 32, 10, seed=7)
    c = make_contexts(small, tok, 32, 10, seed=8)
    assert torch.equal(a.input_ids, b.input_ids) and a.offsets == b.offsets and a.doc_names == b.doc_names
    assert list(zip(a.doc_names, a.offsets)) != list(zip(c.doc_names, c.offsets))
    # a draw of k is the first k of a larger draw with the same seed
    big = make_contexts(small, tok, 32, 30, seed=7)
    assert torch.equal(big.input_ids[:10], a.input_ids)


def test_make_contexts_balances_sources(small, tok):
    ctx = make_contexts(small, tok, 32, 10, seed=0)
    assert ctx.sources == ("code", "prose") * 5  # round-robin over sorted source names
    unbalanced = make_contexts(small, tok, 32, 40, seed=0, balance_sources=False)
    assert set(unbalanced.sources) <= {"code", "prose"}


def test_balance_continues_when_a_source_runs_out(tok):
    words = " ".join(f"word{i}" for i in range(400))
    corpus = corpus_of(Document("prose", "short", "one two three four five six seven eight nine ten"),
                       Document("code", "long", words))
    n_prose_windows = len(tok.encode("one two three four five six seven eight nine ten").ids) // 4
    ctx = make_contexts(corpus, tok, 4, n_prose_windows + 6, seed=1)
    assert ctx.sources.count("prose") == n_prose_windows
    assert ctx.sources.count("code") == 6


def test_context_set_checks_its_fields():
    with pytest.raises(DataError, match="has 2 rows but 1 sources"):
        ContextSet(torch.zeros(2, 4, dtype=torch.int64), ("code",), ("a", "b"), (0, 4))
    with pytest.raises(DataError, match="2-D int64"):
        ContextSet(torch.zeros(2, 4), ("code", "code"), ("a", "b"), (0, 4))


def test_exclude_makes_sets_disjoint(small, tok):
    probe = make_contexts(small, tok, 32, 20, seed=0)
    sampling = make_contexts(small, tok, 32, 20, seed=0, exclude=probe)
    used = set(zip(probe.sources, probe.doc_names, probe.offsets))
    assert used.isdisjoint(zip(sampling.sources, sampling.doc_names, sampling.offsets))
    # with a different window length, excluded token ranges still never overlap
    longer = make_contexts(small, tok, 48, 20, seed=0, exclude=probe)
    same_document = 0
    for src, name, off in zip(longer.sources, longer.doc_names, longer.offsets):
        for s2, n2, o2 in used:
            if (s2, n2) == (src, name):
                same_document += 1
                assert off + 48 <= o2 or o2 + 32 <= off
    assert same_document > 0, "no window shares a document with a probe window: nothing was compared"


def test_exclude_can_exhaust_the_corpus(tok):
    corpus = corpus_of(Document("code", "a", " ".join(["x"] * 40)))
    n = len(tok.encode(corpus.documents[0].text).ids) // 8
    everything = make_contexts(corpus, tok, 8, n, seed=0)
    with pytest.raises(DataError, match=r"requested 1 contexts of 8 tokens but the corpus has only 0 after excluding"):
        make_contexts(corpus, tok, 8, 1, seed=0, exclude=everything)


def test_make_contexts_errors(small, tok):
    with pytest.raises(DataError, match="the corpus is empty"):
        make_contexts(corpus_of(), tok, 32, 4, seed=0)
    with pytest.raises(
        DataError, match=r"^context length 4096 exceeds the model's limit of 2048 positions; lower data.seq_len$"
    ):
        make_contexts(small, tok, 4096, 4, seed=0, max_len=2048)
    with pytest.raises(DataError, match="context length 1 is too short"):
        make_contexts(small, tok, 1, 4, seed=0)
    with pytest.raises(DataError, match="n_contexts must be >= 1"):
        make_contexts(small, tok, 32, 0, seed=0)
    corpus = corpus_of(Document("code", "a", " ".join(["x"] * 40)), Document("prose", "b", "hi there"))
    n_code = len(tok.encode(corpus.documents[0].text).ids) // 8
    with pytest.raises(
        DataError,
        match=rf"requested 100 contexts of 8 tokens but the corpus has only {n_code} \(code: {n_code}, prose: 0\); "
        "lower n_contexts or seq_len",
    ):
        make_contexts(corpus, tok, 8, 100, seed=0)


# --------------------------------------------------------------------------- #
# Readers
# --------------------------------------------------------------------------- #


def test_read_text_files(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "docs" / "sub" / "a.txt").write_text("first é", encoding="utf-8")
    (tmp_path / "docs" / "ignored.md").write_text("not text", encoding="utf-8")
    corpus = read_text_files(tmp_path / "docs", source="notes")
    assert [(d.source, d.name, d.text) for d in corpus.documents] == [
        ("notes", "b.txt", "second"),
        ("notes", "sub/a.txt", "first é"),
    ]
    single = read_text_files([str(tmp_path / "docs" / "b.txt")])
    assert single.documents == (Document("text", "b.txt", "second"),)
    with pytest.raises(DataError, match="does not exist"):
        read_text_files(tmp_path / "missing.txt")


def test_read_text_files_rejects_non_utf8(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello \xff world")
    with pytest.raises(DataError, match=r"bad\.txt is not valid UTF-8 \(bad byte 0xff at byte offset 6\)"):
        read_text_files(bad)


def test_read_jsonl_round_trip(tmp_path):
    path = tmp_path / "mix.jsonl"
    rows = [{"text": "def f():\n    return 1\n", "source": "code"}, {"text": "A sentence."}, {"body": "x"}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n", encoding="utf-8")
    corpus = read_jsonl(path)
    assert [(d.source, d.name, d.text) for d in corpus.documents] == [
        ("code", "mix.jsonl:1", rows[0]["text"]),
        ("mix", "mix.jsonl:2", "A sentence."),
    ]
    assert [d.source for d in read_jsonl(path, source="web").documents] == ["web", "web"]
    assert load_corpus({"kind": "jsonl", "path": str(path)}).content_hash == corpus.content_hash

    # raw U+2028 inside a JSON string is one line in JSON Lines, not two
    path.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\r\n", encoding="utf-8")
    assert [d.text for d in read_jsonl(path).documents] == ["a\u2028b"]

    path.write_text(json.dumps(rows[2]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1 has no 'text' field \(keys: \['body'\]\)"):
        read_jsonl(path)
    path.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_jsonl(path)


def test_read_parquet_round_trip(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": ["alpha beta", "gamma"], "source": ["prose", "code"]}), path)
    corpus = read_parquet(path, column="content")
    assert [(d.source, d.name, d.text) for d in corpus.documents] == [
        ("prose", "docs.parquet:0", "alpha beta"),
        ("code", "docs.parquet:1", "gamma"),
    ]
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"text": ["one", None]}), plain)
    with pytest.raises(DataError, match=r"row 1: column 'text' holds NoneType"):
        read_parquet(plain)
    with pytest.raises(DataError, match=r"has no column 'text' \(columns: \['content', 'source'\]\)"):
        read_parquet(path)
    spec = {"kind": "parquet", "path": path, "column": "content", "source": "s"}
    assert {d.source for d in load_corpus(spec).documents} == {"s"}


def test_load_corpus_dispatch_and_errors(tmp_path):
    corpus = load_corpus({"kind": "embedded", "max_code_files": 3, "max_prose_topics": 2, "split": "all"})
    assert len(corpus) == 5
    kinds = "embedded, hf, jsonl, parquet, stdlib, text"
    with pytest.raises(DataError, match=f"unknown corpus kind 'csv'; valid kinds: {kinds}"):
        load_corpus({"kind": "csv", "path": "x.csv"})
    with pytest.raises(DataError, match=r"corpus kind 'jsonl' does not take \['column'\]"):
        load_corpus({"kind": "jsonl", "path": "x.jsonl", "column": "text"})
    with pytest.raises(DataError, match=r"corpus kind 'text' needs \['paths'\]"):
        load_corpus({"kind": "text"})
    with pytest.raises(DataError, match="needs a 'kind' key"):
        load_corpus({"path": "x"})


def test_hf_dataset_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"pip install datasets|could not load dataset 'nope/none'"):
        read_hf_dataset("nope/none")


# --------------------------------------------------------------------------- #
# Probe sets
# --------------------------------------------------------------------------- #


def test_probe_set_rows_match_contexts(small, tok):
    ctx = make_contexts(small, tok, 24, 6, seed=2)
    probe = make_probe_set(ctx, tok)
    assert probe.n_tokens == 6 * 23
    assert probe.token_context.dtype == np.int32 and probe.token_position.dtype == np.int32
    assert probe.token_id.dtype == np.int64
    assert probe.token_context.tolist() == [c for c in range(6) for _ in range(23)]
    assert probe.token_position.tolist() == list(range(1, 24)) * 6
    ids = ctx.input_ids.numpy()
    np.testing.assert_array_equal(probe.token_id, ids[probe.token_context, probe.token_position])
    assert probe.token_source == tuple(ctx.sources[c] for c in probe.token_context)
    assert len(probe.token_text) == probe.n_tokens
    for t in range(0, probe.n_tokens, 7):
        assert probe.token_text[t] == tok.decode([int(probe.token_id[t])])


def test_probe_context_text(tok):
    text = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n" * 3
    corpus = corpus_of(Document("code", "add.py", text))
    ctx = make_contexts(corpus, tok, 16, 2, seed=0)
    probe = make_probe_set(ctx, tok)
    ids = ctx.input_ids[0].tolist()
    left, mid, right = probe.context_text(5, width=3)  # token 5 sits at position 6 of context 0
    assert left == tok.decode(ids[3:6])
    assert mid == tok.decode([ids[6]])
    assert right == tok.decode(ids[7:10])
    assert left + mid + right == tok.decode(ids[3:10])
    assert probe.context_text(0, width=50)[0] == tok.decode(ids[:1])  # clipped at the context start
    with pytest.raises(DataError, match="out of range"):
        probe.context_text(probe.n_tokens)
