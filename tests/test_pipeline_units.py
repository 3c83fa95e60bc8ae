"""Pure parts of the pipeline: cleaning, validation, tokenization helpers, the writer. No Ray."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from pipeline_fixtures import ShuffleWriter, driver_stream_write

from cluster.config import ConfigError, from_dict
from cluster.core import DATA_SCHEMA, RejectError, load_tokenizer, write_json_atomic
from pipeline.answers import EXTRAPOLATE, FORMS, MODULE_FORMS, answer_form_failed, answer_pattern
from pipeline.clean import clean_text, decode_utf8, strip_wrapper
from pipeline.config import PipelineConfig
from pipeline.tokenize_step import TokenizeBatch, holdout_mask
from pipeline.validate import prepare_text, text_reasons, token_reasons
from pipeline.write import LengthStats, SplitWriter, bucket_ids, content_hash

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

def _prepare(questions, answers, pattern="auto", max_chars=200, source_reject=None, module="algebra__linear_1d"):
    n = len(questions)
    raw = pa.table({
        "question": pa.array(questions, pa.binary() if isinstance(questions[0], bytes) else pa.string()),
        "answer": pa.array(answers, pa.binary() if isinstance(answers[0], bytes) else pa.string()),
        "source_reject": pa.array(source_reject or [None] * n, pa.string()),
        "regime": pa.array(["train-easy"] * n), "split": pa.array(["train"] * n), "module": pa.array([module] * n),
    })
    return prepare_text(raw, max_chars=max_chars, answer_pattern=pattern)


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
    assert _prepare(["q"], ["three"], pattern="none")["reject"].to_pylist() == [None]
    assert _prepare(["q"], ["3/4"], pattern=r"-?\d+/\d+")["reject"].to_pylist() == [None]
    assert _prepare(["q"], ["3/4x"], pattern=r"-?\d+/\d+")["reject"].to_pylist() == ["answer_form"]  # full match
    assert _prepare(["q"], ["three"], module="my__own_module")["reject"].to_pylist() == [None]  # no known form


def test_one_megabyte_line_rejected_before_tokenizing():
    out = _prepare(["x" * (1 << 20)], ["1"], max_chars=2000)
    assert out["reject"].to_pylist() == ["text_too_long"]


def test_token_reasons():
    r = token_reasons(np.array([5, 300, 5, 300]), np.array([2, 2, 99, 2]), np.array([False, False, False, True]),
                      max_input_tokens=256, max_label_tokens=64)
    assert r.to_pylist() == [None, "input_too_long", "labels_too_long", "unknown_chars"]
    kept = text_reasons(pa.array(["a"]), pa.array(["1"]), pa.array([False]), max_chars=5)
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
    assert answer_pattern("algebra__linear_1d") == r"-?\d+" and answer_pattern("my__module") is None
    with pytest.raises(ConfigError, match="no module"):
        from_dict(PipelineConfig, {"modules": "algebra__linear_1d,algebra__linear_9d"}, "pipeline")
    with pytest.raises(ConfigError, match="cannot be combined"):
        from_dict(PipelineConfig, {"modules": ["all", "numbers__gcd"]}, "pipeline")
    with pytest.raises(ConfigError, match="not in pipeline.modules"):
        from_dict(PipelineConfig, {"module_weights": {"numbers__gcd": 2}}, "pipeline")
    with pytest.raises(ConfigError, match="source=generate only"):
        from_dict(PipelineConfig, {"source": "data/", "module_weights": {"algebra__linear_1d": 2}}, "pipeline")


def test_modules_config_one_list_all_and_weights():
    assert PipelineConfig().module_list() == ["algebra__linear_1d"]
    assert from_dict(PipelineConfig, {"modules": "numbers__gcd"}, "pipeline").modules == ["numbers__gcd"]
    assert len(PipelineConfig(modules=["all"]).module_list()) == 56
    cfg = from_dict(PipelineConfig, {"modules": ["numbers__gcd", "arithmetic__div"], "train_rows_per_regime": 100,
                                     "module_weights": {"numbers__gcd": 0.5}, "test_rows": 10,
                                     "extrapolate_rows": 4}, "pipeline")
    assert (cfg.train_rows("numbers__gcd"), cfg.train_rows("arithmetic__div")) == (50, 100)
    assert cfg.test_units("numbers__gcd") == [("interpolate", "numbers__gcd", 10)]
    assert cfg.test_units("arithmetic__div") == [("interpolate", "arithmetic__div", 10),
                                                 ("extrapolate", "arithmetic__div_big", 4)]


# ---- answer forms per module --------------------------------------------------------------------------

# Answers as the generator writes them (sampled from each module), and malformed ones.
ACCEPTED = {
    "algebra__linear_1d": ["24", "-18", "0"],
    "algebra__polynomial_roots": ["2, 141358", "-1, 7, 8, 632", "-(h - 8)*(h - 2)**3*(11*h + 2)",
                                  "4*(o - 1110884)**2/3", "25/3"],
    "algebra__sequence_nth_term": ["u**3 + 6*u**2 + 15*u + 2575", "197857*y + 1"],
    "arithmetic__add_or_sub": ["-1551.09355", "367335", "-116334627.708"],
    "arithmetic__add_or_sub_in_base": ["-1101001110010110001", "2c4", "-4c46"],
    "arithmetic__div": ["-16", "3/56581", "-1/37855", "1703/564"],
    "arithmetic__simplify_surd": ["128*sqrt(11) + 45057", "sqrt(2)/4", "190710 - 7440*sqrt(11)"],
    "comparison__closest": ["-0.5", "d", "0.06", "-1/4"],
    "comparison__pair": ["True", "False", "-3226", "3.8", "v"],
    "comparison__sort": ["5, -5, -10, -52", "5, 2, 0.4, 0.0752, -1/7, -2", "3, 2, k, -3"],
    "measurement__conversion": ["13750", "0.000297183", "9824881000"],
    "measurement__time": ["265", "2:48 PM", "11:40 AM"],
    "numbers__is_prime": ["True", "False"],
    "numbers__list_prime_factors": ["59, 67, 257", "2"],
    "numbers__round_number": ["2900000", "-0.0055", "0.0004"],
    "polynomials__simplify_power": ["x**(-11586/77)", "l**83"],
    "probability__swr_p_level_set": ["143/408", "1/7", "1", "0"],
}
REJECTED = {
    "algebra__linear_1d": ["-", "1.5", "x = 3", "3/4", ""],
    "arithmetic__add_or_sub": ["1.", ".5", "1,000", "--2", "12 apples"],
    "arithmetic__add_or_sub_in_base": ["2C4", "2 c4", "-", "+12"],
    "comparison__closest": ["ab", "True"],
    "comparison__sort": ["5,2", "5, , 2", "[5, 2]", "5, 2,"],
    "measurement__time": ["14:48", "2:48PM", "2:8 PM"],
    "numbers__is_prime": ["true", "yes", "1"],
    "numbers__list_prime_factors": ["2, 3.5", "2 3"],
    "algebra__sequence_nth_term": ["", "   ", "=", "x == 2"],
    "probability__swr_p_level_set": ["1/", "/7", "one"],
}


def test_answer_forms_accept_the_generators_answers_and_reject_malformed_ones():
    for module, good in ACCEPTED.items():
        failed = answer_form_failed(pa.array(good), pa.array([module] * len(good))).to_pylist()
        assert not any(failed), (module, [a for a, f in zip(good, failed, strict=True) if f])
    for module, bad in REJECTED.items():
        failed = answer_form_failed(pa.array(bad), pa.array([module] * len(bad))).to_pylist()
        assert all(failed), (module, [a for a, f in zip(bad, failed, strict=True) if not f])
    # a batch mixing modules: each row against its own module's form
    mixed = answer_form_failed(pa.array(["True", "True", "7", "x"]),
                               pa.array(["numbers__is_prime", "algebra__linear_1d", "algebra__linear_1d", None]))
    assert mixed.to_pylist() == [False, True, False, False]  # a row without a module is not checked
    out = _prepare(["q", "q"], ["12 apples", "-2812.15"], module="arithmetic__add_or_sub")
    assert out["reject"].to_pylist() == ["answer_form", None] and out["module"].to_pylist()[0] == "arithmetic__add_or_sub"


def test_every_module_has_a_form_and_extrapolation_sets_extend_known_modules():
    assert set(MODULE_FORMS.values()) <= set(FORMS)
    assert set(EXTRAPOLATE) <= set(MODULE_FORMS)
    assert all(extra.startswith(base) for base, extra in EXTRAPOLATE.items())


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
        "module": ["algebra__linear_1d"] * n,
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


def _regime_rows(n_per_regime: int) -> pa.Table:
    """Rows in the source's regime-by-regime order (what the generator and the v1.0 files give)."""
    parts = [_rows(n_per_regime, start=i * n_per_regime) for i in range(3)]
    regimes = [r for r in ("train-easy", "train-medium", "train-hard") for _ in range(n_per_regime)]
    t = pa.concat_tables(parts)
    return t.set_column(t.schema.get_field_index("regime"), "regime", pa.array(regimes))


def _write_shuffled(directory, table, sizes, seed=0, buckets=4, rows_per_file=4000):
    w = ShuffleWriter(directory, DATA_SCHEMA, rows_per_file, seed=seed, buckets=buckets,
                      spill_dir=directory.parent / f".shuffle-{directory.name}")
    start = 0
    for s in sizes:
        w.write(table.slice(start, s))
        start += s
    files = w.close()
    assert not (directory.parent / f".shuffle-{directory.name}").exists()  # spill files cleaned up
    return files


def test_shuffle_writer_mixes_every_window_of_1000_rows(tmp_path):
    table = _regime_rows(10_000)
    files = _write_shuffled(tmp_path / "train", table, [8192] * 3 + [5424])
    out = pq.read_table(tmp_path / "train")
    assert sorted(out["question"].to_pylist()) == sorted(table["question"].to_pylist())  # each row once
    assert [pq.read_metadata(f).num_rows for f in files] == [4000] * 7 + [2000]
    regimes = np.array(out["regime"].to_pylist())
    for regime in ("train-easy", "train-medium", "train-hard"):
        share = np.convolve(regimes == regime, np.ones(1000), "valid") / 1000  # every sliding window
        assert np.abs(share - 1 / 3).max() < 0.05, (regime, share.min(), share.max())


def test_shuffle_writer_bytes_depend_on_seed_and_rows_not_batching(tmp_path):
    table = _regime_rows(1000)
    hashes = {}
    for name, sizes, seed in (("a", [3000], 0), ("b", [1, 999, 700, 1300], 0), ("c", [7] * 428 + [4], 0),
                              ("d", [3000], 1)):
        files = _write_shuffled(tmp_path / name / "train", table, sizes, seed=seed)
        hashes[name] = content_hash(tmp_path / name / "train", [f.name for f in files])
    assert hashes["a"] == hashes["b"] == hashes["c"]
    assert hashes["d"] != hashes["a"]
    # bucket ids are a function of the stream position: any batching draws the same ones
    whole = bucket_ids(0, 1000, 7, key=123)
    assert (np.concatenate([bucket_ids(0, 300, 7, 123), bucket_ids(300, 700, 7, 123)]) == whole).all()
    assert np.bincount(whole, minlength=7).min() > 100


def test_module_table_is_the_generators(monkeypatch):
    """pipeline/answers.py lists the generator's modules without importing it (the driver checks names
    before Ray starts): it must be exactly the generator's, and every module must sample (numpy 2 shim)."""
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    from pipeline.generate import _load_generator, generate_rows

    g = _load_generator()
    assert set(g.filtered_modules["train-easy"]) == set(MODULE_FORMS) == set(g.filtered_modules["interpolate"])
    assert set(g.filtered_modules["extrapolate"]) == set(EXTRAPOLATE.values())
    # modules that sample polynomials failed under numpy 2 (ndarray.itemset) before the shim
    for module in ("algebra__linear_1d_composed", "polynomials__expand", "calculus__differentiate"):
        q, a, _ = generate_rows(module, "train-easy", 2, seed=1)
        assert len(q) == 2 and not any(answer_form_failed(pa.array(a), pa.array([module] * 2)).to_pylist())


def test_generator_assertions_are_skipped_and_counted_but_not_forever(monkeypatch):
    """The generator's rare `assert entropy == 0` (a dirichlet draw that did not underflow) hit a 2M-row
    run: the sample is skipped and counted; an assertion that always fires still raises, clearly."""
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    import pipeline.generate as gen

    g = gen._load_generator()
    real, calls = g.sample_from_module, []

    def flaky(fn):
        calls.append(1)
        if len(calls) in (2, 3):
            raise AssertionError
        return real(fn)

    monkeypatch.setattr(g, "sample_from_module", flaky)
    q, a, skipped = gen.generate_rows("algebra__linear_1d", "train-easy", 3, seed=1)
    assert len(q) == len(a) == 3 and len(calls) == 5 and skipped >= 2

    def broken(fn):
        raise AssertionError

    monkeypatch.setattr(g, "sample_from_module", broken)
    with pytest.raises(RuntimeError, match="failed its own assertion 21 times in a row"):
        gen.generate_rows("algebra__linear_1d", "train-easy", 1, seed=1)


def _local_tasks(fn, calls):
    return [fn(*args) for args in calls]


def _run_units(out, batches_by_unit, cfg, buckets, scatter_rows=500_000):
    """The workers' writing without Ray: a UnitWriter per unit (in a scrambled finishing order), the driver's
    Totals over their JSON summaries, then the scatter and part tasks run in this process."""
    from pipeline.job import Totals, write_splits
    from pipeline.write import UnitWriter

    totals = Totals(len(batches_by_unit))
    for u in reversed(range(len(batches_by_unit))):  # the order units finish in must not matter
        w = UnitWriter(out / ".shuffle", u, strict=False)
        for batch in batches_by_unit[u]:
            w.add(batch)
        totals.add(json.loads(json.dumps(w.close())))
    totals.check_complete()
    return totals, write_splits(totals, cfg, out, buckets, run_tasks=_local_tasks, scatter_rows=scatter_rows)


def _unit_batches(n_units=5, batch=13):
    """Tokenized batches of several units: train with a validation hold-out and bad answers, two test units,
    one unit all rejects, one empty batch."""
    units = []
    for u in range(n_units):
        qs = [f"Solve {u}*x + {i} = {i + 2} for x." for i in range(3 * batch)]
        ans = ["one" if (i + u) % 7 == 0 else str(i % 11) for i in range(3 * batch)]
        if u == 3:
            ans = ["?"] * len(qs)
        t = _tokenize(qs, ans, fraction=0.2)
        if u in (1, 4):  # test units
            t = t.set_column(t.schema.get_field_index("split"), "split", pa.array(["test"] * t.num_rows))
        units.append([t.slice(i, batch) for i in range(0, t.num_rows, batch)] + [t.slice(0, 0)])
    return units


@pytest.mark.parametrize("buckets,rows_per_file,scatter_rows", [(3, 7, 1), (1, 1000, 1000), (4, 20, 60)])
def test_workers_write_the_bytes_the_drivers_stream_wrote(tmp_path, buckets, rows_per_file, scatter_rows):
    """Each unit writing its own files, then the scatter and part tasks, gives the same files (names, rows,
    bytes) as the single ordered stream the driver used to write: the seeded bucket shuffle for train and
    validation, source order for test and rejects, parts cut at rows_per_file across bucket and unit borders,
    units scattered one by one or in runs."""
    cfg = PipelineConfig(output=str(tmp_path), rows_per_file=rows_per_file, seed=5)
    units = _unit_batches()
    totals, files = _run_units(tmp_path / "new", units, cfg, buckets, scatter_rows)
    ref = driver_stream_write(tmp_path / "old", [b for unit in units for b in unit], rows_per_file=rows_per_file,
                              seed=cfg.seed, buckets=buckets)
    for kind in ("train", "validation", "test", "rejects"):
        assert [f.name for f in files[kind]] == [f.name for f in ref[kind]], kind
        assert content_hash(tmp_path / "new" / kind, [f.name for f in files[kind]]) == \
            content_hash(tmp_path / "old" / kind, [f.name for f in ref[kind]]), kind
    assert not (tmp_path / "new" / ".shuffle").exists()
    counts = totals.counts()
    rows = {k: pq.read_table(tmp_path / "new" / k).num_rows for k in ("train", "validation", "test", "rejects")}
    assert counts["rows_kept_by_split"] == {k: rows[k] for k in ("train", "validation", "test")}
    assert counts["rows_rejected"] == rows["rejects"] > 39  # unit 3 alone rejects 39
    assert counts["rows_in"] == 5 * 39 == counts["rows_kept"] + counts["rows_rejected"]
    assert len(files["train"]) > 1 or rows_per_file == 1000


def test_scatter_groups_are_runs_of_consecutive_units_with_their_offsets():
    from pipeline.write import scatter_groups

    rows = [5, 0, 3, 4, 0, 0, 9, 1]
    assert scatter_groups(rows, 8) == [((0, 2), 0), ((3,), 8), ((6,), 12), ((7,), 21)]
    assert scatter_groups(rows, 1) == [((0,), 0), ((2,), 5), ((3,), 8), ((6,), 12), ((7,), 21)]
    assert scatter_groups(rows, 100) == [((0, 2, 3, 6, 7), 0)]
    assert scatter_groups([0, 0], 10) == []


def test_unit_summaries_count_by_module_and_the_totals_check_the_row_invariant(tmp_path):
    from pipeline.job import Totals
    from pipeline.write import UnitWriter, unit_spill

    batch = _tokenize(["Solve 2*x = 4 for x.", "Solve y = 1 for y.", "Solve z = 3 for z."], ["2", "one", "3"])
    w = UnitWriter(tmp_path / ".shuffle", 0, strict=False)
    w.add(batch)
    summary = w.close()
    assert len(json.dumps(summary)) < 1000  # small: this is what travels to the driver instead of the rows
    totals = Totals(1)
    totals.add(summary)
    counts = totals.counts()
    assert counts["rows_kept_by_module"] == {"algebra__linear_1d": {"train": {"train-easy": 2}}}
    assert counts["rows_rejected_by_module"] == {"algebra__linear_1d": {"train": {"train-easy": 1}}}
    assert counts["token_lengths_by_module"]["algebra__linear_1d"]["train"] == totals.length_stats()["train"]
    assert totals.length_stats()["train"]["input_tokens"]["rows"] == 2
    with pa.OSFile(str(unit_spill(tmp_path / ".shuffle", "rejects", 0))) as f:
        assert pa.ipc.open_stream(f).read_all().to_pylist()[0]["module"] == "algebra__linear_1d"
    assert not list((tmp_path / ".shuffle").rglob("*.tmp"))  # written under a temporary name, then renamed
    with pytest.raises(RuntimeError, match="reported twice"):
        totals.add(summary)
    totals.rows_in["train"] += 1  # a row that went nowhere: must stop the run (also under python -O)
    with pytest.raises(RuntimeError, match="row accounting broken"):
        totals.counts()
    with pytest.raises(RuntimeError, match="1 of 2 read units never reported"):
        t2 = Totals(2)
        t2.add(summary)
        t2.check_complete()
    with pytest.raises(RejectError, match="--strict: 1 row.*'answer_form'"):
        UnitWriter(tmp_path / "s", 0, strict=True).add(batch)


def test_split_writer_bytes_do_not_depend_on_batching_past_a_page(tmp_path):
    """Parquet cuts data pages (~1 MB) by the input's chunks: at this size the same rows batched two ways gave
    two different files before each row group was written from one contiguous buffer."""
    rng = np.random.default_rng(0)
    n = 40_000
    ids = pa.array([rng.integers(3, 30_000, 40).astype(np.int32) for _ in range(n)], pa.list_(pa.int32()))
    table = pa.table({"question": [f"q{i}" for i in range(n)], "answer": ["1"] * n, "regime": ["train-easy"] * n,
                      "module": ["m"] * n, "input_ids": ids, "attention_mask": ids, "labels": ids})
    hashes = []
    for name, step in (("a", n), ("b", 777)):
        w = SplitWriter(tmp_path / name, DATA_SCHEMA, rows_per_file=n)
        for i in range(0, n, step):
            w.write(table.slice(i, step))
        hashes.append(content_hash(tmp_path / name, [f.name for f in w.close()]))
    assert hashes[0] == hashes[1]


def test_pool_uses_every_cpu_but_the_drivers():
    """The read step is fused into the tokenizer's actor pool, so the pool is the job's parallelism: the
    old default (half the CPUs, at most 16) generated on 8 of a GPU node's 16 cores (6.2k rows/s)."""
    from pipeline.job import pool_size

    assert [pool_size(0, c) for c in (1, 2, 16, 192)] == [1, 1, 15, 191]
    assert pool_size(0, 4, cores=2) == 2 and pool_size(0, 16, cores=16) == 15  # local Ray: not past the cores
    assert pool_size(4, 16) == 4
    assert pool_size(0, 16, units=3) == 3 and pool_size(4, 16, units=1) == 1 and pool_size(0, 16, units=40) == 15
    with pytest.raises(ConfigError, match="tokenize_workers=16 would hold all 16 CPUs.*at most 15"):
        pool_size(16, 16)


def _generate_in_fresh_process(calls: str, fast_paths: bool = True) -> str:
    """print() of generate_rows calls in a fresh Python (PYTHONHASHSEED fixed, as Ray's workers run)."""
    import subprocess
    import sys
    from pathlib import Path

    off = "" if fast_paths else "g._sympy_fast_paths = lambda: None; "
    code = f"import pipeline.generate as g; {off}print([{calls}])"
    root = str(Path(__file__).resolve().parents[1])
    env = {"PYTHONHASHSEED": "0", "PYTHONPATH": root, "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          check=True, timeout=300).stdout


def test_generated_rows_repeat_across_processes_sympys_rng_and_composed_modules():
    """numbers__is_prime draws from sympy's private Random (seeded from the OS at import): the same seed
    gave different rows in each fresh process until generate_rows seeded it too. The composed modules
    ordered their statements by object address (a set of entities) until _expand_entities_in_order."""
    calls = ", ".join(f"g.generate_rows({m!r}, {r!r}, 12, seed=5)" for m, r in [
        ("numbers__is_prime", "train-easy"), ("numbers__gcd_composed", "train-easy"),
        ("polynomials__add", "train-medium"), ("algebra__linear_1d_composed", "interpolate")])
    outs = [_generate_in_fresh_process(calls) for _ in range(2)]
    assert outs[0] == outs[1] and outs[0].count("?") >= 12 and outs[0].count("Let ") >= 12


def test_sympy_fast_paths_give_the_generators_rows_exactly():
    """math.gcd / an integer determinant in place of sympy's (2x linear_1d's generation speed) change no row:
    modules through number.integer (coprime_to too), 1x1 and 2x2 systems, a composed module."""
    calls = ", ".join(f"g.generate_rows({m!r}, {r!r}, 15, seed=3)" for m, r in [
        ("algebra__linear_1d", "train-hard"), ("algebra__linear_2d", "train-medium"),
        ("numbers__div_remainder", "train-easy"), ("arithmetic__add_sub_multiple", "interpolate"),
        ("numbers__lcm_composed", "train-medium")])
    fast, plain = _generate_in_fresh_process(calls), _generate_in_fresh_process(calls, fast_paths=False)
    assert fast == plain and fast.count("Solve") >= 30


def test_fast_gcd_and_det_equal_sympys():
    import random

    import sympy

    from pipeline.generate import _exact_det, _int_gcd

    rng = random.Random(0)
    for _ in range(500):
        a, b = rng.randint(-10**6, 10**6), rng.choice([1, 2, 6, rng.randint(0, 10**4)])
        assert _int_gcd(a, b) == sympy.gcd(a, b)
        n = rng.choice([1, 2, 3])
        m = [[rng.randint(-50, 50) for _ in range(n)] for _ in range(n)]
        assert _exact_det(m) == sympy.det(sympy.Matrix(m))
    assert _int_gcd(sympy.Integer(12), 8) == 4 and _int_gcd(sympy.Rational(1, 2), 3) == sympy.gcd(sympy.Rational(1, 2), 3)
