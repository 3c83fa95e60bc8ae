"""Answer metrics: pure functions, no Ray, no model. Used by eval (per row and aggregated) and train
(validation exact match).

What counts as equal (`normalize_answer`):
- surrounding whitespace and special tokens (`</s>`, `<pad>`, `<s>`, `<unk>`) are removed, inner
  whitespace runs collapse to one space, and the hub copy's `b'...\\n'` wrapping is undone;
- numbers are compared by value: an integer, a decimal or a fraction `p/q` is parsed exactly and
  written canonically (whole numbers as integers, others as a reduced fraction), so "-06", "-6",
  "-6.0" and "-12/2" are all "-6";
- booleans ignore case ("true" is "True"); a comma-separated list is compared item by item in order, each
  item normalized ("-2,0.5" is "-2, 1/2"); a polynomial-like expression ("6*x^2 - 4") is written without
  spaces inside terms, `^` as `**`, and its top-level terms sorted, so "-4 + 6*x**2" is the same answer.
  Anything else is compared as text.

What a token is (`f1`): one non-space character of the normalized answer. DeepMind answers are short
numbers ("-6", "3/4"), so characters are the only sensible unit: a whitespace split would make every
answer one token and F1 would equal exact match. F1 is the bag-of-tokens (multiset) overlap, as in
SQuAD: order and length differences no longer break it (the seed compared token *positions* and scored
an exact answer 0.25 when the padded lengths differed). Both empty = 1.0; one empty = 0.0.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

SPECIAL_TOKENS = ("</s>", "<pad>", "<s>", "<unk>")
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
_HUB_WRAPPED_RE = re.compile(r"^b(['\"])(.*)\1$", re.DOTALL)
# Exact rationals only: an integer, a decimal ("-.5", "2.50") or a fraction of integers ("-3/4").
_INT = r"[+-]?\d+"
_DEC = r"[+-]?(?:\d+\.\d*|\.\d+)"
_NUMBER_RE = re.compile(rf"^(?:{_DEC}|{_INT})$")
_FRACTION_RE = re.compile(rf"^({_INT})\s*/\s*({_INT})$")
_EXPR_RE = re.compile(r"^[A-Za-z0-9_.+\-*/^() ]+$")
_WORDS_RE = re.compile(r"[A-Za-z0-9_.)]\s+[A-Za-z0-9_.(]")

# Error classes of a wrong answer, in the order they are tested (first match wins).
ERROR_CLASSES = ("correct", "sign_error", "off_by_small", "wrong_magnitude", "other_numeric", "non_numeric")
SMALL_ABS = 2  # |pred - ref| <= max(SMALL_ABS, SMALL_REL * |ref|) is "off by a small amount"
SMALL_REL = Fraction(1, 10)


def parse_number(s: str) -> Fraction | None:
    """The exact value of an integer / decimal / fraction string, else None (no floats: "0.1" is 1/10)."""
    s = s.strip()
    if _NUMBER_RE.match(s):
        return Fraction(s)
    m = _FRACTION_RE.match(s)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    return None


def _canonical_number(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def strip_special(s: str) -> str:
    """Remove special tokens anywhere (generation pads after `</s>`), trim, collapse inner whitespace."""
    s = _SPECIAL_RE.sub(" ", s)
    return " ".join(s.split())


def normalize_answer(s: str | None) -> str:
    """The canonical form two answers are compared in (see the module docstring)."""
    if s is None:
        return ""
    s = strip_special(str(s))
    m = _HUB_WRAPPED_RE.match(s)
    if m:  # "b'-6\n'" from the hub's Parquet copy
        s = strip_special(m.group(2).replace("\\n", " "))
    return _canonical(s)


def _canonical(s: str) -> str:
    value = parse_number(s)
    if value is not None:
        return _canonical_number(value)
    if s.lower() in ("true", "false"):
        return s.capitalize()
    items = _split_top_level(s, ",")
    if len(items) > 1:  # a list ("-2, 1/3"): each item on its own, order kept (sorting answers need it)
        return ", ".join(_canonical(item.strip()) for item in items)
    if _is_expression(s):
        return canonical_expression(s)
    return s


def _split_top_level(s: str, sep: str) -> list[str]:
    """`s` cut at every `sep` outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        depth += (c == "(") - (c == ")")
        if c == sep and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    return [*parts, s[start:]]


def _is_expression(s: str) -> bool:
    """A polynomial-like answer: only expression characters, at least one variable, and no two words
    side by side without an operator (so free text such as "no solution" stays text)."""
    return bool(_EXPR_RE.match(s)) and any(c.isalpha() for c in s) and not _WORDS_RE.search(s)


def canonical_expression(s: str) -> str:
    """A sum of terms in one spelling: spaces dropped, `^` as `**`, top-level terms sorted, so
    "-4 + 6*x^2" and "6*x**2 - 4" are the same answer. Terms themselves are compared as written."""
    s = s.replace(" ", "").replace("^", "**")
    terms, depth, start = [], 0, 0
    for i, c in enumerate(s):
        depth += (c == "(") - (c == ")")
        # A + or - splits terms when it follows an operand (not unary, as in "x**-2" or "(-3)").
        if c in "+-" and depth == 0 and i > 0 and (s[i - 1].isalnum() or s[i - 1] in ")."):
            terms.append(s[start:i])
            start = i
    terms.append(s[start:])
    signed = sorted(t if t[0] in "+-" else "+" + t for t in terms)
    out = signed[0].removeprefix("+")
    for t in signed[1:]:
        out += f" {t[0]} {t[1:]}"
    return out


def exact_match(pred: str | None, ref: str | None) -> bool:
    return normalize_answer(pred) == normalize_answer(ref)


def f1_counts_normalized(p: str, r: str) -> tuple[int, int, int]:
    """(overlapping tokens, prediction tokens, reference tokens) of two normalized answers; summable
    across rows for micro F1. Tokens: the non-space characters."""
    pt, rt = [c for c in p if not c.isspace()], [c for c in r if not c.isspace()]
    return sum((Counter(pt) & Counter(rt)).values()), len(pt), len(rt)


def f1_counts(pred: str | None, ref: str | None) -> tuple[int, int, int]:
    return f1_counts_normalized(normalize_answer(pred), normalize_answer(ref))


def f1_from_counts(common: int, n_pred: int, n_ref: int) -> float:
    if n_pred == 0 and n_ref == 0:
        return 1.0  # nothing expected, nothing said
    if common == 0:
        return 0.0
    precision, recall = common / n_pred, common / n_ref
    return 2 * precision * recall / (precision + recall)


def f1(pred: str | None, ref: str | None) -> float:
    """Per-example bag-of-characters F1 on normalized answers; an exact match is always 1.0."""
    return score(pred, ref).f1


def error_class(pred: str | None, ref: str | None) -> str:
    """One of ERROR_CLASSES, for the error breakdown in the report.

    sign_error: pred == -ref (ref != 0). off_by_small: |pred - ref| <= max(2, 10% of |ref|).
    wrong_magnitude: both non-zero and a different power of ten (e.g. 60 for 6, or 0.6).
    other_numeric: any other wrong number. non_numeric: the prediction (or reference) is not a number,
    including an empty prediction.
    """
    return score(pred, ref).error_class


def _error_class(p: str, r: str) -> str:
    if p == r:
        return "correct"
    pv, rv = parse_number(p), parse_number(r)
    if pv is None or rv is None:
        return "non_numeric"
    if rv != 0 and pv == -rv:
        return "sign_error"
    if abs(pv - rv) <= max(SMALL_ABS, SMALL_REL * abs(rv)):
        return "off_by_small"
    if pv != 0 and rv != 0 and _magnitude(pv) != _magnitude(rv):
        return "wrong_magnitude"
    return "other_numeric"


def _magnitude(x: Fraction) -> int:
    """floor(log10(|x|)) computed exactly."""
    x = abs(x)
    k = len(str(x.numerator)) - len(str(x.denominator))
    # 10**k <= x < 10**(k+1) after at most one correction step either way
    while Fraction(10) ** k > x:
        k -= 1
    while Fraction(10) ** (k + 1) <= x:
        k += 1
    return k


@dataclass
class Score:
    """Everything one row contributes to the aggregates (all summable), and the normalized answers."""

    em: bool
    f1: float
    common: int
    n_pred: int
    n_ref: int
    error_class: str
    prediction_norm: str
    answer_norm: str


def score(pred: str | None, ref: str | None) -> Score:
    """Score one row; each answer is normalized once and everything is derived from that."""
    p, r = normalize_answer(pred), normalize_answer(ref)
    common, n_pred, n_ref = f1_counts_normalized(p, r)
    em = p == r
    return Score(em=em, f1=1.0 if em else f1_from_counts(common, n_pred, n_ref), common=common,
                 n_pred=n_pred, n_ref=n_ref, error_class=_error_class(p, r), prediction_norm=p, answer_norm=r)


SCORE_COLUMNS = ("em", "f1", "error_class", "f1_common", "f1_n_pred", "f1_n_ref", "prediction_norm",
                 "answer_norm")


def score_columns(preds: Iterable[str | None], refs: Iterable[str | None]) -> dict[str, list]:
    """Score rows -> one list per SCORE_COLUMNS name (what `aggregate` reads)."""
    scores = [score(p, r) for p, r in zip(preds, refs, strict=True)]
    return {
        "em": [s.em for s in scores],
        "f1": [s.f1 for s in scores],
        "error_class": [s.error_class for s in scores],
        "f1_common": [s.common for s in scores],
        "f1_n_pred": [s.n_pred for s in scores],
        "f1_n_ref": [s.n_ref for s in scores],
        "prediction_norm": [s.prediction_norm for s in scores],
        "answer_norm": [s.answer_norm for s in scores],
    }


# ---------------------------------------------------------------------------------------------------
# Aggregation: one pure function from scored rows to every number in metrics.json.

REGIME_ORDER = ("train-easy", "train-medium", "train-hard", "interpolate", "extrapolate")
COLLAPSE_SHARE = 0.2  # one prediction on >= 20% of the rows, >= 20 points more often than it is the gold
COLLAPSE_MIN_ROWS = 50  # fewer rows say too little to call it
TOP_PREDICTIONS = 5
SIGN_GAP = 0.2  # negative answers predicted >= 20 points more (or less) often than in the gold: a sign bias


def regime_order(regimes: Iterable[str]) -> list[str]:
    """DeepMind's order (easy, medium, hard, interpolate, extrapolate), then any other alphabetically."""
    return sorted(set(regimes), key=lambda r: (REGIME_ORDER.index(r) if r in REGIME_ORDER else len(REGIME_ORDER), r))


def collapse(preds: Sequence[str], answers: Sequence[str], share: float = COLLAPSE_SHARE) -> dict[str, Any]:
    """Has the model collapsed onto a few answers? `preds` and `answers` are normalized.

    Collapsed: at least COLLAPSE_MIN_ROWS rows, and one of the top predictions covers >= `share` of them
    while being the gold answer of at least `share` fewer (the demo's "-10": 57% predicted, ~2% gold; a
    boolean module answered "False" every time: 100% predicted, ~55% gold). A model that says "False" as
    often as the gold does is not flagged.
    """
    n = len(preds)
    # Ties broken by the answer text, so the result does not depend on the order rows came in.
    top = sorted(Counter(preds).items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_PREDICTIONS]
    gold = Counter(answers)
    rows = [{"prediction": p, "rows": c, "share": c / n, "gold_share": gold.get(p, 0) / n} for p, c in top]
    return {
        "collapsed": n >= COLLAPSE_MIN_ROWS and any(
            r["share"] >= share and r["share"] - r["gold_share"] >= share for r in rows),
        "top_predictions": rows,
        "top_answer_share": max(gold.values()) / n if n else 0.0,
        "distinct_predictions": len(set(preds)),
        "distinct_answers": len(gold),
        "share_threshold": share,
    }


def sign_balance(preds: Sequence[str], answers: Sequence[str], em: Sequence[bool]) -> dict[str, Any]:
    """Do the predicted signs follow the gold's? Over rows whose normalized prediction and gold are both
    numbers (`parse_number`, as the error classes: "-3, 1, 5" is a list, not a negative number): the share
    of negative predictions, of negative gold answers, and exact match on each side of the gold. Biased: at least COLLAPSE_MIN_ROWS such rows and the two shares SIGN_GAP or more apart.
    A character-level model unsure of the sign answers "-" first (one token against ten first digits):
    measured, 94% negative answers for 47% negative gold while its magnitudes were right on 21% of rows,
    which the collapse check (whole answers) does not see."""
    values = ((parse_number(p), parse_number(r), bool(e)) for p, r, e in zip(preds, answers, em, strict=True))
    rows = [(p < 0, r < 0, e) for p, r, e in values if p is not None and r is not None]
    n = len(rows)
    neg = [e for _, g, e in rows if g]
    pos = [e for _, g, e in rows if not g]
    pred_neg = sum(p for p, _, _ in rows) / n if n else 0.0
    gold_neg = len(neg) / n if n else 0.0
    return {
        "rows": n,
        "predicted_negative": pred_neg,
        "gold_negative": gold_neg,
        "exact_match_gold_negative": sum(neg) / len(neg) if neg else None,
        "exact_match_gold_positive": sum(pos) / len(pos) if pos else None,
        "biased": n >= COLLAPSE_MIN_ROWS and abs(pred_neg - gold_neg) >= SIGN_GAP,
        "gap": SIGN_GAP,
    }


def _summary(idx: list[int], cols: Mapping[str, Sequence], teacher_forced: bool) -> dict[str, Any]:
    n = len(idx)
    if not n:
        return {"n": 0, "exact_match": 0.0, "f1": 0.0, "f1_micro": 0.0, "truncated": 0,
                "teacher_forced_exact_match": 0.0 if teacher_forced else None}
    counts = [sum(int(cols[k][i]) for i in idx) for k in ("f1_common", "f1_n_pred", "f1_n_ref")]
    return {
        "n": n,
        "exact_match": sum(bool(cols["em"][i]) for i in idx) / n,
        # fsum: exact, so the result does not depend on the order rows came back in
        "f1": math.fsum(float(cols["f1"][i]) for i in idx) / n,
        "f1_micro": f1_from_counts(*counts),
        "truncated": sum(bool(cols["truncated"][i]) for i in idx) if "truncated" in cols else 0,
        "teacher_forced_exact_match": sum(bool(cols["tf_em"][i]) for i in idx) / n if teacher_forced else None,
    }


def aggregate(cols: Mapping[str, Sequence], teacher_forced: bool = False,
              collapse_share: float = COLLAPSE_SHARE) -> dict[str, Any]:
    """Scored rows (SCORE_COLUMNS, optional regime, module, tf_em, truncated) -> overall metrics, by
    regime, by module x regime, error classes (overall and by regime), the collapse and sign checks.

    The only aggregation eval has: `python -m eval`, `--predictions` and the evaluate module all use it.
    """
    n = len(cols["em"])
    regimes = [str(x) for x in cols["regime"]] if "regime" in cols else ["unknown"] * n
    modules = [str(x) for x in cols["module"]] if "module" in cols else ["unknown"] * n
    by_regime_idx: dict[str, list[int]] = defaultdict(list)
    by_module_idx: dict[str, list[int]] = defaultdict(list)
    for i in range(n):
        by_regime_idx[regimes[i]].append(i)
        by_module_idx[modules[i]].append(i)
    errors = dict.fromkeys(ERROR_CLASSES, 0)
    errors_by_regime: dict[str, dict[str, int]] = {r: dict.fromkeys(ERROR_CLASSES, 0) for r in by_regime_idx}
    for i in range(n):
        c = str(cols["error_class"][i])
        errors[c] = errors.get(c, 0) + 1
        errors_by_regime[regimes[i]][c] = errors_by_regime[regimes[i]].get(c, 0) + 1
    preds, answers = list(cols["prediction_norm"]), list(cols["answer_norm"])

    by_module = {}
    for m in sorted(by_module_idx):
        idx = by_module_idx[m]
        per_regime: dict[str, list[int]] = defaultdict(list)
        for i in idx:
            per_regime[regimes[i]].append(i)
        col = collapse([preds[i] for i in idx], [answers[i] for i in idx], collapse_share)
        by_module[m] = {
            **_summary(idx, cols, teacher_forced),
            "by_regime": {r: _summary(per_regime[r], cols, teacher_forced) for r in regime_order(per_regime)},
            "collapsed": col["collapsed"],
            "top_prediction": col["top_predictions"][0] if col["top_predictions"] else None,
        }
    overall = collapse(preds, answers, collapse_share)
    overall["collapsed_modules"] = [m for m, v in by_module.items() if v["collapsed"]]
    return {
        **_summary(list(range(n)), cols, teacher_forced),
        "by_regime": {r: _summary(by_regime_idx[r], cols, teacher_forced) for r in regime_order(by_regime_idx)},
        "by_module": by_module,
        "error_classes": errors,
        "error_classes_by_regime": {r: errors_by_regime[r] for r in regime_order(errors_by_regime)},
        "collapse": overall,
        "sign": sign_balance(preds, answers, [bool(x) for x in cols["em"]]),
    }
