"""Fault injection, full variant: inject every kind of fault at random points,
rerun, and check the results are bit-identical to an uninterrupted run.

    python benchmarks/fault_injection.py [--rounds 3] [--seed 0] [--only actor,driver,...]

Real processes, real Ray, real Zarr, nothing mocked. Faults:

- actor:      kill -9 a SamplerActor process of this driver at a random
              progress point (+ a random delay); the service re-queues its unit.
- corrupt:    flip a byte in / truncate / delete a random committed chunk, or
              truncate a random checkpoint, then resume.
- disk:       a size-limited directory: a real tmpfs (`mount -t tmpfs -o
              size=...`, needs root) of a random size too small for the run;
              the run stops with DiskFullError; remount bigger, resume.
- node:       a two-node Ray cluster on this machine (ray.cluster_utils.Cluster:
              a head and a worker node, each its own raylet and object store);
              the worker node is removed at a random progress point.
- midwrite:   the store's real write path (SampleStore.write_block, what
              actors run) in its own process, writing 4 MB chunks, frozen
              (SIGSTOP) at random moments until it is caught with a chunk
              half on disk (zarr's `<chunk>.<uuid>.partial`), then SIGKILLed
              there. A chunk write is ~1 ms of a unit's seconds, so random
              kills of the whole job almost never land inside one; this does.
- driver:     the main job (`jobs/run.py`, a tiny local model, stage=sample)
              as a subprocess; the driver process alone is SIGKILLed at a
              random progress point (its Ray processes may outlive it; after
              20 s any that did are killed), then the same command is rerun.
- covariance: the susceptibilities stage (the Ray Data job) as a subprocess,
              SIGKILLed at a random moment while its output is half made; rerun.

For each: faults injected, runs completed after the fault, data lost (draws
or chi values that differ from the uninterrupted run, must be 0) and whether
every array is bit-identical. Library-level faults use the tiny GPT-NeoX of
benchmarks/common.py; the driver and covariance faults run the real CLI on a tiny
random GPT-NeoX saved as a local snapshot, with the embedded tokenizer and a
small text corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import EMBEDDED, arrays, make_store, tiny_config, tiny_problem, write_random_checkpoint  # noqa: E402
from midwrite import fault_midwrite  # noqa: E402
from spectro.store import TRACE_ARRAYS  # noqa: E402

UNIT_AND_STATE = ("sampling_loss", "probe_loss", *TRACE_ARRAYS, "diverged_at", "progress")


# ---------------------------------------------------------------- comparing results

def lost(ref: dict, got: dict) -> tuple[int, bool]:
    """(draw rows that differ from the reference, every array bitwise identical)."""
    rows = ~np.all(np.isclose(ref["probe_loss"], got["probe_loss"], rtol=0, atol=0, equal_nan=True), axis=-1)
    rows |= ~np.isclose(ref["sampling_loss"], got["sampling_loss"], rtol=0, atol=0, equal_nan=True)
    identical = all(ref[n].dtype == got[n].dtype and ref[n].tobytes() == got[n].tobytes() for n in ref)
    return int(rows.sum()), identical


def chi_arrays(run_dir: Path) -> dict:
    import xarray as xr
    ds = xr.open_zarr(run_dir / "susceptibilities.zarr", consolidated=False)
    return {n: ds[n].values for n in ("chi", "chi_se", "chi_per_chain", "llc_mean", "rhat", "ess_bulk")}


class Tally:
    def __init__(self):
        self.rows: dict[str, dict] = {}

    def add(self, fault: str, injected: int, completed: bool, data_lost: int, identical: bool, note: str = ""):
        r = self.rows.setdefault(fault, {"injected": 0, "completed": 0, "lost": 0, "identical": True, "notes": []})
        r["injected"] += injected
        r["completed"] += int(completed)
        r["lost"] += data_lost
        r["identical"] &= identical and completed
        if note:
            r["notes"].append(note)
        print(f"  {fault}: injected {injected}, completed {completed}, data lost {data_lost}, "
              f"bit-identical {identical}{' (' + note + ')' if note else ''}", flush=True)

    def table(self) -> str:
        lines = ["| fault | faults injected | runs completed | data lost | bit-identical |", "|---|---|---|---|---|"]
        for fault, r in self.rows.items():
            lines.append(f"| {fault} | {r['injected']} | {r['completed']} | {r['lost']} | "
                         f"{'yes' if r['identical'] else 'NO'} |")
        total = {k: sum(r[k] for r in self.rows.values()) for k in ("injected", "completed", "lost")}
        lines.append(f"| **all** | {total['injected']} | {total['completed']} | {total['lost']} | "
                     f"{'yes' if all(r['identical'] for r in self.rows.values()) else 'NO'} |")
        return "\n".join(lines)


# ---------------------------------------------------------------- library-level faults (tiny GPT-NeoX)

def descendants_named(word: str) -> list:
    import psutil
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if any(word in part for part in p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def at_progress(store_path: Path, target: int, action, deadline_s: float = 300):
    """Run `action()` in a thread once the store's committed chain-draws reach `target`."""
    from spectro.store import SampleStore
    fired = []

    def watch():
        end = time.time() + deadline_s
        while time.time() < end:
            try:
                done = int(SampleStore.open(store_path).progress().sum())
            except Exception:
                done = 0
            if done >= target:
                fired.append(action())
                return
            time.sleep(0.02)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t, fired


def fault_actor(rng, rounds, work, ref, tally):
    from spectro.service import sample

    problem, config = tiny_problem(), tiny_config(burnin=2)
    total = 3 * 4 * 6
    for r in range(rounds):
        run = work / f"actor{r}"
        store = make_store(run / "samples.zarr", problem, config)
        target, delay = int(rng.integers(1, total // 2)), float(rng.uniform(0, 0.5))

        def kill():
            time.sleep(delay)
            victims = descendants_named("SamplerActor")
            if victims:
                victim = victims[int(rng.integers(len(victims)))]
                os.kill(victim.pid, signal.SIGKILL)
            return len(victims) > 0

        t, fired = at_progress(store.path, target, kill)
        report = sample(problem, store, config, run / "checkpoints", poll_s=0.1)
        t.join()
        n, same = lost(ref, arrays(store.path))
        tally.add("kill -9 an actor", int(any(fired)), store.complete(), n, same,
                  f"at {target}+{delay:.2f}s, {report.actor_failures} actor lost")
        shutil.rmtree(run)


def fault_corrupt(rng, rounds, work, ref_dir, ref, tally):
    from spectro.service import sample
    from spectro.store import SampleStore

    problem, config = tiny_problem(), tiny_config(burnin=2)
    for r in range(rounds):
        run = work / f"corrupt{r}"
        shutil.copytree(ref_dir, run)
        zroot = run / "samples.zarr"
        chunks = [p for p in zroot.rglob("*") if p.is_file() and p.relative_to(zroot).parts[0] in UNIT_AND_STATE
                  and p.relative_to(zroot).parts[1:2] == ("c",)]
        kind = ["flip a byte", "truncate", "delete", "truncate checkpoint"][r % 4]
        if kind == "truncate checkpoint":
            victim = sorted((run / "checkpoints").glob("*.pt"))[int(rng.integers(6))]
            victim.write_bytes(victim.read_bytes()[:int(rng.integers(1, victim.stat().st_size))])
        else:
            victim = sorted(chunks)[int(rng.integers(len(chunks)))]
            data = bytearray(victim.read_bytes())
            if kind == "flip a byte":
                data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
                victim.write_bytes(bytes(data))
            elif kind == "truncate":
                victim.write_bytes(bytes(data[:int(rng.integers(0, len(data)))]))
            else:
                victim.unlink()
        store = SampleStore.open(run / "samples.zarr", mode="r+")
        report = sample(problem, store, config, run / "checkpoints")
        n, same = lost(ref, arrays(store.path))
        tally.add("corrupt/truncate/delete a chunk or checkpoint", 1, store.complete() and store.verify() == [],
                  n, same, f"{kind} {victim.relative_to(run)}: {len(report.units_repaired)} unit(s) repaired, "
                            f"{len(report.units_run)} run")
        shutil.rmtree(run)


def fault_disk(rng, rounds, work, ref, tally):
    from spectro.errors import DiskFullError
    from spectro.service import sample

    problem, config = tiny_problem(), tiny_config(burnin=2)
    for r in range(rounds):
        disk = work / f"disk{r}"
        disk.mkdir()
        size_kb = int(rng.integers(300, 1200))        # the store needs ~92 KB, the whole run ~2 MB
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(disk)],
                                               capture_output=True).returncode != 0:
            print("  disk full: skipped (needs root and mount -t tmpfs)")
            return
        try:
            store = make_store(disk / "samples.zarr", problem, config)
            hit = False
            try:
                sample(problem, store, config, disk / "checkpoints")
            except DiskFullError:
                hit = True
            leftovers = list(disk.rglob("*.partial")) + list(disk.rglob("*.tmp"))
            kept = int(store.progress().sum())
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
            sample(problem, store, config, disk / "checkpoints")
            n, same = lost(ref, arrays(store.path))
            tally.add("disk full (tmpfs)", int(hit), store.complete(), n, same and not leftovers,
                      f"{size_kb} KB: {kept} chain-draws kept at the error, {len(leftovers)} half-written files")
        finally:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fault_node(rng, rounds, work, ref, tally):
    import ray
    from ray.cluster_utils import Cluster

    from spectro.service import sample

    problem, config = tiny_problem(), tiny_config(burnin=2)
    total = 3 * 4 * 6
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        for r in range(rounds):
            worker = cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            run = work / f"node{r}"
            store = make_store(run / "samples.zarr", problem, config)
            target = int(rng.integers(1, total // 2))
            t, fired = at_progress(store.path, target, lambda: cluster.remove_node(worker) or True)
            report = sample(problem, store, config, run / "checkpoints", poll_s=0.1)
            t.join()
            n, same = lost(ref, arrays(store.path))
            tally.add("remove a worker node", int(any(fired)), store.complete(), n, same,
                      f"at {target} chain-draws, {report.actor_failures} actor(s) lost")
            shutil.rmtree(run)
    finally:
        ray.shutdown()
        cluster.shutdown()


# ---------------------------------------------------------------- the main job as a subprocess

# A random 2-layer GPT-NeoX with the embedded model's tokenizer (4096 tokens), for the CLI's faults.
TINY_SNAPSHOT = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": 4096,
                 "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
                 "rotary_pct": 0.25, "max_position_embeddings": 64, "use_parallel_residual": True,
                 "tie_word_embeddings": False}


def cli_args(model_dir: Path, corpus: Path) -> list[str]:
    return ["model=local", f"model.source={model_dir}", "data=files", f"data.corpus.paths=[{corpus}]",
            "components=[l0h1,l1.mlp]", "sampler.num_chains=4", "sampler.chain_group=2", "sampler.num_draws=8",
            "sampler.checkpoint_every=2", "sampler.burnin=2", "sampler.batch_size=4", "data.seq_len=16",
            "data.n_probe_contexts=8", "data.n_train_contexts=32", "data.n_sampling_contexts=4", "ray.num_actors=2"]


def job(run_dir: Path, args: list[str], stage: str) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "jobs" / "run.py"), f"hydra.run.dir={run_dir}", *args, f"stage={stage}"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})


def finish(proc: subprocess.Popen, what: str) -> str:
    out, _ = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{out[-3000:]}")
    return out


def kill_driver(proc: subprocess.Popen, grace_s: float = 20.0) -> int:
    """SIGKILL the driver alone; its private Ray instance should follow. Returns survivors killed by us."""
    import psutil
    family = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    gone, alive = psutil.wait_procs(family, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)
    return len(alive)


def fault_driver(rng, rounds, work, args, ref_cli, tally):
    from spectro.store import SampleStore

    total = 3 * 4 * 8
    for r in range(rounds):
        run = work / f"driver{r}"
        proc = job(run, args, "sample")
        target = int(rng.integers(1, total - 8))
        store = run / "samples.zarr"
        hit, note = False, ""
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            try:
                done = int(SampleStore.open(store).progress().sum())
            except Exception:
                done = 0
            if done >= target:
                survivors = kill_driver(proc)
                torn = len(list(store.rglob("*.partial")))
                hit = True
                note = (f"killed at {done} chain-draws; {survivors} Ray process(es) outlived it by 20 s "
                        f"and were killed; {torn} half-written chunk(s)")
                break
            time.sleep(0.02)
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        finish(job(run, args, "sample"), "resume")
        summary = json.loads((run / "summary.json").read_text())["sample"]
        n, same = lost(ref_cli, arrays(store))
        tally.add("SIGKILL the driver (jobs/run.py)", int(hit), summary["complete"], n, same,
                  note + f"; the rerun ran {summary['units_run']} unit(s), repaired "
                         f"{len(summary.get('units_repaired', []))}")
        shutil.rmtree(run)


def fault_covariance(rng, rounds, work, args, ref_dir, ref_chi, tally):
    for r in range(rounds):
        run = work / f"cov{r}"
        run.mkdir()
        shutil.copytree(ref_dir / "samples.zarr", run / "samples.zarr")
        shutil.copy(ref_dir / "config.json", run / "config.json")
        proc = job(run, args, "susceptibilities")
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and not (run / "susceptibilities.zarr.partial").exists():
            time.sleep(0.01)
        delay = float(rng.uniform(0, 2.0))
        time.sleep(delay)
        hit = proc.poll() is None
        if hit:
            kill_driver(proc)
        proc.communicate()
        half = (run / "susceptibilities.zarr.partial").exists()
        finish(job(run, args, "susceptibilities"), "covariance rerun")
        got = chi_arrays(run)
        same = all(ref_chi[k].tobytes() == got[k].tobytes() for k in ref_chi)
        n = int(sum((~np.isclose(ref_chi[k], got[k], rtol=0, atol=0, equal_nan=True)).sum() for k in ref_chi))
        tally.add("interrupt the covariance job", int(hit), True, n, same,
                  f"killed {delay:.2f}s after its output appeared; half-made output left: {half}")
        shutil.rmtree(run)


# ---------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="faults of each kind")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="actor,corrupt,disk,node,midwrite,driver,covariance")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    only = set(a.only.split(","))
    rng = np.random.default_rng(a.seed)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="spectro-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    tally = Tally()
    t0 = time.time()

    if only & {"actor", "corrupt", "disk", "node"}:
        import ray

        from spectro.service import sample

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        problem, config = tiny_problem(), tiny_config(burnin=2)
        ref_dir = work / "reference"
        sample(problem, make_store(ref_dir / "samples.zarr", problem, config), config, ref_dir / "checkpoints")
        ref = arrays(ref_dir / "samples.zarr")
        print(f"reference (library, tiny GPT-NeoX): {ref['probe_loss'].shape} probe losses", flush=True)
        if "actor" in only:
            fault_actor(rng, a.rounds, work, ref, tally)
        if "corrupt" in only:
            fault_corrupt(rng, max(a.rounds, 4), work, ref_dir, ref, tally)
        if "disk" in only:
            fault_disk(rng, a.rounds, work, ref, tally)
        ray.shutdown()
        if "node" in only:
            fault_node(rng, a.rounds, work, ref, tally)
    if "midwrite" in only:
        fault_midwrite(rng, a.rounds, work, tally)

    if only & {"driver", "covariance"}:
        model_dir = write_random_checkpoint(work / "model", TINY_SNAPSHOT, EMBEDDED / "tokenizer.json", std=0.05)
        corpus = work / "corpus.txt"
        import sysconfig
        corpus.write_text((Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text()
                          + (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text())
        args = cli_args(model_dir, corpus)
        ref_cli_dir = work / "reference-cli"
        finish(job(ref_cli_dir, args, "sample"), "reference sample")
        finish(job(ref_cli_dir, args, "susceptibilities"), "reference susceptibilities")
        ref_cli = arrays(ref_cli_dir / "samples.zarr")
        ref_chi = chi_arrays(ref_cli_dir)
        print(f"reference (CLI, tiny snapshot): {ref_cli['probe_loss'].shape} probe losses, "
              f"chi {ref_chi['chi'].shape}", flush=True)
        if "driver" in only:
            fault_driver(rng, a.rounds, work, args, ref_cli, tally)
        if "covariance" in only:
            fault_covariance(rng, a.rounds, work, args, ref_cli_dir, ref_chi, tally)

    print(f"\nfault injection, seed {a.seed}, {a.rounds} round(s) per kind, {time.time() - t0:.0f} s\n")
    print(tally.table())
    for fault, r in tally.rows.items():
        for note in r["notes"]:
            print(f"- {fault}: {note}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
