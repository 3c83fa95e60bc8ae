"""Batch generation: a callable class for Ray Data `map_batches` (model loaded once per actor).

Each call gets a window of rows, sorts them by question length, and runs greedy generate() on
batch_size-row chunks, so every chunk pads to similar lengths without a global sort (a shuffle) of the
dataset. Results are put back in the window's order, so the output is independent of the chunking.
The encoder runs once per chunk and its output feeds both generate() and the teacher-forced pass.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import numpy as np

from eval.aggregate import score_batch

# Fault injection for the reliability tests (issue 6): SIGKILL this actor on its Nth batch, once per
# marker directory. Read from the environment so no config field or CLI flag exists for it.
FAULT_KILL_AT_BATCH = "MATHTUNE_FAULT_EVAL_KILL_AT_BATCH"
FAULT_MARKER_DIR = "MATHTUNE_FAULT_DIR"


def length_sorted_chunks(lengths: list[int], size: int) -> list[np.ndarray]:
    """Row indices grouped into chunks of `size` rows of similar length (stable: ties keep row order)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i : i + size] for i in range(0, len(order), size)]


def pad(seqs: list[np.ndarray], value: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest sequence: (ids, mask)."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), value, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


class Predictor:
    def __init__(
        self,
        model: str,
        tokenizer: str,
        batch_size: int,
        max_new_tokens: int,
        teacher_forced: bool,
        use_gpu: bool,
        torch_threads: int,
    ) -> None:
        import torch

        from cluster.core import load_tokenizer
        from eval.resolve import load_model

        torch.set_num_threads(torch_threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        # bf16 on GPU halves memory and doubles matmul speed; T5 is stable in bf16 (not in fp16).
        dtype = torch.bfloat16 if use_gpu else torch.float32
        self.model = load_model(model, dtype=dtype).to(self.device).eval()
        self.tokenizer = load_tokenizer(tokenizer)
        self.pad_id = self.model.config.pad_token_id
        self.eos_id = self.model.config.eos_token_id
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.teacher_forced = teacher_forced
        self.calls = 0

    def _maybe_fault(self) -> None:
        at = os.environ.get(FAULT_KILL_AT_BATCH)
        if not at or self.calls != int(at):
            return
        marker = Path(os.environ[FAULT_MARKER_DIR]) / "eval-actor-killed"
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # first actor to get here wins
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        self.calls += 1
        self._maybe_fault()
        inputs = [np.asarray(x) for x in batch["input_ids"]]
        labels = [np.asarray(x) for x in batch["labels"]]
        n = len(inputs)
        preds: list[str] = [""] * n
        tf_em = np.zeros(n, dtype=bool)
        gen_tokens = np.zeros(n, dtype=np.int32)
        truncated = np.zeros(n, dtype=bool)
        with torch.inference_mode():
            for idx in length_sorted_chunks([len(x) for x in inputs], self.batch_size):
                ids, mask = pad([inputs[i] for i in idx], self.pad_id)
                ids_t = torch.from_numpy(ids).to(self.device)
                mask_t = torch.from_numpy(mask).to(self.device)
                enc = self.model.get_encoder()(input_ids=ids_t, attention_mask=mask_t)
                out = self.model.generate(
                    encoder_outputs=enc,
                    attention_mask=mask_t,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                )
                gen = out[:, 1:].cpu().numpy()  # drop the decoder start token
                is_eos = gen == self.eos_id
                has_eos = is_eos.any(axis=1)
                lengths = np.where(has_eos, is_eos.argmax(axis=1), gen.shape[1])
                texts = self.tokenizer.batch_decode(gen, skip_special_tokens=True)
                for j, i in enumerate(idx):
                    preds[i] = texts[j]
                    gen_tokens[i] = lengths[j]
                    truncated[i] = not has_eos[j]
                if self.teacher_forced:
                    lab, lab_mask = pad([labels[i] for i in idx], self.pad_id)
                    lab_t = torch.from_numpy(lab).to(self.device)
                    lab_t = lab_t.masked_fill(torch.from_numpy(lab_mask == 0).to(self.device), -100)
                    logits = self.model(encoder_outputs=enc, attention_mask=mask_t, labels=lab_t).logits
                    argmax = logits.argmax(-1).cpu().numpy()
                    # Every gold position (answer tokens and </s>) predicted right given the gold prefix.
                    ok = (argmax == lab) | (lab_mask == 0)
                    tf_em[idx] = ok.all(axis=1)
        regime = batch["regime"] if "regime" in batch else np.full(n, "unknown", dtype=object)
        # Scored here rather than in a separate map_batches: one operator less, so no extra worker
        # processes (each costs seconds of imports on a small machine) for microseconds of work.
        return score_batch({
            "question": batch["question"],
            "answer": batch["answer"],
            "regime": regime,
            "prediction": np.asarray(preds, dtype=object),
            "tf_em": tf_em,
            "gen_tokens": gen_tokens,
            "truncated": truncated,
        })
