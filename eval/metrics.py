"""Answer metrics: pure functions, no Ray, no model. Used by eval (per row and aggregated) and train
(validation exact match).

What counts as equal (`normalize_answer`):
- surrounding whitespace and special tokens (`</s>`, `<pad>`, `<s>`, `<unk>`) are removed, inner
  whitespace runs collapse to one space, and the hub copy's `b'...\\n'` wrapping is undone;
- numbers are compared by value: an integer, a decimal or a fraction `p/q` is parsed exactly and
  written canonically (whole numbers as integers, others as a reduced fraction), so "-06", "-6",
  "-6.0" and "-12/2" are all "-6". Anything else is compared as text.

What a token is (`f1`): one non-space character of the normalized answer. DeepMind answers are short
numbers ("-6", "3/4"), so characters are the only sensible unit: a whitespace split would make every
answer one token and F1 would equal exact match. F1 is the bag-of-tokens (multiset) overlap, as in
SQuAD: order and length differences no longer break it (the seed compared token *positions* and scored
an exact answer 0.25 when the padded lengths differed). Both empty = 1.0; one empty = 0.0.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

SPECIAL_TOKENS = ("</s>", "<pad>", "<s>", "<unk>")
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
_HUB_WRAPPED_RE = re.compile(r"^b(['\"])(.*)\1$", re.DOTALL)
# Exact rationals only: an integer, a decimal ("-.5", "2.50") or a fraction of integers ("-3/4").
_INT = r"[+-]?\d+"
_DEC = r"[+-]?(?:\d+\.\d*|\.\d+)"
_NUMBER_RE = re.compile(rf"^(?:{_DEC}|{_INT})$")
_FRACTION_RE = re.compile(rf"^({_INT})\s*/\s*({_INT})$")

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
    value = parse_number(s)
    return _canonical_number(value) if value is not None else s


def exact_match(pred: str | None, ref: str | None) -> bool:
    return normalize_answer(pred) == normalize_answer(ref)


def answer_tokens(s: str | None) -> list[str]:
    """F1's tokens: the non-space characters of the normalized answer."""
    return [c for c in normalize_answer(s) if not c.isspace()]


def f1_counts(pred: str | None, ref: str | None) -> tuple[int, int, int]:
    """(overlapping tokens, prediction tokens, reference tokens): summable across rows for micro F1."""
    p, r = answer_tokens(pred), answer_tokens(ref)
    common = sum((Counter(p) & Counter(r)).values())
    return common, len(p), len(r)


def f1_from_counts(common: int, n_pred: int, n_ref: int) -> float:
    if n_pred == 0 and n_ref == 0:
        return 1.0  # nothing expected, nothing said
    if common == 0:
        return 0.0
    precision, recall = common / n_pred, common / n_ref
    return 2 * precision * recall / (precision + recall)


def f1(pred: str | None, ref: str | None) -> float:
    """Per-example bag-of-characters F1 on normalized answers; an exact match is always 1.0."""
    # Counts come from normalized answers, so "-6.0" vs "-6" (equal values) scores 1.0 too.
    return f1_from_counts(*f1_counts(pred, ref))


def error_class(pred: str | None, ref: str | None) -> str:
    """One of ERROR_CLASSES, for the error breakdown in the report.

    sign_error: pred == -ref (ref != 0). off_by_small: |pred - ref| <= max(2, 10% of |ref|).
    wrong_magnitude: both non-zero and a different power of ten (e.g. 60 for 6, or 0.6).
    other_numeric: any other wrong number. non_numeric: the prediction (or reference) is not a number,
    including an empty prediction.
    """
    if exact_match(pred, ref):
        return "correct"
    p, r = parse_number(normalize_answer(pred)), parse_number(normalize_answer(ref))
    if p is None or r is None:
        return "non_numeric"
    if r != 0 and p == -r:
        return "sign_error"
    if abs(p - r) <= max(SMALL_ABS, SMALL_REL * abs(r)):
        return "off_by_small"
    if p != 0 and r != 0 and _magnitude(p) != _magnitude(r):
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
    """Everything the per-row metrics contribute to the aggregates (all summable)."""

    em: bool
    f1: float
    common: int
    n_pred: int
    n_ref: int
    error_class: str


def score(pred: str | None, ref: str | None) -> Score:
    common, n_pred, n_ref = f1_counts(pred, ref)
    return Score(
        em=exact_match(pred, ref),
        f1=f1(pred, ref),
        common=common,
        n_pred=n_pred,
        n_ref=n_ref,
        error_class=error_class(pred, ref),
    )


def micro_f1(common: int, n_pred: int, n_ref: int) -> float:
    """Corpus-level F1 from token counts summed over all rows (the seed wanted it beside the mean)."""
    return f1_from_counts(common, n_pred, n_ref)


def aggregate(preds: Iterable[str | None], refs: Iterable[str | None]) -> dict[str, float | int]:
    """Exact match, mean per-example F1 and micro F1 over a corpus, in one process (no Ray)."""
    n = em = common = n_pred = n_ref = 0
    f1_sum = 0.0
    for p, r in zip(preds, refs, strict=True):
        s = score(p, r)
        n += 1
        em += s.em
        f1_sum += s.f1
        common, n_pred, n_ref = common + s.common, n_pred + s.n_pred, n_ref + s.n_ref
    return {
        "n": n,
        "exact_match": em / n if n else 0.0,
        "f1_mean": f1_sum / n if n else 0.0,
        "f1_micro": micro_f1(common, n_pred, n_ref) if n else 0.0,
    }
