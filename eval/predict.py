"""Batch generation: a callable class for Ray Data `map_batches` (model loaded once per actor), also used
in-process by `python -m eval --ask`.

Each call gets a window of rows, sorts them by question length, and runs greedy generate() on
batch_size-row chunks, so every chunk pads to similar lengths without a global sort (a shuffle) of the
dataset. Results are put back in the window's order, so the output is independent of the chunking.
The encoder runs once per chunk and its output feeds both generate() and the teacher-forced pass.
Rows are scored here too (eval.metrics.score_columns), so the driver only adds up.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from cluster.core import IGNORE_INDEX, pad_2d
from eval.metrics import score_columns


def process_age_s() -> float:
    """Seconds since this process started (psutil: a Ray dependency, in every Ray worker); -1 without it."""
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:  # only a log line depends on it
        return -1.0


def length_sorted_chunks(lengths: list[int], size: int) -> list[np.ndarray]:
    """Row indices grouped into chunks of `size` rows of similar length (stable: ties keep row order)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i : i + size] for i in range(0, len(order), size)]


def score_batch(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """Add eval.metrics.SCORE_COLUMNS to a batch with `prediction` and `answer`."""
    scored = score_columns(batch["prediction"], batch["answer"])
    out = dict(batch)
    for k, v in scored.items():
        out[k] = np.asarray(v, dtype=object if k in ("error_class", "prediction_norm", "answer_norm") else None)
    return out


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
        announce: bool = False,
    ) -> None:
        t0 = time.perf_counter()
        import torch

        # transformers' model code (modeling_utils: ~2.3 s of its ~2.5 s on a CPU VM) is imported lazily at
        # the first from_pretrained: imported here, so "model load" in the ready line is the weights alone.
        from transformers import modeling_utils  # noqa: F401

        from cluster.core import load_tokenizer
        from eval.resolve import load_model

        torch.set_num_threads(torch_threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        t_imported = time.perf_counter()
        # bf16 on GPU halves memory and doubles matmul speed; T5 is stable in bf16 (not in fp16). The
        # weights go straight to the device (device_map): no fp32 copy converted on the actor's one CPU.
        dtype = torch.bfloat16 if use_gpu else torch.float32
        self.model = load_model(model, dtype=dtype, device=self.device).eval()
        self.tokenizer = load_tokenizer(tokenizer)
        if announce:  # where an actor's start-up goes (Ray prefixes the line with the actor's name and pid)
            print(f"[eval] actor ready {process_age_s():.1f}s after its process started: imports "
                  f"{t_imported - t0:.1f}s, model load to {self.device.type} {time.perf_counter() - t_imported:.1f}s",
                  flush=True)
        self.pad_id = self.model.config.pad_token_id
        self.eos_id = self.model.config.eos_token_id
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.teacher_forced = teacher_forced

    def predict(self, inputs: Sequence[Sequence[int]], labels: Sequence[Sequence[int]] | None = None):
        """Greedy answers for token-id rows: (texts, generated tokens, truncated, teacher-forced EM or None)."""
        import torch

        n = len(inputs)
        preds: list[str] = [""] * n
        tf_em = np.zeros(n, dtype=bool)
        gen_tokens = np.zeros(n, dtype=np.int32)
        truncated = np.zeros(n, dtype=bool)
        with torch.inference_mode():
            for idx in length_sorted_chunks([len(x) for x in inputs], self.batch_size):
                ids, mask = pad_2d([inputs[i] for i in idx], self.pad_id)
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
                if labels is not None:
                    lab, lab_mask = pad_2d([labels[i] for i in idx], self.pad_id)
                    lab_t = torch.from_numpy(lab).to(self.device)
                    lab_t = lab_t.masked_fill(torch.from_numpy(lab_mask == 0).to(self.device), IGNORE_INDEX)
                    logits = self.model(encoder_outputs=enc, attention_mask=mask_t, labels=lab_t).logits
                    argmax = logits.argmax(-1).cpu().numpy()
                    # Every gold position (answer tokens and </s>) predicted right given the gold prefix.
                    ok = (argmax == lab) | (lab_mask == 0)
                    tf_em[idx] = ok.all(axis=1)
        return preds, gen_tokens, truncated, (tf_em if labels is not None else None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        inputs = [np.asarray(x) for x in batch["input_ids"]]
        labels = [np.asarray(x) for x in batch["labels"]] if self.teacher_forced else None
        preds, gen_tokens, truncated, tf_em = self.predict(inputs, labels)
        out = {k: batch[k] for k in ("question", "answer", "regime", "module")}
        out.update(prediction=np.asarray(preds, dtype=object), gen_tokens=gen_tokens, truncated=truncated,
                   tf_em=tf_em if tf_em is not None else np.zeros(len(inputs), dtype=bool))
        # Scored here rather than in a separate map_batches: one operator less, so no extra worker
        # processes (each costs seconds of imports on a small machine) for microseconds of work.
        return score_batch(out)
