"""Shared fixtures. Ray is started once per test session, locally, with logical CPUs raised so that
trainer workers and Ray Data tasks both get a slot on a 2-core machine; it is shut down at the end."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray Train's controller polls its workers every 2 s by default: a run's start, each checkpoint's commit and
# its end wait for the next poll. Polling every 0.25 s takes ~9 s off each of the suite's ~13 Ray Train
# runs (measured on 2 cores); what the tests assert does not depend on it. The preemption watcher (one more
# actor process per run) watches for spot-node preemption, which no test here simulates.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        # address="local": never attach to another process's `ray start` cluster (ray_current_cluster).
        ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=1 << 30, log_to_driver=False)
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
