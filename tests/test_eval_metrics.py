"""Unit tests of eval/metrics.py: pure functions, no Ray (milliseconds)."""

from __future__ import annotations

import json
import random

import pytest

from eval.metrics import (
    aggregate,
    collapse,
    error_class,
    exact_match,
    f1,
    f1_counts,
    f1_from_counts,
    normalize_answer,
    parse_number,
    score,
    score_columns,
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
        ("-.5", "-1/2"),
        ("true", "True"),  # booleans ignore case
        ("FALSE", "False"),
        ("-2,0.5", "-2, 1/2"),  # lists: item by item, each item normalized, order kept
        ("3, 1, 2", "3, 1, 2"),
        ("6*x^2 - 4", "6*x**2 - 4"),  # polynomials: no spaces inside terms, ^ as **
        ("-4 + 6*x**2", "6*x**2 - 4"),  # ... and terms in one order
        ("x**(-3/4)", "x**(-3/4)"),  # a unary minus inside a term is not a new term
        ("2*sqrt(7) + 3", "2*sqrt(7) + 3"),
        ("5:17 AM", "5:17 AM"),  # free text stays text
        ("no solution", "no solution"),
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
    micro = f1_from_counts(common, n_pred, n_ref)  # P = 4/5, R = 4/5
    assert micro == pytest.approx(0.8)
    agg = aggregate(score_columns(preds, refs))
    assert agg["n"] == 3
    assert agg["exact_match"] == pytest.approx(1 / 3)
    assert agg["f1"] == pytest.approx((1.0 + 0.0 + 0.8) / 3)
    assert agg["f1_micro"] == pytest.approx(micro)


def test_aggregate_empty_corpus():
    agg = aggregate(score_columns([], []))
    assert (agg["n"], agg["exact_match"], agg["f1"], agg["f1_micro"]) == (0, 0.0, 0.0, 0.0)
    assert agg["by_module"] == {} and agg["collapse"]["collapsed"] is False


def test_polynomial_boolean_and_list_answers_score():
    assert exact_match("-4 + 6*x^2", "6*x**2 - 4") and f1("-4 + 6*x^2", "6*x**2 - 4") == 1.0
    assert not exact_match("6*x**2 + 4", "6*x**2 - 4")
    assert exact_match("true", "True") and not exact_match("True", "False")
    assert exact_match("-2,0.5", "-2, 1/2") and not exact_match("0.5, -2", "-2, 1/2")  # order matters
    assert error_class("True", "False") == "non_numeric"


def test_score_normalizes_each_answer_once(monkeypatch):
    import eval.metrics as m

    calls = []
    real = m.normalize_answer
    monkeypatch.setattr(m, "normalize_answer", lambda s: calls.append(s) or real(s))
    s = m.score("-06</s>", "-6")
    assert calls == ["-06</s>", "-6"]
    assert (s.em, s.f1, s.error_class, s.prediction_norm, s.answer_norm) == (True, 1.0, "correct", "-6", "-6")


def _cols(preds, refs, regimes, modules):
    cols = score_columns(preds, refs)
    cols.update(regime=regimes, module=modules)
    return cols


def test_aggregate_by_module_and_regime_adds_up():
    # module a: 4 interpolate (2 right) + 2 extrapolate (1 right); module b: 2 interpolate (0 right)
    preds = ["1", "2", "0", "0", "5", "0", "x", "y"]
    refs = ["1", "2", "3", "4", "5", "6", "z", "w"]
    regimes = ["interpolate"] * 4 + ["extrapolate"] * 2 + ["interpolate"] * 2
    modules = ["a"] * 6 + ["b"] * 2
    m = aggregate(_cols(preds, refs, regimes, modules))
    assert list(m["by_module"]) == ["a", "b"]
    a = m["by_module"]["a"]
    assert (a["n"], a["exact_match"]) == (6, pytest.approx(3 / 6))
    assert list(a["by_regime"]) == ["interpolate", "extrapolate"]  # DeepMind's order, not alphabetical
    assert a["by_regime"]["interpolate"]["exact_match"] == pytest.approx(0.5)
    assert a["by_regime"]["extrapolate"]["exact_match"] == pytest.approx(0.5)
    assert m["by_module"]["b"]["exact_match"] == 0.0
    assert sum(v["n"] for v in m["by_module"].values()) == m["n"] == 8
    assert m["by_regime"]["interpolate"]["n"] == 6
    assert sum(m["error_classes"].values()) == 8
    json.dumps(m)  # metrics.json-serializable


def test_aggregate_does_not_depend_on_row_order():
    rng = random.Random(0)
    preds = [str(rng.randint(-9, 9)) for _ in range(300)]
    refs = [str(rng.randint(-9, 9)) for _ in range(300)]
    regimes = [rng.choice(["interpolate", "extrapolate"]) for _ in range(300)]
    modules = [rng.choice(["a", "b", "c"]) for _ in range(300)]
    order = list(range(300))
    rng.shuffle(order)
    a = aggregate(_cols(preds, refs, regimes, modules))
    b = aggregate(_cols(*([x[i] for i in order] for x in (preds, refs, regimes, modules))))
    assert a["by_module"] == b["by_module"] and a["f1"] == b["f1"] and a["by_regime"] == b["by_regime"]


def test_collapse_is_flagged_with_top_predictions():
    # The demo's failure: "-10" for 57% of the rows, "-1" for 36%, while gold answers are spread out.
    refs = [str(i % 40 - 20) for i in range(200)]
    preds = ["-10"] * 114 + ["-1"] * 72 + [str(i) for i in range(14)]
    c = collapse([normalize_answer(p) for p in preds], [normalize_answer(r) for r in refs])
    assert c["collapsed"]
    assert c["top_predictions"][:2] == [{"prediction": "-10", "rows": 114, "share": 0.57, "gold_share": 0.025},
                                        {"prediction": "-1", "rows": 72, "share": 0.36, "gold_share": 0.025}]
    assert c["top_answer_share"] == 0.025 and c["distinct_answers"] == 40
    m = aggregate(_cols(preds, refs, ["interpolate"] * 200, ["algebra__linear_1d"] * 200))
    assert m["collapse"]["collapsed"] and m["collapse"]["collapsed_modules"] == ["algebra__linear_1d"]
    assert m["by_module"]["algebra__linear_1d"]["top_prediction"]["prediction"] == "-10"


def test_collapse_on_a_skewed_gold_small_or_varied_sets():
    refs = ["False"] * 60 + ["True"] * 40
    assert not collapse(refs[:], refs)["collapsed"]  # says False as often as the gold does
    assert not collapse(["False"] * 75 + ["True"] * 25, refs)["collapsed"]  # a little more often: fine
    assert collapse(["False"] * 100, refs)["collapsed"]  # always False: 100% vs 60% gold
    assert not collapse(["1"] * 49, [str(i) for i in range(49)])["collapsed"]  # too few rows to judge
    varied = [str(i % 30) for i in range(300)]
    assert not collapse(varied, varied)["collapsed"]
    assert collapse(["1"] * 30 + varied[:70], varied[:100])["collapsed"]  # 30% (+ its gold share) vs ~3%
    assert not collapse(["1"] * 30 + varied[:70], varied[:100], share=0.4)["collapsed"]  # configurable


def test_collapse_warnings_in_console_lines():
    from eval.report import warning_lines

    refs = [str(i % 40 - 20) for i in range(200)] + ["True", "False"] * 50
    preds = ["-10"] * 200 + ["True", "False"] * 50
    mods = ["algebra__linear_1d"] * 200 + ["numbers__is_prime"] * 100
    m = aggregate(_cols(preds, refs, ["interpolate"] * 300, mods))
    lines = warning_lines(m)
    assert lines[0].startswith("WARNING: the model has collapsed: it answers '-10' 66.7%")
    assert lines[1] == "WARNING: collapsed in module(s) algebra__linear_1d ('-10' for 100.0% of its rows)."
    assert warning_lines(aggregate(_cols(refs, refs, ["interpolate"] * 300, mods))) == []


def test_sign_bias_is_flagged_where_the_collapse_check_sees_nothing():
    """What the 95-minute CPU run's model did: varied answers (no collapse), nearly all of them negative
    while half the gold is positive."""
    from eval.metrics import sign_balance
    from eval.report import warning_lines

    refs = [str(v) for i in range(100) for v in [i % 40 + 1, -(i % 40 + 1)]]  # 200 rows, half negative
    # positive gold: the right magnitude, negated; negative gold: right on every other row
    preds = ["-" + r if i % 2 == 0 else r if i % 4 == 1 else r + "1" for i, r in enumerate(refs)]
    b = sign_balance(preds, refs, [p == r for p, r in zip(preds, refs, strict=True)])
    assert b["rows"] == 200 and b["predicted_negative"] == 1.0 and b["gold_negative"] == 0.5 and b["biased"]
    assert b["exact_match_gold_positive"] == 0.0 and b["exact_match_gold_negative"] == 0.5
    m = aggregate(_cols(preds, refs, ["interpolate"] * 200, ["algebra__linear_1d"] * 200))
    assert not m["collapse"]["collapsed"] and m["sign"] == b
    assert warning_lines(m) == [
        "WARNING: sign bias: 100.0% of the numeric answers given are negative, 50.0% of the gold's (200 rows; "
        "exact match 50.0% where the gold is negative, 0.0% where the gold is positive). The model has not "
        "learned when the answer is negative."]
    assert not sign_balance(refs, refs, [True] * 200)["biased"]  # the gold's own signs
    near = ["-" + r.lstrip("-") if i % 10 == 0 else r for i, r in enumerate(refs)]  # 55% vs 50%: fine
    assert not sign_balance(near, refs, [False] * 200)["biased"]
    assert sign_balance(["-1"] * 49, ["1"] * 49, [False] * 49)["rows"] == 49  # too few rows to judge ...
    assert not sign_balance(["-1"] * 49, ["1"] * 49, [False] * 49)["biased"]
    words = sign_balance(["True", "-", "x", "-3, 1, 5"] * 30, ["False", "-2", "3", "1, 3, 5"] * 30, [False] * 120)
    assert words["rows"] == 0 and not words["biased"]  # ... non-numbers (a list too) left out


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
    from eval.predict import length_sorted_chunks

    lengths = [5, 1, 9, 1, 7, 3, 3]
    chunks = length_sorted_chunks(lengths, 3)
    flat = [int(i) for c in chunks for i in c]
    assert sorted(flat) == list(range(len(lengths)))  # no row lost or doubled
    assert [[lengths[i] for i in c] for c in chunks] == [[1, 1, 3], [3, 5, 7], [9]]


def test_local_evaluate_module_matches_metrics(monkeypatch):
    """eval/math_answer loads from its local path with the hub switched off, and agrees with metrics.py."""
    from pathlib import Path

    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = evaluate.load(str(Path(__file__).resolve().parents[1] / "eval" / "math_answer"))
    preds, refs = ["-06 </s>", "21", "", "3/4"], ["-6", "12", "5", "0.75"]
    got = metric.compute(predictions=preds, references=refs)
    want = aggregate(score_columns(preds, refs))
    assert got == {"exact_match": want["exact_match"], "f1": want["f1"], "f1_micro": want["f1_micro"], "n": 4}
    assert got["exact_match"] == 0.5
