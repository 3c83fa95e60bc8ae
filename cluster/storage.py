"""Refuse, before any work starts, a multi-node run pointed at a path only one node can see.

On a multi-node cluster the driver (on the head) checks and creates its paths on the head's own disk; the
training workers, eval actors and Ray Data tasks run on other nodes. A node-local path there means rank 0
writes checkpoints and metrics.jsonl to its own disk, where the driver's export and the eval actors never
find them. So every path that workers read or write must be one of:

- an object-store URI (s3://, gs://, ...), where the stage supports one (train.storage_path, sources);
- on a network filesystem that every node mounts (NFS: EFS on AWS, Filestore on GCP, a ReadWriteMany PVC on
  Kubernetes; the cluster files mount it at /mnt/shared), recognised from /proc/mounts;
- or declared shared by the user in `ray.shared_paths` (a shared filesystem of a type not recognised here).

A run whose work all stays on the driver's machine (a laptop, one big GPU node holding the driver too, or
several Ray nodes started on one machine) is always fine: they share one disk.
"""

from __future__ import annotations

import dataclasses
import os

from cluster.config import ConfigError, RayConfig

# Filesystem types (as /proc/mounts names them) that every node mounting the same export sees alike.
NETWORK_FS = frozenset({
    "nfs", "nfs4", "efs", "cifs", "smb3", "lustre", "gpfs", "beegfs", "glusterfs", "ceph", "9p",
    "fuse.gcsfuse", "fuse.s3fs", "fuse.mountpoint-s3", "fuse.juicefs", "fuse.ceph", "fuse.glusterfs",
    "fuse.weka", "wekafs",
})
SHARED_HINT = ("use storage every node mounts (/mnt/shared in cluster/aws.yaml, gcp.yaml and "
               "kuberay-rayjob.yaml: EFS, Filestore or a ReadWriteMany PVC; README 'Run on a cluster')")


@dataclasses.dataclass(frozen=True)
class Mount:
    point: str
    fstype: str


def parse_mounts(text: str) -> list[Mount]:
    """/proc/mounts lines ('source point fstype options 0 0'); spaces in paths are written as \\040."""
    mounts = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            point = parts[1].encode().decode("unicode_escape") if "\\" in parts[1] else parts[1]
            mounts.append(Mount(point, parts[2]))
    return mounts


def is_uri(path: str) -> bool:
    return "://" in path


def mount_of(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount that holds `path` (the longest mount point above it; the last one wins on a tie, as the
    kernel shows stacked mounts in order)."""
    path = os.path.normpath(path)
    best: Mount | None = None
    for m in mounts:
        point = os.path.normpath(m.point)
        under = path == point or path.startswith(point.rstrip("/") + "/")
        if under and (best is None or len(point) >= len(os.path.normpath(best.point))):
            best = m
    return best


def is_declared(path: str, declared: list[str]) -> bool:
    path = os.path.normpath(path)
    return any(path == os.path.normpath(d) or path.startswith(os.path.normpath(d).rstrip("/") + "/")
               for d in declared)


def local_path_problem(what: str, path: str, mounts: list[Mount], declared: list[str], uri_ok: bool) -> str | None:
    """None if every node can reach `path`, else the one-line reason naming the path and what to use."""
    if is_uri(path):
        if uri_ok:
            return None
        return f"{what} {path} must be a path every node mounts, not a URI: {SHARED_HINT}"
    if is_declared(path, declared):
        return None
    m = mount_of(os.path.abspath(path), mounts)
    if m is not None and m.fstype in NETWORK_FS:
        return None
    where = f"{m.fstype} at {m.point}" if m else "no mount found"
    alt = " or an s3:// / gs:// URI" if uri_ok else ""
    return (f"{what} {path} is on this node's own disk ({where}), but this run spans several nodes that cannot "
            f"see it: {SHARED_HINT}{alt}, or list it in ray.shared_paths if it is shared")


def spans_machines(nodes: list[dict], driver_node_id: str | None, per_bundle: dict[str, float], bundles: int,
                   can_grow: bool) -> bool:
    """Whether the work can land on a machine other than the driver's (ray.nodes() entries): an alive node
    lives elsewhere, or the nodes on the driver's machine cannot hold the request and the cluster can grow
    (an autoscaler adds machines for it, e.g. GPU workers beside a CPU head). A Ray started in this process
    cannot grow: a request too big for it fails on its own (cluster/connect.py require_resources)."""
    alive = [n for n in nodes if n.get("Alive")]
    here = next((n for n in alive if n.get("NodeID") == driver_node_id), None)
    if here is None:
        return bool(alive)
    host = here.get("NodeManagerAddress")
    if any(n.get("NodeManagerAddress") != host for n in alive):
        return True
    fits = sum(min((int(n.get("Resources", {}).get(k, 0) // v) for k, v in per_bundle.items() if v > 0),
                   default=bundles) for n in alive)
    return can_grow and fits < bundles


def check_shared(paths: dict[str, tuple[str, bool]], *, multi_node: bool, mounts: list[Mount],
                 declared: list[str]) -> None:
    """paths: what (config key) -> (path, whether a URI is allowed there). ConfigError on the first
    node-local path of a multi-node run."""
    if not multi_node:
        return
    for what, (path, uri_ok) in paths.items():
        if path and (problem := local_path_problem(what, path, mounts, declared, uri_ok)):
            raise ConfigError(problem)


def require_shared_storage(paths: dict[str, tuple[str, bool]], ray_cfg: RayConfig | None,
                           per_bundle: dict[str, float], bundles: int = 1) -> None:
    """check_shared against the live cluster (Ray initialized): its nodes, the driver's node and the
    driver's /proc/mounts (the cluster files mount the same shared storage on every node). A cluster can
    grow when the driver connected to one (ray.address / $RAY_ADDRESS, as under `ray job submit`)."""
    import ray

    ray_cfg = ray_cfg or RayConfig()
    try:
        with open("/proc/mounts") as f:
            mounts = parse_mounts(f.read())
    except OSError:  # not Linux: no way to tell, and no cluster node runs there
        return
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    multi = spans_machines(ray.nodes(), ray.get_runtime_context().get_node_id(), per_bundle, bundles,
                           can_grow=bool(address and address != "local"))
    check_shared(paths, multi_node=multi, mounts=mounts, declared=ray_cfg.shared_paths)
