"""The files in cluster/ are checked the way their consumers would check them, without a cloud account:
launcher YAMLs against Ray's own autoscaler schema, the RayJob against KubeRay's own CRD schema, every
Ray version against the project's pin, and every file for ports opened to the internet. Then each cluster
file is read together with each shipped GPU config, to prove the cluster can serve it: enough GPUs on the
node type, storage every node reaches, torch that sees the GPUs. Seconds, no Ray."""

from __future__ import annotations

import copy
import ipaddress
import json
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
DOCKERFILE = CLUSTER / "Dockerfile"
CRD_SCHEMA = ROOT / "tests" / "data" / "kuberay_rayjob_schema.json"
# Ray's head ports that must never face the internet: GCS, dashboard + job API, Ray Client.
PRIVATE_PORTS = {6379: "GCS", 8265: "dashboard/job API", 10001: "Ray Client"}


def pyproject_deps() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def pinned_ray_version() -> str:
    pins = [m.group(1) for d in pyproject_deps() if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==([\w.]+)", d))]
    assert len(pins) == 1, f"pyproject.toml must pin ray exactly once (ray[...]==X.Y.Z), found {pins}"
    return pins[0]


def pinned_torch_version() -> str:
    pins = [m.group(1) for d in pyproject_deps() if (m := re.fullmatch(r"torch==([\w.]+)", d))]
    assert len(pins) == 1, f"pyproject.toml must pin torch exactly once (torch==X.Y.Z), found {pins}"
    return pins[0]


def load(name: str) -> Any:
    return yaml.safe_load((CLUSTER / name).read_text())


def load_all(name: str) -> list[Any]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]


def rayjob() -> dict:
    (job,) = [d for d in load_all(KUBERAY) if d["kind"] == "RayJob"]
    return job


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
    job = rayjob()
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
    assert head_container["image"] == project_image_tag(), "the head runs the image cluster/Dockerfile builds"
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


def test_kuberay_runtime_env_ships_only_the_code():
    runtime_env = yaml.safe_load(rayjob()["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"].endswith(".zip"), "a pod has no checkout: working_dir must be a remote zip"
    assert set(runtime_env) == {"working_dir"}, (
        f"{sorted(set(runtime_env) - {'working_dir'})}: dependencies belong in the image (cluster/Dockerfile), "
        "not installed into every pod of every job"
    )


def test_the_submitted_config_exists():
    job = rayjob()
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
    files = sorted(CLUSTER.glob("*.y*ml")) + [DOCKERFILE, CLUSTER / "README.md", ROOT / "Makefile"]
    found = {p.name: ray_versions_in(p.read_text()) for p in files if p.exists()}
    wrong = {name: [f for f in fs if f[1] != pin] for name, fs in found.items()}
    assert not any(wrong.values()), f"Ray versions differ from pyproject's ray=={pin}: {wrong}"
    # Not vacuous: each launcher has its image and its version check, the manifest its images + rayVersion.
    for name in LAUNCHERS:
        kinds = {k for k, _ in found[name]}
        assert {"image tag", "version check"} <= kinds, (name, found[name])
    assert {"rayVersion"} <= {k for k, _ in found[KUBERAY]}
    assert {"image tag"} <= {k for k, _ in found["Dockerfile"]}, "the KubeRay image's base is rayproject/ray"


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
    job = rayjob()
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
    assert rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"


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


def test_every_gitignored_path_is_excluded_from_the_upload():
    """Ray honours .gitignore only unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1: the excludes must hold the same
    local state (a checkout after `make gpu-pack` uploaded 106 MiB of .gpu/ before they did)."""
    norm = lambda p: p.strip().strip("/")  # noqa: E731
    ignored = {norm(p) for p in (ROOT / ".gitignore").read_text().splitlines() if p.strip() and not p.startswith("#")}
    missing = ignored - {norm(p) for p in load(RUNTIME_ENV)["excludes"]}
    assert not missing, f".gitignore entries missing from cluster/runtime_env.yaml excludes: {sorted(missing)}"


def test_make_submit_matches_the_documented_command():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nsubmit:", 1)[1].split("\n\n", 1)[0]
    assert "ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- " in recipe
    assert "python -m cluster.run --config $(CONFIG)" in recipe
    assert "RAY_ADDRESS" in recipe, "make submit must refuse to run without RAY_ADDRESS"


# ---------------------------------------------------------------------------------------------------------
# The RayJob against KubeRay's own CRD schema (tests/data/kuberay_rayjob_schema.json, extracted unchanged from
# ray-project/kuberay; the file names the commit). Kubernetes prunes unknown fields silently, but `kubectl
# apply` validates strictly by default (--validate=strict: an unknown field is an error): so every object
# schema that lists its properties is closed here, as kubectl would.


def strict(schema: Any) -> Any:
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def rayjob_validator():
    import jsonschema

    schema = json.loads(CRD_SCHEMA.read_text())["schema"]
    return jsonschema.Draft7Validator(strict(schema))


def test_rayjob_passes_kuberays_crd_schema():
    errors = sorted(rayjob_validator().iter_errors(rayjob()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("spec", "shutdownAfterJobFinish"), True, "Additional properties"),  # the real key ends in -es
        (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "maxReplicas"), "1", "is not of type 'integer'"),
        (("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0, "imagePullPolicy"), 7,
         "is not of type 'string'"),
        (("spec", "rayClusterSpec", "authOptions", "mode"), "tokens", "is not one of"),
    ],
)
def test_crd_validation_is_not_vacuous(path, value, expected):
    job = copy.deepcopy(rayjob())
    node = job
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    messages = [e.message for e in rayjob_validator().iter_errors(job)]
    assert any(expected in m for m in messages), messages


def test_crd_schema_note_names_its_source():
    data = json.loads(CRD_SCHEMA.read_text())
    assert re.search(r"ray-project/kuberay .*ray\.io_rayjobs\.yaml, commit [0-9a-f]{40}", data["_source"])
    assert data["schema"]["properties"]["kind"] == {"type": "string"}
    assert "rayClusterSpec" in data["schema"]["properties"]["spec"]["properties"]


# ---------------------------------------------------------------------------------------------------------
# The KubeRay image: built from cluster/Dockerfile, torch baked in from a CUDA 12 index.

TORCH_INDEX = re.compile(r"pip install[^\n]*\btorch==([\w.]+)[^\n]*--index-url https://download\.pytorch\.org/whl/cu(\d+)")


def dockerfile_torch() -> tuple[str, str]:
    """(torch version, cuXYZ) the Dockerfile installs."""
    (m,) = TORCH_INDEX.finditer(DOCKERFILE.read_text())
    return m.group(1), f"cu{m.group(2)}"


def project_image_tag() -> str:
    torch_version, cu = dockerfile_torch()
    return f"YOUR_REGISTRY/mathtune:ray{pinned_ray_version()}-torch{torch_version}-{cu}"


def test_dockerfile_bakes_pyprojects_dependencies_and_cuda12_torch():
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM (\S+)", text, re.M)
    assert base == f"rayproject/ray:{pinned_ray_version()}-py311-gpu"
    torch_version, cu = dockerfile_torch()
    assert torch_version == pinned_torch_version(), "the image's torch must be pyproject's pin"
    assert cu.startswith("cu12"), f"{cu}: a CUDA 12 build runs on drivers >= 525; CUDA 13 needs >= 580"
    # The other dependencies come from pyproject.toml itself, after torch (so the CUDA 12 build is kept).
    assert "COPY pyproject.toml" in text and "['project']['dependencies']" in text
    assert text.index("--index-url") < text.index("pip install --no-cache-dir -r")
    # The GPU node check travels in the image, and the build context holds exactly what is copied.
    copied = re.findall(r"^COPY (.+) \S+$", text, re.M)
    sources = {src for line in copied for src in line.split()}
    assert sources == {"pyproject.toml", "cluster/__init__.py", "cluster/gpu_check_node.py"}
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split("\n")
    assert "*" in ignore and all(f"!{src}" in ignore for src in sources)
    for src in sources:
        assert (ROOT / src).is_file()


def test_kuberay_pods_run_the_project_image():
    images = {c["image"] for _, key, v in walk(rayjob()) if key in ("containers", "initContainers") for c in v}
    assert images == {project_image_tag()}, images


# ---------------------------------------------------------------------------------------------------------
# Each cluster file x each shipped GPU config: can this cluster serve this config as written?


# One-machine GPU configs, not cluster jobs: the speedrun is what `make gpu-check` runs on a single lent
# GPU node (bench/gpu_check.sh), with its outputs on that node's disk.
ONE_MACHINE_CONFIGS = {"speedrun.yaml"}


def gpu_configs() -> list[Path]:
    found = [p for p in sorted((ROOT / "configs").glob("*.yaml"))
             if (yaml.safe_load(p.read_text()).get("train") or {}).get("use_gpu") and p.name not in ONE_MACHINE_CONFIGS]
    assert found, "no shipped GPU config"
    return found


CLUSTERS = (*LAUNCHERS, KUBERAY)


def gpu_node_types(name: str, config: dict | None = None) -> list[dict]:
    """Each GPU node type of a cluster file: GPUs and CPUs per node, how many nodes, its instance type."""
    if name == KUBERAY:
        out = []
        for g in (config or rayjob())["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
            (c,) = g["template"]["spec"]["containers"]
            limits = c["resources"]["limits"]
            if limits.get("nvidia.com/gpu", 0):
                out.append({"name": g["groupName"], "gpus": int(limits["nvidia.com/gpu"]), "cpus": float(limits["cpu"]),
                            "nodes": g["maxReplicas"], "instance": None})
        return out
    config = config or load(name)
    out = []
    for type_name, t in config["available_node_types"].items():
        if t["resources"].get("GPU", 0):
            nc = t["node_config"]
            out.append({"name": type_name, "gpus": int(t["resources"]["GPU"]), "cpus": float(t["resources"]["CPU"]),
                        "nodes": min(t["max_workers"], config["max_workers"]),
                        "instance": nc.get("InstanceType") or nc.get("machineType")})
    return out


def end_to_end_job(config: Path):
    """The paths and settings the end-to-end job (python -m cluster.run) really uses for this config."""
    from cluster.run import build_job

    return build_job(str(config), {})


def capacity_problems(name: str, config: Path, cluster: dict | None = None) -> list[str]:
    """Why this cluster cannot serve this config as written (empty: it can)."""
    from train.plan import GPUS, NODE_TYPES, estimate

    job = end_to_end_job(config)
    train, ev = job.train, job.eval_after
    types = gpu_node_types(name, cluster)
    if not types:
        return [f"{name}: no GPU node type"]
    problems = []
    # Ray Train places one bundle (1 GPU + cpus_per_worker CPUs) per worker, each inside one node.
    fits = {t["name"]: min(t["gpus"], int(t["cpus"] // train.cpus_per_worker)) * t["nodes"] for t in types}
    if sum(fits.values()) < train.num_workers:
        problems.append(f"{name} holds {fits} training workers of 1 GPU + {train.cpus_per_worker:g} CPUs; "
                        f"{config.name} asks for {train.num_workers} (the job would wait, then fail)")
    # One node holds every worker: DDP all-reduces over NVLink. Otherwise over TCP: compress the gradients.
    one_node = any(min(t["gpus"], int(t["cpus"] // train.cpus_per_worker)) >= train.num_workers for t in types)
    if not one_node and train.ddp_comm_hook != "bf16":
        problems.append(f"{name}: {config.name}'s {train.num_workers} workers span nodes over TCP; "
                        "set train.ddp_comm_hook: bf16")
    # Eval: an actor's GPUs fit on one node.
    if not all((ev.gpus_per_actor or 1) <= t["gpus"] for t in types):
        problems.append(f"{name}: eval.gpus_per_actor {ev.gpus_per_actor} exceeds a node's GPUs")
    # Memory: the planner's estimate fits the node type's GPU (KubeRay: the smallest GPU of an 8-GPU type).
    for t in types:
        if t["instance"] and t["instance"] not in NODE_TYPES:
            problems.append(f"{name}: {t['instance']} is not in train/plan.py's NODE_TYPES")
            continue
        gpu = (NODE_TYPES[t["instance"]][0] if t["instance"]
               else min((g for g, n in NODE_TYPES.values() if n == t["gpus"]), key=GPUS.get))
        if t["instance"] and NODE_TYPES[t["instance"]][1] != t["gpus"]:
            problems.append(f"{name}: {t['instance']} has {NODE_TYPES[t['instance']][1]} GPUs, not {t['gpus']}")
        if not estimate(train).fits()[gpu]:
            problems.append(f"{config.name} needs more than a {gpu} per worker (python -m train plan)")
    return problems


@pytest.mark.parametrize("config", gpu_configs(), ids=lambda p: p.name)
@pytest.mark.parametrize("name", CLUSTERS)
def test_the_cluster_has_the_gpus_the_config_asks_for(name, config):
    assert capacity_problems(name, config) == []


def test_capacity_check_is_not_vacuous():
    """The topology this replaced (at most four 1-GPU g5.2xlarge nodes) cannot serve flan-t5-large's 8 workers."""
    config = ROOT / "configs" / "flan-t5-large.yaml"
    old = load("aws.yaml")
    old["max_workers"] = 4
    old["available_node_types"]["gpu_worker"].update(max_workers=4, resources={"CPU": 8, "GPU": 1})
    old["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"] = "g5.2xlarge"
    problems = capacity_problems("aws.yaml", config, old)
    assert any("asks for 8" in p for p in problems) and any("ddp_comm_hook: bf16" in p for p in problems)
    assert any("g5.2xlarge is not in" in p for p in problems)
    two_nodes = load("gcp.yaml")
    two_nodes["max_workers"] = 2
    two_nodes["available_node_types"]["gpu_worker"].update(max_workers=2, resources={"CPU": 48, "GPU": 4})
    two_nodes["available_node_types"]["gpu_worker"]["node_config"]["machineType"] = "a2-highgpu-4g"
    assert any("span nodes over TCP" in p for p in capacity_problems("gcp.yaml", config, two_nodes))


def shared_mounts(name: str, config: dict | None = None) -> set[str]:
    """Paths every node of the cluster mounts from one network filesystem."""
    if name == KUBERAY:
        docs = load_all(KUBERAY)
        rwx = {d["metadata"]["name"] for d in docs
               if d["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in d["spec"]["accessModes"]}
        rc = rayjob()["spec"]["rayClusterSpec"]
        pods = [rc["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in rc["workerGroupSpecs"]]
        per_pod = []
        for pod in pods:
            claims = {v["name"] for v in pod.get("volumes", [])
                      if v.get("persistentVolumeClaim", {}).get("claimName") in rwx}
            (c,) = pod["containers"]
            per_pod.append({m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in claims})
        return set.intersection(*per_pod)
    config = config or load(name)
    # Mounted on the host of every node (initialization_commands run on all of them) and handed to the
    # container at the same path (docker run_options, which apply to every node).
    nfs = set(re.findall(r"mount -t nfs4? .*? (/\S+)\s*$", "\n".join(config["initialization_commands"]), re.M))
    volumes = {a for o in config["docker"]["run_options"] if (m := re.fullmatch(r"-v (\S+):(\S+)", o))
               for a in [m.group(2)] if m.group(1) == m.group(2)}
    return nfs & volumes


def cloud_credentials(name: str) -> bool:
    """Whether every node can write object storage (checkpoints) without keys in files."""
    if name == KUBERAY:
        rc = rayjob()["spec"]["rayClusterSpec"]
        pods = [rc["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in rc["workerGroupSpecs"]]
        return all(p.get("serviceAccountName") for p in pods)
    config = load(name)
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    # The head gets Ray's own instance profile / service account; workers need theirs stated.
    return all(t["node_config"].get("IamInstanceProfile") or t["node_config"].get("serviceAccounts") for t in workers)


@pytest.mark.parametrize("config", gpu_configs(), ids=lambda p: p.name)
@pytest.mark.parametrize("name", CLUSTERS)
def test_every_node_reaches_the_configs_storage(name, config):
    from cluster.storage import Mount, local_path_problem

    mounts = [Mount("/", "overlay")] + [Mount(p, "nfs4") for p in shared_mounts(name)]
    assert len(mounts) > 1, f"{name} mounts no shared filesystem on every node"
    job = end_to_end_job(config)
    # What workers read or write in the job: the same keys the stages check at run time (cluster/storage.py).
    paths = {
        "pipeline.output": (job.pipeline.output, False),
        "train.data": (job.train.data, False),
        "train.output": (job.train.output, False),
        "train.storage_path": (job.train.resolved_storage_path(), True),
        "eval.data": (job.eval_after.data, False),
        "eval.model": (job.eval_after.model, False),
    }
    problems = [p for what, (path, uri_ok) in paths.items()
                if (p := local_path_problem(what, path, mounts, job.ray.shared_paths, uri_ok))]
    assert not problems, f"{name} x {config.name}: {problems}"
    # Checkpoints on object storage: the nodes need credentials for it.
    storage = job.train.resolved_storage_path()
    assert re.match(r"(s3|gs)://", storage), f"checkpoints belong on object storage, got {storage}"
    assert cloud_credentials(name), f"{name}: not every node can write {storage}"


def test_storage_check_is_not_vacuous():
    from cluster.storage import Mount, local_path_problem

    assert shared_mounts("aws.yaml") == {"/mnt/shared"}
    mounts = [Mount("/", "overlay")] + [Mount(p, "nfs4") for p in shared_mounts("aws.yaml")]
    # The Anyscale-only path this replaced is on the node's own disk of a `ray up` cluster.
    assert local_path_problem("train.output", "/mnt/cluster_storage/mathtune/train", mounts, [], False)
    # Mounted on the host but not handed to the container: not shared.
    config = load("aws.yaml")
    config["docker"]["run_options"] = [o for o in config["docker"]["run_options"] if not o.startswith("-v ")]
    assert shared_mounts("aws.yaml", config) == set()
    config = load("gcp.yaml")
    config["initialization_commands"] = [c for c in config["initialization_commands"] if "mount -t" not in c]
    assert shared_mounts("gcp.yaml", config) == set()


def test_the_config_names_no_anyscale_only_storage():
    for config in gpu_configs():
        assert "/mnt/cluster_storage" not in config.read_text(), f"{config.name}: no ray up / KubeRay cluster mounts it"


# ---------------------------------------------------------------------------------------------------------
# GPU nodes: a torch whose CUDA the node's driver runs, and the node check before the node joins.

# The oldest NVIDIA driver each node image ships (the DLAMI "Base OSS Nvidia Driver" line started at 535;
# GCP's Deep Learning VM families name theirs).
IMAGE_DRIVERS = {
    "base-oss-nvidia-driver-gpu-ubuntu-22.04": "535.54.03",
    "common-cu128-ubuntu-2204-nvidia-570": "570.86.15",
}


def launcher_torch_cuda(config: dict) -> str:
    """The CUDA version of the torch the launcher's setup installs ('12.6'); its version must be the pin."""
    cmds = "\n".join(config["setup_commands"])
    (m,) = TORCH_INDEX.finditer(cmds)
    assert m.group(1) == pinned_torch_version()
    torch_at = cmds.index(m.group(0))
    project_at = next(cmds.index(c) for c in config["setup_commands"] if re.search(r"pip install -q -e ", c))
    assert torch_at < project_at, "torch from the CUDA 12 index first, or pyproject's pin pulls PyPI's CUDA 13 build"
    digits = m.group(2)
    return f"{digits[:-1]}.{digits[-1]}"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_torch_cuda_agrees_with_the_node_driver(name):
    from cluster.gpu_check_node import diagnose

    config = load(name)
    cuda = launcher_torch_cuda(config)
    for type_name, t in config["available_node_types"].items():
        if not t["resources"].get("GPU"):
            continue
        image = t["node_config"].get("ImageId") or t["node_config"]["disks"][0]["initializeParams"]["sourceImage"]
        (driver,) = [d for key, d in IMAGE_DRIVERS.items() if key in image] or [None]
        assert driver, f"{name}.{type_name}: image {image} has no known NVIDIA driver (add it to IMAGE_DRIVERS)"
        assert diagnose(driver, pinned_torch_version(), cuda, True, None) is None, (
            diagnose(driver, pinned_torch_version(), cuda, True, None))


def test_pypis_cuda13_torch_would_be_refused_on_these_images():
    from cluster.gpu_check_node import diagnose

    msg = diagnose(IMAGE_DRIVERS["common-cu128-ubuntu-2204-nvidia-570"], "2.13.0", "13.0", False, None)
    assert msg and "needs driver >= 580" in msg


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_gpu_nodes_run_the_node_check(name):
    config = load(name)
    checkout = next(k for k, v in config["file_mounts"].items() if v == ".")
    assert f"cd {checkout} && python -m cluster.gpu_check_node" in config["worker_setup_commands"], (
        f"{name}: every GPU node must run the check from the project checkout before it joins"
    )
    # Only GPU workers exist besides the head, so worker_setup_commands reach every GPU node; the head
    # (no GPU) must not run it.
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    assert all(t["resources"].get("GPU", 0) >= 1 for t in workers)
    assert not any("gpu_check_node" in c for c in config["head_setup_commands"] + config["setup_commands"])
    assert config["docker"].get("worker_run_options") == ["--gpus all"]


def test_kuberay_gpu_workers_run_the_node_check_first():
    for g in rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        pod = g["template"]["spec"]
        (worker,) = pod["containers"]
        gpus = worker["resources"]["limits"].get("nvidia.com/gpu", 0)
        if not gpus:
            continue
        (check,) = [c for c in pod.get("initContainers", []) if "cluster.gpu_check_node" in c.get("command", [])]
        assert check["command"] == ["python", "-m", "cluster.gpu_check_node"]
        assert check["image"] == worker["image"], "the check must test the torch the worker runs"
        assert check["resources"]["limits"]["nvidia.com/gpu"] == gpus, "it must see every GPU of the pod"
        assert check["workingDir"] == "/opt/mathtune"
        assert "/opt/mathtune/cluster/" in DOCKERFILE.read_text()
