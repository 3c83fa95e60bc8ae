"""Examples/s of `python -m eval` against a plain single-process generate() loop, same model and rows.

    .venv/bin/python -m bench.eval_bench                       # CPU: small random T5, char tokenizer
    .venv/bin/python -m bench.eval_bench --gpu --rows 10000    # one GPU: flan-t5-large architecture

Both sides get the same random-weight model (saved once with save_pretrained) and the same Parquet rows in
the pipeline's format, and generate greedily with the same max_new_tokens. The baseline is what the seed
did: load the model, loop over fixed-size batches in file order, pad, generate, decode. `python -m eval`
is timed as a subprocess from start to finish (Ray start, actor start, model load, read, generate, score,
report) and, from its metrics.json, the Ray Data part alone. Weights are random, so accuracy means
nothing here: the model always runs to max_new_tokens, the worst case for generation time.

The `--gpu` variant is the issue's target: the 10,000-row test set in under 20 s on one H100, with
flan-t5-large's architecture and **random weights** (783.2M parameters, untied head, built by
bench/train_gpu_bench.py's `build_model`: nothing can be downloaded on a lent GPU machine). Its rows
have linear_1d's real token lengths under the flan-t5 tokenizer (questions drawn from the measured
interpolate histogram in bench/flops.py, answers 2-4 tokens), as random token ids: the char tokenizer
saved beside them only decodes the predictions, and drops ids it does not know.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A small CPU model: d_model 128, 2+2 layers (1.2M parameters), the size the CPU demo trains (t5-tiny).
CPU_SMALL = dict(d_model=128, d_kv=32, d_ff=512, num_layers=2, num_decoder_layers=2, num_heads=4)


def build_model(path: Path, arch: dict, seed: int = 0) -> None:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from cluster.core import load_tokenizer

    tok = load_tokenizer("char")
    torch.manual_seed(seed)
    cfg = T5Config(**{"vocab_size": len(tok), **arch}, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5ForConditionalGeneration(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def build_model_gpu(path: Path) -> None:
    """flan-t5-large, random weights, untied head (783,150,080 parameters, asserted), as safetensors."""
    from bench.train_gpu_bench import build_model as build_flan
    from cluster.core import load_tokenizer

    model, _ = build_flan("google/flan-t5-large", "cpu", dropout=0.1)
    model.save_pretrained(path)
    load_tokenizer("char").save_pretrained(path)


def t5_length_ids(rows: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Random input_ids / labels with linear_1d's interpolate lengths under flan-t5's tokenizer, eos-ended."""
    from bench.flops import sample_lengths

    rng = random.Random(seed)
    ids, labels = [], []
    for q, a in sample_lengths(rows, "interpolate", seed):
        ids.append([rng.randrange(3, 32000) for _ in range(q - 1)] + [1])
        labels.append([rng.randrange(3, 32000) for _ in range(a - 1)] + [1])
    return ids, labels


def build_data(data: Path, rows: int, seed: int = 0, t5_lengths: bool = False) -> None:
    """linear_1d-style rows in the pipeline's contract format, one Parquet file: char-tokenized, or
    (t5_lengths) random ids with flan-t5's token lengths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cluster.core import load_tokenizer

    rng = random.Random(seed)
    tok = load_tokenizer("char")
    qs, ans = [], []
    for _ in range(rows):
        x, a, b = rng.randint(-99, 99), rng.choice([k for k in range(-99, 100) if k]), rng.randint(-999, 999)
        v = rng.choice("abcdfghjklmnpqrstuvwxyz")
        qs.append(f"Solve {a}*{v} + {b} = {a * x + b} for {v}.")
        ans.append(str(x))
    ids, labels = t5_length_ids(rows, seed) if t5_lengths else (tok(qs)["input_ids"], tok(ans)["input_ids"])
    (data / "test").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "question": qs, "answer": ans, "regime": ["interpolate"] * rows,
        "input_ids": pa.array(ids, pa.list_(pa.int32())),
        "attention_mask": pa.array([[1] * len(x) for x in ids], pa.list_(pa.int32())),
        "labels": pa.array(labels, pa.list_(pa.int32())),
    }), data / "test" / "part-00000.parquet")
    tok.save_pretrained(data / "tokenizer")


def plain_loop(model_dir: Path, data: Path, batch_size: int, max_new_tokens: int, gpu: bool, threads: int) -> dict:
    """The seed's way: one process, batches in file order, padded to the batch's longest question."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    dev = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, use_safetensors=True, dtype=dtype).to(dev).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    table = pq.read_table(data / "test", columns=["input_ids"])
    inputs = [np.asarray(x) for x in table["input_ids"].to_pylist()]
    t_loaded = time.perf_counter()
    preds = []
    with torch.inference_mode():
        for i in range(0, len(inputs), batch_size):
            chunk = inputs[i : i + batch_size]
            width = max(len(x) for x in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, x in enumerate(chunk):
                ids[j, : len(x)] = torch.from_numpy(x)
            ids = ids.to(dev)
            out = model.generate(input_ids=ids, attention_mask=(ids != 0).long(), max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1)
            preds += tok.batch_decode(out, skip_special_tokens=True)
    if gpu:
        torch.cuda.synchronize()
    t_end = time.perf_counter()
    n = len(preds)
    return {"rows": n, "wall_s": t_end - t0, "examples_per_s": n / (t_end - t0),
            "generate_only_examples_per_s": n / (t_end - t_loaded)}


# The line each eval actor prints when ready (eval/predict.py); Ray forwards it to the driver's output.
ACTOR_READY = re.compile(r"\[eval\] actor ready (-?[\d.]+)s after its process started: imports ([\d.]+)s, "
                         r"model load to \w+ ([\d.]+)s")


def run_eval_cli(model_dir: Path, data: Path, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "eval", "--model", str(model_dir), "--data", str(data), "--output", str(out),
           "--no-teacher-forced", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"python -m eval failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    ready = [tuple(map(float, g)) for g in ACTOR_READY.findall(proc.stdout + proc.stderr)]
    return {"cmd": " ".join(cmd[1:]), "rows": m["rows_scored"], "wall_s": wall, "examples_per_s": m["rows_scored"] / wall,
            "ray_data_wall_s": m["wall_s"], "ray_data_examples_per_s": m["examples_per_s"],
            "max_new_tokens": m["max_new_tokens"], "timing_s": m.get("timing_s"),
            "actor_ready_s": [{"since_process_start": a, "imports": b, "model_load": c} for a, b, c in ready]}



def _versions(gpu: bool) -> dict:
    import ray
    import torch
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
         "ray": ray.__version__}
    if gpu and torch.cuda.is_available():
        v["device"] = torch.cuda.get_device_name()
    return v


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.eval_bench", description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="flan-t5-large architecture on one GPU (bf16)")
    p.add_argument("--rows", type=int, default=None, help="rows to evaluate (default 2000 CPU, 10000 GPU)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per generate() (default 64 CPU, 512 GPU)")
    p.add_argument("--variants", default=None,
                   help="semicolon-separated extra flag sets for python -m eval, one run each")
    p.add_argument("--workdir", default=None, help="keep model/data/outputs here (default: a temp dir)")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    p.add_argument("--skip-baseline", action="store_true",
                   help="only python -m eval, no plain generate() loop (saves time on a lent GPU machine)")
    args = p.parse_args(argv)

    rows = args.rows or (10_000 if args.gpu else 2000)
    bs = args.batch_size or (512 if args.gpu else 64)
    if args.variants is not None:
        variants = [v.split() for v in args.variants.split(";")]
    elif args.gpu:
        variants = [["--num-actors", "1", "--gpus-per-actor", "1", "--cpus-per-actor", "1"]]
    else:  # 2 cores: one actor using both, or two actors with one thread each
        variants = [["--num-actors", "1", "--cpus-per-actor", "1", "--torch-threads", "2"],
                    ["--num-actors", "2", "--cpus-per-actor", "1", "--torch-threads", "1"]]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="eval-bench-"))
    model_dir, data = work / "model", work / "data"
    if not (model_dir / "config.json").exists():
        if args.gpu:
            build_model_gpu(model_dir)
        else:
            build_model(model_dir, CPU_SMALL)
    if not (data / "test").exists():
        build_data(data, rows, t5_lengths=args.gpu)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results: dict = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} {os.cpu_count()} cores" + (" + GPU" if args.gpu else ", no GPU"),
        "model": ("flan-t5-large architecture, RANDOM weights (no download), untied head, 783.2M; rows with "
                  "linear_1d's flan-t5 token lengths") if args.gpu else "T5 d_model 128, 2+2 layers, random",
        "versions": _versions(args.gpu),
        "rows": rows, "batch_size": bs, "runs": [],
    }
    for i, extra in enumerate(variants):
        r = run_eval_cli(model_dir, data, work / f"out{i}", ["--batch-size", str(bs), *extra])
        results["runs"].append({"what": "python -m eval " + " ".join(extra), **r})
        print(json.dumps(results["runs"][-1]), flush=True)
        max_new = r["max_new_tokens"]
    threads = 1 if args.gpu else min(2, os.cpu_count() or 1)
    if not args.skip_baseline:
        base = plain_loop(model_dir, data, bs, max_new, args.gpu, threads)
        results["runs"].append({"what": f"plain generate() loop, 1 process, {threads} threads", **base})
        print(json.dumps(results["runs"][-1]), flush=True)
    print(f"\n{rows} rows, batch {bs}, max_new_tokens {max_new}, {results['machine']}, {results['date']}")
    print(f"{'what':70} {'wall s':>8} {'ex/s':>8}")
    for r in results["runs"]:
        print(f"{r['what'][:70]:70} {r['wall_s']:8.1f} {r['examples_per_s']:8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
