"""Shared fixtures: a tiny real GPT-NeoX, a tiny sampling problem, and a
local Ray instance on loopback owned by one fixture (init once, shutdown at
the end)."""

import os

# Keep Ray on 127.0.0.1 (DESIGN 3); must be set before Ray starts.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from spectro.config import SpectroConfig, to_config


def tiny_model(seed: int = 0, layers: int = 2, hidden: int = 32, heads: int = 4, vocab: int = 96, max_pos: int = 64):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)  # transformers' init uses the global generator; tests only
    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden, rotary_pct=0.25, max_position_embeddings=max_pos,
                        use_parallel_residual=True, tie_word_embeddings=False, attn_implementation="eager")
    model = GPTNeoXForCausalLM(cfg).float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tiny_config(**sampler) -> SpectroConfig:
    base = dict(step_size=1e-3, nbeta=8.0, gamma=100.0, batch_size=4, num_chains=4, num_draws=6,
                chain_group=2, checkpoint_every=3, seed=0)
    base.update(sampler)
    return to_config({"sampler": base, "data": {"seq_len": 12, "n_train_contexts": 16,
                                                "n_sampling_contexts": 4, "n_probe_contexts": 3},
                      "components": ["l0h1", "l1.mlp"],
                      "ray": {"num_actors": 2, "num_cpus_per_actor": 1}})


def tiny_problem(seed: int = 0):
    from spectro.sampling import make_problem

    model = tiny_model(seed)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, model.config.vocab_size, (23, 12), generator=g)
    return make_problem(model, ids[:16], ids[16:20], ids[20:23])


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
