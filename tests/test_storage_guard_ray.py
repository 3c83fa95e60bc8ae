"""The shared-storage guard on a live local Ray (cluster/storage.py): the train driver refuses a node-local
path before any training when its work must land on other machines, and lets the same run through when the
path is declared shared. Seconds: the run never gets as far as starting workers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cluster.config import ConfigError, RayConfig
from cluster.connect import ResourceError
from cluster.storage import require_shared_storage
from train.config import TrainConfig
from train.trainer import run

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import make_dataset  # noqa: E402

# The driver "connected to" a cluster that can grow (as under `ray job submit`); Ray itself is the test's
# local one, already initialized, so init_ray reuses it and this address is only read by the guard.
GROWABLE = "127.0.0.1:6379"


def cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), output=str(out), model="t5-tiny", precision="fp32", num_workers=8,
                global_batch_size=16, max_steps=4, warmup_steps=1, eval_every=4, ckpt_every=4, eval_samples=0)
    return TrainConfig(**{**base, **kw})


def test_require_shared_storage_reads_the_live_cluster(ray_local, tmp_path):
    local = {"train.output": (str(tmp_path / "out"), False)}
    # Fits this one machine: nothing to share.
    require_shared_storage(local, RayConfig(address=GROWABLE), {"CPU": 1}, 2)
    # Too big for this machine but Ray was started here (cannot grow): left to require_resources.
    require_shared_storage(local, RayConfig(), {"CPU": 1}, 64)
    # Too big and the cluster can grow: the work lands on other machines, which cannot see tmp_path.
    with pytest.raises(ConfigError, match=rf"^train.output {tmp_path}/out is on this node's own disk"):
        require_shared_storage(local, RayConfig(address=GROWABLE), {"CPU": 1}, 64)
    require_shared_storage(local, RayConfig(address=GROWABLE, shared_paths=[str(tmp_path)]), {"CPU": 1}, 64)
    require_shared_storage({"train.storage_path": ("s3://bucket/x", True)}, RayConfig(address=GROWABLE), {"CPU": 1}, 64)


def test_train_refuses_a_node_local_path_before_training(ray_local, tmp_path):
    data = make_dataset(tmp_path / "data", n_train=64, n_val=8)
    out = tmp_path / "train"
    # 8 workers x 1 CPU do not fit this 4-CPU machine: on a growing cluster they run on other machines.
    with pytest.raises(ConfigError) as e:
        run(cfg(data, out), RayConfig(address=GROWABLE))
    msg = str(e.value)
    assert msg.startswith(f"train.data {data} is on this node's own disk") and "/mnt/shared" in msg
    assert not (out / "ray" / "train").exists(), "refused before Ray Train started a run"
    # Declared shared (all on one disk): the guard lets it through and the next check, resources, speaks.
    with pytest.raises(ResourceError, match="8 x"):
        run(cfg(data, out), RayConfig(address=GROWABLE, shared_paths=[str(tmp_path)]))
    # Checkpoints on object storage and data/output declared shared: still only the resources are missing.
    with pytest.raises(ResourceError, match="8 x"):
        run(cfg(data, out, storage_path="s3://bucket/x"), RayConfig(address=GROWABLE, shared_paths=[str(tmp_path)]))
