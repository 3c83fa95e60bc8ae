"""eval refuses bad inputs with one clear message, before Ray starts (seconds, no Ray)."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from eval_fixtures import make_data, make_rows, make_tiny_model

from cluster.config import ConfigError, RayConfig
from cluster.core import ModelError
from eval.aggregate import block_partials, combine, score_batch
from eval.config import EvalConfig
from eval.metrics import aggregate
from eval.resolve import EvalError, check_tokenizers_agree, inspect_split, resolve_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "final")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("d") / "data", n_test=8, files=1)


def _run(**kw):
    from eval.job import run

    return run(EvalConfig(**kw), RayConfig())


def test_model_dir_missing_weights_is_a_clear_error(tmp_path, model_dir, data_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(ModelError, match=r"incomplete: missing model\.safetensors"):
        _run(model=str(broken), data=str(data_dir), output=str(tmp_path / "out"))


def test_model_dir_missing_config_and_pickle_only_weights(tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(ModelError) as e:
        resolve_model(str(d))
    assert "config.json" in str(e.value) and "never unpickle" in str(e.value)


def test_model_dir_not_found_and_hub_id_offline(tmp_path, data_dir, monkeypatch):
    with pytest.raises(EvalError, match="model directory not found"):
        resolve_model(str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EvalError, match="offline"):
        _run(model="google/flan-t5-large", data=str(data_dir), output=str(tmp_path / "out"))


def test_train_output_dir_resolves_to_final(model_dir):
    src = resolve_model(str(model_dir.parent))
    assert src.spec == str(model_dir) and src.local


def test_data_errors(tmp_path, model_dir, data_dir):
    with pytest.raises(EvalError, match=r"no Parquet files in .*validation.*splits found.*test"):
        inspect_split(str(data_dir), "validation", None)
    bad = tmp_path / "bad"
    (bad / "test").mkdir(parents=True)
    pq.write_table(pa.table({"question": ["q"], "answer": ["1"]}), bad / "test" / "p.parquet")
    with pytest.raises(EvalError, match=r"missing column\(s\) \['input_ids', 'labels'\]"):
        inspect_split(str(bad), "test", None)
    (bad / "test" / "p.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(EvalError, match="unreadable Parquet"):
        inspect_split(str(bad), "test", None)


def test_token_ids_beyond_the_model_vocabulary(tmp_path, model_dir):
    data = tmp_path / "data"
    (data / "test").mkdir(parents=True)
    pq.write_table(
        pa.table({"question": ["q"], "answer": ["1"], "input_ids": [[5, 31999, 1]], "labels": [[20, 1]]}),
        data / "test" / "p.parquet",
    )
    with pytest.raises(EvalError, match="token id 31999 .* vocabulary of"):
        _run(model=str(model_dir), data=str(data), output=str(tmp_path / "out"))


def test_tokenizer_mismatch(tmp_path, data_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "Solve": 3}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(EvalError, match="encode text differently"):
        check_tokenizers_agree(str(tmp_path / "other"), str(data_dir))
    check_tokenizers_agree(str(data_dir / "tokenizer"), str(data_dir))  # the same one: fine


def test_unwritable_output(tmp_path, model_dir, data_dir):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(EvalError, match="not writable"):
        _run(model=str(model_dir), data=str(data_dir), output=str(blocker / "out"))


def test_predictions_file_errors(tmp_path):
    p = tmp_path / "p.parquet"
    pq.write_table(pa.table({"answer": ["1"], "pred": ["1"]}), p)
    with pytest.raises(EvalError, match=r"missing column\(s\) \['prediction'\]"):
        _run(predictions=str(p), output=str(tmp_path / "o"))
    pq.write_table(pa.table({"answer": [1], "prediction": ["1"]}), p)
    with pytest.raises(EvalError, match="answer must be a string column"):
        _run(predictions=str(p), output=str(tmp_path / "o"))


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"model": "m", "data": "d"}, "output is required"),
        ({"output": "o", "model": "m", "predictions": "p"}, "not both"),
        ({"output": "o"}, "--model MODEL"),
        ({"output": "o", "model": "m"}, "--data DIR"),
        ({"output": "o", "predictions": "p", "batch_size": 64, "sort_window": 8}, "sort_window"),
        ({"output": "o", "predictions": "p", "num_actors": 0}, "num_actors"),
    ],
)
def test_contradictory_config(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        EvalConfig(**kw)


def test_cli_errors_exit_codes(tmp_path, capsys):
    from cluster.config import run_cli
    from eval.__main__ import main

    with pytest.raises(SystemExit) as e:  # argparse: unknown flag
        main(["--output", str(tmp_path), "--no-such-flag", "1"])
    assert e.value.code == 2
    with pytest.raises(ConfigError):  # run_cli turns this into exit 2
        main(["--output", str(tmp_path), "--model", "m"])
    with pytest.raises(SystemExit) as e:  # any user error: one line, exit 2 (cluster.config.run_cli)
        run_cli(lambda: main(["--output", str(tmp_path / "o"), "--model", str(tmp_path / "missing"), "--data", "d"]))
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: model directory not found")


def test_block_partials_combine_equals_single_process_aggregate():
    """The Ray aggregation path (partials per block, combined) equals metrics.aggregate on one list."""
    rng = random.Random(1)
    rows = make_rows(200, seed=3)
    answers = [r["answer"] for r in rows]
    preds = [rng.choice([a, "-" + a, str(int(a) + 1), "", a + "0", "x"]) for a in answers]
    batch = {
        "answer": np.array(answers, dtype=object),
        "prediction": np.array(preds, dtype=object),
        "regime": np.array([r["regime"] for r in rows], dtype=object),
    }
    scored = score_batch(batch)
    cuts = [0, 13, 50, 51, 140, 200]
    partials = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        block = block_partials({k: v[a:b] for k, v in scored.items()})
        partials += [dict(zip(block, vals, strict=True)) for vals in zip(*block.values(), strict=True)]
    got = combine(partials, teacher_forced=False)
    want = aggregate(preds, answers)
    assert got["n"] == want["n"] == 200
    for k in ("exact_match", "f1_mean", "f1_micro"):
        assert got["f1" if k == "f1_mean" else k] == pytest.approx(want[k], abs=1e-12)
    assert sum(got["error_classes"].values()) == 200
    assert all(v > 0 for k, v in got["error_classes"].items() if k != "wrong_magnitude" and k != "other_numeric")
    json.dumps(got)  # metrics.json-serializable (no numpy scalars)


def test_predictor_own_greedy_output_is_teacher_forced_exact(model_dir, data_dir):
    """In-process, no Ray: feed the model its own greedy answers as gold. Generation EM and teacher-forced
    EM must then be 1 on every row that ended with </s>; this checks the sort/unsort of rows (each row
    gets its own prediction back) and the teacher-forced alignment of logits and labels."""
    from cluster.core import load_tokenizer
    from eval.predict import Predictor

    table = pq.read_table(data_dir / "test")
    batch = {k: np.array(table[k].to_pylist(), dtype=object) for k in ("question", "answer", "regime")}
    batch["input_ids"] = np.array([np.array(x) for x in table["input_ids"].to_pylist()] + [None], dtype=object)[:-1]
    batch["labels"] = np.array([np.array(x) for x in table["labels"].to_pylist()] + [None], dtype=object)[:-1]
    pred = Predictor(str(model_dir), str(model_dir), batch_size=3, max_new_tokens=12, teacher_forced=True,
                     use_gpu=False, torch_threads=1)
    first = pred(batch)
    done = ~first["truncated"]
    assert done.sum() >= 2, "the fixture model should finish some answers"
    tok = load_tokenizer(str(model_dir))
    own = {k: v[done] for k, v in batch.items()}
    own["answer"] = first["prediction"][done]
    own["labels"] = np.array([np.array(x) for x in tok(list(own["answer"]))["input_ids"]] + [None],
                             dtype=object)[:-1]
    second = pred(own)
    assert list(second["prediction"]) == list(own["answer"])
    assert second["em"].all() and second["tf_em"].all()
    assert (second["f1"] == 1.0).all()
