"""Pure parts of the pipeline: cleaning, validation, tokenization helpers, the writer. No Ray."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cluster.config import ConfigError, from_dict
from cluster.core import DATA_SCHEMA, load_tokenizer, write_json_atomic
from pipeline.clean import clean_text, decode_utf8, strip_wrapper
from pipeline.config import PipelineConfig, answer_regex
from pipeline.tokenize_step import TokenizeBatch, holdout_mask
from pipeline.validate import prepare_text, text_reasons, token_reasons
from pipeline.write import LengthStats, SplitWriter, content_hash

# ---- cleaning ---------------------------------------------------------------------------------------

def test_strip_wrapper_only_where_present():
    raw = pa.array([
        "b'Solve 24 = 1601*c - 1605*c for c.\\n'",  # the hub's form: literal backslash-n inside
        "b'-6\\n'",
        'b"What\'s x?\\n"',  # repr picks double quotes when the text has a single quote
        "b'no newline'",
        "Solve 2*x = 4 for x.",  # unwrapped: the seed's [2:-3] would have eaten 'So' and 'x.'
        "b",
        "-6",
        None,
    ])
    assert strip_wrapper(raw).to_pylist() == [
        "Solve 24 = 1601*c - 1605*c for c.", "-6", "What's x?", "no newline", "Solve 2*x = 4 for x.", "b", "-6",
        None,
    ]


def test_clean_normalizes_whitespace():
    raw = pa.array(["  Solve  2*x\t=\n4   for x. ", "b'  7 \\n'", "   ", ""])
    assert clean_text(raw).to_pylist() == ["Solve 2*x = 4 for x.", "7", "", ""]


def test_decode_utf8_rejects_only_bad_rows():
    text, bad = decode_utf8(pa.array([b"Solve x = 1 for x.", b"caf\xe9 \xff", None], pa.binary()))
    assert bad.to_pylist() == [False, True, False]
    assert text.to_pylist()[0] == "Solve x = 1 for x."
    assert text.to_pylist()[1] == "caf\\xe9 \\xff"  # kept visible for the rejects file
    text, bad = decode_utf8(pa.chunked_array([pa.array(["ok", "fine"], pa.large_string())]))
    assert text.type == pa.string() and not any(bad.to_pylist())


# ---- validation ---------------------------------------------------------------------------------------

def _prepare(questions, answers, regex=r"-?\d+", max_chars=200, source_reject=None):
    n = len(questions)
    raw = pa.table({
        "question": pa.array(questions, pa.binary() if isinstance(questions[0], bytes) else pa.string()),
        "answer": pa.array(answers, pa.binary() if isinstance(answers[0], bytes) else pa.string()),
        "source_reject": pa.array(source_reject or [None] * n, pa.string()),
        "regime": pa.array(["train-easy"] * n), "split": pa.array(["train"] * n),
    })
    return prepare_text(raw, max_chars=max_chars, answer_regex=regex)


def test_text_reasons_each_class_and_precedence():
    out = _prepare(
        [b"Solve x = 1 for x.", b"  ", b"Solve \xff", b"Solve y = 2 for y.", b"Q" * 300, b"Solve z = 3 for z.",
         b"Solve 2 = w for w."],
        [b"b'1\\n'", b"1", b"1", b"", b"1", b"three", b"2"],
        source_reject=[None, None, None, None, None, None, "unpaired_line"],
    )
    assert out["reject"].to_pylist() == [
        None, "empty_question", "not_utf8", "empty_answer", "text_too_long", "answer_form", "unpaired_line"]
    assert out["answer"].to_pylist()[0] == "1"
    # original text kept for the rejects file (before cleaning)
    assert out["question_raw"].to_pylist()[1] == "  "


def test_answer_form_off_and_custom():
    assert _prepare(["q"], ["three"], regex=None)["reject"].to_pylist() == [None]
    assert _prepare(["q"], ["3/4"], regex=r"-?\d+/\d+")["reject"].to_pylist() == [None]
    assert _prepare(["q"], ["3/4x"], regex=r"-?\d+/\d+")["reject"].to_pylist() == ["answer_form"]  # full match


def test_one_megabyte_line_rejected_before_tokenizing():
    out = _prepare(["x" * (1 << 20)], ["1"], max_chars=2000)
    assert out["reject"].to_pylist() == ["text_too_long"]


def test_token_reasons():
    r = token_reasons(np.array([5, 300, 5, 300]), np.array([2, 2, 99, 2]), np.array([False, False, False, True]),
                      max_input_tokens=256, max_label_tokens=64)
    assert r.to_pylist() == [None, "input_too_long", "labels_too_long", "unknown_chars"]
    kept = text_reasons(pa.array(["a"]), pa.array(["1"]), pa.array([False]), max_chars=5, answer_regex=None)
    assert kept.to_pylist() == [None]


def test_config_rejects_contradictions():
    with pytest.raises(ConfigError, match="validation_size"):
        from_dict(PipelineConfig, {"validation_size": 0.5}, "pipeline")
    with pytest.raises(ConfigError, match="more than"):
        from_dict(PipelineConfig, {"validation_size": 50_000, "train_rows_per_regime": 100}, "pipeline")
    with pytest.raises(ConfigError, match="regex"):
        from_dict(PipelineConfig, {"answer_pattern": "(("}, "pipeline")
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(PipelineConfig, {"rows": 5}, "pipeline")
    assert answer_regex(PipelineConfig()) == r"-?\d+"
    assert answer_regex(PipelineConfig(module="numbers__gcd")) is None


# ---- tokenization -------------------------------------------------------------------------------------

def test_char_tokenizer_round_trip_and_special_ids(tmp_path):
    tok = load_tokenizer("char")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("Solve -3*x = 6 for x.")["input_ids"]
    assert ids[-1] == 1 and len(ids) == len("Solve -3*x = 6 for x.") + 1
    assert tok.decode(ids, skip_special_tokens=True) == "Solve -3*x = 6 for x."
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("Solve -3*x = 6 for x.")["input_ids"] == ids
    assert tok("é")["input_ids"] == [2, 1]  # outside the alphabet: unk


def _tokenize(questions, answers, fraction=0.0, max_in=256, max_lab=64):
    tok = load_tokenizer("char")
    step = TokenizeBatch(tok.backend_tokenizer.to_str(), tok.eos_token_id, tok.unk_token_id, max_in, max_lab,
                         fraction, seed=0)
    return step(_prepare(questions, answers))


def test_tokenize_batch_matches_tokenizer_call():
    tok = load_tokenizer("char")
    qs, ans = ["Solve 2*x = 4 for x.", "Solve -y = 3 for y."], ["2", "-3"]
    out = _tokenize(qs, ans)
    assert out["input_ids"].to_pylist() == [tok(q)["input_ids"] for q in qs]
    assert out["labels"].to_pylist() == [tok(a)["input_ids"] for a in ans]
    assert out["attention_mask"].to_pylist() == [[1] * len(tok(q)["input_ids"]) for q in qs]
    assert out["input_ids"].type == pa.list_(pa.int32())
    assert out["reject"].to_pylist() == [None, None] and out["question_raw"].null_count == 2


def test_repeated_answers_are_encoded_once_and_match_the_tokenizer():
    """Answers repeat (a few hundred distinct per 50k rows): encoded once each, gathered back in order."""
    tok = load_tokenizer("char")
    ans = ["2", "-3", "2", "2", "7", "-3", "2", "10"]
    qs = [f"Solve x = {i} for x." for i in range(len(ans))]
    out = _tokenize(qs, ans)
    assert out["labels"].to_pylist() == [tok(a)["input_ids"] for a in ans]
    assert out["reject"].to_pylist() == [None] * len(ans)
    assert pc.list_value_length(out["labels"]).to_pylist() == [len(tok(a)["input_ids"]) for a in ans]


def test_tokenize_batch_rejects_unknown_chars_and_long_inputs():
    out = _tokenize(["Solve π*x = 2 for x.", "Solve " + "1+" * 20 + "x = 2 for x.", "Solve x = 9 for x."],
                    ["2", "2", "9"], max_in=30)
    assert out["reject"].to_pylist() == ["unknown_chars", "input_too_long", None]
    assert out["question_raw"].to_pylist()[0] == "Solve π*x = 2 for x."


def test_holdout_is_seeded_fraction_and_order_free():
    qs = pa.array([f"Solve {i}*x = {i} for x." for i in range(20_000)])
    m = holdout_mask(qs, 0.1, seed=0)
    assert 0.08 < m.mean() < 0.12
    assert (holdout_mask(qs, 0.1, seed=0) == m).all()
    assert not (holdout_mask(qs, 0.1, seed=1) == m).all()
    perm = np.random.default_rng(0).permutation(len(qs))
    assert (holdout_mask(qs.take(perm), 0.1, seed=0) == m[perm]).all()  # depends on the question only
    assert not holdout_mask(qs, 0.0, seed=0).any()


# ---- writing ------------------------------------------------------------------------------------------

def _rows(n, start=0):
    return pa.table({
        "question": [f"q{i}" for i in range(start, start + n)], "answer": ["1"] * n, "regime": ["train-easy"] * n,
        "input_ids": pa.array([[5, 1]] * n, pa.list_(pa.int32())),
        "attention_mask": pa.array([[1, 1]] * n, pa.list_(pa.int32())),
        "labels": pa.array([[1]] * n, pa.list_(pa.int32())),
    })


def test_split_writer_bytes_do_not_depend_on_batching(tmp_path):

    table = _rows(2500)
    outs = []
    for name, sizes in (("a", [2500]), ("b", [1, 999, 700, 800]), ("c", [100] * 25)):
        w = SplitWriter(tmp_path / name, DATA_SCHEMA, rows_per_file=1000)
        start = 0
        for s in sizes:
            w.write(table.slice(start, s))
            start += s
        files = w.close()
        assert [pq.read_metadata(f).num_rows for f in files] == [1000, 1000, 500]
        outs.append(content_hash(tmp_path / name, [f.name for f in files]))
    assert outs[0] == outs[1] == outs[2]
    assert pq.read_table(tmp_path / "b").to_pylist() == table.to_pylist()


def test_empty_split_gets_an_empty_file(tmp_path):

    files = SplitWriter(tmp_path / "validation", DATA_SCHEMA, 100).close()
    assert len(files) == 1 and pq.read_table(files[0]).num_rows == 0


def test_length_stats_and_atomic_json(tmp_path):
    st = LengthStats()
    st.add(_rows(3))
    st.add(pa.table({"input_ids": pa.array([[1, 2, 3]], pa.list_(pa.int32())),
                     "labels": pa.array([[1, 2]], pa.list_(pa.int32()))}))
    d = st.to_dict()
    assert d["input_tokens"] == {"rows": 4, "min": 2, "max": 3, "mean": 2.25, "histogram": {"2": 3, "3": 1}}
    assert d["label_tokens"]["histogram"] == {"1": 3, "2": 1}
    write_json_atomic(tmp_path / "m.json", d)
    assert json.loads((tmp_path / "m.json").read_text()) == d
    assert not (tmp_path / "m.json.tmp").exists()
