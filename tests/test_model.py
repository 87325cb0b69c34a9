"""spectro.model: loading hub-layout GPT-NeoX snapshots, and every refusal.

The Pythia-14M-shaped checkpoint (real tokenizer, random fp16 weights under
the hub's key names) is loaded once per module; everything else uses a tiny
2-layer snapshot written by tests/pythia_fixture.py.
"""

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch

from spectro.components import resolve_components
from spectro.errors import ModelLoadError
from spectro.model import EMBEDDED_MODEL_DIR, LoadedModel, load_model, resolve_model_dir
from tests.pythia_fixture import (
    PYTHIA14M_N_PARAMETERS,
    TINY_CONFIG,
    TINY_WORDS,
    hub_state_dict,
    make_pythia14m_checkpoint,
    make_tiny_checkpoint,
)
from tests.helpers import malicious_bin

REPO_ROOT = Path(__file__).resolve().parents[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the Pythia-14M shape ----------------------------------------------------


@pytest.fixture(scope="module")
def pythia14m(tmp_path_factory) -> tuple[Path, LoadedModel]:
    directory = make_pythia14m_checkpoint(tmp_path_factory.mktemp("pythia14m"))
    return directory, load_model(str(directory))


def test_pythia14m_shape_parameters_and_tokenizer(pythia14m):
    directory, loaded = pythia14m
    model = loaded.model
    assert sum(p.numel() for p in model.parameters()) == PYTHIA14M_N_PARAMETERS == 14_067_712
    assert loaded.provenance["n_parameters"] == 14_067_712
    assert len(resolve_components(model, "all")) == 32
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    assert model.config._attn_implementation == "eager"
    assert model.config.use_cache is False
    assert loaded.max_positions == 2048
    assert loaded.tokenizer.encode("Hello, I am").ids == [12092, 13, 309, 717]

    ids = torch.tensor([[12092, 13, 309, 717]])
    logits = model(ids).logits                                  # (1, 4, vocab)
    assert logits.shape == (1, 4, 50304)
    assert torch.isfinite(logits).all()


def test_pythia14m_weights_equal_the_fp16_file(pythia14m):
    directory, loaded = pythia14m
    stored = safetensors.torch.load_file(directory / "model.safetensors")
    params = dict(loaded.model.named_parameters())
    legacy = re.compile(r"\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$")
    compared = 0
    for key, value in stored.items():
        if legacy.search(key):
            continue
        name = "lm_head.weight" if key == "embed_out.weight" else key
        assert value.dtype == torch.float16
        assert torch.equal(params[name], value.float()), name
        compared += value.numel()
    assert compared == 14_067_712
    # the head really is the file's embed_out, not a copy of the input embedding
    assert not torch.equal(params["lm_head.weight"], params["gpt_neox.embed_in.weight"])


def test_pythia14m_provenance(pythia14m):
    directory, loaded = pythia14m
    prov = loaded.provenance
    assert json.loads(json.dumps(prov)) == prov
    assert prov["source"] == "local"
    assert prov["id"] == prov["path"] == str(directory.resolve())
    assert prov["revision"] is None
    assert prov["architecture"] == "GPTNeoXForCausalLM"
    assert prov["files"] == {name: sha256(directory / name)
                             for name in ("config.json", "model.safetensors", "tokenizer.json")}
    assert prov["config"] == {
        "model_type": "gpt_neox", "vocab_size": 50304, "hidden_size": 128, "intermediate_size": 512,
        "num_hidden_layers": 6, "num_attention_heads": 4, "max_position_embeddings": 2048,
        "rotary_pct": 0.25, "rotary_emb_base": 10000, "use_parallel_residual": True,
        "tie_word_embeddings": False, "layer_norm_eps": 1e-05, "hidden_act": "gelu",
        "attention_bias": True, "stored_dtype": "float16",
    }


# --- tiny snapshots: formats -------------------------------------------------


def test_bin_and_sharded_safetensors_load_the_same_weights(tmp_path):
    ref = load_model(str(make_tiny_checkpoint(tmp_path / "st", seed=3))).model.state_dict()

    from_bin = load_model(str(make_tiny_checkpoint(tmp_path / "bin", seed=3, weights="bin")))
    assert set(from_bin.provenance["files"]) == {"config.json", "pytorch_model.bin", "tokenizer.json"}

    sharded = make_tiny_checkpoint(tmp_path / "sharded", seed=3, weights="none")
    state = hub_state_dict(TINY_CONFIG, seed=3)
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for shard, shard_keys in halves.items():
        safetensors.torch.save_file({k: state[k] for k in shard_keys}, sharded / shard)
    index = {"metadata": {}, "weight_map": {k: s for s, ks in halves.items() for k in ks}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    from_shards = load_model(str(sharded))
    assert set(from_shards.provenance["files"]) == {"config.json", "tokenizer.json", "model.safetensors.index.json",
                                                    *halves}

    for loaded in (from_bin, from_shards):
        other = loaded.model.state_dict()
        assert other.keys() == ref.keys()
        assert all(torch.equal(other[k], ref[k]) for k in ref)


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    directory = make_tiny_checkpoint(tmp_path / "ckpt", weights="none")
    marker = tmp_path / "pwned.txt"
    malicious_bin(directory / "pytorch_model.bin", marker)

    with pytest.raises(ModelLoadError, match=r"refused to load .*pytorch_model\.bin.*not a plain tensor "
                                             r"checkpoint.*unpickling can run arbitrary code"):
        load_model(str(directory))
    assert not marker.exists()

    # The payload is live: an unrestricted unpickler does run it.
    torch.load(directory / "pytorch_model.bin", weights_only=False)
    assert marker.read_text() == "pwned"


def test_loading_leaves_the_global_rng_alone(tmp_path):
    directory = make_tiny_checkpoint(tmp_path / "ckpt")
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    load_model(str(directory))
    assert torch.equal(torch.rand(4), expected)


def test_training_json_is_recorded(tmp_path):
    directory = make_tiny_checkpoint(tmp_path / "ckpt")
    (directory / "training.json").write_text(json.dumps({"steps": 10, "corpus": "tiny"}))
    prov = load_model(str(directory)).provenance
    assert prov["training"] == {"steps": 10, "corpus": "tiny"}
    assert prov["files"]["training.json"] == sha256(directory / "training.json")


def test_safetensors_is_preferred_over_a_bin(tmp_path):
    directory = make_tiny_checkpoint(tmp_path / "ckpt")
    marker = tmp_path / "pwned.txt"
    malicious_bin(directory / "pytorch_model.bin", marker)
    loaded = load_model(str(directory))
    assert "pytorch_model.bin" not in loaded.provenance["files"]
    assert not marker.exists()


# --- refusals ----------------------------------------------------------------


def _resave(directory: Path, state: dict) -> None:
    safetensors.torch.save_file(state, directory / "model.safetensors")


def test_missing_path_and_bad_sources(tmp_path):
    with pytest.raises(ModelLoadError, match=r"does not exist as a local directory and is not a hub id"):
        load_model(str(tmp_path / "nowhere"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelLoadError, match=r"is a file; pass the directory that holds config\.json"):
        load_model(str(tmp_path / "file.txt"))
    with pytest.raises(ModelLoadError, match=r"model source '' is empty"):
        load_model("")
    directory = make_tiny_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ModelLoadError, match=r"revision='step1' was given .* only applies to a hub id"):
        load_model(str(directory), revision="step1")


def test_missing_files(tmp_path):
    no_config = make_tiny_checkpoint(tmp_path / "a")
    (no_config / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"has no config\.json; a model directory must be a hub-layout"):
        load_model(str(no_config))

    no_weights = make_tiny_checkpoint(tmp_path / "b", weights="none")
    with pytest.raises(ModelLoadError, match=r"has no weights: expected one of model\.safetensors, "
                                             r"model\.safetensors\.index\.json, pytorch_model\.bin"):
        load_model(str(no_weights))

    no_tokenizer = make_tiny_checkpoint(tmp_path / "c")
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"has no tokenizer\.json"):
        load_model(str(no_tokenizer))


def test_non_gpt_neox_config_is_refused(tmp_path):
    directory = make_tiny_checkpoint(tmp_path / "ckpt")
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 32, "n_head": 4,
            "n_layer": 2, "n_positions": 64, "vocab_size": 64}
    (directory / "config.json").write_text(json.dumps(gpt2))
    with pytest.raises(ModelLoadError, match=r"declares model_type='gpt2'; only GPT-NeoX-style causal LMs"):
        load_model(str(directory))


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    words = TINY_WORDS + [f"w{i}" for i in range(100 - len(TINY_WORDS))]
    directory = make_tiny_checkpoint(tmp_path / "ckpt", vocab_words=words)
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json .* has 100 tokens but the model's embedding has "
                                             r"only vocab_size=64 rows"):
        load_model(str(directory))


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    directory = make_tiny_checkpoint(tmp_path / "ckpt")
    state = hub_state_dict(TINY_CONFIG)

    missing = dict(state)
    del missing["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"]
    _resave(directory, missing)
    with pytest.raises(ModelLoadError, match=r"missing gpt_neox\.layers\.1\.mlp\.dense_4h_to_h\.bias, "
                                             r"unexpected none"):
        load_model(str(directory))

    no_head = dict(state)
    del no_head["embed_out.weight"]
    _resave(directory, no_head)
    with pytest.raises(ModelLoadError, match=r"missing lm_head\.weight, unexpected none"):
        load_model(str(directory))

    extra = dict(state, **{"gpt_neox.layers.0.attention.extra.weight": torch.zeros(2, dtype=torch.float16)})
    _resave(directory, extra)
    with pytest.raises(ModelLoadError, match=r"missing none, unexpected gpt_neox\.layers\.0\.attention\.extra"):
        load_model(str(directory))

    wrong_shape = dict(state, **{"gpt_neox.embed_in.weight": torch.zeros(65, 32, dtype=torch.float16)})
    _resave(directory, wrong_shape)
    with pytest.raises(ModelLoadError, match=r"gpt_neox\.embed_in\.weight: file \(65, 32\) vs config \(64, 32\)"):
        load_model(str(directory))

    nan = dict(state)
    nan["gpt_neox.final_layer_norm.bias"] = torch.full((32,), float("nan"), dtype=torch.float16)
    _resave(directory, nan)
    with pytest.raises(ModelLoadError, match=r"contain NaN or inf: gpt_neox\.final_layer_norm\.bias"):
        load_model(str(directory))


def test_tied_embeddings_are_refused(tmp_path):
    directory = make_tiny_checkpoint(tmp_path / "ckpt", config={**TINY_CONFIG, "tie_word_embeddings": True})
    with pytest.raises(ModelLoadError, match=r"sets tie_word_embeddings=true; spectro needs separate input"):
        load_model(str(directory))


# --- the hub path, through a real HF cache, in a subprocess ------------------

_HUB_SCRIPT = textwrap.dedent("""
    import json, sys
    from spectro.errors import ModelLoadError
    from spectro.model import load_model
    results = {}
    def attempt(key, *args, **kwargs):
        try:
            loaded = load_model(*args, **kwargs)
            results[key] = {"ok": True, "provenance": loaded.provenance,
                            "sum": float(sum(p.double().sum() for p in loaded.model.parameters()))}
        except ModelLoadError as err:
            results[key] = {"ok": False, "error": str(err)}
    attempt("cached_offline", "spectro-test/tiny-neox", "step1", allow_download=False)
    attempt("cached_hub_down", "spectro-test/tiny-neox", "step1", allow_download=True)
    attempt("uncached_hub_down", "spectro-test/not-cached", "step1", allow_download=True)
    attempt("uncached_no_download", "spectro-test/not-cached", "step1", allow_download=False)
    attempt("local", sys.argv[1])
    print(json.dumps(results))
""")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_ids_use_the_cache_and_fail_clearly_when_the_hub_is_unreachable(tmp_path):
    # A hub cache laid out as huggingface_hub writes it: refs/<revision> names a commit, whose
    # snapshot folder holds the files.
    commit = "0123456789abcdef0123456789abcdef01234567"
    storage = tmp_path / "hub" / "models--spectro-test--tiny-neox"
    snapshot = make_tiny_checkpoint(storage / "snapshots" / commit, seed=5)
    (storage / "refs").mkdir()
    (storage / "refs" / "step1").write_text(commit)
    local = make_tiny_checkpoint(tmp_path / "local", seed=5)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "hf_home"),
               HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}",  # connection refused: the hub is down
               PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run([sys.executable, "-c", _HUB_SCRIPT, str(local)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout.strip().splitlines()[-1])

    for key in ("cached_offline", "cached_hub_down"):
        r = results[key]
        assert r["ok"], r
        prov = r["provenance"]
        assert (prov["source"], prov["id"], prov["revision"], prov["commit"]) == \
            ("hub", "spectro-test/tiny-neox", "step1", commit)
        assert prov["path"] == str(snapshot.resolve())
        assert prov["files"]["model.safetensors"] == sha256(snapshot / "model.safetensors")
        assert r["sum"] == results["local"]["sum"]  # same bytes, same code path, same model

    down = results["uncached_hub_down"]
    assert not down["ok"]
    assert "could not be fetched: the Hugging Face hub is unreachable and the files are not in the local cache" \
        in down["error"]
    assert "pass its directory as the model source" in down["error"]

    offline = results["uncached_no_download"]
    assert not offline["ok"]
    assert "is not in the local Hugging Face cache and allow_download=False" in offline["error"]


# --- the embedded model --------------------------------------------------------


def test_embedded_model_loads():
    loaded = load_model("embedded")
    prov = loaded.provenance
    assert (prov["source"], prov["id"], prov["revision"]) == ("embedded", "embedded", None)
    assert prov["path"] == str(EMBEDDED_MODEL_DIR.resolve())
    assert prov["n_parameters"] == sum(p.numel() for p in loaded.model.parameters())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(prov["files"])
    assert loaded.tokenizer.get_vocab_size() <= loaded.model.config.vocab_size
    path, partial = resolve_model_dir("embedded")
    assert path == EMBEDDED_MODEL_DIR.resolve() and partial["source"] == "embedded"
