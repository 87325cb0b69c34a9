"""The shipped default model (spectro/assets/default_model).

Loads it the way a hub snapshot is loaded, recomputes the held-out loss on the
16 contexts training.json records, and checks the model beats the best
context-free predictor by a wide margin.
"""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import GPTNeoXForCausalLM

import spectro
from spectro.data import embedded_corpus, make_contexts

MODEL_DIR = Path(spectro.__file__).parent / "assets" / "default_model"


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads((MODEL_DIR / "training.json").read_text())


@pytest.fixture(scope="module")
def model() -> GPTNeoXForCausalLM:
    torch.set_num_threads(1)
    return GPTNeoXForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))


def test_asset_layout_and_size():
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "training.json"} <= names
    size = sum(p.stat().st_size for p in MODEL_DIR.iterdir())
    assert size < 8_000_000, f"default model directory is {size / 1e6:.1f} MB"


def test_model_shape_matches_the_spec(model, record):
    cfg = model.config
    assert cfg.model_type == "gpt_neox"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (4096, 128, 4)
    assert (cfg.num_attention_heads, cfg.intermediate_size, cfg.max_position_embeddings) == (4, 512, 256)
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.25
    assert cfg.rope_parameters["rope_theta"] == 10000
    assert cfg.use_parallel_residual and not cfg.tie_word_embeddings
    assert (cfg.hidden_act, cfg.layer_norm_eps, cfg.bos_token_id, cfg.eos_token_id) == ("gelu", 1e-5, 0, 0)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == record["n_parameters"] == 1_841_920


def test_tokenizer(tok):
    assert tok.get_vocab_size() == 4096
    assert tok.token_to_id("<|endoftext|>") == 0
    for text in ["    def __init__(self, name):\n        self.name = name\n", "naïve café ünïcode ✓ 数"]:
        assert tok.decode(tok.encode(text).ids) == text  # byte-level: lossless on any text
    code = "    def __init__(self, name, value=None):\n        self.name = name\n        return self\n"
    assert len(tok.encode(code).ids) < len(code) / 3  # BPE merges really compress code


def test_heldout_loss_reproduces_and_beats_unigram(model, tok, record):
    assert record["heldout_loss"] < 0.6 * record["unigram_entropy"]

    heldout = embedded_corpus(split="heldout")
    check = record["check"]
    ctx = make_contexts(
        heldout, tok, record["seq_len"], check["n_contexts"], seed=check["seed"],
        max_len=model.config.max_position_embeddings,
    )  # fmt: skip
    with torch.no_grad():
        logits = model(input_ids=ctx.input_ids).logits[:, :-1]  # (16, seq_len-1, vocab)
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ctx.input_ids[:, 1:]).item()

    # the held-out split comes from the shipped corpus asset: the same 16 contexts on every Python, so the same number
    assert heldout.content_hash == record["heldout_content_hash"], (
        "the embedded held-out corpus is not the one the default model was trained on; "
        "retrain the default model (jobs/train_default_model.py)"
    )
    assert loss == pytest.approx(check["loss"], abs=2e-3)
    assert loss == pytest.approx(record["heldout_loss"], rel=0.3)
    assert loss < 0.6 * record["unigram_entropy"]


def test_model_completes_python(model, tok):
    ids = torch.tensor([tok.encode("class Point:\n    def __init__(self").ids])  # (1, n)
    with torch.no_grad():
        probs = model(input_ids=ids).logits[0, -1].softmax(-1)  # (vocab,)
    after_self = sum(probs[tok.token_to_id(t)].item() for t in [",", "):"])
    assert after_self > 0.5  # the trained model knows what follows `self` in a def


def test_the_default_model_copies_from_its_context(model, tok, record):
    """The known answers a spectroscope must find in the default model: induction (loss on a repeated passage
    drops by >= 2 nats, on natural held-out text and on random tokens) carried by heads the ablation names, and
    a previous-token head. The figures are recomputed here from the shipped weights on the recorded passages."""
    from spectro import mechanisms

    mech = record["mechanisms"]
    assert mech["passages"]["n"] == mechanisms.PASSAGES["n"] and mech["passages"]["length"] == 40
    natural, rand = mechanisms.standard_passages(tok, model.config.vocab_size, embedded_corpus(split="heldout"))
    for name, passages in (("induction_natural", natural), ("induction_random", rand)):
        fig = mechanisms.induction_figure(model, passages)
        assert fig["drop"] == pytest.approx(mech[name]["drop"], abs=2e-3), name
        assert fig["drop"] >= 2.0, (name, fig)
    assert mech["induction_heads"] and mech["previous_token_heads"]
    rows = {r["head"]: r for r in mech["ablation"]["heads"]}
    base = mech["ablation"]["intact"]["induction_random"]
    for head in mech["induction_heads"]:       # zeroing a named head costs >= 20% of the random-token figure
        assert rows[head]["induction_random_drop"] >= mechanisms.INDUCTION_SHARE * base
    assert record["heldout_loss"] <= 3.56
