"""Where the work meets Ray: connect (or start a right-sized local Ray) and check resources up front.

- No address (or "local") and no $RAY_ADDRESS: start a local Ray. On a small machine its logical CPUs are raised to at
  least 4, because a TorchTrainer whose workers hold every CPU leaves Ray Data none to feed them and the
  run waits forever (measured on 2 cores: the dataset's map tasks sit at "1/0 CPU").
- `--address` / $RAY_ADDRESS (set by `ray job submit` for the driver): connect to that cluster.
- `require_resources` turns "would wait forever for resources" into a clear error within a bounded time.
"""

from __future__ import annotations

import logging
import os
import time

from cluster.config import RayConfig
from cluster.core import ResourceError

log = logging.getLogger("mathtune")

MIN_LOCAL_CPUS = 4


def local_num_cpus() -> int:
    return max(MIN_LOCAL_CPUS, os.cpu_count() or 1)


def init_ray(cfg: RayConfig | None = None, **runtime_env_vars: str) -> None:
    """Idempotent: a Ray already initialized in this process (tests, cluster.run) is reused.

    Also the one place the console is set up (cluster/console.py): Ray Data progress as short lines from
    the driver only, no progress bars or per-report lines from workers, and where Ray's full logs are."""
    import ray

    from cluster import console

    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return
    # Quiet, deterministic tokenizers in workers; never forward secrets (HF_TOKEN stays in the driver env
    # and is only read by huggingface_hub where it is needed).
    env_vars = {"TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "false"),
                **console.WORKER_ENV, **runtime_env_vars}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if not cfg.dashboard and not (address and address != "local"):  # the Ray started here has no state API
        env_vars[console.NO_STATE_API_ENV] = "1"
    runtime_env = {"env_vars": env_vars, "worker_process_setup_hook": "cluster.console.setup_worker"}
    # Ray's own INFO lines (start-up banner) go to its log files; we print one line saying where.
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address and address != "local":  # "local" = start one here, sized as below
        log.info("connecting to Ray at %s", address)
        info = ray.init(address=address, runtime_env=runtime_env, **quiet)
    else:
        num_cpus = cfg.num_cpus or local_num_cpus()
        store = int(cfg.object_store_memory_gb * 2**30) if cfg.object_store_memory_gb else None
        log.info("starting a local Ray with %d logical CPUs", num_cpus)
        info = ray.init(
            # "local", not None: None attaches to whatever `ray start` cluster ran last on this machine
            # (/tmp/ray/ray_current_cluster), and then fails because num_cpus is set.
            address="local",
            num_cpus=num_cpus,
            num_gpus=cfg.num_gpus,
            object_store_memory=store,
            include_dashboard=cfg.dashboard,
            runtime_env=runtime_env,
            **quiet,
        )
    console.setup_driver()
    console.announce_ray(ray, info)


def require_resources(
    what: str, cpus: float = 0, gpus: float = 0, per_bundle: dict | None = None, bundles: int = 1,
    timeout_s: float = 0.0,
) -> None:
    """Fail clearly unless the cluster has (or grows to, within timeout_s) the requested resources.

    Checks both the total and that each bundle (e.g. one training worker) fits on some single node:
    a 2-GPU worker never fits a cluster of 1-GPU nodes, however many there are.
    """
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        total = ray.cluster_resources()
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        problems = []
        if total.get("CPU", 0) < cpus:
            problems.append(f"{cpus:g} CPUs (cluster has {total.get('CPU', 0):g})")
        if total.get("GPU", 0) < gpus:
            problems.append(f"{gpus:g} GPUs (cluster has {total.get('GPU', 0):g})")
        if per_bundle:
            fits = sum(
                min(int(n.get(k, 0) // v) for k, v in per_bundle.items() if v > 0) if any(per_bundle.values()) else bundles
                for n in nodes
            )
            if fits < bundles:
                problems.append(f"{bundles} x {per_bundle} on single nodes (room for {fits})")
        if not problems:
            return
        if time.monotonic() >= deadline:
            waited = f" after waiting {timeout_s:g}s" if timeout_s else ""
            raise ResourceError(
                f"{what} needs {', '.join(problems)}{waited}. Lower the request (e.g. --num-workers, "
                f"--use-gpu false, --cpus-per-worker), raise ray.num_cpus for a local Ray, or set "
                f"ray.resource_timeout_s to let an autoscaling cluster grow."
            )
        time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))


def wait_until_free(cpus: float, gpus: float = 0.0, timeout_s: float = 30.0) -> bool:
    """Wait (bounded) until the cluster has `cpus` / `gpus` free right now. A stage that just ended gives its
    resources back asynchronously (Ray Train releases its placement group a few seconds after fit()
    returns; a finished task's CPU a moment after it returns); starting a Ray Data job before that logs
    "does not have any available CPUs ... will hang". Never an error: require_resources has already checked
    the totals. Returns whether they were free."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        free = ray.available_resources()
        if free.get("CPU", 0.0) >= cpus and free.get("GPU", 0.0) >= gpus:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)
