"""Helpers shared by the test files (test files import from here, never from
each other): a tiny real GPT-NeoX and sampling problem, sample stores built
on it, composed Hydra configs, a hostile pickle, and the linear-regression
closed forms that SGLD and the estimator are checked against.

Bigger fixture builders have their own modules: pythia_fixture.py (hub-layout
checkpoints), regression.py (linear regression as a spectro Problem),
synthetic.py (the easy planted family, a Gaussian closed form), wandb_reader.py (offline wandb runs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from spectro.config import SpectroConfig, as_dict, to_config
from tests.synthetic import gaussian_stationary_moments

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


# --------------------------------------------------------------------------- #
# configs
# --------------------------------------------------------------------------- #


def compose_cfg(overrides=()):
    """The Hydra config from conf/ with these overrides, as the command line would compose it."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


# --------------------------------------------------------------------------- #
# a tiny GPT-NeoX and its sampling problem
# --------------------------------------------------------------------------- #


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


# --------------------------------------------------------------------------- #
# sample stores
# --------------------------------------------------------------------------- #

COMPONENTS = ["full", "l0h1", "l1.mlp"]


def make_store(path, problem, config, components=COMPONENTS):
    """A fresh (or reopened) samples.zarr for `problem` under `config`, probe texts t0, t1, ..."""
    from spectro.pipeline import fingerprint
    from spectro.store import Layout, ProbeTable, SampleStore

    s = config.sampler
    layout = Layout.plan(components, s.num_chains, s.num_draws, problem.probe_ids.shape[0],
                         problem.probe_ids.shape[1], s.chain_group, s.checkpoint_every, config.store.probe,
                         s.probe_shards)
    n_ctx, seq = problem.probe_ids.shape
    T = n_ctx * (seq - 1)
    probe = ProbeTable(input_ids=problem.probe_ids.numpy(), context=np.repeat(np.arange(n_ctx), seq - 1),
                       position=np.tile(np.arange(1, seq), n_ctx), token_id=problem.probe_ids[:, 1:].reshape(-1).numpy(),
                       text=[f"t{i}" for i in range(T)], source=["code"] * T)
    return SampleStore.create_or_open(path, layout, fingerprint=fingerprint(config), config=as_dict(config),
                                      model={"source": "tiny"}, data={}, init_loss=problem.init_loss, probe=probe)


def arrays(path):
    """Every sample and trace array of a store, by name."""
    from spectro.store import MOMENT_ARRAYS, TRACE_ARRAYS, SampleStore

    st = SampleStore.open(path)
    probe = ["probe_loss"] if st.layout.probe == "draws" else list(MOMENT_ARRAYS)
    names = ["sampling_loss", *probe, "diverged_at", "progress", *TRACE_ARRAYS]
    return {n: st.read(n) for n in names}


def kill_actor_mid_run(store_path, killed: list, min_done: int, timeout_s: float = 120.0) -> None:
    """Once the store at `store_path` has at least `min_done` chain-draws committed and a unit is part-way, SIGKILL
    one sampler actor (a descendant of this process: this test's local Ray, never another's) and append its pid
    to `killed`. Run it in a thread beside `service.sample`."""
    import os
    import signal
    import time

    import psutil

    from spectro.store import SampleStore

    deadline = time.time() + timeout_s
    while time.time() < deadline and not killed:
        st = SampleStore.open(store_path)
        prog = st.progress()
        part_way = ((prog > 0) & (prog < st.layout.n_draws)).any()     # a unit with a checkpoint and draws left
        if prog.sum() >= min_done and part_way:
            for proc in psutil.Process().children(recursive=True):     # Ray titles it "ray::SamplerActor..."
                try:
                    cmdline = proc.cmdline()
                except psutil.Error:
                    continue
                if any("SamplerActor" in part for part in cmdline):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed.append(proc.pid)
                    return
        time.sleep(0.05)


def assert_identical(a, b):
    for name in a:
        assert a[name].dtype == b[name].dtype
        assert np.array_equal(a[name], b[name], equal_nan=True), f"{name} differs"
        # bitwise, not just numerically equal
        assert a[name].tobytes() == b[name].tobytes(), f"{name} differs bitwise"


# --------------------------------------------------------------------------- #
# a hostile pickle
# --------------------------------------------------------------------------- #


class WritesAFile:
    """Unpickling this runs `exec`, which creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def malicious_bin(path: Path, marker: Path) -> None:
    """A pytorch_model.bin of the tiny checkpoint whose unpickling writes `marker`."""
    from tests.pythia_fixture import TINY_CONFIG, hub_state_dict

    state = hub_state_dict(TINY_CONFIG)
    state["gpt_neox.embed_in.weight"] = WritesAFile(marker)
    torch.save(state, path)


# --------------------------------------------------------------------------- #
# linear regression in closed form (plain torch, for SGLD and the estimator)
# --------------------------------------------------------------------------- #


def regression_problem(d=2, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    w_true = torch.tensor([1.0, -2.0, 0.5][:d], dtype=torch.float64)
    y = X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    w_hat = torch.linalg.solve(X.T @ X, X.T @ y)
    return X, y, w_hat


def loss_fn(p, batch):
    X, y = batch
    r = y - X @ p["w"]
    return 0.5 * (r * r).mean()


def closed_form(X, y, w_hat, anchor, nbeta, gamma, eps):
    """Mean and covariance of full-batch SGLD's stationary law on the localized, tempered regression posterior."""
    n = X.shape[0]
    H = X.T @ X / n
    lam = nbeta * H + gamma * torch.eye(X.shape[1], dtype=torch.float64)
    mean = torch.linalg.solve(lam, nbeta * H @ w_hat + gamma * anchor)
    return gaussian_stationary_moments(lam, mean, eps)


# --------------------------------------------------------------------------- #
# killing a sampler actor
# --------------------------------------------------------------------------- #


def kill_sampler_actor_when(ready, killed: list, timeout: float = 120.0) -> None:
    """Thread target: poll `ready()` until it is true, then SIGKILL one sampler actor of this process's own
    Ray instance (its descendants, never another process's) and append its pid to `killed`."""
    import os
    import signal
    import time

    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline and not killed:
        if ready():
            for proc in psutil.Process().children(recursive=True):
                try:
                    cmdline = proc.cmdline()
                except psutil.Error:
                    continue
                if any("SamplerActor" in part for part in cmdline):     # Ray titles it "ray::SamplerActor..."
                    os.kill(proc.pid, signal.SIGKILL)
                    killed.append(proc.pid)
                    return
        time.sleep(0.05)


# --------------------------------------------------------------------------- #
# an S3 server on loopback (moto's standalone server, a subprocess)
# --------------------------------------------------------------------------- #


def start_s3_server(timeout: float = 60.0):
    """Start moto's standalone S3 server on a free loopback port; returns (process, endpoint URL) once it
    accepts connections. Uses the `moto_server` beside this interpreter (the venv's own), else `-m moto.server`."""
    import socket
    import subprocess
    import sys
    import time

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
    """The AWS_* variables that point s3fs, botocore and boto3 (in every process that inherits them) at
    `endpoint` with throwaway credentials."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}


# --------------------------------------------------------------------------- #
# a unit stopped between two of its writes
# --------------------------------------------------------------------------- #


class Stopped(Exception):
    """Stands for the process being killed at this point."""


def stopping_store(path, point: str, at: int):
    """A real SampleStore at `path` whose writer stops the `at`-th time it reaches `point`: "write_block" (after
    the block's data, before the checkpoint), "set_progress" (after the checkpoint, before progress) or an array
    name (in the middle of a block's data, before that array is written)."""
    from spectro.store import SampleStore

    class StoppingStore(SampleStore):
        seen = 0

        def _reached(self, where: str) -> None:
            if where == point:
                self.seen += 1
                if self.seen == at:
                    raise Stopped(where)

        def _array(self, name):
            self._reached(name)
            return super()._array(name)

        def write_block(self, *args, **kwargs):
            super().write_block(*args, **kwargs)
            self._reached("write_block")

        def set_progress(self, *args, **kwargs):
            self._reached("set_progress")
            super().set_progress(*args, **kwargs)

    opened = SampleStore.open(path, mode="r+")
    return StoppingStore(opened.path, opened.group)
