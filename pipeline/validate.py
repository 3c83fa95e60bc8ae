"""Row validation: every row is kept or rejected with exactly one reason (the first that applies).

Pure functions over Arrow arrays; the reason column is null for kept rows. Text checks run before
tokenizing (cheap, and a 1 MB line never reaches the tokenizer); token checks run after.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Every reason a row can be rejected for, in precedence order, with what it means (copied to the manifest).
REASONS = {
    "unpaired_line": "a v1.0 text file ended with a question line and no answer line",
    "not_utf8": "question or answer bytes are not valid UTF-8",
    "empty_question": "question missing or blank after cleaning",
    "empty_answer": "answer missing or blank after cleaning",
    "text_too_long": "question or answer longer than max_text_chars characters",
    "answer_form": "answer does not match its module's answer form (pipeline/answers.py; answer_pattern)",
    "unknown_chars": "question or answer contains characters the tokenizer cannot encode (unk token)",
    "input_too_long": "question encodes to more than max_input_tokens tokens",
    "labels_too_long": "answer encodes to more than max_label_tokens tokens",
}


def first_reason(checks: list[tuple[str, pa.Array | np.ndarray]], n: int,
                 prior: pa.Array | None = None) -> pa.Array:
    """Combine boolean failure masks (in precedence order) into one reason per row (null = kept).

    `prior`: reasons already assigned by an earlier step; they take precedence over these checks.
    """
    reason = pa.nulls(n, pa.string())
    for name, failed in reversed(checks):
        failed = pa.array(failed) if isinstance(failed, np.ndarray) else failed
        reason = pc.if_else(pc.fill_null(failed, False), pa.scalar(name, pa.string()), reason)
    if prior is not None:
        reason = pc.coalesce(prior, reason)
    return reason


def text_reasons(
    question: pa.Array, answer: pa.Array, undecodable: pa.Array, *, max_chars: int,
    answer_failed: pa.Array | None = None, prior: pa.Array | None = None,
) -> pa.Array:
    """Reasons from the cleaned text alone. `undecodable`: rows whose bytes were not UTF-8;
    `answer_failed`: rows whose answer does not match its module's form (pipeline.answers)."""
    n = len(question)
    q_len = pc.fill_null(pc.utf8_length(question), 0)
    a_len = pc.fill_null(pc.utf8_length(answer), 0)
    checks = [
        ("not_utf8", undecodable),
        ("empty_question", pc.equal(q_len, 0)),
        ("empty_answer", pc.equal(a_len, 0)),
        ("text_too_long", pc.or_(pc.greater(q_len, max_chars), pc.greater(a_len, max_chars))),
    ]
    if answer_failed is not None:
        checks.append(("answer_form", answer_failed))
    return first_reason(checks, n, prior)


def token_reasons(
    input_lengths: np.ndarray, label_lengths: np.ndarray, has_unknown: np.ndarray, *,
    max_input_tokens: int, max_label_tokens: int, prior: pa.Array | None = None,
) -> pa.Array:
    checks = [
        ("unknown_chars", has_unknown),
        ("input_too_long", input_lengths > max_input_tokens),
        ("labels_too_long", label_lengths > max_label_tokens),
    ]
    return first_reason(checks, len(input_lengths), prior)


def prepare_text(raw: pa.Table, *, max_chars: int, answer_pattern: str = "auto") -> pa.Table:
    """Raw rows (as read) -> decoded, cleaned text with a reject reason per row.

    Columns out: question, answer (cleaned), regime, module, split, reject (null = kept), question_raw /
    answer_raw (the text as read: the tokenize step keeps it for rejected rows only), source_skipped.
    `answer_pattern`: `auto` (each module's form), `none`, or one regex for every module.
    """
    from pipeline.answers import answer_form_failed
    from pipeline.clean import clean_text, decode_utf8

    q_raw, q_bad = decode_utf8(raw["question"])
    a_raw, a_bad = decode_utf8(raw["answer"])
    question, answer = clean_text(q_raw), clean_text(a_raw)
    module = raw["module"].combine_chunks().cast(pa.string())
    failed = None if answer_pattern == "none" else answer_form_failed(answer, module, answer_pattern)
    reject = text_reasons(question, answer, pc.or_(q_bad, a_bad), max_chars=max_chars,
                          answer_failed=failed, prior=raw["source_reject"].combine_chunks())
    return pa.table({
        "question": question,
        "answer": answer,
        "regime": raw["regime"].combine_chunks().cast(pa.string()),
        "module": module,
        "split": raw["split"].combine_chunks().cast(pa.string()),
        "reject": reject,
        "question_raw": q_raw,
        "answer_raw": a_raw,
        "source_skipped": (raw["source_skipped"].combine_chunks() if "source_skipped" in raw.column_names
                           else pa.array(np.zeros(len(question), dtype=np.int64))),
    })
