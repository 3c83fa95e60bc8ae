"""Experiment tracking for rank 0: TensorBoard event files always, MLflow as an option.

One small interface (`log_params`, `log_metrics`, `close`) with a no-op variant for the other ranks (the
idea of nanochat's DummyWandb): the loop calls the tracker unconditionally. MLflow calls go through a
background thread and a bounded queue, so a slow or unreachable tracking server never stalls a training
step: when the queue is full the record is dropped and counted, and `close` waits a bounded time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

from cluster.core import write_text_atomic

log = logging.getLogger("mathtune.train")

TENSORBOARD_DIR = "tensorboard"


class NoTracker:
    """What ranks other than 0 get: every call does nothing."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(NoTracker):
    """Scalars under <output>/tensorboard (tensorboardX, installed with Ray Train). On resume a new event
    file is added; TensorBoard shows the later value where steps repeat."""

    def __init__(self, output: str | Path) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(Path(output) / TENSORBOARD_DIR), flush_secs=10)

    def log_params(self, params: dict[str, Any]) -> None:
        text = "\n".join(f"    {k}: {v}" for k, v in sorted(params.items()))  # indented: markdown code block
        self.writer.add_text("config", text, 0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, float(v), step)

    def close(self) -> None:
        self.writer.close()


class MLflowTracker(NoTracker):
    """One MLflow run (named after the Ray Train run), fed from a daemon thread. Resume reuses the run
    (its id is kept in <output>/mlflow_run_id), so a restarted run continues one history; a fresh start
    (`fresh`) forgets the id and opens a new run, as it starts a new metrics.jsonl."""

    def __init__(self, uri: str, experiment: str, run_name: str, output: str | Path, queue_size: int = 1000,
                 fresh: bool = False):
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.id_file = Path(output) / "mlflow_run_id"
        if fresh:
            self.id_file.unlink(missing_ok=True)
        self.q: queue.Queue = queue.Queue(maxsize=queue_size)
        self.dropped = 0
        self.thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self.thread.start()

    def _put(self, item) -> None:
        try:
            self.q.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    def log_params(self, params: dict[str, Any]) -> None:
        self._put(("params", params, None))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._put(("metrics", {k: float(v) for k, v in metrics.items()}, step))

    def _work(self) -> None:
        try:
            from mlflow.tracking import MlflowClient

            if self.uri.startswith("file:"):
                # MLflow 3 keeps the file store (offline, no database) behind an opt-in; we opt in.
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            client = MlflowClient(tracking_uri=self.uri)
            run_id = self.id_file.read_text().strip() if self.id_file.is_file() else None
            if run_id is None:
                exp = client.get_experiment_by_name(self.experiment)
                exp_id = exp.experiment_id if exp else client.create_experiment(self.experiment)
                run_id = client.create_run(exp_id, run_name=self.run_name).info.run_id
                write_text_atomic(self.id_file, run_id + "\n")
        except Exception as e:  # tracking must never take training down
            log.warning("[train] mlflow tracking disabled: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
            run_id = None
        while True:
            kind, payload, step = self.q.get()
            try:
                if kind == "stop" or run_id is None:
                    if kind == "stop":
                        if run_id is not None:
                            client.set_terminated(run_id)
                        return
                    continue
                if kind == "params":
                    from mlflow.entities import Param

                    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in payload.items()])
                else:
                    from mlflow.entities import Metric

                    ts = int(1000 * time.time())
                    client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v in payload.items()])
            except Exception as e:
                log.warning("[train] mlflow: could not log %s: %s", kind, str(e).splitlines()[0] if str(e) else e)
            finally:
                self.q.task_done()

    def close(self, timeout_s: float = 30.0) -> None:
        with contextlib.suppress(queue.Full):
            self.q.put(("stop", None, None), timeout=timeout_s)
        self.thread.join(timeout_s)
        if self.dropped:
            log.warning("[train] mlflow: %d records dropped (the tracking server was too slow)", self.dropped)


class Trackers(NoTracker):
    """Several trackers behind one interface."""

    def __init__(self, trackers: list[NoTracker]) -> None:
        self.trackers = trackers

    def log_params(self, params: dict[str, Any]) -> None:
        for t in self.trackers:
            t.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def mlflow_uri(configured: str | None, output: str | Path) -> str:
    """The configured URI, else MLFLOW_TRACKING_URI, else a file store under the output. Plain paths
    become file: URIs."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or str(Path(output) / "mlruns")
    return uri if "://" in uri or uri.startswith(("file:", "databricks")) else Path(uri).absolute().as_uri()


def make_tracker(cfg, rank: int, fresh: bool = False) -> NoTracker:
    """Rank 0: TensorBoard (+ MLflow if configured; `fresh`: a new MLflow run). Other ranks: the no-op."""
    if rank != 0:
        return NoTracker()
    trackers: list[NoTracker] = [TensorBoardTracker(cfg.output)]
    if "mlflow" in cfg.tracking:
        trackers.append(MLflowTracker(mlflow_uri(cfg.mlflow_tracking_uri, cfg.output), cfg.mlflow_experiment,
                                      cfg.run_name, cfg.output, fresh=fresh))
    return Trackers(trackers)
