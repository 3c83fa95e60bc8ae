"""The console set-up (cluster/console.py): what the driver shows of Ray Data's progress, what workers
print, and which Ray Train lines are demoted. Pure logging, no Ray started."""

from __future__ import annotations

import logging
import os

from cluster.console import DemoteToDebug, DriverDataFilter, WorkerDataFilter

PROGRESS = "ray.data._internal.progress.logging_progress"


def _record(name: str, msg: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_driver_shows_total_progress_once_per_change_and_drops_the_rest():
    f = DriverDataFilter()
    shown = []
    for msg in ["======= Running Dataset: dataset_1 =======", "Total Progress: 0/?", "Active & requested resources: 1/4 CPU",
                "", "MapBatches(tokenize): 0/1", "Total Progress: 120/960", "Total Progress: 120/960",
                "Total Progress: 960/960", "=" * 40]:
        r = _record(PROGRESS, msg)
        if f.filter(r):
            shown.append(r.getMessage())
    assert shown == ["[data] 120/960 rows", "[data] 960/960 rows"]
    from cluster.console import counting

    with counting("read units"):  # the pipeline's dataset counts one summary per read unit
        r = _record(PROGRESS, "Total Progress: 3/13")
        assert f.filter(r) and r.getMessage() == "[data] 3/13 read units"
    r = _record(PROGRESS, "Total Progress: 4/13")
    assert f.filter(r) and r.getMessage() == "[data] 4/13 rows"
    with counting("rows", total=500):  # eval knows its row count; Ray extrapolates from the first block
        r = _record(PROGRESS, "Total Progress: 64/512")
        assert f.filter(r) and r.getMessage() == "[data] 64/500 rows"
    r = _record(PROGRESS, "Total Progress: 128/512")
    assert f.filter(r) and r.getMessage() == "[data] 128/512 rows"
    # The executor's per-dataset INFO chatter is dropped, its warnings and everything else kept.
    executor = "ray.data._internal.execution.streaming_executor"
    assert not f.filter(_record(executor, "Starting execution of Dataset dataset_1. Full logs are in /tmp/ray/..."))
    assert f.filter(_record(executor, "Operator X is backpressured", logging.WARNING))
    assert f.filter(_record("ray.data.read_api", "Reading 3 files"))
    assert not f.filter(_record("ray.data._internal.progress", "Progress bars for operators disabled. To enable, ...",
                                logging.WARNING))


def test_workers_print_no_data_progress_and_train_checkpoint_lines_become_debug():
    f = WorkerDataFilter()
    assert not f.filter(_record(PROGRESS, "Total Progress: 8/16"))
    assert not f.filter(_record("ray.data._internal.progress.tqdm_progress", "[dataset]: A new progress UI is available"))
    assert f.filter(_record(PROGRESS, "something failed", logging.ERROR))
    r = _record("ray.train.v2._internal.execution.storage", "Checkpoint successfully created at: ...")
    assert DemoteToDebug().filter(r) and r.levelno == logging.DEBUG  # kept for DEBUG log files, not the console
    w = _record("ray.train.v2._internal.execution.storage", "disk full", logging.WARNING)
    assert DemoteToDebug().filter(w) and w.levelno == logging.WARNING


def test_without_a_dashboard_the_cleaners_every_second_warning_is_dropped_and_only_then(monkeypatch):
    """Ray Train's placement-group cleaner warns once a second on a local Ray without its dashboard
    (the speedrun's): init_ray marks such workers, whose setup hook then drops that line, and only it."""
    import ray

    from cluster import console

    cleaner = logging.getLogger(console._PG_CLEANER_LOGGER)
    for name in (console._PG_CLEANER_LOGGER, console._TRAIN_CHECKPOINT_LOGGER):  # restored after the test
        monkeypatch.setattr(logging.getLogger(name), "filters", [])
    report = logging.getLogger(os.path.join(os.path.dirname(ray.__file__), console._TRAIN_REPORT_LOGGER))
    monkeypatch.setattr(report, "level", report.level)
    line = "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. Continuing to monitor."
    monkeypatch.delenv(console.NO_STATE_API_ENV, raising=False)
    console.quiet_ray_train()  # what setup_worker, Ray's hook in every worker, does first
    assert cleaner.filter(_record(cleaner.name, line, logging.WARNING))  # with a dashboard: a real problem, shown
    monkeypatch.setenv(console.NO_STATE_API_ENV, "1")
    console.quiet_ray_train()
    console.quiet_ray_train()  # a second call adds nothing
    assert sum(isinstance(f, console.NoStateApiNotice) for f in cleaner.filters) == 1
    assert not cleaner.filter(_record(cleaner.name, line, logging.WARNING))
    assert cleaner.filter(_record(cleaner.name, "Failed to clean up placement group pg_1", logging.WARNING))


def test_the_transient_resource_request_warning_loses_its_traceback_only(monkeypatch):
    """The controller's "Failed to send resource request" (a 5 s GetTimeoutError while the autoscaling
    coordinator starts) stays one warning line, without its 20-line traceback; other records keep theirs."""
    import sys

    from cluster import console

    client = logging.getLogger(console._AUTOSCALING_CLIENT_LOGGER)
    monkeypatch.setattr(client, "filters", [])
    console.quiet_ray_train()
    try:
        raise TimeoutError("Get timed out: some object(s) not ready.")
    except TimeoutError:
        exc = sys.exc_info()
    transient = _record(client.name, "Failed to send resource request for train-2e37. If this only happens "
                        "transiently ... it's safe to ignore this error.", logging.WARNING)
    other = _record(client.name, "Something else failed", logging.WARNING)
    transient.exc_info = other.exc_info = exc
    assert client.filter(transient) and client.filter(other)  # both still shown
    assert transient.exc_info is None and other.exc_info is exc
    assert "Traceback" not in logging.Formatter().format(transient)
