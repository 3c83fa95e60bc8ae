"""A three-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head and two worker nodes), and
the project's own stages on it. Run by tests/test_cluster_multinode.py in a process of its own, so its Ray
never meets the test session's local Ray:

    python tests/cluster_multinode_job.py WORKDIR     # writes WORKDIR/result.json

The node shapes make placement a property of the cluster, as on a real one: the head has 1 CPU (the driver,
Ray Train's controller and Ray Data's read tasks), each worker node 2 CPUs, and a training worker or an eval
actor asks for 2 CPUs, so each needs a whole worker node and the two land on different nodes.

1. Fault-free: `train.run` with 2 workers, checkpoints on a storage path every node shares (a local dir:
   all nodes are this machine), then `eval.run` with 2 actors across both worker nodes.
2. Node loss: a third worker node joins (the spare capacity an autoscaler would add), then the same training
   config runs under another run name; once its first checkpoint exists, the node of one training worker
   is removed (SIGKILL of its raylet and everything on it). With max_failures=1 Ray Train restarts the
   worker group from the last checkpoint on the nodes left, and the run ends at the planned step.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

WORKER_NODE = {"num_cpus": 2, "object_store_memory": 150 * 2**20}
NODE_LOSS_TIMEOUT_S = 240
# Long enough that the run is still going when the killer sees the first checkpoint registered (the
# controller records it at its next poll, ~2 s after the report): 20 more steps are seconds of work.
MAX_STEPS = 24


def make_data(data: Path) -> None:
    """A pipeline-format output (train/validation/test + tokenizer + manifest), built without Ray."""
    from eval_fixtures import char_tokenizer, make_rows, write_split

    write_split(data, "train", make_rows(512, seed=1), files=4)
    write_split(data, "validation", make_rows(32, seed=2), files=1)
    write_split(data, "test", make_rows(48, seed=3), files=2)
    char_tokenizer().save_pretrained(data / "tokenizer")
    (data / "manifest.json").write_text(json.dumps({"complete": True}))


def train_config(work: Path, run_name: str):
    from train.config import TrainConfig

    return TrainConfig(
        data=str(work / "data"), output=str(work / run_name), storage_path=str(work / "storage"),
        run_name=run_name, model="t5-tiny", precision="fp32", num_workers=2, cpus_per_worker=2, torch_threads=1,
        global_batch_size=16, max_steps=MAX_STEPS, warmup_steps=2, eval_every=4, ckpt_every=4, eval_samples=8,
        eval_batch_size=8, log_every=2, keep_best_k=2, max_failures=1, seed=0,  # log_every: see test_run_e2e
    )


def actor_nodes(class_fragment: str, alive_only: bool = False) -> dict[str, str]:
    """actor id -> node id of every actor (alive or dead, unless alive_only) whose class name contains
    class_fragment."""
    import ray

    return {
        actor_id: info["Address"]["NodeID"]
        for actor_id, info in ray._private.state.actors().items()
        if class_fragment in info["ActorClassName"] and info["Address"]["NodeID"]
        and (not alive_only or info["State"] == "ALIVE")
    }


def remove_a_training_node(cluster, nodes_by_id: dict, run_dir: Path, done: threading.Event, log: dict) -> None:
    """Wait for the run's first checkpoint, then kill the node of one training worker. (Runs in a thread;
    adding a node must happen in the main thread: Ray's Node registers signal handlers.)"""
    from train_fixtures import committed_checkpoints

    deadline = time.monotonic() + NODE_LOSS_TIMEOUT_S
    while not (registered := committed_checkpoints(run_dir)) and time.monotonic() < deadline:
        if done.is_set():
            break
        time.sleep(0.2)
    if not registered:
        log["error"] = "no checkpoint was registered before training ended"
        return
    # Only this run's live workers: the fault-free run's dead workers sat on other nodes, and removing a
    # node that holds no training worker is no fault at all.
    alive = {a: n for a, n in actor_nodes("RayTrainWorker", alive_only=True).items() if n in nodes_by_id}
    if not alive:
        log["error"] = "no live training worker on a removable node"
        return
    train_nodes = sorted(set(alive.values()))
    victim_id = train_nodes[0]
    log["checkpoints_before_removal"] = registered
    log["train_worker_nodes"] = train_nodes
    log["removed_node"] = victim_id
    cluster.remove_node(nodes_by_id.pop(victim_id), allow_graceful=False)


def main(work: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    import eval as eval_stage
    import train as train_stage
    from cluster.config import RayConfig
    from eval.config import EvalConfig

    make_data(work / "data")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": 200 * 2**20, "include_dashboard": False},
    )
    workers = [cluster.add_node(**WORKER_NODE) for _ in range(2)]
    cluster.wait_for_nodes()
    result: dict = {"head": cluster.head_node.node_id, "workers": [w.node_id for w in workers]}
    ray.init(address=cluster.address, log_to_driver=False)
    ray_cfg = RayConfig(address=cluster.address)
    try:
        t0 = time.monotonic()
        result["train"] = train_stage.run(train_config(work, "spread"), ray_cfg)
        result["train_worker_nodes"] = sorted(set(actor_nodes("RayTrainWorker").values()))
        result["train_s"] = time.monotonic() - t0

        t0 = time.monotonic()
        before = set(actor_nodes("Predictor"))
        result["eval"] = eval_stage.run(
            EvalConfig(output=str(work / "eval"), model=str(work / "spread"), data=str(work / "data"),
                       split="test", max_rows=16, num_actors=2, cpus_per_actor=2, torch_threads=1, batch_size=8,
                       sort_window=8),
            ray_cfg,
        )
        result["eval_actor_nodes"] = sorted({n for a, n in actor_nodes("Predictor").items() if a not in before})
        result["eval_s"] = time.monotonic() - t0

        t0 = time.monotonic()
        spare = cluster.add_node(**WORKER_NODE)
        cluster.wait_for_nodes()
        result["spare"] = spare.node_id
        nodes_by_id = {w.node_id: w for w in [*workers, spare]}
        done, fault = threading.Event(), {}
        killer = threading.Thread(
            target=remove_a_training_node,
            args=(cluster, nodes_by_id, work / "storage" / "node-loss", done, fault),
        )
        killer.start()
        try:
            result["train_node_loss"] = train_stage.run(train_config(work, "node-loss"), ray_cfg)
        finally:
            done.set()
            killer.join()
        result["fault"] = fault
        result["train_node_loss_s"] = time.monotonic() - t0
    finally:
        (work / "result.json").write_text(json.dumps(result, indent=2, default=str))
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
