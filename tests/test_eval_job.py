"""eval on a local Ray: actor-count invariance, a killed actor, row accounting, reports, --predictions.

One tiny random T5 (tests/eval_fixtures.py) and 96 rows; sort_window 16 gives 6 batches, so 2 actors
really split the work and a kill at an actor's 2nd batch happens mid-job. The 1-actor run is shared by
the tests that compare against it.
"""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from eval_fixtures import make_data, make_tiny_model, write_train_metrics

from cluster.config import RayConfig
from eval.config import EvalConfig
from eval.predict import FAULT_KILL_AT_BATCH, FAULT_MARKER_DIR

N_ROWS = 96
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Differ between runs by nature (timing, paths, the config that made them).
VOLATILE = {"wall_s", "examples_per_s", "config", "num_actors", "cpus_per_actor", "model", "tokenizer", "data"}

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
    assert {"question", "answer", "regime", "prediction", "em", "f1"} <= set(preds.column_names)
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
    assert baseline["teacher_forced_exact_match"] is not None
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["exact_match"] == baseline["exact_match"]


def test_report_and_plots_are_valid_pngs(assets, baseline):
    from PIL import Image

    out = assets["root"] / "one-actor"
    report = (out / "report.md").read_text()
    assert "exact match (generation)" in report and "teacher-forced" in report
    assert "`-06`, `-6`" in report  # the normalization rule is stated
    assert "accuracy_by_regime.png" in report and "training_curve.png" in report
    for name in ("accuracy_by_regime.png", "training_curve.png"):
        raw = (out / name).read_bytes()
        assert raw[:8] == PNG_SIGNATURE, name
        with Image.open(out / name) as im:
            im.verify()
            assert im.size[0] > 100 and im.size[1] > 100


def test_two_actors_give_identical_metrics_and_predictions(assets, baseline):
    import eval

    two = eval.run(_cfg(assets, "two-actors", num_actors=2, cpus_per_actor=0.5), RayConfig())
    assert two["num_actors"] == 2
    assert _stable(two) == _stable(baseline)
    a = pq.read_table(assets["root"] / "one-actor" / "predictions.parquet")
    b = pq.read_table(assets["root"] / "two-actors" / "predictions.parquet")
    assert a.equals(b)


def test_killed_actor_mid_job_gives_identical_metrics(assets, baseline, tmp_path, monkeypatch):
    import eval

    monkeypatch.setenv(FAULT_KILL_AT_BATCH, "2")
    monkeypatch.setenv(FAULT_MARKER_DIR, str(tmp_path))
    faulty = eval.run(_cfg(assets, "killed-actor"), RayConfig())
    marker = tmp_path / "eval-actor-killed"
    assert marker.is_file(), "the fault was never injected: the test proves nothing"
    assert faulty["rows_in"] == faulty["rows_scored"] == N_ROWS
    assert faulty["missing"] == faulty["duplicated"] == 0
    assert _stable(faulty) == _stable(baseline)
    a = pq.read_table(assets["root"] / "one-actor" / "predictions.parquet")
    b = pq.read_table(assets["root"] / "killed-actor" / "predictions.parquet")
    assert a.equals(b)


def test_score_predictions_file(tmp_path, ray_local):
    import eval

    rows = {
        "question": ["q1", "q2", "q3", "q4", "q5"],
        "answer": ["-6", "12", "3", "7", "5"],
        "regime": ["interpolate", "interpolate", "train-easy", "train-easy", "train-easy"],
        "prediction": [" -06 </s>", "21", "-3", "", None],
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
    assert m["teacher_forced_exact_match"] is None
    out = pq.read_table(tmp_path / "out" / "predictions.parquet")
    assert out["em"].to_pylist() == [True, False, False, False, False]
    assert math.isclose(out["f1"].to_pylist()[2], 2 / 3)
    assert (tmp_path / "out" / "report.md").is_file()


@pytest.mark.parametrize(
    "kw, msg",
    [({"num_actors": 8}, "needs 8 CPUs"), ({"gpus_per_actor": 1.0}, "GPUs"), ({"num_actors": 4}, "no CPU for")],
)
def test_more_than_the_cluster_can_provide_fails_fast(assets, ray_local, kw, msg):
    import time

    import eval
    from cluster.connect import ResourceError

    t0 = time.monotonic()
    with pytest.raises(ResourceError, match=msg):
        eval.run(_cfg(assets, "too-big", **kw), RayConfig())
    assert time.monotonic() - t0 < 30  # a clear error, never an endless wait for resources
