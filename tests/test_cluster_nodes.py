"""What a node of a real cluster checks before work starts, tested on CPU without Ray: the GPU node check
(cluster/gpu_check_node.py) and the shared-storage guard of multi-node runs (cluster/storage.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cluster import gpu_check_node as g
from cluster.config import ConfigError, RayConfig, from_dict
from cluster.storage import (
    Mount,
    check_shared,
    local_path_problem,
    mount_of,
    parse_mounts,
    spans_machines,
)

# ---------------------------------------------------------------------------------------------------------
# GPU node check: versions, the verdict and its one-line message.

PROC_VERSION = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.133.20  Fri Mar 14 09:03:25 UTC 2025\n"
                "GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n")


def test_versions_parse():
    assert g.driver_from_proc(PROC_VERSION) == "570.133.20"
    assert g.driver_from_proc("garbage") is None
    assert g.parse_version("570.133.20") == (570, 133, 20)
    assert g.parse_version("12.6") == (12, 6)
    assert g.min_driver("12.6") == (525, 60, 13)
    assert g.min_driver("13.0") == (580, 65, 6)
    assert g.min_driver("99.0") is None
    with pytest.raises(ValueError):
        g.parse_version("none")


def test_cuda13_torch_on_a_570_driver_is_refused_naming_both_versions():
    msg = g.diagnose("570.133.20", "2.13.0", "13.0", cuda_available=False, matmul_error=None)
    assert msg.startswith("GPU node check failed: NVIDIA driver 570.133.20, torch 2.13.0 built for CUDA 13.0")
    assert "needs driver >= 580.65.6" in msg and "whl/cu126" in msg
    assert "\n" not in msg


def test_cuda12_torch_on_the_same_driver_passes():
    assert g.diagnose("570.133.20", "2.13.0+cu126", "12.6", cuda_available=True, matmul_error=None) is None
    assert g.diagnose("580.65.06", "2.13.0", "13.0", cuda_available=True, matmul_error=None) is None
    # The driver version explains failures; a node whose torch works is never failed for it.
    assert g.diagnose(None, "2.13.0", "12.6", cuda_available=True, matmul_error=None) is None


@pytest.mark.parametrize(
    ("driver", "cuda", "available", "matmul", "expected"),
    [
        (None, "12.6", False, None, "No NVIDIA driver is visible"),
        ("535.183.01", None, False, None, "CPU build"),
        ("535.183.01", "12.6", False, None, "torch.cuda.is_available() is False"),
        ("535.183.01", "12.6", True, "CUBLAS_STATUS_NOT_SUPPORTED", "bf16 matmul on the GPU failed: CUBLAS"),
        ("520.61.05", "12.1", False, None, "needs driver >= 525.60.13"),
        ("570.133.20", "13.0", True, "CUDA driver version is insufficient", "needs driver >= 580.65.6"),
    ],
)
def test_every_failure_names_driver_and_torch_cuda(driver, cuda, available, matmul, expected):
    msg = g.diagnose(driver, "2.13.0", cuda, available, matmul)
    assert expected in msg
    assert f"NVIDIA driver {driver or 'not found'}" in msg
    assert f"built for CUDA {cuda or 'none (CPU build)'}" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_the_module_fails_the_node_without_a_usable_gpu():
    """What a node's set-up sees: exit 1 and one line on stderr (here: this machine has no GPU)."""
    out = subprocess.run([sys.executable, "-m", "cluster.gpu_check_node"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1, out
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("GPU node check failed: NVIDIA driver ")
    assert f"torch {torch.__version__} built for CUDA {torch.version.cuda or 'none (CPU build)'}" in line


@pytest.mark.gpu
def test_the_module_passes_on_a_gpu_node():
    out = subprocess.run([sys.executable, "-m", "cluster.gpu_check_node"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("GPU node check ok: ") and "bf16 matmul ok" in out.stdout


# ---------------------------------------------------------------------------------------------------------
# Shared storage: a multi-node run pointed at a node-local path fails before it starts.

MOUNTS = parse_mounts(
    "overlay / overlay rw,relatime 0 0\n"
    "/dev/nvme0n1p1 /home/ray/data ext4 rw 0 0\n"
    "fs-0123.efs.us-west-2.amazonaws.com:/ /mnt/shared nfs4 rw,vers=4.1 0 0\n"
    "10.0.0.2:/mathtune /mnt/filestore nfs rw 0 0\n"
    "bucket /mnt/gcs fuse.gcsfuse rw 0 0\n"
    "/dev/sdb /mnt/with\\040space ext4 rw 0 0\n"
)
HEAD = {"NodeID": "head", "Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 8.0}}
GPU_NODE = {"NodeID": "gpu", "Alive": True, "NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 96.0, "GPU": 8.0}}


def test_mount_table_parsing_and_lookup():
    assert Mount("/mnt/with space", "ext4") in MOUNTS
    assert mount_of("/mnt/shared/mathtune/train", MOUNTS) == Mount("/mnt/shared", "nfs4")
    assert mount_of("/mnt/sharedness/x", MOUNTS) == Mount("/", "overlay"), "a prefix of a name is not a parent"
    assert mount_of("/home/ray/data", MOUNTS) == Mount("/home/ray/data", "ext4")


@pytest.mark.parametrize("path", ["/mnt/shared/mathtune/data", "/mnt/filestore/x", "/mnt/gcs/ckpt"])
def test_network_filesystems_are_shared(path):
    assert local_path_problem("train.data", path, MOUNTS, [], uri_ok=False) is None


def test_uris_are_shared_only_where_the_stage_takes_them():
    assert local_path_problem("train.storage_path", "s3://b/mathtune", MOUNTS, [], uri_ok=True) is None
    msg = local_path_problem("train.output", "gs://b/out", MOUNTS, [], uri_ok=False)
    assert "train.output gs://b/out must be a path every node mounts" in msg


def test_node_local_path_is_refused_naming_it_and_what_to_use():
    msg = local_path_problem("train.storage_path", "/home/ray/data/ray", MOUNTS, [], uri_ok=True)
    assert msg.startswith("train.storage_path /home/ray/data/ray is on this node's own disk (ext4 at /home/ray/data)")
    assert "/mnt/shared" in msg and "s3:// / gs://" in msg and "ray.shared_paths" in msg
    # the container's root (overlay) is just as local
    assert "(overlay at /)" in local_path_problem("train.output", "/tmp/out", MOUNTS, [], uri_ok=False)


def test_declared_shared_paths_are_trusted():
    assert local_path_problem("train.data", "/home/ray/data/x", MOUNTS, ["/home/ray/data"], uri_ok=False) is None
    assert local_path_problem("train.data", "/home/ray/database", MOUNTS, ["/home/ray/data"], uri_ok=False)
    assert from_dict(RayConfig, {"shared_paths": "/a,/b"}, "ray").shared_paths == ["/a", "/b"]
    assert RayConfig().shared_paths == []


def test_which_runs_span_machines():
    train = ({"CPU": 8, "GPU": 1}, 8)
    assert spans_machines([HEAD], "head", *train, can_grow=True), "a CPU head: GPU workers come from other machines"
    assert spans_machines([HEAD, GPU_NODE], "head", {"CPU": 1}, 1, can_grow=False), "a node on another machine"
    assert not spans_machines([GPU_NODE], "gpu", *train, can_grow=True), "one 8-GPU node running the driver too"
    assert not spans_machines([HEAD], "head", {"CPU": 1}, 1, can_grow=True), "CPU-only work that fits the head"
    assert not spans_machines([HEAD, {**GPU_NODE, "Alive": False}], "head", {"CPU": 1}, 4, can_grow=False), (
        "dead nodes do not count; a local Ray that cannot grow refuses the request elsewhere")
    # Several Ray nodes on one machine (tests, a workstation) share its disk: not multi-machine.
    local = [{**HEAD, "NodeManagerAddress": "127.0.0.1", "Resources": {"CPU": 0.0}},
             {"NodeID": "w1", "Alive": True, "NodeManagerAddress": "127.0.0.1", "Resources": {"CPU": 2.0}},
             {"NodeID": "w2", "Alive": True, "NodeManagerAddress": "127.0.0.1", "Resources": {"CPU": 2.0}}]
    assert not spans_machines(local, "head", {"CPU": 1}, 2, can_grow=True)
    assert spans_machines(local, "head", {"CPU": 1}, 8, can_grow=True), "too big for this machine: it must grow"


def test_check_shared_raises_one_line_only_for_multi_node_runs():
    paths = {"train.data": ("/mnt/shared/mathtune/data", False), "train.output": ("/home/ray/data/out", False),
             "train.storage_path": ("s3://bucket/mathtune", True)}
    check_shared(paths, multi_node=False, mounts=MOUNTS, declared=[])  # single node: anything goes
    with pytest.raises(ConfigError) as e:
        check_shared(paths, multi_node=True, mounts=MOUNTS, declared=[])
    assert str(e.value).startswith("train.output /home/ray/data/out is on this node's own disk")
    assert "\n" not in str(e.value)
    check_shared(paths, multi_node=True, mounts=MOUNTS, declared=["/home/ray/data"])
    check_shared({"eval.model": ("", False)}, multi_node=True, mounts=MOUNTS, declared=[])  # a hub id: skipped
