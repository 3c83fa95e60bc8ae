"""Fail a GPU node's set-up unless its torch can use the GPU: `python -m cluster.gpu_check_node`.

Run by every GPU node before it joins the cluster (cluster/aws.yaml and cluster/gcp.yaml
worker_setup_commands, the KubeRay worker's init container). A torch built for a newer CUDA than the node's
NVIDIA driver supports imports fine, reports `torch.cuda.is_available() == False` and trains on the CPU or
not at all, an hour later; here it stops the node at once with one line naming the driver, the CUDA
version torch was built for, and the fix. On success it prints one line and exits 0.

Also a plain script (`python gpu_check_node.py`): it imports nothing from the project, so the KubeRay image
can carry this one file.
"""

from __future__ import annotations

import re
import subprocess
import sys

# Oldest Linux driver that runs any toolkit of a CUDA major version (NVIDIA's "minor version
# compatibility": a 12.x build runs on any driver >= 525.60.13; 13.x needs the 580 branch).
MIN_DRIVER_FOR_CUDA_MAJOR = {11: (450, 80, 2), 12: (525, 60, 13), 13: (580, 65, 6)}


def parse_version(text: str) -> tuple[int, ...]:
    """'570.133.20' -> (570, 133, 20); '12.6' -> (12, 6). ValueError if there is no dotted number."""
    m = re.search(r"\d+(?:\.\d+)+|\d+", text)
    if not m:
        raise ValueError(f"no version number in {text!r}")
    return tuple(int(p) for p in m.group(0).split("."))


def driver_from_proc(text: str) -> str | None:
    """The driver version from /proc/driver/nvidia/version ('NVRM version: NVIDIA UNIX x86_64 Kernel
    Module  570.133.20  ...'), or None."""
    m = re.search(r"Kernel Module\s+(\d+\.\d+(?:\.\d+)?)", text)
    return m.group(1) if m else None


def min_driver(torch_cuda: str) -> tuple[int, ...] | None:
    """Oldest driver that runs a torch built for CUDA `torch_cuda` ('12.6'), None if unknown."""
    return MIN_DRIVER_FOR_CUDA_MAJOR.get(parse_version(torch_cuda)[0])


def fmt(v: tuple[int, ...]) -> str:
    return ".".join(str(p) for p in v)


def diagnose(driver: str | None, torch_version: str, torch_cuda: str | None, cuda_available: bool,
             matmul_error: str | None) -> str | None:
    """None when the node is usable (torch sees the GPU and the bf16 matmul ran), else the one-line reason:
    what was found and what to do. The driver version explains a failure; it never fails a working node
    (a CUDA forward-compatibility package can make an old driver work)."""
    found = f"NVIDIA driver {driver or 'not found'}, torch {torch_version} built for CUDA {torch_cuda or 'none (CPU build)'}"
    if torch_cuda is None:
        return (f"GPU node check failed: {found}. This is torch's CPU build: install the CUDA build "
                "(pip install torch==<pin> --index-url https://download.pytorch.org/whl/cu126)")
    if cuda_available and matmul_error is None:
        return None
    need = min_driver(torch_cuda)
    if driver is not None and need is not None and parse_version(driver) < need:
        return (f"GPU node check failed: {found}; CUDA {torch_cuda} needs driver >= {fmt(need)}. Use a node "
                f"image with a newer driver, or a torch build for an older CUDA (--index-url "
                f"https://download.pytorch.org/whl/cu126 runs on drivers >= 525.60.13)")
    if not cuda_available:
        if driver is None:
            return (f"GPU node check failed: {found}. No NVIDIA driver is visible here: use a GPU image with the "
                    "driver installed and run the container with the GPUs (docker --gpus all / nvidia.com/gpu)")
        return f"GPU node check failed: {found}, but torch.cuda.is_available() is False (no GPU visible to torch)"
    return f"GPU node check failed: {found}; a bf16 matmul on the GPU failed: {matmul_error}"


def read_driver() -> str | None:
    try:
        with open("/proc/driver/nvidia/version") as f:
            if v := driver_from_proc(f.read()):
                return v
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
        return out.stdout.split()[0] if out.returncode == 0 and out.stdout.split() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def bf16_matmul() -> str | None:
    """Run a bf16 matmul on every visible GPU and compare it with the CPU; None if all agree."""
    import torch

    a = torch.randn(256, 256)
    b = torch.randn(256, 256)
    want = (a.bfloat16().float() @ b.bfloat16().float())
    try:
        for i in range(torch.cuda.device_count()):
            got = (a.to(f"cuda:{i}", torch.bfloat16) @ b.to(f"cuda:{i}", torch.bfloat16)).float().cpu()
            err = (got - want).abs().max().item() / want.abs().max().item()
            if not err < 2e-2:
                return f"cuda:{i} gave a relative error of {err:.3g} against the CPU"
    except RuntimeError as e:
        return str(e).strip().splitlines()[0]
    return None


def main() -> int:
    import torch

    driver = read_driver()
    available = torch.cuda.is_available()
    problem = diagnose(driver, torch.__version__, torch.version.cuda, available,
                       bf16_matmul() if available else None)
    if problem:
        print(problem, file=sys.stderr, flush=True)
        return 1
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    print(f"GPU node check ok: {torch.cuda.device_count()} x {', '.join(names)}; NVIDIA driver {driver}, "
          f"torch {torch.__version__} (CUDA {torch.version.cuda}); bf16 matmul ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
