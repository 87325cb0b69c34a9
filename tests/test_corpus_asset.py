"""The embedded corpus ships as a data asset (spectro/assets/corpus): the default corpus is the same on every
Python, it is the corpus the shipped model was trained on, a damaged asset is one clear error, the run's
provenance records the asset's hash, and the live build from the standard library stays available."""

import hashlib
import json
import platform
import shutil
from pathlib import Path

import pytest

import spectro
from spectro.config import to_config
from spectro.data import embedded_corpus, load_corpus, read_text_files, stdlib_corpus
from spectro.errors import DataError

ASSETS = Path(spectro.__file__).parent / "assets"
ASSET_DIR = ASSETS / "corpus"
MANIFEST = json.loads((ASSET_DIR / "manifest.json").read_text(encoding="utf-8"))
TRAINING = json.loads((ASSETS / "default_model" / "training.json").read_text(encoding="utf-8"))
SPLITS = ("all", "train", "heldout")


@pytest.fixture(scope="module")
def shipped():
    return {s: embedded_corpus(split=s) for s in SPLITS}


def test_default_corpus_is_the_one_the_shipped_model_was_trained_on(shipped):
    """Built on the running interpreter from the asset: the content hashes recorded with the model."""
    assert shipped["train"].content_hash == TRAINING["corpus_content_hash"]
    assert shipped["heldout"].content_hash == TRAINING["heldout_content_hash"]
    assert {s: c.content_hash for s, c in shipped.items()} == MANIFEST["content_hash"]
    assert load_corpus({"kind": "embedded"}).content_hash == MANIFEST["content_hash"]["all"]   # the config's default
    full = shipped["all"]
    assert {s: sum(d.source == s for d in full.documents) for s in full.sources} == MANIFEST["documents"]
    assert full.description.startswith(f"embedded corpus (shipped asset, built from the python {MANIFEST['python']} "
                                       "standard library): 400 code files, 79 prose topics, split=all")
    assert full.asset == {"file": MANIFEST["file"], "sha256": MANIFEST["sha256"], "python": MANIFEST["python"]}


def test_the_asset_is_what_its_manifest_says_and_carries_its_licence():
    data = (ASSET_DIR / MANIFEST["file"]).read_bytes()
    assert len(data) == MANIFEST["bytes"] < 5_000_000
    assert hashlib.sha256(data).hexdigest() == MANIFEST["sha256"]
    assert MANIFEST["command"] == "python jobs/build_corpus_asset.py"
    licence = (ASSET_DIR / MANIFEST["license"]).read_text(encoding="utf-8")
    assert MANIFEST["file"] in licence.splitlines()[0]
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in licence
    assert "ZERO-CLAUSE BSD LICENSE FOR CODE IN THE PYTHON DOCUMENTATION" in licence


@pytest.mark.skipif(platform.python_version() != MANIFEST["python"],
                    reason=f"the asset was built from Python {MANIFEST['python']}'s standard library; "
                           f"this is {platform.python_version()}, whose standard library differs")
def test_the_live_standard_library_build_equals_the_asset(shipped):
    for s in SPLITS:
        live = stdlib_corpus(split=s)
        assert live.documents == shipped[s].documents and live.content_hash == shipped[s].content_hash, s
        assert live.asset is None and f"running python {MANIFEST['python']}" in live.description
    assert load_corpus({"kind": "stdlib", "split": "heldout"}).content_hash == TRAINING["heldout_content_hash"]
    # smaller selections choose the same documents from the asset as from the standard library
    for n_code, n_prose, split in [(12, 12, "all"), (0, 5, "train"), (60, None, "heldout"), (399, 0, "all")]:
        assert (embedded_corpus(n_code, n_prose, split).documents
                == stdlib_corpus(n_code, n_prose, split).documents), (n_code, n_prose, split)


def test_a_damaged_or_missing_asset_is_one_clear_error(tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(ASSET_DIR, damaged)
    path = damaged / MANIFEST["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"the corpus asset .*{MANIFEST['file']} is damaged: its sha256 is "
                                        rf"[0-9a-f]{{12}}\.\.\., its manifest records {MANIFEST['sha256'][:12]}"):
        load_corpus({"kind": "embedded", "asset_dir": str(damaged)})

    missing = tmp_path / "missing"
    shutil.copytree(ASSET_DIR, missing)
    (missing / MANIFEST["file"]).unlink()
    with pytest.raises(DataError, match=r"the corpus asset in .*missing cannot be read .*No such file"):
        embedded_corpus(asset_dir=missing)
    # a file that matches its manifest but is not xz-compressed JSON Lines (a hand-made asset)
    (missing / MANIFEST["file"]).write_bytes(b"not xz")
    manifest = dict(MANIFEST, sha256=hashlib.sha256(b"not xz").hexdigest())
    (missing / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(DataError, match=rf"the corpus asset .*{MANIFEST['file']} is malformed \("):
        embedded_corpus(asset_dir=missing)
    with pytest.raises(DataError, match=r"holds 400 code files, fewer than max_code_files=401; .*kind=stdlib"):
        embedded_corpus(max_code_files=401)


def test_provenance_records_the_asset():
    from spectro import pipeline

    corpus = {"kind": "embedded", "max_code_files": 4, "max_prose_topics": 4}     # a small slice tokenizes fast
    config = to_config({"components": ["l1h2"], "sampler": {"batch_size": 4},
                        "data": {"corpus": corpus, "seq_len": 16, "n_train_contexts": 4, "n_sampling_contexts": 2,
                                 "n_probe_contexts": 2}})
    data = pipeline.provenance(pipeline.prepare(config))["data"]
    assert data["asset"] == {"file": MANIFEST["file"], "sha256": MANIFEST["sha256"], "python": MANIFEST["python"]}
    assert data["content_hash"] == load_corpus(corpus).content_hash


def test_other_corpora_have_no_asset(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n", encoding="utf-8")
    assert read_text_files(tmp_path).asset is None
