from __future__ import annotations

import dataclasses
import time
from typing import Literal

import pytest

from cluster.config import ConfigError, RayConfig, from_dict, parse_stage_args, read_yaml


@dataclasses.dataclass
class Demo:
    output: str = "out"
    """where to write"""
    rows: int = 10
    lr: float = 1e-3
    strict: bool = False
    mode: Literal["a", "b"] = "a"
    limit: int | None = None

    def __post_init__(self):
        if self.rows < 1:
            raise ConfigError("rows must be >= 1")


def test_yaml_then_cli_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("demo:\n  rows: 20\n  lr: 0.1\nray:\n  num_cpus: 6\n")
    cfg, ray_cfg, _ = parse_stage_args(Demo, "demo", ["--config", str(f), "--rows", "30", "--strict"], "", "x")
    assert cfg.rows == 30 and cfg.lr == 0.1 and cfg.strict is True and cfg.output == "out"
    assert ray_cfg.num_cpus == 6


def test_cli_only_and_optional_none():
    cfg, _, _ = parse_stage_args(Demo, "demo", ["--limit", "none", "--mode", "b"], "", "x")
    assert cfg.limit is None and cfg.mode == "b"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"rowz": 3}, "unknown key(s) in 'demo': rowz"),
        ({"rows": "many"}, "demo.rows: expected an integer"),
        ({"strict": "maybe"}, "demo.strict: expected true/false"),
        ({"mode": "c"}, "demo.mode: 'c' is not one of"),
        ({"rows": 0}, "rows must be >= 1"),
        ({"lr": True}, "demo.lr: expected a number"),
    ],
)
def test_bad_values_are_clear_errors(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_dict(Demo, values, "demo")


def test_bad_yaml_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        read_yaml(f)
    with pytest.raises(ConfigError, match="config file not found"):
        read_yaml(tmp_path / "missing.yaml")


def test_ray_config_validation():
    with pytest.raises(ConfigError, match="num_cpus"):
        RayConfig(num_cpus=0)


@pytest.mark.parametrize("stage", ["pipeline", "train", "eval", "cluster.run"])
def test_every_stage_help_lists_its_options(stage):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", stage, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--config" in proc.stdout and "usage:" in proc.stdout


def test_every_shipped_config_loads():
    from pathlib import Path

    from cluster.run import build_job

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 2
    for path in configs:
        assert path.read_text().lstrip().startswith("#"), f"{path.name} must open with the command that runs it"
        build_job(str(path), {})


@pytest.mark.parametrize("address", [None, "local"])
def test_local_ray_is_sized_for_a_small_machine(monkeypatch, address):
    """No address and "local" both start a local Ray with >= 4 logical CPUs (2 cores: trainer workers and
    Ray Data tasks both need a slot); any other address connects without sizing."""
    import ray

    from cluster.config import RayConfig
    from cluster.connect import MIN_LOCAL_CPUS, init_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    init_ray(RayConfig(address=address))
    init_ray(RayConfig(address="ray://head:10001"))
    assert calls[0]["address"] == "local" and calls[0]["num_cpus"] >= MIN_LOCAL_CPUS
    assert calls[1]["address"] == "ray://head:10001" and "num_cpus" not in calls[1]


@pytest.mark.parametrize("argv, message", [
    (["plan", "--model", "/no/such/model"], "error: plan: no architecture for '/no/such/model'"),
    (["plan", "--global-batch-size", "0"], "error: train.global_batch_size must be >= 1, got 0"),
    (["--max-stepz", "3"], "error: unrecognized arguments: --max-stepz 3; did you mean --max-steps?"),
])
def test_train_and_train_plan_user_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    """Every entry point: one `error:` line, exit 2; the traceback in a log file; --debug re-raises."""
    from pathlib import Path

    from cluster.config import run_cli
    from train.__main__ import main

    monkeypatch.delenv("MATHTUNE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith(message), err
    if "(traceback: " in err:
        assert "Traceback (most recent call last)" in Path(err.rsplit("(traceback: ", 1)[1].rstrip(")\n")).read_text()
        monkeypatch.setenv("MATHTUNE_DEBUG", "1")
        with pytest.raises(ValueError, match=message.removeprefix("error: ").replace("(", r"\(").replace(")", r"\)")):
            run_cli(lambda: main(argv))


def test_wait_until_free_waits_for_released_resources_and_is_bounded(monkeypatch):
    """The next stage waits (bounded) for what the previous one is still giving back; never forever."""
    import ray

    from cluster.connect import wait_until_free

    free = iter([{"CPU": 0.0}, {"CPU": 0.0}, {"CPU": 2.0}])
    monkeypatch.setattr(ray, "available_resources", lambda: next(free))
    assert wait_until_free(1, timeout_s=10) is True
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 0.0})
    t0 = time.monotonic()
    assert wait_until_free(1, timeout_s=0.5) is False
    assert time.monotonic() - t0 < 2
