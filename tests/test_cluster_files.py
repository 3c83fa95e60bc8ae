"""The files in cluster/ are checked the way their consumers would check them, without a cloud account:
launcher YAMLs against Ray's own autoscaler schema, the KubeRay manifest for the fields KubeRay needs, every
Ray version against the project's pin, and every file for ports opened to the internet. Seconds, no Ray."""

from __future__ import annotations

import copy
import ipaddress
import re
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHERS = ("aws.yaml", "gcp.yaml")
KUBERAY = "kuberay-rayjob.yaml"
RUNTIME_ENV = "runtime_env.yaml"
# Ray's head ports that must never face the internet: GCS, dashboard + job API, Ray Client.
PRIVATE_PORTS = {6379: "GCS", 8265: "dashboard/job API", 10001: "Ray Client"}


def pyproject_deps() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def pinned_ray_version() -> str:
    pins = [m.group(1) for d in pyproject_deps() if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==([\w.]+)", d))]
    assert len(pins) == 1, f"pyproject.toml must pin ray exactly once (ray[...]==X.Y.Z), found {pins}"
    return pins[0]


def load(name: str) -> Any:
    return yaml.safe_load((CLUSTER / name).read_text())


def load_all(name: str) -> list[Any]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]


def walk(node: Any, path: str = ""):
    """Every (path, key or None, value) in a parsed YAML tree, for checks that must not miss a nesting."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield f"{path}.{k}", k, v
            yield from walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield f"{path}[{i}]", None, v
            yield from walk(v, f"{path}[{i}]")


# ---------------------------------------------------------------------------------------------------------
# Every YAML in cluster/ is one of the kinds checked below: a new file cannot slip in unchecked.


def test_every_cluster_yaml_is_a_known_kind():
    found = sorted(p.name for p in CLUSTER.glob("*.y*ml"))
    assert set(found) == {*LAUNCHERS, KUBERAY, RUNTIME_ENV}, (
        f"cluster/ holds {found}: add a check for any new file to tests/test_cluster_files.py"
    )


# ---------------------------------------------------------------------------------------------------------
# Cluster launcher YAMLs: Ray's own schema (ray/autoscaler/ray-schema.json) and `ray up`'s own checks.


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_yaml_passes_rays_own_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(name)
    validate_config(config)  # jsonschema against ray-schema.json + head/min_workers consistency
    validate_config(prepare_config(copy.deepcopy(config)))  # and after merging Ray's provider defaults


def test_schema_validation_is_not_vacuous():
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    config = load("aws.yaml")
    config["available_node_types"]["gpu_worker"]["min_worker"] = 0  # a typo `ray up` must refuse
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_has_cpu_head_and_autoscaling_gpu_workers(name):
    config = load(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head runs the driver and the pipeline: no GPU needed"
    workers = [t for n, t in types.items() if n != config["head_node_type"]]
    gpu_workers = [t for t in workers if t["resources"].get("GPU", 0) >= 1]
    assert gpu_workers, "no GPU worker node type"
    for t in gpu_workers:
        assert t["min_workers"] == 0, "GPU workers must scale to zero when idle"
        assert 1 <= t["max_workers"] <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_installs_the_project_and_ships_the_checkout(name):
    config = load(name)
    mounts = config["file_mounts"]
    assert "." in mounts.values(), "the checkout must be mounted so its pyproject.toml can be installed"
    remote = next(k for k, v in mounts.items() if v == ".")
    assert any("pip install" in c and remote in c for c in config["setup_commands"]), config["setup_commands"]
    for pattern in (".venv", ".git", "outputs"):
        assert pattern in config["rsync_exclude"], f"rsync_exclude must keep {pattern} off the nodes"


# ---------------------------------------------------------------------------------------------------------
# KubeRay RayJob: the fields KubeRay requires, autoscaling, and the same dependencies as pyproject.toml.


def test_kuberay_rayjob_has_the_fields_kuberay_requires():
    (job,) = load_all(KUBERAY)
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"]), "not a DNS-1123 name"
    spec = job["spec"]
    assert spec["entrypoint"].split() == ["python", "-m", "cluster.run", "--config", "configs/flan-t5-large.yaml"]
    rc = spec["rayClusterSpec"]
    head = rc["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values are strings"
    (head_container,) = head["template"]["spec"]["containers"]
    assert head_container["image"].startswith("rayproject/ray:")
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"], "the head needs no GPU"

    assert rc["enableInTreeAutoscaling"] is True
    assert rc["workerGroupSpecs"], "no worker group"
    for group in rc["workerGroupSpecs"]:
        assert group["groupName"]
        assert isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] == 0 <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1
        (c,) = group["template"]["spec"]["containers"]
        assert c["image"] == head_container["image"], "head and workers must run the same image"
        assert c["resources"]["limits"]["nvidia.com/gpu"] >= 1


def test_kuberay_runtime_env_installs_exactly_pyprojects_dependencies():
    (job,) = load_all(KUBERAY)
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"].endswith(".zip"), "a pod has no checkout: working_dir must be a remote zip"
    assert sorted(runtime_env["pip"]) == sorted(pyproject_deps()), (
        "the RayJob's pip list drifted from pyproject.toml's dependencies"
    )


def test_the_submitted_config_exists():
    (job,) = load_all(KUBERAY)
    config = job["spec"]["entrypoint"].split("--config", 1)[1].split()[0]
    assert (ROOT / config).is_file(), f"the RayJob runs {config}, which is not in the repo"


# ---------------------------------------------------------------------------------------------------------
# One Ray version everywhere: every image tag and install line equals pyproject's pin.

VERSION_PATTERNS = {
    "image tag": re.compile(r"rayproject/ray(?:-ml)?:([^\s\"'@]+)"),
    "pip pin": re.compile(r"\bray(?:\[[^\]]*\])?==([\w.]+)"),
    "rayVersion": re.compile(r"rayVersion:\s*[\"']?([\w.]+)"),
    "version check": re.compile(r"ray\.__version__ == '([\w.]+)'"),
}


def ray_versions_in(text: str) -> list[tuple[str, str]]:
    found = []
    for kind, pattern in VERSION_PATTERNS.items():
        for m in pattern.finditer(text):
            v = m.group(1)
            found.append((kind, v.split("-")[0] if kind == "image tag" else v))
    return found


def test_version_scan_catches_mismatches():
    found = ray_versions_in("image: rayproject/ray:2.9.0-py311-gpu\npip install 'ray[default]==2.9.0'\n")
    assert found == [("image tag", "2.9.0"), ("pip pin", "2.9.0")]
    assert ray_versions_in("image: rayproject/ray:latest-gpu") == [("image tag", "latest")]


def test_every_ray_version_equals_the_pin():
    pin = pinned_ray_version()
    files = sorted(CLUSTER.glob("*.y*ml")) + [CLUSTER / "README.md", ROOT / "Makefile"]
    found = {p.name: ray_versions_in(p.read_text()) for p in files if p.exists()}
    wrong = {name: [f for f in fs if f[1] != pin] for name, fs in found.items()}
    assert not any(wrong.values()), f"Ray versions differ from pyproject's ray=={pin}: {wrong}"
    # Not vacuous: each launcher has its image and its version check, the manifest its images + rayVersion.
    for name in LAUNCHERS:
        kinds = {k for k, _ in found[name]}
        assert {"image tag", "version check"} <= kinds, (name, found[name])
    assert {"image tag", "rayVersion", "pip pin"} <= {k for k, _ in found[KUBERAY]}


def test_no_deprecated_ray_ml_image():
    offenders = [p.name for p in CLUSTER.glob("*") if p.is_file() and "rayproject/ray-ml" in p.read_text()]
    assert not offenders, f"ray-ml images are deprecated: {offenders}"


# ---------------------------------------------------------------------------------------------------------
# No public exposure of the dashboard / job API (8265), GCS (6379) or Ray Client (10001).


def publicly_open_ports(ip_permissions: list[dict]) -> list[str]:
    """Which private Ray ports an AWS security group's inbound rules open to the whole internet."""
    opened = []
    for rule in ip_permissions:
        everyone = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + [
            r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])
        ]
        if not any(c and ipaddress.ip_network(c).prefixlen == 0 for c in everyone):
            continue
        lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
        all_ports = rule.get("IpProtocol") == "-1" or lo == -1
        opened += [f"{port} ({what})" for port, what in PRIVATE_PORTS.items() if all_ports or lo <= port <= hi]
    return opened


def test_security_group_check_is_not_vacuous():
    bad = [
        {"IpProtocol": "tcp", "FromPort": 8000, "ToPort": 9000, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "-1", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]},
    ]
    assert publicly_open_ports(bad) == ["8265 (dashboard/job API)", "6379 (GCS)", "8265 (dashboard/job API)",
                                        "10001 (Ray Client)"]
    ok = [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
          {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}]
    assert publicly_open_ports(ok) == []


def head_start_flags(config: dict) -> list[str]:
    return [c for c in config["head_start_ray_commands"] if "ray start" in c and "--head" in c]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_keeps_dashboard_on_loopback(name):
    config = load(name)
    (start,) = head_start_flags(config)
    hosts = re.findall(r"--dashboard-host[= ](\S+)", start)
    assert hosts == ["127.0.0.1"], f"{name}: the dashboard must bind to loopback, got {hosts or 'the default'}"
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "0.0.0.0" not in cmd, f"{name}: {cmd!r} binds a Ray service to every interface"
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    assert publicly_open_ports(rules) == [], f"{name}: security group opens {publicly_open_ports(rules)}"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_enables_token_auth_on_every_node(name):
    config = load(name)
    assert "-e RAY_AUTH_MODE=token" in config["docker"]["run_options"], "every Ray process must require the token"
    assert config["file_mounts"].get("/home/ray/.ray/auth_token") == "~/.ray/auth_token", (
        "every node needs the same token as the submitting machine"
    )


def test_kuberay_enables_token_auth():
    (job,) = load_all(KUBERAY)
    assert job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}


def test_kuberay_exposes_nothing_outside_the_cluster():
    docs = load_all(KUBERAY)
    for doc in docs:
        assert doc["kind"] not in ("Ingress", "Route", "Gateway"), f"{doc['kind']} would publish the dashboard"
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", doc["metadata"]["name"]
        for path, key, value in walk(doc):
            assert key not in ("hostPort", "nodePort", "externalIPs", "loadBalancerIP"), path
            assert not (key == "hostNetwork" and value is True), f"{path}: hostNetwork puts Ray on the node's IPs"
            assert not (key == "enableIngress" and value is True), path
            assert value not in ("LoadBalancer", "NodePort"), f"{path}: {value} publishes the head's ports"
    (job,) = docs
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"


# ---------------------------------------------------------------------------------------------------------
# `ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml`: what Ray would upload.


def test_runtime_env_is_only_excludes_and_no_secrets():
    env = load(RUNTIME_ENV)
    assert set(env) == {"excludes"}, (
        f"unexpected keys {sorted(set(env) - {'excludes'})}: env_vars would clash with the driver's "
        "ray.init(runtime_env=...) (Ray refuses the job), and secrets there are shown in the dashboard"
    )


def test_working_dir_upload_is_small_and_has_the_code(tmp_path):
    """Build the exact zip Ray builds for --working-dir . with our excludes, .gitignore switched off (so the
    excludes alone must do the job, as with RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1)."""
    from ray._private.runtime_env.packaging import create_package

    pkg = tmp_path / "working_dir.zip"
    create_package(str(ROOT), pkg, include_gitignore=False, excludes=load(RUNTIME_ENV)["excludes"])
    names = zipfile.ZipFile(pkg).namelist()
    for needed in ("cluster/run.py", "cluster/config.py", "pyproject.toml", "configs/demo.yaml"):
        assert needed in names, f"{needed} missing from the upload"
    leaked = sorted({n.split("/")[0] for n in names if n.startswith((".venv/", ".git/", "outputs/", "runs/"))})
    assert not leaked, f"uploaded local state: {leaked}"
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".parquet", ".safetensors"))]
    assert pkg.stat().st_size < 5 * 2**20, f"upload is {pkg.stat().st_size / 2**20:.1f} MiB"


def test_make_submit_matches_the_documented_command():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nsubmit:", 1)[1].split("\n\n", 1)[0]
    assert "ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- " in recipe
    assert "python -m cluster.run --config $(CONFIG)" in recipe
    assert "RAY_ADDRESS" in recipe, "make submit must refuse to run without RAY_ADDRESS"
