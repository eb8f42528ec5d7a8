"""Two Ray nodes on one machine (`ray.cluster_utils.Cluster`): a stage trains with one worker on each node
over gloo; when a node that holds a worker is removed mid-stage, Ray Train replaces the worker group on the
nodes that are left and the stage resumes from its last recorded checkpoint, not from epoch 0.

One Ray cluster for the module: a head and two worker nodes of 1 CPU each, so the stage's two 1-CPU
workers always sit on two different nodes and still fit after one node is gone.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from tests.engine.callbacks import PauseAfterFirstEpoch

from .conftest import digits_stage, run_stage_in_thread, wait_for_pause

pytestmark = [pytest.mark.integration, pytest.mark.faults]
EPOCHS = 3


class NodesAndPause(PauseAfterFirstEpoch):
    """Reports the node of every rank (`node_ids`); after epoch 0 is recorded, rank 0 writes them to
    `marker` and waits for `go` (the test removes a node meanwhile)."""

    def on_epoch_end(self, worker, epoch, metrics):
        import ray
        import torch.distributed as dist
        nodes = [None] * worker.world_size
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
        metrics["node_ids"] = nodes
        self.nodes = nodes

    def marker_text(self) -> str:
        return json.dumps(self.nodes)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, digits, mlflow_server):
    import ray
    from ray.cluster_utils import Cluster

    tmp = tmp_path_factory.mktemp("two-nodes")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "bitmixer" / "torch_extensions"))
    (Path(tempfile.gettempdir()) / "ray").mkdir(exist_ok=True)
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: socket paths are limited
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                          "temp_dir": temp_dir})
    workers = [nodes.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=nodes.address)
    try:
        yield {"tmp": tmp, "data": digits, "mlflow": mlflow_server, "cluster": nodes, "workers": workers}
    finally:
        ray.shutdown()
        nodes.shutdown()


def test_stage_spans_two_nodes_and_survives_losing_one(cluster):
    from mlflow.tracking import MlflowClient

    cfg = digits_stage("two-nodes", data=cluster["data"], tracking_uri=cluster["mlflow"].uri,
                       storage_path=str(cluster["tmp"] / "ray"), epochs=EPOCHS, eval_every_epochs=EPOCHS,
                       max_failures=1, scaling=dict(num_workers=2, cpus_per_worker=1))
    marker, go = cluster["tmp"] / "paused", cluster["tmp"] / "go"
    thread, box = run_stage_in_thread(cfg, [NodesAndPause(str(marker), str(go))])
    wait_for_pause(marker, thread, box)
    first_nodes = json.loads(marker.read_text())
    assert len(set(first_nodes)) == 2  # one worker on each of two nodes
    removed = next(node for node in cluster["workers"] if node.node_id in first_nodes)
    cluster["cluster"].remove_node(removed, allow_graceful=False)
    go.write_text("go")
    thread.join(timeout=900)
    assert not thread.is_alive() and "error" not in box, box.get("error")

    result = box["result"]
    assert result.metrics["resumed_at_epoch"] == 1 and result.metrics["epoch"] == EPOCHS - 1
    last_nodes = result.metrics["node_ids"]
    assert removed.node_id not in last_nodes and len(set(last_nodes)) == 2  # resumed on what is left
    client = MlflowClient(cluster["mlflow"].uri)
    history = client.get_metric_history(result.mlflow_run_id, "sys/epoch_time_s")
    assert sorted(m.step for m in history) == list(range(EPOCHS))  # every epoch trained once
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and "model.pt" in {a.path for a in client.list_artifacts(run.info.run_id)}
