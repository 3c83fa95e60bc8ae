"""Typed configs: YAML sections -> dataclasses, every field overridable from the command line.

One YAML file describes a whole run (`configs/demo.yaml`): a section per stage (`pipeline:`, `train:`,
`eval:`) plus `ray:` for how to reach Ray. Each stage parses its own section into its own dataclass; the
file holds only what differs from the dataclass defaults (nanoGPT's configurator, litgpt's args.py).

Errors (unknown key, wrong type, contradictory values) raise ConfigError before Ray starts; the stage
entry points turn it into a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import operator
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


from cluster.core import ConfigError, UserError, find_user_error  # noqa: E402, F401  (ConfigError, UserError re-exported)


@dataclasses.dataclass
class RayConfig:
    """How a stage reaches Ray. Empty address = start a local Ray sized for this machine."""

    address: str | None = None
    """Ray address ("auto", "ray://head:10001", "127.0.0.1:6379"; "local" = start one here). Falls back to $RAY_ADDRESS."""
    num_cpus: int | None = None
    """Logical CPUs of a *local* Ray. Default max(4, cores): on a 2-core box Ray Train workers and Ray Data
    tasks must both get a CPU slot, or the data feeding the trainer never runs (measured: with num_cpus=2, a
    2-worker TorchTrainer fed by a Ray Dataset waits forever on "backpressured: ResourceBudget")."""
    num_gpus: int | None = None
    """GPUs of a local Ray (default: what Ray detects)."""
    object_store_memory_gb: float | None = None
    """Object store size of a local Ray (default: Ray's, 30% of RAM)."""
    dashboard: bool = True
    """Start Ray's dashboard with a *local* Ray (Ray's own default; http://127.0.0.1:8265). It also serves
    the state API that Ray Train's placement-group cleaner polls every second: without it the run logs
    "Failed to query Ray Train Controller actor state" once a second. Off saves ~3 s of start-up."""
    resource_timeout_s: float = 0.0
    """How long to wait for an autoscaling cluster to grow to the requested resources before failing.
    0 = decide now from what the cluster has (right for a local Ray, which never grows)."""
    shared_paths: list[str] = dataclasses.field(default_factory=list)
    """Paths every node of the cluster mounts that /proc/mounts does not show as network storage (NFS, EFS,
    Filestore, Lustre, gcsfuse... are recognised). A multi-node run refuses any other local path for data,
    outputs and checkpoints before it starts (cluster/storage.py)."""

    def __post_init__(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError(f"ray.num_cpus must be >= 1, got {self.num_cpus}")
        if self.resource_timeout_s < 0:
            raise ConfigError("ray.resource_timeout_s must be >= 0")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
        if len(args) < len(get_args(tp)):  # e.g. int | Literal["auto"] | None
            return functools.reduce(operator.or_, args), True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and where unambiguous convert) a YAML/CLI value to the field's annotated type."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("null", "none")):
        if optional:
            return None
        raise ConfigError(f"{key}: must not be null")
    if get_origin(inner) in (Union, types.UnionType):  # e.g. int | Literal["auto"]: the first arm that takes it
        errors = []
        for arm in get_args(inner):
            try:
                return _coerce(value, arm, key)
            except ConfigError as e:
                errors.append(str(e).removeprefix(f"{key}: "))
        raise ConfigError(f"{key}: {' and '.join(errors)}")
    if get_origin(inner) is Literal:
        choices = get_args(inner)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if inner is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if inner is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if inner is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if get_origin(inner) in (list, tuple):
        (item_tp, *_) = get_args(inner) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        items = [v if item_tp is Any else _coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if get_origin(inner) is tuple else items
    if inner is dict or get_origin(inner) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], values: dict[str, Any], section: str) -> T:
    """Build dataclass `cls` from a mapping: unknown keys and wrong types are ConfigErrors."""
    if not isinstance(values, dict):
        raise ConfigError(f"section '{section}' must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) in '{section}': {', '.join(unknown)}. Known keys: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field without default
        raise ConfigError(f"section '{section}': {e}") from e


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field (litgpt style), for --help."""
    import ast
    import inspect

    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


class ArgParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one `error: ...` line and exit code 2, like every other user error
    (argparse's default prints the whole usage block first)."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        import difflib
        import sys

        hint = ""
        if message.startswith("unrecognized arguments:"):
            flags = [a.split("=")[0] for a in message.split(":", 1)[1].split() if a.startswith("--")]
            close = [m for f in flags for m in difflib.get_close_matches(f, self._option_string_actions, 1, 0.75)]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
        print(f"error: {message}{hint} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def add_dataclass_args(
    parser: argparse.ArgumentParser, cls: type, title: str, prefix: str | None = None,
    hidden: typing.Collection[str] = (), aliases: bool = False,
) -> None:
    """One --kebab-case flag per field. Defaults are SUPPRESS so we can tell what the user set.

    With `prefix` ("train"), the flag is `--train.max-steps` (`--train.max_steps` also accepted) and the
    value lands in `args["train.max_steps"]`; `aliases` also accepts the bare `--max-steps`. Fields in
    `hidden` are accepted but left out of --help (the caller refuses them with its own message)."""
    group = parser.add_argument_group(title)
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kebab = f.name.replace("_", "-")
        if prefix:
            flags = [f"--{prefix}.{kebab}"] + ([f"--{kebab}"] if aliases else [])
            # The underscore spelling works too, without doubling every line of --help.
            hidden_flags = [f"--{prefix}.{f.name}"] if f.name != kebab else []
            dest = f"{prefix}.{f.name}"
        else:
            flags, hidden_flags, dest = ["--" + kebab], [], f.name
        inner, _ = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        # argparse %-formats help strings: a literal % in a docstring ("30% of RAM") must be doubled.
        help_ = f"{docs.get(f.name, '')} (default: {default!r})".strip().replace("%", "%%")
        for names, text in ((flags, argparse.SUPPRESS if f.name in hidden else help_),
                            (hidden_flags, argparse.SUPPRESS)):
            if not names:
                continue
            if inner is bool:
                group.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=text)
            else:
                group.add_argument(*names, dest=dest, default=argparse.SUPPRESS, metavar=f.name.upper(), help=text)


DEBUG_HELP = ("on an error, re-raise it with its full traceback instead of the one-line message "
              "(also MATHTUNE_DEBUG=1); the traceback is always written to a log file named in the error line")


def parse_stage_args(
    stage_cls: type[T], section: str, argv: list[str] | None, description: str, prog: str,
    extra: typing.Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[T, RayConfig, argparse.Namespace]:
    """`python -m <stage> --config FILE [--<field> VALUE ...]` -> (stage config, ray config, raw args).

    Precedence: dataclass default < YAML section < command-line flag. `extra` adds command options that
    are not config fields (they come back in the raw args).
    """
    parser = ArgParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML config file (sections: ray, pipeline, train, eval)")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    if extra:
        extra(parser)
    add_dataclass_args(parser, stage_cls, f"{section} options (override the '{section}:' section)")
    add_dataclass_args(parser, RayConfig, "ray options (override the 'ray:' section)")
    args = parser.parse_args(argv)
    # Tracebacks go next to the stage's output (<parent>/logs/), also when the config itself is the error.
    output = vars(args).get("output")
    if output is None and args.config:
        try:
            output = (read_yaml(args.config).get(section) or {}).get("output")
        except (ConfigError, AttributeError):
            output = None
    if output:
        set_error_log_dir(Path(str(output)).parent / "logs")
    cfg, ray_cfg = resolve(stage_cls, section, args.config, vars(args))
    return cfg, ray_cfg, args


def resolve(
    stage_cls: type[T], section: str, config_path: str | None, overrides: dict[str, Any]
) -> tuple[T, RayConfig]:
    data = read_yaml(config_path) if config_path else {}
    stage_vals = dict(data.get(section) or {})
    ray_vals = dict(data.get("ray") or {})
    stage_names = {f.name for f in dataclasses.fields(stage_cls)}
    ray_names = {f.name for f in dataclasses.fields(RayConfig)}
    for k, v in overrides.items():
        if k in stage_names:
            stage_vals[k] = v
        elif k in ray_names:
            ray_vals[k] = v
    return from_dict(stage_cls, stage_vals, section), from_dict(RayConfig, ray_vals, "ray")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# Where run_cli writes the traceback of an error: set by the entry point once it knows its output folder.
_error_log_dir: Path | None = None


def set_error_log_dir(path: str | Path | None) -> None:
    global _error_log_dir
    _error_log_dir = Path(path) if path else None


def debug_requested(argv: list[str] | None = None) -> bool:
    import os
    import sys

    return "--debug" in (sys.argv[1:] if argv is None else argv) or os.environ.get("MATHTUNE_DEBUG", "") not in (
        "", "0", "false")


def write_traceback(e: BaseException) -> Path | None:
    """The full traceback to <log dir>/error-<UTC time>-<pid>.log (the system temp folder when the entry
    point set none or it is not writable); its path, or None when nothing could be written."""
    import os
    import tempfile
    import time
    import traceback

    text = "".join(traceback.format_exception(e))
    name = f"error-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}.log"
    for d in (_error_log_dir, Path(tempfile.gettempdir()) / "mathtune-logs"):
        if d is None:
            continue
        try:
            d.mkdir(parents=True, exist_ok=True)
            (d / name).write_text(text)
            return d / name
        except OSError:
            continue
    return None


def run_cli(main: typing.Callable[[], int | None]) -> None:
    """Run an entry point's main(); any user error (cluster.core.UserError, also when Ray wrapped it)
    becomes one line, `error: <what> (traceback: <log file>)`, and exit code 2. The traceback of every
    error is written to a log file; `--debug` (or MATHTUNE_DEBUG=1) re-raises instead, traceback and all.
    Anything that is not a user error is a bug: it is re-raised as it is."""
    import sys

    from cluster.console import quiet_env

    quiet_env()
    try:
        code = main()
    except Exception as e:
        log_file = write_traceback(e)
        err = find_user_error(e)
        if err is None or debug_requested():
            raise
        where = f" (traceback: {log_file})" if log_file else ""
        print(f"error: {err}{where}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
