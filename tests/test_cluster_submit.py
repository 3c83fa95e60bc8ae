"""`ray job submit` against a real Ray head started on this machine, the way a user submits to a cluster.

The head is `ray start --head --block` on 127.0.0.1 with its own free ports and its own --temp-dir, in its
own session. It is stopped by exactly the processes it started (its session and process tree), never by
`ray stop`, which would end every other Ray on the machine. The fixture's finalizer does it, so a failing
test cleans up too.

Token authentication is on (RAY_AUTH_MODE=token, a fresh random RAY_AUTH_TOKEN), as on the clusters in
cluster/: the job API refuses a request without it. It also keeps the test independent of whatever
~/.ray/auth_token other Rays on this machine created (Ray 2.60 switches auth on when that file exists).

The head is started from the project's venv with the venv's bin first on PATH: Ray runs a job's entrypoint
through a shell in the environment of the raylet, so `python -m cluster.run` resolves to the venv's python,
as it resolves to the image's python on a real cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cluster_procs import free_ports, processes_of, stop_processes

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY_CLI = str(VENV_BIN / "ray")
HEAD_START_TIMEOUT_S = 90


@dataclass
class LocalHead:
    process: subprocess.Popen
    temp_dir: Path
    dashboard_port: int
    token: str

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def auth_env(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def get(self, path: str, token: str | None = None) -> dict:
        """GET the dashboard's HTTP API, with this head's token unless another one is given."""
        token = self.token if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        req = urllib.request.Request(f"{self.address}{path}", headers=headers)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {**os.environ, **self.auth_env, "RAY_ADDRESS": self.address}
        return subprocess.run(
            [RAY_CLI, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )

    def stop(self) -> list[int]:
        procs = processes_of(self.process.pid, session=self.process.pid)
        # 3 s of SIGTERM, then SIGKILL: some of the head's processes outwait a grace period (seen: the
        # default 10 s all spent in teardown), and the temp dir goes with them.
        left = stop_processes(procs, grace_s=3.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)  # reap it: a zombie head would look alive to the next check
        return left


def start_local_head(num_cpus: int = 4) -> LocalHead:
    (gcs, dashboard, client, agent_http, agent_grpc, metrics, node_manager, object_manager,
     runtime_env_agent) = free_ports(9)
    # Short path: Ray's unix sockets live under it and a socket path is capped at 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="mt-ray-", dir="/tmp"))
    token = secrets.token_hex(32)
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           # Ray's address file (ray_current_cluster) goes here, not to /tmp/ray where a plain ray.init()
           # of someone else would find this head and attach to it.
           "RAY_TMPDIR": str(temp_dir)}
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    cmd = [
        RAY_CLI, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
        f"--runtime-env-agent-port={runtime_env_agent}", f"--temp-dir={temp_dir}",
        f"--num-cpus={num_cpus}", "--object-store-memory=600000000", "--disable-usage-stats",
    ]
    log = open(temp_dir / "ray-start.log", "w")  # noqa: SIM115 - lives as long as the head
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    head = LocalHead(proc, temp_dir, dashboard, token)
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while True:
        try:
            head.get("/api/version")
            return head
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                head.stop()
                output = (temp_dir / "ray-start.log").read_text()
                shutil.rmtree(temp_dir, ignore_errors=True)
                raise RuntimeError(f"ray start --head did not come up:\n{output[-3000:]}") from None
            time.sleep(0.5)


@pytest.fixture(scope="module")
def local_head():
    head = start_local_head()
    try:
        yield head
    finally:
        left = head.stop()
        shutil.rmtree(head.temp_dir, ignore_errors=True)
        assert not left, f"processes of the test's Ray head survived SIGKILL: {left}"


def submit(head: LocalHead, submission_id: str, entrypoint: list[str], timeout: float = 300):
    """`ray job submit` exactly as `make submit` runs it; waits for the job and returns the CLI's result.
    A head that answers HTTP may not have its job agent yet ("No available agent to submit job, please
    try again later": seen on a loaded 2-core machine); the job is then not created, so submit again."""
    deadline = time.monotonic() + 60
    while True:
        result = head.cli(
            "job", "submit", "--submission-id", submission_id, "--working-dir", ".",
            "--runtime-env", "cluster/runtime_env.yaml", "--", *entrypoint, timeout=timeout,
        )
        if "No available agent to submit job" not in result.stdout + result.stderr or time.monotonic() > deadline:
            return result
        time.sleep(2)


def job_status(head: LocalHead, submission_id: str) -> str:
    return head.get(f"/api/jobs/{submission_id}")["status"]


@pytest.mark.slow
def test_job_api_refuses_requests_without_the_token(local_head):
    for token, code in (("", 401), ("not-the-token", 403)):
        with pytest.raises(urllib.error.HTTPError) as err:
            local_head.get("/api/jobs/", token=token)
        assert err.value.code == code
    assert isinstance(local_head.get("/api/jobs/"), list)


@pytest.mark.slow
def test_submitted_job_runs_the_uploaded_code_with_the_project_python(local_head):
    probe = (
        "import os, sys, cluster.config; "
        "print('PYTHON', sys.executable); print('CWD', os.getcwd()); "
        "print('CODE', os.path.dirname(cluster.config.__file__))"
    )
    result = submit(local_head, "probe", ["python", "-c", probe], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert job_status(local_head, "probe") == "SUCCEEDED"

    logs = local_head.cli("job", "logs", "probe", timeout=60)
    assert logs.returncode == 0, logs.stderr
    lines = dict(line.split(" ", 1) for line in logs.stdout.splitlines() if line.startswith(("PYTHON", "CWD", "CODE")))
    assert Path(lines["PYTHON"]).resolve() == Path(sys.executable).resolve(), "the job must use the venv's python"
    # The code came from the uploaded working_dir (under the head's temp dir), not from this checkout.
    assert lines["CWD"].startswith(str(local_head.temp_dir)), lines
    assert lines["CODE"].startswith(lines["CWD"]), lines


@pytest.mark.slow
def test_failed_job_is_reported_as_failed(local_head):
    result = submit(local_head, "fails", ["python", "-c", "raise SystemExit(3)"], timeout=120)
    assert result.returncode != 0
    assert job_status(local_head, "fails") == "FAILED"


# The smallest end-to-end job that still runs every stage for real: ~330 generated rows, a t5-tiny trained
# 4 steps by one worker (checkpoints at 2 and 4), 16 test rows scored before and after.
TINY_RUN = {
    "pipeline": {"train_rows_per_regime": 100, "test_rows": 32, "validation_size": 0.1},
    "train": {"model": "t5-tiny", "precision": "fp32", "num_workers": 1, "global_batch_size": 16, "max_steps": 4,
              "warmup_steps": 1, "eval_every": 2, "ckpt_every": 2, "eval_samples": 8, "eval_batch_size": 8,
              "log_every": 2},
    "eval": {"max_rows": 16, "batch_size": 16, "num_actors": 1},
}


@pytest.mark.slow
@pytest.mark.cluster
def test_end_to_end_job_via_ray_job_submit(local_head, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"run": {"output_dir": str(out)}, **TINY_RUN}))

    result = submit(local_head, "e2e", ["python", "-m", "cluster.run", "--config", str(config)], timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert job_status(local_head, "e2e") == "SUCCEEDED"

    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["complete"] is True
    summary = json.loads((out / "train" / "summary.json").read_text())
    assert summary["max_steps"] == 4
    assert (out / "train" / "final" / "config.json").is_file()
    assert list((out / "train" / "final").glob("*.safetensors"))
    for stage in ("eval-before", "eval-after"):
        assert json.loads((out / stage / "metrics.json").read_text())["n"] == 16, stage
    run_summary = json.loads((out / "run_summary.json").read_text())
    assert run_summary["outputs"]["model"] == str(out / "train" / "final")

    logs = local_head.cli("job", "logs", "e2e", timeout=60)
    assert logs.returncode == 0, logs.stderr
    for line in ("[run] pipeline: done", "[run] train: done", "[run] eval-after: done", "== mathtune run =="):
        assert line in logs.stdout, f"{line!r} missing from `ray job logs e2e`"


def test_stop_processes_stops_exactly_the_given_processes():
    """The cleanup the fixture relies on: it ends a whole process group it started and nothing else."""
    keep = subprocess.Popen(["sleep", "60"])
    group = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(processes_of(group.pid, session=group.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        procs = processes_of(group.pid, session=group.pid)
        assert len(procs) == 3, procs  # the shell and its two sleeps
        assert keep.pid not in procs
        assert stop_processes(procs, grace_s=5) == []
        group.wait(timeout=5)
        assert keep.poll() is None, "a process outside the session was killed"
    finally:
        keep.kill()
        keep.wait()
