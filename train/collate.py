"""Seq2seq collation (pure): unpadded token lists -> padded tensors.

- Inputs are padded to the batch's longest question, rounded up to a multiple of `pad_to_multiple_of`
  (8: tensor-core tile friendly, and few distinct encoder shapes).
- Labels are padded only to the batch's longest answer (answers are a few tokens: rounding them up would
  mostly add decoder positions that compute nothing useful), with -100, the index CrossEntropyLoss
  ignores, so padding never counts in the loss (the seed project padded labels with 0 = <pad> and trained
  on its pads).
- No decoder_input_ids here: T5ForConditionalGeneration builds them from `labels` with its own
  `_shift_right` (decoder_start_token_id, -100 -> pad), so the shift always matches the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cluster.core import IGNORE_INDEX, pad_2d

__all__ = ["IGNORE_INDEX", "collate_seq2seq"]


def collate_seq2seq(
    batch: dict[str, Sequence[Sequence[int]]], pad_id: int = 0, pad_to_multiple_of: int = 8
) -> dict[str, torch.Tensor]:
    """{input_ids, labels} token rows (as Ray Data hands them: arrays of arrays; or cluster.core.FlatRows,
    the in-memory path's) -> model-ready tensors."""
    input_ids, attention_mask = pad_2d(batch["input_ids"], pad_id, pad_to_multiple_of)
    labels, _ = pad_2d(batch["labels"], IGNORE_INDEX)
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels)}

