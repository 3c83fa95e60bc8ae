"""What a person reads on the console, set up in one place (cluster.connect.init_ray calls both halves).

Driver (`setup_driver`): Ray Data's progress is shown once, from the driver, as one short line per
update (`[data] 1200/2000 rows`) instead of its 8-line block every 10 s; its "Starting execution" and
"Execution plan" lines stay in Ray Data's own log file (ray-data.log in the session's log folder, printed
once at start-up). Warnings and errors always show.

Workers (`setup_worker`, Ray's `worker_process_setup_hook`, so it runs in every worker process of the
job: Ray Train workers, the split coordinator that feeds them, Ray Data tasks and actors): Ray Data's
progress and execution chatter is not printed to the console (workers are not a terminal: on the
driver it arrived as raw progress-bar escape codes), and Ray Train's per-report "Reporting training
result ..." lines are silenced; on a local Ray started without its dashboard, so is the placement-group
cleaner's "Failed to query ..." warning, once a second. Training's own step lines (our logger) are untouched.

Model loading (`quiet_untied_head_notice`, called by train's and eval's loaders, Ray or not): transformers'
"will NOT tie them" notice for T5's own LM head is dropped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys

# Ray Data's non-terminal progress (ray/data/_internal/progress/logging_progress.py) logs, per update:
# a "===== Running Dataset: ... =====" header, "Total Progress: a/b", a resources line, operator lines
# and a footer. Only the total is worth a line.
_TOTAL = re.compile(r"^Total Progress: (\d+)/(\S+)")
_DATA_PROGRESS_LOGGERS = ("ray.data._internal.progress", "ray.data._internal.execution.streaming_executor")
# Ray Data's notices about the progress settings made here (logged once, as warnings).
_NOTICES = ("Progress bars for operators disabled", "Progress bars disabled", "[dataset]: A new progress UI")
# Ray Train V2 names this logger after its file (logging.getLogger(__file__)): "Reporting training result
# N: TrainingReport(...)" from every worker at every report.
_TRAIN_REPORT_LOGGER = os.path.join("train", "v2", "_internal", "execution", "context.py")
# "Checkpoint successfully created at: ..." at every checkpoint (our loop prints its own shorter line).
_TRAIN_CHECKPOINT_LOGGER = "ray.train.v2._internal.execution.storage"
# Ray Train's placement-group cleaner asks the state API (served by the dashboard) every second whether the
# controller still lives, and without a dashboard warns each time it cannot ask.
_PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
NO_STATE_API_ENV = "MATHTUNE_RAY_WITHOUT_DASHBOARD"  # set in the job's workers by init_ray (dashboard: false)
# Ray Train's controller registers its workers' resources with an autoscaling coordinator actor, waiting 5 s.
_AUTOSCALING_CLIENT_LOGGER = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"


progress_unit = "rows"  # what Ray Data's row count counts in the running job (see counting())
progress_total: int | None = None  # the job's exact total, when the driver knows it (see counting())


@contextlib.contextmanager
def counting(unit: str, total: int | None = None):
    """Within: `[data]` progress says `unit` (the pipeline's dataset holds one summary row per read unit,
    so Ray's "rows" are units there) and, given `total`, shows it instead of Ray's estimate (which
    extrapolates from the first block: "64/512 rows" for eval's 500); restored after."""
    global progress_unit, progress_total
    before = progress_unit, progress_total
    progress_unit, progress_total = unit, total
    try:
        yield
    finally:
        progress_unit, progress_total = before


class DriverDataFilter(logging.Filter):
    """On the console handler of the `ray.data` logger: progress -> `[data] done/total rows`, printed when
    the count moves (Ray repeats its block every 10 s, also while nothing moves); the per-dataset
    start/plan/finish INFO lines and progress decorations are dropped (the log file keeps them)."""

    def __init__(self) -> None:
        super().__init__()
        self._last: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(_NOTICES):
            return False
        if record.levelno >= logging.WARNING:
            return True
        if not record.name.startswith(_DATA_PROGRESS_LOGGERS):
            return True
        m = _TOTAL.match(record.getMessage())
        if not m or m.group(1) == "0" or m.group(0) == self._last:
            return False
        self._last = m.group(0)
        total = f"/{progress_total}" if progress_total is not None else "" if m.group(2) == "?" else f"/{m.group(2)}"
        record.msg, record.args = f"[data] {m.group(1)}{total} {progress_unit}", None
        return True


class WorkerDataFilter(logging.Filter):
    """In workers: Ray Data's progress and execution INFO lines are not printed (warnings are)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(_NOTICES):
            return False
        return record.levelno >= logging.WARNING or not record.name.startswith(_DATA_PROGRESS_LOGGERS)


class DemoteToDebug(logging.Filter):
    """On a logger: its INFO records become DEBUG, so console handlers (INFO and up) skip them while Ray's
    DEBUG-level log files keep them. A filter, not a level: Ray Train's dictConfig resets the levels of
    the `ray.train.*` loggers when a worker starts training, but keeps their filters."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


class NoStateApiNotice(logging.Filter):
    """Drops Ray Train's "Failed to query Ray Train Controller actor state. State API may be temporarily
    unavailable", which its placement-group cleaner logs every second of a run on a Ray started without
    its dashboard (`ray.dashboard: false`, or --no-dashboard): there the state API is not unavailable for
    a while but absent by choice (the cleaner then cannot remove a dead controller's placement group,
    which matters only if the controller dies while the cluster lives on). Installed only then."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to query Ray Train Controller actor state")


class ShortTransientResourceRequest(logging.Filter):
    """Ray Train's "Failed to send resource request ..." (its own text: "If this only happens transiently
    ... it's safe to ignore") comes with a 20-line GetTimeoutError traceback when the autoscaling
    coordinator actor, started at that moment, takes over 5 s to answer (seen once per run on the GPU
    node). One line without the traceback; anything else from that logger is left as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Failed to send resource request"):
            record.exc_info, record.exc_text = None, None
        return True


class UntiedHeadNotice(logging.Filter):
    """Drops transformers 5's "... specifies to tie shared.weight to lm_head.weight, but both are present in
    the checkpoints with different values, so we will NOT tie them", logged at every load of a T5 with its
    own LM head: flan-t5 and every model this project writes. T5Config forces tie_word_embeddings=true
    whatever config.json says, so no file can avoid it; not tying is what is meant (tests check the loaded
    head is untied). Any other tie notice still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("to tie shared.weight to lm_head.weight" in msg and "NOT tie them" in msg)


def quiet_untied_head_notice() -> None:
    """Call before `from_pretrained` of a T5 (once per process is enough; repeated calls add nothing)."""
    logger = logging.getLogger("transformers.modeling_utils")
    if not any(isinstance(f, UntiedHeadNotice) for f in logger.filters):
        logger.addFilter(UntiedHeadNotice())


def _console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    # Ray Data's console handler is a StreamHandler subclass (ray._private.log.PlainRayHandler); its file
    # handler (SessionFileHandler) is not, and keeps every record.
    return [h for h in logger.handlers if isinstance(h, logging.StreamHandler)]


def _add_filter(handlers: list[logging.Handler], cls: type[logging.Filter]) -> None:
    for h in handlers:
        if not any(isinstance(f, cls) for f in h.filters):
            h.addFilter(cls())


def setup_driver() -> None:
    """Call after `import ray.data` (which installs Ray Data's handlers) and before any dataset runs."""
    from ray.data import DataContext

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # eval's report plots: "generated new fontManager"
    ctx = DataContext.get_current()
    # Operator-level lines are noise for a person; the total is shown (see DriverDataFilter). Datasets
    # copy the current context when created, so the ones Ray Train feeds its workers inherit this.
    ctx.enable_operator_progress_bars = False
    ctx.use_ray_tqdm = False  # bars inside workers would reach the driver as raw escape codes
    logging.getLogger("ray.data._internal.progress").setLevel(logging.INFO)
    handlers = _console_handlers(logging.getLogger("ray.data"))
    _add_filter(handlers, DriverDataFilter)
    for h in handlers:
        h.setFormatter(logging.Formatter("%(message)s"))


def quiet_ray_train() -> None:
    """In a worker: Ray Train's per-report lines off, its checkpoint lines to DEBUG, its transient
    resource-request warning without a traceback, and without a dashboard the cleaner's warning dropped
    (see the filters)."""
    import ray

    logging.getLogger(os.path.join(os.path.dirname(ray.__file__), _TRAIN_REPORT_LOGGER)).setLevel(logging.WARNING)
    for name, cls in ((_TRAIN_CHECKPOINT_LOGGER, DemoteToDebug),
                      (_AUTOSCALING_CLIENT_LOGGER, ShortTransientResourceRequest),
                      *([(_PG_CLEANER_LOGGER, NoStateApiNotice)] if os.environ.get(NO_STATE_API_ENV) else [])):
        logger = logging.getLogger(name)
        if not any(isinstance(f, cls) for f in logger.filters):
            logger.addFilter(cls())


def setup_worker() -> None:
    """Ray's worker_process_setup_hook (runtime_env): runs once in every worker process of the job."""
    quiet_ray_train()
    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"  # for a DataContext created in this worker later
    try:
        import ray.data
    except ImportError:  # a worker image without Ray Data: nothing to quiet
        return
    ray.data.DataContext.get_current().enable_progress_bars = False
    _add_filter(_console_handlers(logging.getLogger("ray.data")), WorkerDataFilter)


# Worker environment (runtime_env env_vars): no transformers / hub progress bars in workers ("Loading
# weights" per actor), no Ray Data bars.
WORKER_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


def quiet_env() -> None:
    """The driver's own environment: set before transformers is imported (it reads it at import)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not sys.stdout.isatty():  # a log file or a pipe: Ray's "(RayTrainWorker pid=...)" prefix without colour codes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def announce_ray(ray, info=None) -> None:
    """One line: what Ray this is and where its full logs are (they stay there, not on the console)."""
    if not ray.is_initialized():
        return
    node = ray._private.worker._global_node
    logs = os.path.join(node.get_session_dir_path(), "logs") if node is not None else "/tmp/ray/session_latest/logs"
    dash = getattr(info, "dashboard_url", None)
    res = ray.cluster_resources()
    print(f"[ray] {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs; full logs: {logs}"
          + (f"; dashboard: http://{dash}" if dash else ""), flush=True)
