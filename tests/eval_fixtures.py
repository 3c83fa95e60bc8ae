"""Tiny models and pipeline-format data for eval tests, built locally (no hub, no pipeline run)."""

from __future__ import annotations

import json
import random
from pathlib import Path

REGIMES = ("train-easy", "train-medium", "train-hard", "interpolate")


def char_tokenizer():
    from cluster.core import load_tokenizer

    return load_tokenizer("char")


def make_tiny_model(path: Path, seed: int = 0, d_model: int = 32) -> Path:
    """A random T5 (1 encoder + 1 decoder layer) with the char vocabulary, saved with its tokenizer.

    T5's own init makes a tiny random model emit only <pad>; re-initialized weights and an output layer
    restricted to digits, "-" and </s> give varied, answer-like predictions of varied lengths, so the
    tests compare real, different outputs (and F1 is not always 0).
    """
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from train.model import untie_lm_head

    tok = char_tokenizer()
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tok),
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=4,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = untie_lm_head(T5ForConditionalGeneration(config)).eval()  # flan-t5's layout: silencing the
    with torch.no_grad():  # head below must not zero the input embedding of those characters too
        for p in model.parameters():
            torch.nn.init.normal_(p, std=1.0)
        allowed = [tok.convert_tokens_to_ids(c) for c in "0123456789-"] + [tok.eos_token_id]
        silenced = torch.ones(len(tok), dtype=torch.bool)
        silenced[allowed] = False
        model.lm_head.weight[silenced] = 0
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """linear_1d-looking questions with their true answers, spread over the regimes."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        x = rng.randint(-20, 20)
        a = rng.choice([k for k in range(-9, 10) if k])
        b = rng.randint(-50, 50)
        var = rng.choice("xyzbcdfgjklmnpqrstuvw")
        rows.append({
            "question": f"Solve {a}*{var} + {b} = {a * x + b} for {var}.",
            "answer": str(x),
            "regime": REGIMES[i % len(REGIMES)],
        })
    return rows


def write_split(data: Path, split: str, rows: list[dict], files: int = 2) -> None:
    """Rows -> <data>/<split>/part-*.parquet in the pipeline's contract format."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = char_tokenizer()
    (data / split).mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // files)
    for f in range(files):
        chunk = rows[f * per : (f + 1) * per]
        if not chunk:
            continue
        enc_q = tok([r["question"] for r in chunk])["input_ids"]
        enc_a = tok([r["answer"] for r in chunk])["input_ids"]
        table = pa.table({
            "question": pa.array([r["question"] for r in chunk], pa.string()),
            "answer": pa.array([r["answer"] for r in chunk], pa.string()),
            "regime": pa.array([r["regime"] for r in chunk], pa.string()),
            "input_ids": pa.array(enc_q, pa.list_(pa.int32())),
            "attention_mask": pa.array([[1] * len(x) for x in enc_q], pa.list_(pa.int32())),
            "labels": pa.array(enc_a, pa.list_(pa.int32())),
        })
        pq.write_table(table, data / split / f"part-{f:05d}.parquet")


def make_data(data: Path, n_test: int = 64, seed: int = 0, files: int = 2) -> Path:
    """A minimal pipeline output: test split, tokenizer/ and a complete manifest."""
    write_split(data, "test", make_rows(n_test, seed), files)
    char_tokenizer().save_pretrained(data / "tokenizer")
    (data / "manifest.json").write_text(json.dumps({"complete": True, "splits": {"test": n_test}}))
    return data


def write_train_metrics(train_dir: Path, steps: int = 20) -> None:
    lines = []
    for s in range(1, steps + 1):
        lines.append({"step": s, "loss": 3.0 / s ** 0.5, "lr": 1e-3})
        if s % 5 == 0:
            lines.append({"step": s, "val_loss": 3.2 / s ** 0.5, "val_exact_match": s / (4 * steps)})
    (train_dir / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
