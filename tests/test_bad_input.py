"""Bad input, hostile files and numerics under stress.

End to end through `spectro.cli.main` (what `jobs/run.py` calls): every bad
input is one line `spectro: error: ...` naming what is wrong, exit code 2,
before any work, and the run directory it would have created is gone.
Property-based (hypothesis) where a whole input space fits: config values,
corpus bytes, SGLD hyperparameters at their edges. Hostile stores and
checkpoints are refused with a message and never executed or read as data;
names from configs or stores cannot write outside the run directory.
"""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spectro import cli
from spectro.config import to_config
from spectro.errors import (ComponentError, ConfigError, DataError, DivergenceError, StoreError,
                            UnsafePathError)
from spectro.store import SampleStore, confined
from tests.helpers import WritesAFile, compose_cfg, make_store, malicious_bin, tiny_config, tiny_problem
from tests.pythia_fixture import TINY_CONFIG, make_tiny_checkpoint

WORDS = "the cat sat on a mat the dog ran on a mat a cat ran the dog sat".split()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny local model, a good corpus, and bad variants of both."""
    root = tmp_path_factory.mktemp("inputs")
    good = make_tiny_checkpoint(root / "model")
    no_tok = make_tiny_checkpoint(root / "no_tokenizer")
    (no_tok / "tokenizer.json").unlink()
    big_tok = make_tiny_checkpoint(root / "big_tokenizer", vocab_words=[f"w{i}" for i in range(98)] + ["[UNK]", "<|endoftext|>"])
    mismatched = make_tiny_checkpoint(root / "mismatched")
    (mismatched / "config.json").write_text(json.dumps({**TINY_CONFIG, "intermediate_size": 128}))
    truncated = make_tiny_checkpoint(root / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    hostile = make_tiny_checkpoint(root / "hostile", weights="none")
    malicious_bin(hostile / "pytorch_model.bin", root / "pwned.txt")
    corpus = root / "corpus.txt"
    corpus.write_text(" ".join(WORDS * 400))                # one token per word: len(WORDS) * 50 windows of 8
    tiny = root / "tiny.txt"
    tiny.write_text("the cat sat")
    latin1 = root / "latin1.txt"
    latin1.write_bytes("the café sat".encode("latin-1"))
    badjson = root / "bad.jsonl"
    badjson.write_text('{"text": "the cat"}\n{"text": "the dog" \n')
    return {"GOOD": good, "NOTOK": no_tok, "BIGTOK": big_tok, "MISMATCHED": mismatched, "TRUNCATED": truncated,
            "NTRAIN": len(WORDS) * 50 - 4 - 1,             # leaves 1 window for the 4 probe contexts
            "HOSTILE": hostile, "CORPUS": corpus, "TINY": tiny, "LATIN1": latin1, "BADJSON": badjson, "ROOT": root}


BASE = ["model=local", "model.source=GOOD", "data=files", "data.corpus.paths=[CORPUS]", "data.seq_len=8",
        "data.n_train_contexts=16", "data.n_sampling_contexts=4", "data.n_probe_contexts=4",
        "sampler.batch_size=4", "components=[l0h1]"]


def with_base(*overrides):
    """BASE with some keys replaced (same key later wins in Hydra, but keep it explicit)."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [o for o in BASE if o.split("=", 1)[0] not in keys] + list(overrides)


@pytest.mark.parametrize("overrides, message", [
    # model directory: missing, mismatched, corrupted, hostile files
    (with_base("model.source=NOTOK"), r"has no tokenizer\.json"),
    (with_base("model.source=BIGTOK"), r"tokenizer\.json .* has 100 tokens but the model's embedding has only "
                                       r"vocab_size=64 rows.*Use the tokenizer that belongs to this checkpoint"),
    (with_base("model.source=MISMATCHED"), r"weight shapes .* do not match its config\.json.*dense_h_to_4h"),
    (with_base("model.source=TRUNCATED"), r"model\.safetensors is not a readable safetensors file"),
    (with_base("model.source=HOSTILE"), r"refused to load .*pytorch_model\.bin.*unpickling can run arbitrary code"),
    # components: duplicates (also through a group), unknown, a path
    (with_base("components=[heads,l0h1]"), r"\['l0h1'\] requested more than once"),
    (with_base("components=[l0h1,l0h1]"), r"components lists \['l0h1'\] more than once"),
    (with_base("components=['../../../tmp/evil']"), r"unknown component '\.\./\.\./\.\./tmp/evil'"),
    # corpora: too small, non-UTF-8, malformed, unknown kind; contexts longer than the model allows
    (with_base("data.corpus.paths=[TINY]"), r"requested 16 contexts of 8 tokens but the corpus has only 0"),
    (with_base("data.n_train_contexts=NTRAIN"), r"requested 4 contexts of 8 tokens but the corpus has only 1 after "
                                                r"excluding already-used windows"),
    (with_base("data.corpus.paths=[LATIN1]"), r"latin1\.txt is not valid UTF-8 \(bad byte 0xe9 at byte offset 7\)"),
    (with_base("data.corpus.kind=jsonl", "~data.corpus.paths", "+data.corpus.path=BADJSON"),
     r"bad\.jsonl line 2 is not valid JSON"),
    (with_base("data.corpus.kind=csv"),
     r"unknown corpus kind 'csv'; valid kinds: embedded, hf, jsonl, parquet, stdlib, text"),
    (with_base("data.seq_len=65"), r"context length 65 exceeds the model's limit of 64 positions"),
    # malformed values
    (with_base("sampler.num_chains=many"), r"invalid config at 'sampler\.num_chains': Value 'many' of type 'str' "
                                           r"could not be converted to Integer$"),
    (with_base("sampler.step_size=inf"), r"sampler\.step_size must be a positive finite number \(got inf\)"),
    (with_base("sampler.gamma=nan"), r"sampler\.gamma must be >= 0 \(got nan\)"),
])
def test_bad_input_is_one_clear_error_and_leaves_nothing(files, tmp_path, capsys, overrides, message):
    resolved = []
    for o in overrides:
        for name, path in files.items():
            o = re.sub(rf"\b{name}\b", lambda _: str(path), o)
        resolved.append(o)
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)            # what Hydra writes before calling us
    code = cli.main(compose_cfg(resolved), run_dir)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("spectro: error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not run_dir.exists(), "a failed start must not leave a run directory behind"
    assert not (files["ROOT"] / "pwned.txt").exists(), "a hostile pickle ran"


def test_the_base_inputs_are_good(files):
    """The cases above fail for the reason they name, not because the base is bad."""
    from spectro import pipeline

    overrides = [o.replace("GOOD", str(files["GOOD"])).replace("CORPUS", str(files["CORPUS"])) for o in BASE]
    p = pipeline.prepare(to_config(compose_cfg(overrides)))
    assert p.probe.n_tokens == 4 * 7 and np.isfinite(p.problem.init_loss)


# ---------------------------------------------------------------- property-based

SCALARS = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                    st.booleans(), st.none(), st.lists(st.integers(), max_size=2))
KEYS = ["sampler.step_size", "sampler.nbeta", "sampler.gamma", "sampler.num_chains", "sampler.num_draws",
        "sampler.batch_size", "sampler.chain_group", "sampler.checkpoint_every", "sampler.precondition",
        "sampler.divergence_bound", "data.seq_len", "data.n_probe_contexts", "estimator.form", "ray.num_actors",
        "clustering.k", "clustering.alpha", "wandb.mode", "device", "stage", "components"]


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), SCALARS, min_size=1, max_size=3))
def test_any_config_values_validate_or_raise_config_error(values):
    nested: dict = {}
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        cfg = to_config(nested)
    except ConfigError as exc:
        assert any(k.split(".")[-1] in str(exc) for k in values), str(exc)   # names the bad key
        return
    assert cfg.sampler.step_size > 0 and np.isfinite(cfg.sampler.step_size) and cfg.sampler.nbeta > 0


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=64))
def test_any_bytes_are_text_or_a_utf8_error(tmp_path, data):
    from spectro.data import read_text_files

    path = tmp_path / "doc.txt"
    path.write_bytes(data)
    try:
        expected = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        with pytest.raises(DataError, match=rf"is not valid UTF-8 \(bad byte 0x{data[err.start]:02x} at byte "
                                            rf"offset {err.start}\); convert it to UTF-8"):
            read_text_files(path)
        return
    assert read_text_files(path).documents[0].text == expected


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 200), st.integers(2, 200))
def test_contexts_longer_than_the_model_are_refused(seq_len, max_len):
    from spectro.data import Corpus, Document, make_contexts
    from tests.pythia_fixture import word_level_tokenizer

    corpus = Corpus((Document("text", "a", " ".join(WORDS * 30)),), "x" * 64, "test corpus")
    tok = word_level_tokenizer(sorted(set(WORDS)) + ["[UNK]"])
    if seq_len > max_len:
        with pytest.raises(DataError, match=rf"context length {seq_len} exceeds the model's limit of {max_len}"):
            make_contexts(corpus, tok, seq_len, 1, 0, max_len=max_len)
    else:
        assert make_contexts(corpus, tok, seq_len, 1, 0, max_len=max_len).seq_len == seq_len


# ---------------------------------------------------------------- numerics under stress

@pytest.fixture(scope="module")
def problem():
    return tiny_problem()


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(log_step=st.floats(-12, 4), log_nbeta=st.floats(-6, 6), log_gamma=st.one_of(st.just(None), st.floats(-3, 9)),
       precondition=st.sampled_from(["none", "rmsprop"]))
def test_extreme_hyperparameters_give_finite_draws_or_recorded_divergence(problem, log_step, log_nbeta, log_gamma,
                                                                           precondition):
    """Over step sizes 1e-12..1e4, nβ 1e-6..1e6, γ 0 or 1e-3..1e9: a chain's draw is finite,
    or the chain is recorded as diverged from that draw on (NaN, never inf, never silent)."""
    from spectro.components import resolve_components
    from spectro.sampling import UnitRunner

    cfg = tiny_config(step_size=10.0 ** log_step, nbeta=10.0 ** log_nbeta,
                      gamma=0.0 if log_gamma is None else 10.0 ** log_gamma, precondition=precondition, burnin=1)
    comp = resolve_components(problem.model, ["l0h1"])[0]
    runner = UnitRunner(problem, comp, [0, 1], cfg.sampler, run_seed=0)
    state = runner.start()
    for _ in range(2):
        state, d = runner.next_draw(state)
        for c in range(2):
            if d.diverged[c]:
                assert 0 <= state.diverged_at[c] <= d.index
                assert np.isnan(d.sampling_loss[c]) and np.isnan(d.probe_loss[c]).all()
            else:
                assert state.diverged_at[c] == -1
                assert np.isfinite(d.sampling_loss[c]) and np.isfinite(d.probe_loss[c]).all()
                assert d.sampling_loss[c] <= problem.init_loss + cfg.sampler.divergence_bound


def test_a_huge_step_size_diverges_every_chain_at_once(problem):
    from spectro.components import resolve_components
    from spectro.sampling import UnitRunner

    cfg = tiny_config(step_size=1e4, burnin=0)
    runner = UnitRunner(problem, resolve_components(problem.model, ["full"])[0], [0, 1], cfg.sampler, run_seed=0)
    state, d = runner.next_draw(runner.start())
    assert state.diverged_at.tolist() == [0, 0] and np.isnan(d.sampling_loss).all() and d.diverged.all()


def store_with(tmp_path, problem, diverged: dict):
    """A complete tiny store; `diverged` maps component -> chains that diverged at draw 1."""
    from spectro.store import TRACE_ARRAYS

    config = tiny_config(num_draws=3, checkpoint_every=3)
    store = make_store(tmp_path / "samples.zarr", problem, config)
    L = store.layout
    rng = np.random.default_rng(0)
    for comp, chains in L.units():
        g = len(chains)
        s = problem.init_loss + 0.01 * rng.random((g, 3))                            # (chains, draws)
        probe = (3.0 + rng.random((g, 3, L.n_tokens))).astype(np.float32)         # (chains, draws, tokens)
        div = np.array([1 if k in diverged.get(comp, ()) else -1 for k in chains])
        s[div >= 0, 1:] = np.nan
        probe[div >= 0, 1:] = np.nan
        store.write_block(comp, chains, 0, sampling_loss=s, probe_loss=probe,
                          traces={t: np.zeros((g, 3)) for t in TRACE_ARRAYS}, diverged_at=div)
        store.set_progress(comp, chains, 3)
    return store


def test_a_fully_diverged_component_is_reported_not_averaged(problem, tmp_path):
    from spectro.susceptibilities import block_estimate, diagnostics, select_chains

    store = store_with(tmp_path, problem, {"l0h1": [0, 1, 2, 3], "l1.mlp": [1]})
    sel = select_chains(store)
    assert [(e["component"], e["chain"]) for e in sel.excluded] == [("l0h1", k) for k in range(4)] + [("l1.mlp", 1)]
    chi, se, per_chain = block_estimate(store, sel, 0, store.layout.n_tokens, "peer")[:3]
    assert np.isnan(chi[:, 1]).all()                     # no chain left: NaN, and said so below
    assert np.isfinite(chi[:, [0, 2]]).all() and np.isfinite(se[:, [0, 2]]).all()
    assert np.isnan(per_chain[1, :, 2]).all() and np.isfinite(per_chain[[0, 2, 3], :, 2]).all()
    diag = diagnostics(store, sel, nbeta=8.0, rhat_threshold=1.1)
    assert diag["n_chains_used"].tolist() == [4, 0, 3] and diag["n_diverged"].tolist() == [0, 4, 1]


def test_every_full_chain_diverged_is_an_error_before_any_work(problem, tmp_path):
    from spectro.pipeline import run_susceptibilities

    store = store_with(tmp_path, problem, {"full": [0, 1, 2, 3]})
    with pytest.raises(DivergenceError, match=r"every chain of 'full' diverged \(at draws \[1, 1, 1, 1\]\).*"
                                              r"Lower sampler\.step_size \(now 0\.001\), raise sampler\.gamma"):
        run_susceptibilities(tiny_config(), tmp_path)            # stops before starting the covariance job
    assert not (tmp_path / "susceptibilities.zarr").exists()


# ---------------------------------------------------------------- hostile stores, checkpoints and paths

@pytest.fixture()
def good_store(problem, tmp_path):
    return store_with(tmp_path, problem, {})


def _edit_attrs(path, **changes):
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"].update(changes)
    (path / "zarr.json").write_text(json.dumps(meta))


def test_foreign_truncated_and_old_stores_are_refused(good_store, tmp_path):
    path = good_store.path
    (tmp_path / "garbage.zarr").mkdir()
    (tmp_path / "garbage.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"garbage\.zarr is not a readable Zarr v3 store"):
        SampleStore.open(tmp_path / "garbage.zarr")
    import zarr
    zarr.open_group(str(tmp_path / "theirs.zarr"), mode="w").create_array("x", shape=(3,), dtype="f8")
    with pytest.raises(StoreError, match=r"theirs\.zarr is not a spectro sample store \(it has no 'spectro_store'"):
        SampleStore.open(tmp_path / "theirs.zarr")

    old = tmp_path / "old.zarr"
    shutil.copytree(path, old)
    _edit_attrs(old, spectro_store=1)
    with pytest.raises(StoreError, match=r"sample store of format 1, but this version reads format 2; "
                                         r"rerun with fresh=true"):
        SampleStore.open(old)

    cut = tmp_path / "cut.zarr"
    shutil.copytree(path, cut)
    shutil.rmtree(cut / "probe_loss")
    with pytest.raises(StoreError, match=r"cut\.zarr is truncated: arrays \['probe_loss'\] are missing"):
        SampleStore.open(cut)

    noattr = tmp_path / "noattr.zarr"
    shutil.copytree(path, noattr)
    meta = json.loads((noattr / "zarr.json").read_text())
    del meta["attributes"]["layout"]
    (noattr / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"is truncated: attributes \['layout'\] are missing"):
        SampleStore.open(noattr)

    shape = tmp_path / "shape.zarr"
    shutil.copytree(path, shape)
    layout = json.loads((shape / "zarr.json").read_text())["attributes"]["layout"]
    _edit_attrs(shape, layout={**layout, "n_draws": 30})
    with pytest.raises(StoreError, match=r"does not match its own layout: sampling_loss \(3, 4, 3\) "
                                         r"\(expected \(3, 4, 30\)\)"):
        SampleStore.open(shape)

    evil = tmp_path / "evil.zarr"
    shutil.copytree(path, evil)
    _edit_attrs(evil, layout={**layout, "components": ["full", "../../../etc/cron.d/x", "l1.mlp"]})
    with pytest.raises(StoreError, match=r"names a component '\.\./\.\./\.\./etc/cron\.d/x' that is not a valid"):
        SampleStore.open(evil)


def test_names_from_configs_or_stores_cannot_escape_the_run_directory(tmp_path):
    from spectro.service import checkpoint_path

    assert confined(tmp_path, "l0.mlp__c0-3.pt") == tmp_path / "l0.mlp__c0-3.pt"
    for bad in ["../x.pt", "/etc/passwd", "a/b.pt", "..", "", "l0h1/../../x", "x\0y"]:
        with pytest.raises(UnsafePathError, match=r"refusing to write .* \(no path separators or '\.\.'\)"):
            confined(tmp_path, bad)
    with pytest.raises(UnsafePathError, match=r"refusing to write '\.\./\.\./evil__c0-1\.pt'"):
        checkpoint_path(tmp_path, "../../evil", [0, 1])
    link = tmp_path / "link.pt"
    link.symlink_to("/tmp/elsewhere.pt")
    with pytest.raises(UnsafePathError, match=r"resolves outside"):
        confined(tmp_path, "link.pt")
    with pytest.raises(ComponentError, match=r"unknown component '\.\./x'"):
        from spectro.components import resolve_components
        resolve_components(tiny_problem().model, ["../x"])


def test_a_hostile_checkpoint_is_never_unpickled_and_the_unit_restarts(problem, tmp_path):
    from spectro.service import checkpoint_path, run_unit

    config = tiny_config(num_draws=3, checkpoint_every=3, burnin=0)
    ref = make_store(tmp_path / "ref" / "samples.zarr", problem, config)
    (tmp_path / "ref" / "ck").mkdir()
    run_unit(problem, ref, "l0h1", [0, 1], config.sampler, 0, tmp_path / "ref" / "ck")
    store = make_store(tmp_path / "run" / "samples.zarr", problem, config)
    ckpt = checkpoint_path(tmp_path / "run" / "ck", "l0h1", [0, 1])
    ckpt.parent.mkdir(parents=True)
    marker = tmp_path / "pwned.txt"
    torch.save({"draw": 2, "params": WritesAFile(marker)}, ckpt)
    store.set_progress("l0h1", [0, 1], 3)                  # it even claims the unit is done
    out = run_unit(problem, store, "l0h1", [0, 1], config.sampler, 0, tmp_path / "run" / "ck")
    assert not marker.exists(), "the checkpoint's pickle ran"
    assert out["resumed_at"] == 0
    for name in ("sampling_loss", "probe_loss"):
        assert store.read(name)[1, :2].tobytes() == ref.read(name)[1, :2].tobytes()
