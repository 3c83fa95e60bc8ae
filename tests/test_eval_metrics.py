"""Unit tests of eval/metrics.py: pure functions, no Ray (milliseconds)."""

from __future__ import annotations

import pytest

from eval.metrics import (
    aggregate,
    error_class,
    exact_match,
    f1,
    f1_counts,
    micro_f1,
    normalize_answer,
    parse_number,
    score,
)


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("-6", "-6"),
        ("  -6 ", "-6"),
        ("-6</s>", "-6"),
        ("-6</s><pad><pad>", "-6"),
        ("<pad> -6 </s>", "-6"),
        ("-06", "-6"),
        ("+6", "6"),
        ("-0", "0"),
        ("-6.0", "-6"),
        ("2.50", "5/2"),
        ("6/8", "3/4"),
        ("-12/2", "-6"),
        ("b'-6\\n'", "-6"),  # the hub copy's wrapping
        ("", ""),
        (None, ""),
        ("</s>", ""),
        ("x  =  3", "x = 3"),  # text: whitespace collapsed, content kept
        ("1/0", "1/0"),  # not a number: compared as text, never a ZeroDivisionError
    ],
)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_seed_cases_exact_answer_with_spaces_and_eos_scores_one():
    # The seed's token-position F1 gave 0.25 here because the padded lengths differed.
    for pred in ["-6", " -6 ", "-6</s>", "-6 </s> <pad> <pad>", "-06"]:
        assert exact_match(pred, "-6")
        assert f1(pred, "-6") == 1.0


def test_seed_cases_different_lengths_and_empty_prediction():
    assert not exact_match("6", "-6")
    assert f1("6", "-6") == pytest.approx(2 / 3)  # tokens {6} vs {-,6}: P=1, R=1/2
    assert f1("-61", "-6") == pytest.approx(0.8)  # P=2/3, R=1
    assert f1("", "-6") == 0.0
    assert f1("</s>", "-6") == 0.0
    assert f1("12", "-6") == 0.0
    assert f1("", "") == 1.0
    assert exact_match("", "</s>")


def test_f1_is_a_bag_not_positions():
    assert f1("-21", "-12") == pytest.approx(1.0)  # same characters, different order
    assert not exact_match("-21", "-12")
    assert f1_counts("-21", "-12") == (3, 3, 3)


def test_f1_counts_and_micro_vs_mean():
    preds, refs = ["-6", "", "123"], ["-6", "4", "12"]
    counts = [f1_counts(p, r) for p, r in zip(preds, refs, strict=True)]
    assert counts == [(2, 2, 2), (0, 0, 1), (2, 3, 2)]
    common, n_pred, n_ref = (sum(c[i] for c in counts) for i in range(3))
    micro = micro_f1(common, n_pred, n_ref)  # P = 4/5, R = 4/5
    assert micro == pytest.approx(0.8)
    agg = aggregate(preds, refs)
    assert agg["n"] == 3
    assert agg["exact_match"] == pytest.approx(1 / 3)
    assert agg["f1_mean"] == pytest.approx((1.0 + 0.0 + 0.8) / 3)
    assert agg["f1_micro"] == pytest.approx(micro)


def test_aggregate_empty_corpus():
    assert aggregate([], []) == {"n": 0, "exact_match": 0.0, "f1_mean": 0.0, "f1_micro": 0.0}


def test_parse_number_is_exact():
    assert parse_number("0.1") * 10 == 1
    assert parse_number("-3/4") == parse_number("-0.75")
    assert parse_number("abc") is None
    assert parse_number("1e3") is None  # generator never writes exponents; keep it text


@pytest.mark.parametrize(
    "pred, ref, cls",
    [
        ("-6", "-6", "correct"),
        ("-06</s>", "-6", "correct"),
        ("6", "-6", "sign_error"),
        ("-5", "-6", "off_by_small"),
        ("-8", "-6", "off_by_small"),  # |d| <= 2
        ("95", "100", "off_by_small"),  # |d| <= 10% of |ref|
        ("60", "6", "wrong_magnitude"),
        ("-600", "-6", "wrong_magnitude"),
        ("1/2", "5", "wrong_magnitude"),
        ("-9", "-5", "other_numeric"),  # |d| = 4, same power of ten
        ("0", "5", "other_numeric"),  # zero has no magnitude
        ("", "-6", "non_numeric"),
        ("x", "-6", "non_numeric"),
        ("-6", "x", "non_numeric"),
    ],
)
def test_error_class(pred, ref, cls):
    assert error_class(pred, ref) == cls


def test_score_bundles_everything():
    s = score("-5</s>", "-6")
    assert (s.em, s.error_class, (s.common, s.n_pred, s.n_ref)) == (False, "off_by_small", (1, 2, 2))
    assert s.f1 == pytest.approx(0.5)


def test_length_sorted_chunks_cover_every_row_once():
    from eval.predict import length_sorted_chunks, pad

    lengths = [5, 1, 9, 1, 7, 3, 3]
    chunks = length_sorted_chunks(lengths, 3)
    flat = [int(i) for c in chunks for i in c]
    assert sorted(flat) == list(range(len(lengths)))  # no row lost or doubled
    assert [[lengths[i] for i in c] for c in chunks] == [[1, 1, 3], [3, 5, 7], [9]]
    ids, mask = pad([[4, 1], [7, 8, 9, 1]], value=0)
    assert ids.tolist() == [[4, 1, 0, 0], [7, 8, 9, 1]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_local_evaluate_module_matches_metrics(monkeypatch):
    """eval/math_answer loads from its local path with the hub switched off, and agrees with metrics.py."""
    from pathlib import Path

    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = evaluate.load(str(Path(__file__).resolve().parents[1] / "eval" / "math_answer"))
    preds, refs = ["-06 </s>", "21", "", "3/4"], ["-6", "12", "5", "0.75"]
    got = metric.compute(predictions=preds, references=refs)
    want = aggregate(preds, refs)
    assert got == {"exact_match": want["exact_match"], "f1": want["f1_mean"], "f1_micro": want["f1_micro"], "n": 4}
    assert got["exact_match"] == 0.5
