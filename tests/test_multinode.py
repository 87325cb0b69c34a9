"""Multi-node: a two-node Ray cluster on this machine (ray.cluster_utils);
actors spread across nodes; removing the worker node mid-run still completes
the run, with the same numbers as an uninterrupted run."""

import threading
import time

import pytest

from spectro.service import sample
from spectro.store import SampleStore
from tests.helpers import arrays, assert_identical, make_store, tiny_config, tiny_problem

pytestmark = pytest.mark.slow          # a second Ray node, removed mid-run


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster, worker
    ray.shutdown()
    cluster.shutdown()


def test_worker_node_removed_mid_run_completes_identically(two_nodes, tmp_path):
    import ray

    cluster, worker = two_nodes
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    problem, config = tiny_problem(), tiny_config(num_draws=9, checkpoint_every=3)
    store = make_store(tmp_path / "a" / "samples.zarr", problem, config)
    removed = []

    def remove_worker():
        deadline = time.time() + 180
        total = store.layout.n_draws * store.layout.n_chains * len(store.layout.components)
        while time.time() < deadline:
            done = SampleStore.open(store.path).progress().sum()
            if 0 < done < total // 2:
                cluster.remove_node(worker)
                removed.append(done)
                return
            time.sleep(0.05)

    t = threading.Thread(target=remove_worker)
    t.start()
    report = sample(problem, store, config, tmp_path / "a" / "checkpoints", poll_s=0.1)
    t.join()
    assert removed, "the worker was never removed mid-run"
    assert store.complete()
    assert report.actor_failures >= 1
    assert len({u["node"] for u in report.units_run}) >= 1
    # reference: the same run, uninterrupted, on the surviving node
    ref = make_store(tmp_path / "b" / "samples.zarr", problem, config)
    sample(problem, ref, config, tmp_path / "b" / "checkpoints")
    assert_identical(arrays(ref.path), arrays(store.path))
