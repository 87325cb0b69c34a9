"""Labelled probe sets (spectro.probes) and the known answers a run reports
against them (spectro.known_answers): rules checked on hand-made token rows,
suites deterministic and labelled, a user's labelled file read with its
spans and token indices, and every misaligned label one clear DataError."""

import json

import numpy as np
import pytest

from spectro import probes
from spectro.data import embedded_corpus, make_contexts
from spectro.errors import DataError
from spectro.known_answers import best_cluster, best_f1, effect_sizes, known_answers, readout_auc
from spectro.model import load_model


@pytest.fixture(scope="module")
def tok():
    return load_model("embedded").tokenizer


# --------------------------------------------------------------------------- #
# rules
# --------------------------------------------------------------------------- #


def test_repeat_rule_marks_second_occurrences_of_four_token_spans():
    row = np.array([[5, 6, 7, 8, 9, 1, 2, 5, 6, 7, 8, 9, 3, 6, 7, 8]])
    second, first = probes._repeats(row)
    # 5 6 7 8 recurs at 7..10: its 4th token (10) is the first second-occurrence; 9 at 11 continues the copy
    assert np.flatnonzero(second[0]).tolist() == [10, 11]
    assert np.flatnonzero(first[0]).tolist() == [0, 1, 2, 3, 4]
    # 6 7 8 at 13..15 is only 3 tokens after a mismatch (3 6 7 8 never occurred): not a repeat
    assert not second[0, 13:].any()


@pytest.mark.parametrize("prev, tok, rule, expected", [
    ("foo(x", ")", "closing_bracket", True), ("a", " ]", "closing_bracket", True), ("x", "):", "closing_bracket", True),
    ("x", "(", "closing_bracket", False), ("x", " a)", "closing_bracket", False),
    (":\n    ", "return", "line_start", True), ("\n", " x", "line_start", True), ("\n    ", "   ", "line_start", False),
    ("a\nb", "c", "line_start", False), ("x", "\nfoo", "line_start", False),
    ("12", "34", "digit_run", True), (" 1", "0", "digit_run", True), ("a", "34", "digit_run", False),
    ("12", "3a", "digit_run", False),
])
def test_text_rules(prev, tok, rule, expected):
    out = probes._TEXT_RULES[rule](np.zeros((1, 2), dtype=np.int64), [[prev, tok]])
    assert bool(out[0, 1]) is expected and not out[0, 0]


# --------------------------------------------------------------------------- #
# suites and the probe set
# --------------------------------------------------------------------------- #


def test_suites_are_deterministic_disjoint_and_rich_in_their_label(tok):
    a = probes.suite_contexts(list(probes.SUITES), 6, tok, 48, seed=3)
    b = probes.suite_contexts(list(probes.SUITES), 6, tok, 48, seed=3)
    c = probes.suite_contexts(list(probes.SUITES), 6, tok, 48, seed=4)
    assert [x.input_ids.tolist() for x in a] == [x.input_ids.tolist() for x in b]
    assert [x.input_ids.tolist() for x in a] != [x.input_ids.tolist() for x in c]
    windows = [(n.split(":", 1)[1], o) for s in a for n, o in zip(s.doc_names, s.offsets)]
    assert len(windows) == len(set(windows)) == 24                      # no window in two suites
    held = {d.name for d in embedded_corpus(split="heldout").documents}
    assert all(name in held for name, _ in windows)                     # text the shipped model never trained on
    ps = probes.build_probe_set(None, a, None, tok, 48)
    rate = {name: ps.labels[:, j].reshape(len(probes.SUITES), -1).sum(1) for j, name in enumerate(ps.label_names)}
    assert rate["induction"][0] >= 6 * 5                                 # every induction context holds a copy
    assert rate["closing_bracket"][1] == rate["closing_bracket"].max()   # each suite is richest in its own kind
    assert rate["line_start"][2] == rate["line_start"].max()
    assert rate["digit_run"][3] == rate["digit_run"].max() > 0


def test_induction_suite_copies_a_span_inside_each_window(tok):
    (ind,) = probes.suite_contexts(["induction"], 5, tok, 64, seed=0)
    for row in ind.input_ids.tolist():
        second, _ = probes._repeats(np.array([row]))
        assert second.sum() >= 12 - probes.REPEAT_SPAN + 1


def test_probe_set_puts_natural_then_suites_then_file_and_labels_every_token(tok, tmp_path):
    nat = make_contexts(embedded_corpus(), tok, 32, 4, seed=2)
    suites = probes.suite_contexts(["brackets"], 3, tok, 32, seed=0, exclude=nat)
    text = embedded_corpus(split="heldout").documents[0].text[:4000]
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"text": text, "tokens": [[5, "mine"]]}) + "\n")
    ps = probes.build_probe_set(nat, suites, f, tok, 32)
    assert ps.contexts.n_contexts == 4 + 3 + 1 and ps.n_tokens == 8 * 31
    assert ps.label_names == probes.RULES + ("mine",)
    assert ps.labels.shape == (8 * 31, len(probes.RULES) + 1)
    mine = np.flatnonzero(ps.labels[:, -1])
    assert mine.tolist() == [7 * 31 + 4]                                # token index 5 of the 8th context
    # rules labelled the natural part too: the same rule on the same rows gives the same labels
    again = probes.build_probe_set(nat, [], None, tok, 32)
    assert np.array_equal(again.labels, ps.labels[: 4 * 31, : len(probes.RULES)])


# --------------------------------------------------------------------------- #
# a user's labelled file
# --------------------------------------------------------------------------- #


def _text(tok, n=40):
    text = embedded_corpus(split="heldout").documents[1].text
    assert len(tok.encode(text).ids) > n
    return text


def test_labelled_file_spans_and_tokens(tok, tmp_path):
    text = _text(tok)
    enc = tok.encode(text, add_special_tokens=False)
    a, b = enc.offsets[3][0], enc.offsets[6][1]                          # tokens 3..6 exactly
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"text": text, "spans": [[a, b, "span"]], "tokens": [[9, "one"], [10, "one"]]}) + "\n\n")
    ctx, labels = probes.read_labelled_file(f, tok, 24)
    assert ctx.input_ids.tolist() == [enc.ids[:24]] and ctx.doc_names == ("p.jsonl:1",)
    assert np.flatnonzero(labels["span"][0]).tolist() == [3, 4, 5, 6]
    assert np.flatnonzero(labels["one"][0]).tolist() == [9, 10]


@pytest.mark.parametrize("record, message", [
    ({"text": "short"}, r"line 1: has \d+ tokens; a probe context needs data.seq_len = 24"),
    ({"spans": []}, r'line 1: needs a "text" string'),
    ({"text": "T", "labels": []}, r"line 1: has unknown keys \['labels'\]"),
    ({"text": "T", "spans": [[0, 1]]}, r"spans entry \[0, 1\] must be \[start, end, label\]"),
    ({"text": "T", "spans": [[5, 2, "x"]]}, r"span \[5, 2\) 'x' is outside the text"),
    ({"text": "T", "spans": ["CUT"]}, r"span \[\d+, \d+\) 'cut' cuts token 2"),
    ({"text": "T", "spans": ["FAR"]}, r"reaches token \d+, beyond the first data.seq_len = 24"),
    ({"text": "T", "tokens": [[24, "x"]]}, r"token index 24 \('x'\) is outside the probed tokens 1..23"),
    ({"text": "T", "tokens": [[0, "x"]]}, r"label 'x' is on token 0"),
    ({"text": "T", "tokens": [[3, "induction"]]}, r"label 'induction' is the name of a built-in rule"),
])
def test_bad_label_files_get_one_clear_error(tok, tmp_path, record, message):
    text = _text(tok)
    enc = tok.encode(text, add_special_tokens=False)
    if record.get("text") == "T":
        record["text"] = text
    spans = record.get("spans")
    if spans == ["CUT"]:
        a, b = enc.offsets[2]
        assert b - a >= 2, "token 2 must have two characters to cut"
        record["spans"] = [[a + 1, enc.offsets[4][1], "cut"]]
    elif spans == ["FAR"]:
        record["spans"] = [[enc.offsets[2][0], enc.offsets[30][1], "far"]]
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=message):
        probes.read_labelled_file(f, tok, 24)


def test_not_json_and_missing_file(tok, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "a b c d"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 2: is not valid JSON"):
        probes.read_labelled_file(f, tok, 2)
    with pytest.raises(DataError, match=r"probe file .*nope.jsonl does not exist"):
        probes.read_labelled_file(tmp_path / "nope.jsonl", tok, 2)


# --------------------------------------------------------------------------- #
# known answers on planted data
# --------------------------------------------------------------------------- #


def test_best_cluster_f1_precision_recall_and_ceiling():
    member = np.array([0, 0, 0, 0, 1, 1, -1, -1, 2, 2])
    positive = np.array([1, 1, 1, 0, 0, 0, 1, 0, 0, 0], dtype=bool)
    b = best_cluster(member, positive)
    assert b["cluster"] == 0 and b["size"] == 4
    assert b["precision"] == pytest.approx(0.75) and b["recall"] == pytest.approx(0.75)
    assert b["f1"] == pytest.approx(0.75) and b["ceiling"] == pytest.approx(2 * 4 / 8)


def test_known_answers_find_a_planted_label_and_name_its_component():
    rng = np.random.default_rng(0)
    n_ctx, per = 60, 20
    T = n_ctx * per
    positive = rng.random(T) < 0.15
    chi = rng.normal(size=(T, 6))
    chi[positive, 2] += 3.0                                              # component "c2" responds to the label
    member = np.where(positive, 0, rng.integers(1, 4, T))
    member[rng.random(T) < 0.05] = -1
    context = np.repeat(np.arange(n_ctx), per)
    doc = known_answers(positive[:, None], ["planted"], ["test"], member, chi, chi - chi.mean(1, keepdims=True),
                        [f"c{i}" for i in range(6)], context, {"induction_heads": ["c2"]})
    (e,) = doc["labels"]
    assert e["best_cluster"]["cluster"] == 0 and e["best_cluster"]["f1"] > 0.9
    assert e["shuffled_f1"] < 0.35
    assert e["components"][0]["component"] == "c2" and e["components"][0]["named"] == ["induction"]
    assert e["components"][0]["effect_size"] == pytest.approx(effect_sizes(chi, positive)[2])
    assert e["readout_auc"] > 0.95 and e["readout_f1"] > 0.8
    assert e["readout_auc_half"] is None                                 # no halves given
    # a label with no signal reads at chance
    noise = rng.random(T) < 0.2
    assert abs(readout_auc(chi, noise, context, 0) - 0.5) < 0.1


def test_readout_f1_is_the_best_threshold_and_halves_show_whether_draws_limit_it():
    # by hand: scores 4 > 3 > 2 > 1 with positives at 4 and 2; thresholds 4, 3, 2, 1 give F1 2/3, 1/2, 4/5, 2/3
    assert best_f1(np.array([4.0, 3.0, 2.0, 1.0]), np.array([True, False, True, False])) == pytest.approx(0.8)
    rng = np.random.default_rng(1)
    n_ctx, per = 80, 20
    T = n_ctx * per
    context = np.repeat(np.arange(n_ctx), per)
    positive = rng.random(T) < 0.2
    signal = np.where(positive, 1.0, 0.0)[:, None] * np.array([1.5, 0, 0, 0])
    clean = signal + rng.normal(size=(T, 4))
    # each half of the draws: the same signal with twice the noise variance of the whole
    halves = [signal + rng.normal(size=(T, 4)) * 2.0 for _ in range(2)]
    doc = known_answers(positive[:, None], ["p"], ["test"], np.zeros(T, dtype=np.int64), clean, clean,
                        ["a", "b", "c", "d"], context, features_half=halves)
    (e,) = doc["labels"]
    assert e["readout_auc_half"] < e["readout_auc"] - 0.05              # noise-limited: the halves read it worse
    assert 0.3 < e["readout_f1"] < 0.9
    assert "loss_auc" not in e                                           # no token loss given


def test_token_loss_alone_reads_a_label_of_easy_tokens_and_not_a_label_of_chi():
    rng = np.random.default_rng(2)
    n_ctx, per = 80, 20
    T = n_ctx * per
    context = np.repeat(np.arange(n_ctx), per)
    easy = rng.random(T) < 0.2                                           # predicted well: low loss
    marked = rng.random(T) < 0.2                                         # marked in chi only
    loss = np.where(easy, 0.5, 3.0) + rng.normal(size=T) * 0.3
    chi = rng.normal(size=(T, 4))
    chi[marked, 1] += 2.0
    doc = known_answers(np.c_[easy, marked], ["easy", "marked"], ["", ""], np.zeros(T, dtype=np.int64), chi, chi,
                        list("abcd"), context, token_loss=loss)
    by = {e["label"]: e for e in doc["labels"]}
    assert by["easy"]["loss_auc"] > 0.95 and by["easy"]["loss_f1"] > 0.9
    assert abs(by["marked"]["loss_auc"] - 0.5) < 0.1 and by["marked"]["readout_auc"] > 0.85
    # a token loss with NaN (an estimate without full draws) is not used
    doc = known_answers(easy[:, None], ["easy"], [""], np.zeros(T, dtype=np.int64), chi, chi, list("abcd"), context,
                        token_loss=np.full(T, np.nan))
    assert "loss_auc" not in doc["labels"][0]
