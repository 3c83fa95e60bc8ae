"""The pipeline end to end on a local Ray: manifest vs Parquet row for row, determinism, a worker killed
mid-tokenization, bad rows accounted for, clear errors from inside Ray tasks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.config import ConfigError
from pipeline import OutputError, RejectError, SourceError, run
from pipeline.config import PipelineConfig
from pipeline.write import content_hash

GEN = dict(source="generate", train_rows_per_regime=100, test_rows=60, rows_per_shard=50, validation_size=0.1,
           seed=7)


@pytest.fixture(scope="module")
def generated(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "data"
    manifest = run(PipelineConfig(output=str(out), **GEN))
    return out, manifest


def test_generate_end_to_end_manifest_matches_parquet(generated):
    out, manifest = generated
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest and on_disk["complete"] is True
    assert manifest["rows_in"] == 360 == manifest["rows_kept"] + manifest["rows_rejected"]
    assert manifest["rows_in_by_split"] == {"train": 300, "test": 60}

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    total = 0
    for split in ("train", "validation", "test"):
        t = pq.read_table(out / split)
        total += t.num_rows
        assert t.num_rows == manifest["rows_kept_by_split"][split]
        assert t.schema.field("input_ids").type == pa.list_(pa.int32())
        rows = t.to_pylist()
        # the manifest's histograms are exact: recompute them from the files
        for col, key in (("input_ids", "input_tokens"), ("labels", "label_tokens")):
            lengths = np.bincount([len(r[col]) for r in rows]) if rows else np.zeros(0, int)
            hist = {str(i): int(c) for i, c in enumerate(lengths) if c}
            assert manifest["token_lengths"][split][key]["histogram"] == hist
            assert manifest["token_lengths"][split][key]["max"] == (max(len(r[col]) for r in rows) if rows else 0)
        for r in rows:
            assert r["input_ids"][-1] == r["labels"][-1] == tok.eos_token_id == 1
            assert r["attention_mask"] == [1] * len(r["input_ids"])
            assert tok.decode(r["input_ids"], skip_special_tokens=True) == r["question"]
            assert tok.decode(r["labels"], skip_special_tokens=True) == r["answer"]
            assert r["regime"] in (("interpolate",) if split == "test" else ("train-easy", "train-medium", "train-hard"))
            assert r["module"] == "algebra__linear_1d"
    assert total == manifest["rows_kept"]
    by_module = manifest["rows_kept_by_module"]["algebra__linear_1d"]
    assert {s: sum(r.values()) for s, r in by_module.items()} == {s: n for s, n in manifest["rows_kept_by_split"].items() if n}
    assert manifest["token_lengths_by_module"]["algebra__linear_1d"]["test"] == manifest["token_lengths"]["test"]
    assert manifest["generator_skipped_samples"].keys() <= {"algebra__linear_1d"}
    # train is written shuffled, not regime by regime: each third of the file holds all three regimes
    regimes = pq.read_table(out / "train")["regime"].to_pylist()
    for third in range(3):
        chunk = regimes[third * len(regimes) // 3: (third + 1) * len(regimes) // 3]
        assert set(chunk) == {"train-easy", "train-medium", "train-hard"}
    assert not (out / ".shuffle").exists()
    assert 0 < manifest["rows_kept_by_split"]["validation"] < 0.25 * 300
    assert pq.read_table(out / "rejects").num_rows == manifest["rows_rejected"]
    files = [f for fs in manifest["files"].values() for f in fs]
    assert content_hash(out, files) == manifest["content_sha256"]
    # validation is carved from train: no question in both
    train_q = set(pq.read_table(out / "train")["question"].to_pylist())
    assert not train_q & set(pq.read_table(out / "validation")["question"].to_pylist())


def _tokenize_workers() -> list[int]:
    """Pids of this Ray session's read/tokenize/write actors: the raylet's children titled
    ray::MapWorker(...ProcessUnit)."""
    import psutil
    import ray

    node = ray._private.worker._global_node
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    pids = []
    for p in raylet.children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if title.startswith("ray::") and "MapWorker" in title and "ProcessUnit" in title:
            pids.append(p.pid)
    return pids


def test_same_bytes_with_another_worker_count_and_a_worker_killed_mid_tokenization(generated, tmp_path):
    """Two guarantees, one pipeline run: the same seed gives the same bytes with another worker count (1
    worker here, 3 in the fixture's run), and so it does when that worker is SIGKILLed from outside (by pid,
    as a preempted node would) while the workers write their units' files: Ray restarts it and retries its
    unit, which rewrites its own files (never appends): no row missing or twice."""
    _, first = generated
    out = tmp_path / "data"
    result: dict = {}
    # small batches: each unit takes a while, so the job is still tokenizing when the first units are written
    job = threading.Thread(target=lambda: result.update(m=run(PipelineConfig(
        output=str(out), batch_size=10, tokenize_workers=1, **GEN))))
    job.start()
    killed = None
    deadline = time.time() + 120
    while killed is None and job.is_alive() and time.time() < deadline:
        pids = _tokenize_workers()
        if pids and any((out / ".shuffle").glob("*/units/unit-*")):  # workers are writing: mid-stream
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
        time.sleep(0.05)
    job.join(timeout=300)
    assert killed is not None, "no tokenize worker was found running while the job was writing"
    faulty = result["m"]
    assert faulty["rows_in"] == first["rows_in"] and faulty["rows_kept_by_split"] == first["rows_kept_by_split"]
    assert faulty["content_sha256"] == first["content_sha256"]


def _file_source(root: Path) -> Path:
    """Four train files (one with bad rows) and two test files: six read units of several batches each."""
    src = root / "src"
    src.mkdir()
    for f in range(4):
        qs = [f"Solve {f}*x + {i} = {2 * i} for x." for i in range(40)]
        ans = ["one" if f == 2 and i % 9 == 0 else str(i % 13) for i in range(40)]
        regime = ["train-easy", "train-medium", "train-hard"][min(f, 2)]
        pq.write_table(pa.table({"question": qs, "answer": ans, "regime": [regime] * 40}),
                       src / f"train-{f:05d}.parquet")
    for f in range(2):
        rows = [{"question": f"Solve {i}*k = {3 * i} for k.", "answer": "3"} for i in range(1, 22)]
        (src / f"test-{f:05d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return src


def test_workers_write_what_the_drivers_ordered_stream_wrote(ray_local, tmp_path, monkeypatch):
    """The Ray job (each worker writing its units, then the scatter and part tasks) against the old way,
    computed here in one process: every unit read, cleaned and tokenized in order, the stream written by
    the driver's writers (tests/pipeline_fixtures.py). Same files, same bytes, same counts; several shuffle
    buckets and parts that cut across buckets and units."""
    from pipeline_fixtures import driver_stream_write

    from cluster.core import load_tokenizer
    from pipeline.job import validation_fraction
    from pipeline.sources import find_units, read_unit
    from pipeline.tokenize_step import TokenizeBatch
    from pipeline.validate import prepare_text

    monkeypatch.setattr("pipeline.job.SHUFFLE_BUCKET_ROWS", 50)  # 160 train rows -> 4 buckets
    cfg = PipelineConfig(source=str(_file_source(tmp_path)), output=str(tmp_path / "new"), batch_size=16,
                         rows_per_file=25, validation_size=0.15, seed=11)
    m = run(cfg)
    assert m["shuffle"]["buckets"] == 4

    units, _ = find_units(cfg)
    tok = load_tokenizer(cfg.tokenizer)
    step = TokenizeBatch(tok.backend_tokenizer.to_str(), tok.eos_token_id, tok.unk_token_id, cfg.max_input_tokens,
                         cfg.max_label_tokens, validation_fraction(cfg, units), seed=cfg.seed)
    stream = [step(prepare_text(raw, max_chars=cfg.max_text_chars, answer_pattern=cfg.answer_pattern))
              for unit in units for raw in read_unit(unit, cfg.batch_size)]
    assert len(units) == 6 and len(stream) > len(units)
    ref = driver_stream_write(tmp_path / "old", stream, rows_per_file=cfg.rows_per_file, seed=cfg.seed, buckets=4)
    files = {k: [str(p.relative_to(tmp_path / "old")) for p in v] for k, v in ref.items()}
    assert files == m["files"] and len(files["train"]) > 4
    assert content_hash(tmp_path / "old", [f for v in files.values() for f in v]) == m["content_sha256"]
    assert m["rows_in"] == 4 * 40 + 2 * 21 == m["rows_kept"] + m["rows_rejected"]
    assert m["rows_rejected_by_split"] == {"train": {"answer_form": 5}}
    assert {k: pq.read_table(tmp_path / "old" / k).num_rows for k in ("train", "validation", "test")} == \
        m["rows_kept_by_split"]
    assert not (tmp_path / "new" / ".shuffle").exists()


def test_three_module_mixture_end_to_end(ray_local, tmp_path):
    """Three modules of different answer forms: every row keeps its module, each module has its test set
    (arithmetic__add_or_sub also its extrapolation set), the manifest counts module x split x regime, and
    the train split streams the modules mixed."""
    from ray.data import DataContext

    modules = ["algebra__linear_1d", "numbers__is_prime", "arithmetic__add_or_sub"]
    DataContext.get_current().execution_options.preserve_order = False
    m = run(PipelineConfig(output=str(tmp_path / "data"), modules=modules, train_rows_per_regime=60, test_rows=20,
                           extrapolate_rows=10, rows_per_shard=30, validation_size=0.1, seed=3,
                           module_weights={"numbers__is_prime": 0.5}))
    assert DataContext.get_current().execution_options.preserve_order is False  # the process-global left as found
    assert m["modules"] == sorted(modules) and m["source"]["modules"] == modules
    assert m["rows_in"] == 3 * (60 + 30 + 60) + 3 * 20 + 10 == m["rows_kept"] + m["rows_rejected"]
    for module in modules:
        kept, rejected = m["rows_kept_by_module"][module], m["rows_rejected_by_module"].get(module, {})
        regimes = lambda d, split: d.get(split, {})  # noqa: E731
        train = sum(regimes(kept, "train").values()) + sum(regimes(kept, "validation").values()) + \
            sum(regimes(rejected, "train").values())
        assert train == 3 * (30 if module == "numbers__is_prime" else 60)
        assert set(kept["test"]) == ({"interpolate", "extrapolate"} if module == "arithmetic__add_or_sub"
                                     else {"interpolate"})
        assert {"train", "test"} <= set(m["token_lengths_by_module"][module])
    test = pq.read_table(tmp_path / "data" / "test").to_pylist()
    extra = [r for r in test if r["regime"] == "extrapolate"]
    assert len(extra) == m["rows_kept_by_module"]["arithmetic__add_or_sub"]["test"]["extrapolate"]
    assert {r["module"] for r in extra} == {"arithmetic__add_or_sub"}
    assert {r["answer"] for r in test if r["module"] == "numbers__is_prime"} <= {"True", "False"}
    train = pq.read_table(tmp_path / "data" / "train")["module"].to_pylist()
    for half in (train[: len(train) // 2], train[len(train) // 2:]):
        assert set(half) == set(modules)
        assert 0.1 < half.count("numbers__is_prime") / len(half) < 0.35  # its weight: 1/5 of train


def _bad_source(root: Path) -> Path:
    src = root / "src"
    src.mkdir()
    w = lambda s: f"b'{s}\\n'"  # noqa: E731  the hub's wrapper
    questions = [w("Solve 2*x = 4 for x."), w("Solve -y = 3 for y."), w("Solve π*z = 0 for z."), "x" * (1 << 20),
                 w("Solve " + "1 + " * 70 + "w = 1 for w."), w("Solve q = 1 for q.")]
    answers = [w("2"), w(""), w("0"), "1", w("1"), w("one")]
    pq.write_table(pa.table({"question": questions, "answer": answers}), src / "train-00000.parquet")
    (src / "test-00000.jsonl").write_text(json.dumps({"question": "Solve 3*k = 9 for k.", "answer": "3"}) + "\n")
    return src


def test_bad_rows_are_rejected_with_reason_and_original_text(ray_local, tmp_path):
    m = run(PipelineConfig(source=str(_bad_source(tmp_path)), output=str(tmp_path / "out"), validation_size=0))
    assert m["rows_in"] == 7 == m["rows_kept"] + m["rows_rejected"]
    assert m["rows_kept_by_split"] == {"train": 1, "validation": 0, "test": 1}
    assert m["rows_rejected_by_split"] == {"train": {"answer_form": 1, "empty_answer": 1, "input_too_long": 1,
                                                      "text_too_long": 1, "unknown_chars": 1}}
    rejects = {r["reason"]: r for r in pq.read_table(tmp_path / "out" / "rejects").to_pylist()}
    assert rejects["unknown_chars"]["question"] == "b'Solve π*z = 0 for z.\\n'"  # the original text, as read
    assert rejects["answer_form"]["answer"] == "b'one\\n'"
    assert len(rejects["text_too_long"]["question"]) == 1 << 20
    assert {r["split"] for r in rejects.values()} == {"train"}


def test_strict_fails_on_first_reject_class(ray_local, tmp_path):
    with pytest.raises(RejectError, match="--strict: .*rejected, first reason 'empty_answer'"):
        run(PipelineConfig(source=str(_bad_source(tmp_path)), output=str(tmp_path / "out"), strict=True))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_errors_inside_ray_tasks_and_empty_sources_are_clear(ray_local, tmp_path):
    (tmp_path / "a").mkdir()
    pq.write_table(pa.table({"question": ["q"], "answer": ["1"], "split": ["holdout"]}), tmp_path / "a" / "d.parquet")
    with pytest.raises(SourceError) as e:
        run(PipelineConfig(source=str(tmp_path / "a"), output=str(tmp_path / "out")))
    assert str(e.value).endswith("d.parquet: `split` column holds ['holdout']; expected one of "
                                 "['train', 'validation', 'test']")  # the message itself, not a remote traceback
    (tmp_path / "b").mkdir()
    pq.write_table(pa.table({"question": pa.array([], pa.string()), "answer": pa.array([], pa.string())}),
                   tmp_path / "b" / "train.parquet")
    with pytest.raises(SourceError, match="has no rows"):
        run(PipelineConfig(source=str(tmp_path / "b"), output=str(tmp_path / "out")))


def test_unwritable_or_foreign_output_fails_before_any_work(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutputError, match="not writable"):
        run(PipelineConfig(output=str(tmp_path / "a-file" / "data")))
    with pytest.raises(OutputError, match="is a file"):
        run(PipelineConfig(output=str(tmp_path / "a-file")))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(OutputError, match="not a pipeline output; refusing"):
        run(PipelineConfig(output=str(tmp_path / "home")))
    assert (tmp_path / "home" / "thesis.tex").exists()


def test_push_to_hub_refuses_without_token(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="HF_TOKEN"):
        run(PipelineConfig(output=str(tmp_path / "out"), push_to_hub="me/math"))


def test_cli_reports_bad_input_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--source", str(tmp_path / "missing"), "--output",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(f"error: source not found: {tmp_path / 'missing'} (traceback: ")
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--validation-size", "0.9"], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert proc.returncode == 2 and "validation_size" in proc.stderr
