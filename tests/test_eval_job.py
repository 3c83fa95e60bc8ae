"""eval on a local Ray: actor-count invariance, a killed actor, row accounting, reports, --predictions.

One tiny random T5 (tests/eval_fixtures.py) and 96 rows; sort_window 16 gives 6 batches, so 2 actors
really split the work and a kill after an actor's first finished batch happens mid-job. The 1-actor run
is shared by the tests that compare against it.
"""

from __future__ import annotations

import json
import math
import os
import signal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from eval_fixtures import make_data, make_tiny_model, write_train_metrics

from cluster.config import RayConfig
from eval.config import EvalConfig

N_ROWS = 96
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Differ between runs by nature (timing, paths, the config that made them).
VOLATILE = {"wall_s", "examples_per_s", "timing_s", "config", "num_actors", "min_actors", "cpus_per_actor", "model",
            "tokenizer", "data"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    train_dir = root / "train"
    make_tiny_model(train_dir / "final")
    write_train_metrics(train_dir)
    data = make_data(root / "data", n_test=N_ROWS, files=3)
    return {"root": root, "train": train_dir, "data": data}


def _cfg(assets, name: str, **kw) -> EvalConfig:
    base = dict(
        model=str(assets["train"]), data=str(assets["data"]), output=str(assets["root"] / name),
        batch_size=8, sort_window=16, num_actors=1, cpus_per_actor=1.0,
    )
    return EvalConfig(**{**base, **kw})


def _stable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in VOLATILE}


@pytest.fixture(scope="module")
def baseline(assets, ray_local):
    import eval

    cfg = _cfg(assets, "one-actor")
    return eval.run(cfg, RayConfig())


def test_one_actor_rows_in_equal_rows_out_and_outputs(assets, baseline):
    out = assets["root"] / "one-actor"
    assert baseline["rows_in"] == baseline["rows_scored"] == baseline["n"] == N_ROWS
    assert baseline["missing"] == baseline["duplicated"] == 0
    preds = pq.read_table(out / "predictions.parquet")
    assert preds.num_rows == N_ROWS
    assert {"question", "answer", "regime", "module", "prediction", "em", "f1", "prediction_norm"} <= set(
        preds.column_names)
    # The random model says varied things, and F1 sees the partial overlaps.
    assert len(set(preds["prediction"].to_pylist())) > 3
    assert 0 < baseline["f1"] < 1
    # Input order is kept: row i of the output is row i of the split.
    src = pq.ParquetDataset(sorted((assets["data"] / "test").glob("*.parquet"))).read(columns=["question"])
    assert preds["question"].to_pylist() == src["question"].to_pylist()
    # Every regime is broken down, and the breakdowns add up.
    assert set(baseline["by_regime"]) == {"train-easy", "train-medium", "train-hard", "interpolate"}
    assert sum(m["n"] for m in baseline["by_regime"].values()) == N_ROWS
    assert sum(baseline["error_classes"].values()) == N_ROWS
    # No module column and no module in the manifest: one "unknown" module, broken down by regime.
    assert list(baseline["by_module"]) == ["unknown"]
    assert baseline["by_module"]["unknown"]["by_regime"] == baseline["by_regime"]
    assert set(baseline["collapse"]) >= {"collapsed", "top_predictions", "distinct_predictions"}
    # Generation is bounded by the longest gold answer (+ slack), not a fixed budget.
    longest = max(len(x) for x in src_labels(assets))
    assert baseline["max_new_tokens"] == longest + 4
    assert baseline["teacher_forced_exact_match"] is not None
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["exact_match"] == baseline["exact_match"]
    # where the time went: before Ray, Ray's start (already up here: the fixture's), the Ray Data job
    t = on_disk["timing_s"]
    assert t["ray_data"] == round(on_disk["wall_s"], 2) and 0 <= t["ray_start"] < 30
    assert t["process_start_to_ray"] is None  # Ray was up before this eval (a job's process ran more before it)


def src_labels(assets) -> list:
    return pq.ParquetDataset(sorted((assets["data"] / "test").glob("*.parquet"))).read(columns=["labels"])[
        "labels"].to_pylist()


def test_report_and_plots_are_valid_pngs(assets, baseline):
    from PIL import Image

    out = assets["root"] / "one-actor"
    report = (out / "report.md").read_text()
    assert "exact match (generation)" in report and "teacher-forced" in report
    assert "`-06`, `-6`" in report  # the normalization rule is stated
    assert "accuracy_by_regime.png" in report and "training_curve.png" in report
    assert "## By module and regime" in report and "| **unknown** | all | 96 |" in report
    for name in ("accuracy_by_regime.png", "accuracy_by_module.png", "training_curve.png"):
        raw = (out / name).read_bytes()
        assert raw[:8] == PNG_SIGNATURE, name
        with Image.open(out / name) as im:
            im.verify()
            assert im.size[0] > 100 and im.size[1] > 100


def test_two_actors_one_killed_mid_job_give_identical_metrics_and_predictions(assets, baseline):
    """Two guarantees, one eval run (each run starts its actors anew: ~15 s on 2 cores): a pool of two
    actors gives exactly the one-actor run's metrics and predictions, and so it does when one of its
    actors is SIGKILLed from outside (by its pid, as a preempted node would) once a batch has finished
    and before the job is done: Ray restarts it, retries its batches, and nothing differs."""
    import ray
    from ray.data import DataContext
    from ray.data._internal.execution.execution_callback import ExecutionCallback

    import eval

    killed: dict = {}

    class KillAfterFirstBatch(ExecutionCallback):  # runs in this process, in Ray Data's scheduling loop
        def on_execution_step(self, executor):
            if killed:
                return
            for op in executor._topology:
                done = op.metrics.num_tasks_finished
                if "Predictor" in op.name and done >= 1:
                    alive = [a for a in ray._private.state.actors().values()
                             if "Predictor" in a["ActorClassName"] and a["State"] == "ALIVE"]
                    os.kill(alive[0]["Pid"], signal.SIGKILL)
                    killed.update(actor=alive[0]["ActorID"], batches_done=done)

    ctx = DataContext.get_current()
    ctx.custom_execution_callback_classes.append(KillAfterFirstBatch)
    try:
        faulty = eval.run(_cfg(assets, "killed-actor", num_actors=2, cpus_per_actor=0.5), RayConfig())
    finally:
        ctx.custom_execution_callback_classes.remove(KillAfterFirstBatch)
    assert faulty["num_actors"] == 2
    assert killed, "the actor was never killed: the test proves nothing"
    assert 1 <= killed["batches_done"] < N_ROWS // 16, killed  # mid-job: some batches done, some not
    assert ray._private.state.actors()[killed["actor"]]["NumRestarts"] >= 1  # Ray did restart it
    assert faulty["rows_in"] == faulty["rows_scored"] == N_ROWS
    assert faulty["missing"] == faulty["duplicated"] == 0
    assert _stable(faulty) == _stable(baseline)
    a = pq.read_table(assets["root"] / "one-actor" / "predictions.parquet")
    b = pq.read_table(assets["root"] / "killed-actor" / "predictions.parquet")
    assert a.equals(b)


def test_autoscaling_pool_gives_identical_metrics(assets, baseline):
    import eval

    auto = eval.run(_cfg(assets, "autoscaling", num_actors=None, max_actors=2, cpus_per_actor=0.5), RayConfig())
    assert (auto["min_actors"], auto["num_actors"]) == (1, 2)
    assert _stable(auto) == _stable(baseline)


def test_score_predictions_file(tmp_path):
    import eval

    rows = {
        "question": ["q1", "q2", "q3", "q4", "q5"],
        "answer": ["-6", "12", "3", "7", "5"],
        "regime": ["interpolate", "interpolate", "train-easy", "train-easy", "train-easy"],
        "prediction": [" -06 </s>", "21", "-3", "", None],
        "module": ["a", "a", "b", "b", "b"],
    }
    path = tmp_path / "preds.parquet"
    pq.write_table(pa.table(rows), path)
    m = eval.run(EvalConfig(predictions=str(path), output=str(tmp_path / "out")), RayConfig())
    assert m["rows_in"] == m["rows_scored"] == 5
    assert m["exact_match"] == pytest.approx(1 / 5)
    # per example: 1, 1 (same characters), 2/3 ("-3" vs "3"), 0, 0
    assert m["f1"] == pytest.approx((1 + 1 + 2 / 3) / 5)
    # micro: common 2+2+1, predicted 2+2+2, gold 2+2+1+1+1
    p, r = 5 / 6, 5 / 7
    assert m["f1_micro"] == pytest.approx(2 * p * r / (p + r))
    assert m["error_classes"]["sign_error"] == 1 and m["error_classes"]["non_numeric"] == 2
    assert m["by_regime"]["interpolate"]["exact_match"] == 0.5
    assert m["by_module"]["a"]["exact_match"] == 0.5 and m["by_module"]["b"]["n"] == 3
    assert m["collapse"]["collapsed"] is False  # 5 rows: too few to call it
    assert m["teacher_forced_exact_match"] is None
    out = pq.read_table(tmp_path / "out" / "predictions.parquet")
    assert out["em"].to_pylist() == [True, False, False, False, False]
    assert math.isclose(out["f1"].to_pylist()[2], 2 / 3)
    assert (tmp_path / "out" / "report.md").is_file()


@pytest.mark.parametrize(
    "kw, msg",
    # the last: an autoscaling pool whose smallest size (one actor) cannot fit
    [({"num_actors": 8}, "needs 8 CPUs"), ({"gpus_per_actor": 1.0}, "GPUs"),
     ({"num_actors": None, "cpus_per_actor": 5.0}, "needs 5 CPUs")],
)
def test_more_than_the_cluster_can_provide_fails_fast(assets, ray_local, kw, msg):
    import time

    import eval
    from cluster.connect import ResourceError

    t0 = time.monotonic()
    with pytest.raises(ResourceError, match=msg):
        eval.run(_cfg(assets, "too-big", **kw), RayConfig())
    assert time.monotonic() - t0 < 30  # a clear error, never an endless wait for resources
