"""Tokenization inside Ray Data: a callable class, so each actor builds the tokenizer once.

Fast path (measured on 2 cores: bench/RESULTS.md, "Pipeline"): the `tokenizers` backend's `encode_batch_fast` (no offsets),
ids flattened once with numpy and wrapped as Arrow ListArrays from offsets; no Python list per row
beyond what the backend returns. The tokenizer travels as its JSON (tokenizer.json), so workers on
other nodes need neither the hub nor the output folder.

The same step applies the token-level checks (unknown characters, too many tokens) and assigns the
seeded validation hold-out, so one pass over the rows does all per-row work after cleaning.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.validate import token_reasons


def holdout_key(seed: int) -> str:
    """pandas' vectorized SipHash takes a 16-character key; derive it from the seed."""
    import hashlib

    return hashlib.sha256(f"validation/{seed}".encode()).hexdigest()[:16]


def holdout_mask(questions: pa.Array, fraction: float, seed: int) -> np.ndarray:
    """True for rows held out for validation: a seeded hash of the question below `fraction`.

    Hashing the question (not the row position) makes the choice independent of batching and order,
    and keeps duplicate questions on the same side of the train/validation line.
    """
    if fraction <= 0 or len(questions) == 0:
        return np.zeros(len(questions), dtype=bool)
    h = pd.util.hash_array(np.asarray(questions.to_numpy(zero_copy_only=False), dtype=object),
                           hash_key=holdout_key(seed), categorize=False)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def _list_array(ids: list[list[int]]) -> tuple[pa.Array, np.ndarray]:
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)), lengths


def _ones_like(lists: pa.ListArray) -> pa.Array:
    return pa.ListArray.from_arrays(lists.offsets, pa.array(np.ones(len(lists.values), dtype=np.int32)))


def _has_id(lists: pa.ListArray, lengths: np.ndarray, token_id: int | None) -> np.ndarray:
    if token_id is None or len(lengths) == 0:
        return np.zeros(len(lengths), dtype=bool)
    hit = lists.values.to_numpy() == token_id
    row = np.repeat(np.arange(len(lengths)), lengths)
    return np.bincount(row[hit], minlength=len(lengths)) > 0


class TokenizeBatch:
    """map_batches UDF: prepared text rows -> + input_ids / attention_mask / labels, token checks, split."""

    def __init__(self, tokenizer_json: str, eos_id: int, unk_id: int | None, max_input_tokens: int,
                 max_label_tokens: int, validation_fraction: float, seed: int):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_str(tokenizer_json)
        self.tok.no_padding()
        self.tok.no_truncation()
        self.eos_id, self.unk_id = eos_id, unk_id
        # Some tokenizers' post-processors do not append eos; T5's does. Decide once, append if needed.
        self.append_eos = self.tok.encode("1").ids[-1:] != [eos_id]
        self.max_input_tokens, self.max_label_tokens = max_input_tokens, max_label_tokens
        self.validation_fraction, self.seed = validation_fraction, seed

    def _encode(self, texts: pa.Array) -> tuple[pa.Array, np.ndarray]:
        encodings = self.tok.encode_batch_fast(texts.fill_null("").to_pylist())
        ids = [e.ids for e in encodings]
        if self.append_eos:
            ids = [x + [self.eos_id] for x in ids]
        return _list_array(ids)

    def _encode_distinct(self, texts: pa.Array) -> tuple[pa.Array, np.ndarray]:
        """Encode each distinct text once and gather. Answers are drawn from small sets (linear_1d: a few
        hundred integers per 50k rows), so this skips ~99% of the answer encodes (~15% of the step's CPU).
        Questions are nearly all distinct in real data: they go through _encode."""
        texts = texts.fill_null("")
        distinct = pc.unique(texts)
        if len(distinct) > len(texts) // 2:
            return self._encode(texts)
        lists, lengths = self._encode(distinct)
        index = pc.index_in(texts, value_set=distinct)
        return lists.take(index), lengths[index.to_numpy()]

    def __call__(self, batch: pa.Table) -> pa.Table:
        question = batch["question"].combine_chunks()
        answer = batch["answer"].combine_chunks()
        input_ids, in_len = self._encode(question)
        labels, lab_len = self._encode_distinct(answer)
        unknown = _has_id(input_ids, in_len, self.unk_id) | _has_id(labels, lab_len, self.unk_id)
        reject = token_reasons(in_len, lab_len, unknown, max_input_tokens=self.max_input_tokens,
                               max_label_tokens=self.max_label_tokens, prior=batch["reject"].combine_chunks())
        split = batch["split"].combine_chunks()
        held = holdout_mask(question, self.validation_fraction, self.seed)
        split = pc.if_else(pc.and_(pc.equal(split, "train"), pa.array(held)), pa.scalar("validation"), split)
        rejected = pc.is_valid(reject)
        nothing = pa.nulls(len(reject), pa.string())
        q_raw = pc.if_else(rejected, batch["question_raw"].combine_chunks(), nothing)
        a_raw = pc.if_else(rejected, batch["answer_raw"].combine_chunks(), nothing)
        return pa.table({
            "question": question, "answer": answer, "regime": batch["regime"].combine_chunks(),
            "module": batch["module"].combine_chunks(), "split": split, "input_ids": input_ids, "attention_mask": _ones_like(input_ids), "labels": labels,
            "reject": reject, "question_raw": q_raw, "answer_raw": a_raw,
            "source_skipped": batch["source_skipped"].combine_chunks(),
        })
