"""Seq2seq collation (pure): unpadded token lists -> padded tensors.

- Each batch is padded only to its own longest row, rounded up to a multiple of `pad_to_multiple_of`
  (8: tensor-core tile friendly, and few distinct shapes).
- Labels are padded with -100, the index CrossEntropyLoss ignores, so padding never counts in the loss
  (the seed project padded labels with 0 = <pad> and trained on its pads).
- No decoder_input_ids here: T5ForConditionalGeneration builds them from `labels` with its own
  `_shift_right` (decoder_start_token_id, -100 -> pad), so the shift always matches the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100


def round_up(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple


def pad_2d(rows: Sequence[Sequence[int]], pad_value: int, multiple: int) -> torch.Tensor:
    if len(rows) == 0:
        raise ValueError("cannot collate an empty batch")
    lengths = [len(r) for r in rows]
    if min(lengths) == 0:
        raise ValueError("a row has an empty token list (every sequence must end with eos)")
    width = round_up(max(lengths), multiple)
    out = np.full((len(rows), width), pad_value, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


def collate_seq2seq(
    batch: dict[str, Sequence[Sequence[int]]], pad_id: int = 0, pad_to_multiple_of: int = 8
) -> dict[str, torch.Tensor]:
    """{input_ids, labels} lists (as Ray Data hands them: arrays of arrays) -> model-ready tensors."""
    input_ids = pad_2d(batch["input_ids"], pad_id, pad_to_multiple_of)
    # The mask is derived from lengths, not from `!= pad_id`: a tokenizer may legitimately use id 0 inside
    # a sequence; lengths are what the pipeline guarantees.
    attention_mask = pad_2d([np.ones(len(r), dtype=np.int64) for r in batch["input_ids"]], 0, pad_to_multiple_of)
    labels = pad_2d(batch["labels"], IGNORE_INDEX, pad_to_multiple_of)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class Collator:
    """Picklable callable for `iter_torch_batches(collate_fn=...)`."""

    def __init__(self, pad_id: int = 0, pad_to_multiple_of: int = 8) -> None:
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return collate_seq2seq(batch, self.pad_id, self.pad_to_multiple_of)
