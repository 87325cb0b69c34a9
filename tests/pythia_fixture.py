"""Hub-layout checkpoint directories for tests: random weights, real layout.

`make_pythia14m_checkpoint(dir)` writes what a snapshot of the hub repo
`EleutherAI/pythia-14m` holds (config.json, model.safetensors, tokenizer.json)
with random weights: the real architecture, fp16 tensors under the
hub's key names (`embed_out.weight` for the head, plus the per-layer legacy
buffers `attention.bias`, `attention.masked_bias`, `attention.rotary_emb.inv_freq`
that the hub files carry), and the real GPT-NeoX-20B tokenizer copied at test
time from gpt-neox-20b.json in $SPECTRO_TOKENIZER_DIR (default: shared/tokenizers
beside the repository; never committed; the tests that need it skip when it is
absent).

`make_tiny_checkpoint(dir)` writes the same layout for a 2-layer model with a
small word-level tokenizer, for tests that are not about the Pythia shape.

The key list is written out here by hand rather than taken from transformers'
model, so the loader is tested against the hub layout, not against itself.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import tokenizers
import torch

TOKENIZER_DIR = Path(os.environ.get("SPECTRO_TOKENIZER_DIR")
                     or Path(__file__).resolve().parents[2] / "shared" / "tokenizers")
SHARED_TOKENIZER = TOKENIZER_DIR / "gpt-neox-20b.json"

PYTHIA14M_CONFIG = {
    "architectures": ["GPTNeoXForCausalLM"],
    "bos_token_id": 0,
    "eos_token_id": 0,
    "hidden_act": "gelu",
    "hidden_size": 128,
    "initializer_range": 0.02,
    "intermediate_size": 512,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "model_type": "gpt_neox",
    "num_attention_heads": 4,
    "num_hidden_layers": 6,
    "rotary_emb_base": 10000,
    "rotary_pct": 0.25,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.29.2",
    "use_cache": True,
    "use_parallel_residual": True,
    "vocab_size": 50304,
}
PYTHIA14M_N_PARAMETERS = 14_067_712

TINY_CONFIG = {
    **PYTHIA14M_CONFIG,
    "hidden_size": 32,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "vocab_size": 64,
}
TINY_WORDS = ["<|endoftext|>", "[UNK]", "the", "cat", "sat", "on", "a", "mat", "dog", "ran"]


def make_pythia14m_checkpoint(directory: str | Path, seed: int = 0) -> Path:
    """Write a Pythia-14M-shaped hub snapshot (random fp16 weights, real tokenizer) into `directory`."""
    if not SHARED_TOKENIZER.is_file():
        pytest.skip(f"needs the GPT-NeoX-20B tokenizer file gpt-neox-20b.json in SPECTRO_TOKENIZER_DIR "
                    f"(not found: {SHARED_TOKENIZER})")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SHARED_TOKENIZER, directory / "tokenizer.json")
    _write_config(directory, PYTHIA14M_CONFIG)
    safetensors.torch.save_file(hub_state_dict(PYTHIA14M_CONFIG, seed), directory / "model.safetensors",
                                metadata={"format": "pt"})
    return directory


def make_tiny_checkpoint(directory: str | Path, seed: int = 0, *, config: dict | None = None,
                         weights: str = "safetensors", vocab_words: list[str] | None = None) -> Path:
    """Write a tiny GPT-NeoX hub snapshot; `weights` is "safetensors", "bin" or "none"."""
    config = dict(TINY_CONFIG if config is None else config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_config(directory, config)
    word_level_tokenizer(vocab_words or TINY_WORDS).save(str(directory / "tokenizer.json"))
    state = hub_state_dict(config, seed)
    if weights == "safetensors":
        safetensors.torch.save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    elif weights == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    elif weights != "none":
        raise ValueError(f"weights must be 'safetensors', 'bin' or 'none', not {weights!r}")
    return directory


def word_level_tokenizer(words: list[str]) -> tokenizers.Tokenizer:
    """A whitespace word-level tokenizer whose ids are the positions in `words`."""
    model = tokenizers.models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return tokenizer


def hub_state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the hub's GPT-NeoX key names, fp16 like the hub's Pythia files."""
    gen = torch.Generator().manual_seed(seed)
    V, H, I = config["vocab_size"], config["hidden_size"], config["intermediate_size"]
    P, n_heads = config["max_position_embeddings"], config["num_attention_heads"]
    rot_dims = int(H // n_heads * config["rotary_pct"])

    def normal(*shape: int, mean: float = 0.0) -> torch.Tensor:
        return (mean + 0.02 * torch.randn(*shape, generator=gen)).to(torch.float16)

    state = {"gpt_neox.embed_in.weight": normal(V, H)}
    for i in range(config["num_hidden_layers"]):
        p = f"gpt_neox.layers.{i}."
        state.update({
            p + "input_layernorm.weight": normal(H, mean=1.0),
            p + "input_layernorm.bias": normal(H),
            p + "post_attention_layernorm.weight": normal(H, mean=1.0),
            p + "post_attention_layernorm.bias": normal(H),
            p + "attention.bias": torch.tril(torch.ones(P, P, dtype=torch.bool)).view(1, 1, P, P),
            p + "attention.masked_bias": torch.tensor(-1e9),
            p + "attention.rotary_emb.inv_freq":
                1.0 / config["rotary_emb_base"] ** (torch.arange(0, rot_dims, 2).float() / rot_dims),
            p + "attention.query_key_value.weight": normal(3 * H, H),
            p + "attention.query_key_value.bias": normal(3 * H),
            p + "attention.dense.weight": normal(H, H),
            p + "attention.dense.bias": normal(H),
            p + "mlp.dense_h_to_4h.weight": normal(I, H),
            p + "mlp.dense_h_to_4h.bias": normal(I),
            p + "mlp.dense_4h_to_h.weight": normal(H, I),
            p + "mlp.dense_4h_to_h.bias": normal(H),
        })
    state["gpt_neox.final_layer_norm.weight"] = normal(H, mean=1.0)
    state["gpt_neox.final_layer_norm.bias"] = normal(H)
    state["embed_out.weight"] = normal(V, H)
    return state


def _write_config(directory: Path, config: dict) -> None:
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
