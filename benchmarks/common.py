"""What the benchmark scripts share: their workloads and their measuring tools.

The scripts import this module as `common` (each runs as `python benchmarks/<script>.py`, so this
directory is first on sys.path); they import the product from `spectro` and nothing from the tests.

- Checkpoints with random weights: `write_random_checkpoint`, and the two speed workloads built on it.
  W1, the workload of the speed comparison with devinterp (benchmarks/bench_w1.py): the embedded
  model's shape and tokenizer, `write_w1_checkpoint` and `w1_config`. W2, a model of Pythia-14M's
  shape through the service (benchmarks/bench_w2.py, also bench_plan.py and gpu_check.py):
  `write_pythia14m_checkpoint`, with the GPT-NeoX-20B tokenizer at `TOKENIZER`.
- FLOP accounting from the shapes (`unit_flops`, `dense_sampled`) and the dense matmul rate of one
  core (`matmul_rate`), as bench_w2.py's docstring defines them.
- A tiny problem for the storage and fault-injection benchmarks: a 2-layer GPT-NeoX built in memory
  (`tiny_problem`), its config (3 components x 2 chain groups, 6 draws in chunks of 3, 2 actors),
  its sample store (`make_store`) and bitwise comparisons of stores (`arrays`, `assert_identical`).
- moto's standalone S3 server on loopback (`start_s3_server`, `s3_env`).
- Peak resident memory of a block (`PeakRSS`) and the planted family's number of groups at N tokens
  (`planted_groups`).

torch, transformers and psutil are imported where they are used: the clustering benchmarks import this
module too, and their memory figures include the process's baseline.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "spectro" / "assets" / "default_model"
# The GPT-NeoX-20B tokenizer (not part of the repository): $SPECTRO_TOKENIZER_DIR, else shared/tokenizers
# beside the repository.
TOKENIZER = (Path(os.environ.get("SPECTRO_TOKENIZER_DIR") or ROOT.parent / "shared" / "tokenizers")
             / "gpt-neox-20b.json")

# Timed in CPU seconds of this process: on a shared machine wall time measures the other tenants too.
CLOCK = time.process_time


# ---------------------------------------------------------------- checkpoints with random weights

def write_random_checkpoint(directory: Path, config: dict, tokenizer: Path, seed: int = 0, std: float = 0.02,
                            dtype: str = "float32", hub_names: bool = False) -> Path:
    """A local snapshot (config.json, model.safetensors, tokenizer.json) of the GPT-NeoX `config` with random
    weights drawn from a torch.Generator seeded `seed`: normal(0, `std`) matrices and embeddings, zero biases,
    unit LayerNorm gains, stored as torch's `dtype`. `hub_names`: the head under the hub's name `embed_out.weight`
    (transformers calls it `lm_head.weight`), as a hub snapshot has it."""
    import safetensors.torch
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = Path(tokenizer)
    if not tokenizer.is_file():
        raise FileNotFoundError(f"no tokenizer at {tokenizer} (pass --tokenizer or set SPECTRO_TOKENIZER_DIR)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer, directory / "tokenizer.json")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    with torch.random.fork_rng(devices=[]):
        model = GPTNeoXForCausalLM(GPTNeoXConfig.from_dict(config))
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        if "layernorm" in name or "layer_norm" in name:
            value = torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)
        elif name.endswith("bias"):
            value = torch.zeros_like(p, dtype=torch.float32)
        else:
            value = std * torch.randn(p.shape, generator=gen)
        key = "embed_out.weight" if hub_names and name == "lm_head.weight" else name
        state[key] = value.to(getattr(torch, dtype)).contiguous()
    safetensors.torch.save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


W1_COMPONENTS = ("l0h0", "l1h1", "l2.mlp", "l3h3")
W1_GAMMA = 100.0


def write_w1_checkpoint(directory: Path, seed: int = 0) -> Path:
    """W1's model: the embedded model's config and tokenizer with fresh random weights (seed 0)."""
    config = json.loads((EMBEDDED / "config.json").read_text())
    return write_random_checkpoint(directory, config, EMBEDDED / "tokenizer.json", seed)


def w1_config(model_dir: Path, chain_group: int, actors: int, draws: int = 50, threads: int = 0,
              probe_dtype: str = "float32", components: tuple = W1_COMPONENTS, seed: int = 0):
    """W1's run (bench_w1.py's docstring): 4 chains x `draws` draws of `components` + full on the W1 model."""
    from spectro.config import to_config

    return to_config({
        "model": {"source": str(model_dir)},
        "components": list(components),
        "stage": "sample",
        "data": {"seq_len": 64, "n_train_contexts": 512, "n_sampling_contexts": 32, "n_probe_contexts": 64},
        "sampler": {"step_size": 1e-4, "nbeta": 30.0, "gamma": W1_GAMMA, "batch_size": 16, "num_chains": 4,
                    "num_draws": draws, "burnin": 0, "steps_between_draws": 1, "chain_group": chain_group,
                    "checkpoint_every": draws, "seed": seed, "probe_dtype": probe_dtype,
                    "antithetic": False},     # devinterp draws independent chains: the same work
        "ray": {"num_actors": actors, "num_cpus_per_actor": 1, "torch_threads": threads},
    })


# Pythia-14M's config.json as the hub has it (EleutherAI/pythia-14m).
PYTHIA14M_CONFIG = {
    "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
    "hidden_size": 128, "initializer_range": 0.02, "intermediate_size": 512, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 4, "num_hidden_layers": 6,
    "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.29.2", "use_cache": True, "use_parallel_residual": True, "vocab_size": 50304,
}


def write_pythia14m_checkpoint(directory: Path, tokenizer: Path = TOKENIZER, seed: int = 0) -> Path:
    """W2's model: Pythia-14M's architecture with random fp16 weights under the hub's key names and the
    GPT-NeoX-20B tokenizer."""
    return write_random_checkpoint(directory, PYTHIA14M_CONFIG, tokenizer, seed, dtype="float16", hub_names=True)


# ---------------------------------------------------------------- FLOPs and the machine's rate

def matmul_rate(dtype: torch.dtype, seconds: float = 3.0, shape=(4096, 128, 4096)) -> float:
    """Dense matmul FLOP/s of one thread, per CPU-second: the best of 6 trials (the limit, not a typical run;
    short trials and a median under-read it when another process briefly takes the core's cache)."""
    import torch

    m, k, n = shape
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    rates = []
    for _ in range(6):
        torch.matmul(a, b, out=out)
        t0, reps = CLOCK(), 0
        while CLOCK() - t0 < seconds / 6:
            torch.matmul(a, b, out=out)
            reps += 1
        rates.append(2 * m * k * n * reps / (CLOCK() - t0))
    return max(rates)


def forward_flops_per_token(config, seq: int, start_layer: int = 0) -> float:
    H, I, V = config.hidden_size, config.intermediate_size, config.vocab_size
    n_layers = config.num_hidden_layers - start_layer
    return n_layers * (2 * (4 * H * H + 2 * H * I) + 4 * seq * H) + 2 * H * V


def dense_sampled(comp, config) -> int:
    """Sampled parameters whose gradient is a matmul: all but the token embedding (whose gradient is a
    scatter-add of d numbers per token, not 2 x vocab x d FLOPs)."""
    embed = "gpt_neox.embed_in.weight" in comp.masks
    return comp.n_parameters - (config.vocab_size * config.hidden_size if embed else 0)


def unit_flops(config, seq: int, start_layer: int, grad_layer: int, n_sampled: int, step_tokens: int,
               eval_tokens: int) -> dict:
    """FLOPs of one unit's SGLD step and evaluation. The forward runs from `start_layer` (0, or the cached
    layer); activation gradients are needed only from the head down to the component's layer `grad_layer`
    (nothing below it depends on the sampled weights), and not at all when only the head is sampled."""
    fwd = forward_flops_per_token(config, seq, start_layer)
    act = forward_flops_per_token(config, seq, grad_layer) if grad_layer < config.num_hidden_layers else 0.0
    return {"step": step_tokens * (fwd + act + 2 * n_sampled), "eval": eval_tokens * fwd}


# ---------------------------------------------------------------- a tiny problem and its sample store

COMPONENTS = ["full", "l0h1", "l1.mlp"]


def tiny_model(seed: int = 0, layers: int = 2, hidden: int = 32, heads: int = 4, vocab: int = 96, max_pos: int = 64):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)  # transformers' init uses the global generator
    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden, rotary_pct=0.25, max_position_embeddings=max_pos,
                        use_parallel_residual=True, tie_word_embeddings=False, attn_implementation="eager")
    model = GPTNeoXForCausalLM(cfg).float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tiny_config(**sampler):
    from spectro.config import to_config

    base = dict(step_size=1e-3, nbeta=8.0, gamma=100.0, batch_size=4, num_chains=4, num_draws=6,
                chain_group=2, checkpoint_every=3, seed=0)
    base.update(sampler)
    return to_config({"sampler": base, "data": {"seq_len": 12, "n_train_contexts": 16,
                                                "n_sampling_contexts": 4, "n_probe_contexts": 3},
                      "components": ["l0h1", "l1.mlp"],
                      "ray": {"num_actors": 2, "num_cpus_per_actor": 1}})


def tiny_problem(seed: int = 0):
    import torch

    from spectro.sampling import make_problem

    model = tiny_model(seed)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, model.config.vocab_size, (23, 12), generator=g)
    return make_problem(model, ids[:16], ids[16:20], ids[20:23])


def make_store(path, problem, config, components=COMPONENTS):
    """A fresh (or reopened) samples.zarr for `problem` under `config`, probe texts t0, t1, ..."""
    from spectro.config import as_dict
    from spectro.pipeline import fingerprint
    from spectro.store import Layout, ProbeTable, SampleStore

    s = config.sampler
    n_ctx, seq = problem.probe_ids.shape
    layout = Layout.plan(components, s.num_chains, s.num_draws, n_ctx, seq, s.chain_group, s.checkpoint_every,
                         config.store.probe, s.probe_shards)
    T = n_ctx * (seq - 1)
    probe = ProbeTable(input_ids=problem.probe_ids.numpy(), context=np.repeat(np.arange(n_ctx), seq - 1),
                       position=np.tile(np.arange(1, seq), n_ctx),
                       token_id=problem.probe_ids[:, 1:].reshape(-1).numpy(), text=[f"t{i}" for i in range(T)],
                       source=["code"] * T)
    return SampleStore.create_or_open(path, layout, fingerprint=fingerprint(config), config=as_dict(config),
                                      model={"source": "tiny"}, data={}, init_loss=problem.init_loss, probe=probe)


def arrays(path) -> dict:
    """Every sample and trace array of a store, by name."""
    from spectro.store import MOMENT_ARRAYS, TRACE_ARRAYS, SampleStore

    st = SampleStore.open(path)
    probe = ["probe_loss"] if st.layout.probe == "draws" else list(MOMENT_ARRAYS)
    return {n: st.read(n) for n in ["sampling_loss", *probe, "diverged_at", "progress", *TRACE_ARRAYS]}


def assert_identical(a: dict, b: dict) -> None:
    """The same arrays, bit for bit (dtype and bytes)."""
    for name in a:
        if a[name].dtype != b[name].dtype or a[name].tobytes() != b[name].tobytes():
            raise AssertionError(f"{name} differs bitwise")


# ---------------------------------------------------------------- an S3 server on loopback

def start_s3_server(timeout: float = 60.0):
    """Start moto's standalone S3 server on a free loopback port; returns (process, endpoint URL) once it
    accepts connections. Uses the `moto_server` beside this interpreter, else `-m moto.server`."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exe = Path(sys.executable).parent / "moto_server"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"moto's S3 server did not start on 127.0.0.1:{port}") from None
            time.sleep(0.2)


def s3_env(endpoint: str) -> dict:
    """The AWS_* variables that point s3fs, botocore and boto3 at `endpoint` with throwaway credentials."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}


# ---------------------------------------------------------------- memory, the planted family

class PeakRSS:
    """Peak resident memory (MB) while inside the block, sampled every 20 ms."""

    def __enter__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.done.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.mb = self.peak / 2 ** 20


def planted_groups(n_tokens: int) -> int:
    """Groups of the planted family at `n_tokens` tokens: 60 at 20,000, scaled as sqrt(N / 20,000)."""
    return int(round(60 * np.sqrt(n_tokens / 20000)))


def parse_setting(setting: str) -> dict:
    """A sampler setting as the calibration benchmarks take it: `key=value,...` (values as JSON; "" -> {})."""
    out = {}
    for kv in filter(None, setting.split(",")):
        k, v = kv.split("=")
        out[k] = json.loads(v)
    return out
