"""Pipeline benchmark: the seed's `datasets.map` way vs `python -m pipeline`, whole processes, same rows,
same tokenizer; and `--source generate` vs the single-process generator.

    python -m bench.pipeline_bench --rows 200000 2000000      # file runs (hub's wrapped Parquet form)
    python -m bench.pipeline_bench --gen-rows 8000             # generator runs
    python -m bench.pipeline_bench --rows --writer-rows 2000000  # the driver's writing alone (no Ray)

Fixtures live in bench/out/ (git-ignored) and are made once: a T5-kind SentencePiece-unigram tokenizer
(vocab 1000, trained with `tokenizers` on generated rows) and wrapped Parquet files in the hub's layout
(<module>/{train,test}/0000.parquet, every string "b'...\\n'"). Generating 2M rows takes ~25 min of CPU
here, so the Parquet rows are a 30k-row generated base repeated to size: the per-row cost of cleaning and
tokenizing does not depend on rows being unique. Each measurement is a fresh process (tree): wall time
and the peak summed RSS of the process and all its descendants (Ray's raylet, GCS and workers included).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
PY = sys.executable
BASE_ROWS = 30_000
TEST_ROWS = 10_000
MODULE = "algebra__linear_1d"
TOKENIZERS = ["unigram-1000", "char"]

# The seed's way: clean with a per-row map (slicing off the wrapper), then tokenize with the tokenizer's
# __call__ in batched map, then write Parquet.
SEED_SCRIPT = r"""
import sys
from datasets import load_dataset
from transformers import AutoTokenizer
src, tok_dir, out, num_proc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) or None
tok = AutoTokenizer.from_pretrained(tok_dir)
ds = load_dataset("parquet", data_files={"train": f"{src}/train/*.parquet", "test": f"{src}/test/*.parquet"})
def clean(ex):
    return {"question": ex["question"][2:-3], "answer": ex["answer"][2:-3]}
ds = ds.map(clean, num_proc=num_proc)
def tokenize(b):
    return tok(b["question"], text_target=b["answer"])
ds = ds.map(tokenize, batched=True, num_proc=num_proc)
for split in ds:
    ds[split].to_parquet(f"{out}/{split}.parquet")
print("rows", sum(len(ds[s]) for s in ds))
"""


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Wall seconds and peak RSS (MiB) of a command's whole process tree, sampled every 0.2 s."""
    import tempfile

    import psutil

    # Output goes to a file, not a pipe: a pipe nobody reads until the end fills at 64 KiB (progress bars)
    # and blocks the measured process forever.
    with tempfile.TemporaryFile(mode="w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT, text=True)
        ps = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            try:
                rss = ps.memory_info().rss
                for child in ps.children(recursive=True):
                    with contextlib.suppress(psutil.Error):  # a child may exit between listing and reading
                        rss += child.memory_info().rss
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.2)
        wall = time.perf_counter() - t0
        log.seek(0)
        out = log.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(peak / 2**20), "tail": out.strip().splitlines()[-1:]}


def base_rows() -> tuple[list[str], list[str]]:
    """BASE_ROWS generated (question, answer) pairs, cached as JSON."""
    path = OUT / "base_rows.json"
    if path.exists():
        d = json.loads(path.read_text())
        return d["q"], d["a"]
    OUT.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONHASHSEED"] = "0"
    from pipeline.generate import generate_rows

    q, a = [], []
    for i, regime in enumerate(("train-easy", "train-medium", "train-hard")):
        qq, aa, _ = generate_rows(MODULE, regime, BASE_ROWS // 3, seed=100 + i)
        q += qq
        a += aa
    path.write_text(json.dumps({"q": q, "a": a}))
    return q, a


def unigram_tokenizer() -> Path:
    """A T5-kind tokenizer: SentencePiece unigram, vocab 1000, pad 0 / eos 1 / unk 2, `</s>` appended."""
    path = OUT / "unigram_tokenizer"
    if (path / "tokenizer.json").exists():
        return path
    from tokenizers import processors
    from tokenizers.implementations import SentencePieceUnigramTokenizer
    from transformers import PreTrainedTokenizerFast

    q, a = base_rows()
    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(q + a, vocab_size=1000, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                           show_progress=False)
    tok = sp._tokenizer
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    assert (fast.pad_token_id, fast.eos_token_id, fast.unk_token_id) == (0, 1, 2)
    fast.save_pretrained(path)
    return path


def hub_fixture(rows: int) -> Path:
    """rows wrapped rows in the hub's layout: train = rows - 10k, test = 10k."""
    root = OUT / f"hub_{rows}" / MODULE
    if (root / "test" / "0000.parquet").exists():
        return root
    import pyarrow as pa
    import pyarrow.parquet as pq

    q, a = base_rows()
    wq = pa.array([f"b'{x}\\n'" for x in q])
    wa = pa.array([f"b'{x}\\n'" for x in a])
    for split, n in (("train", rows - TEST_ROWS), ("test", TEST_ROWS)):
        (root / split).mkdir(parents=True, exist_ok=True)
        reps = -(-n // len(q))
        t = pa.table({"question": pa.concat_arrays([wq] * reps)[:n], "answer": pa.concat_arrays([wa] * reps)[:n]})
        pq.write_table(t, root / split / "0000.parquet", row_group_size=100_000)  # hub-like row groups
    return root


def bench_files(rows: int, skip_single: bool) -> list[dict]:
    src, tok = hub_fixture(rows), unigram_tokenizer()
    results = []
    for name, tokenizer in (("unigram-1000", str(tok)), ("char", "char")):
        if name not in TOKENIZERS:
            continue
        runs = []
        for num_proc in ([2] if skip_single else [0, 2]):
            out = OUT / "seed_out"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            cache = OUT / "hf_cache"
            shutil.rmtree(cache, ignore_errors=True)  # cold: no cached map results from an earlier run
            if tokenizer == "char":
                from cluster.core import build_char_tokenizer

                build_char_tokenizer().save_pretrained(OUT / "char_tokenizer")
                tok_dir = str(OUT / "char_tokenizer")
            else:
                tok_dir = tokenizer
            r = measure([PY, "-c", SEED_SCRIPT, str(src), tok_dir, str(out), str(num_proc)],
                        env={"HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
            runs.append({"way": f"seed datasets.map num_proc={num_proc or 1}", **r})
        out = OUT / "pipeline_out"
        shutil.rmtree(out, ignore_errors=True)
        r = measure([PY, "-m", "pipeline", "--source", str(src), "--tokenizer", tokenizer, "--output", str(out),
                     "--validation-size", "0", "--address", "local"], env={"HF_HUB_OFFLINE": "1"})
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["rows_in"] == rows, manifest["rows_in"]
        runs.append({"way": "python -m pipeline", **r, "rows_kept": manifest["rows_kept"]})
        base = next(x for x in runs if x["way"].endswith("num_proc=2"))
        for x in runs:
            x.update(rows=rows, tokenizer=name, rows_per_s=round(rows / x["wall_s"]),
                     speedup_vs_num_proc_2=round(base["wall_s"] / x["wall_s"], 2))
        results += runs
        print(json.dumps(runs, indent=1), flush=True)
    return results


def bench_generate(rows: int) -> list[dict]:
    """`--source generate` (parallel Ray tasks, whole pipeline) vs generating the same rows in one process."""
    per_regime, test = rows // 4, rows - 3 * (rows // 4)
    single = measure([PY, "-c", (
        "import os; from pipeline.generate import generate_rows\n"
        f"for r, n in [('train-easy', {per_regime}), ('train-medium', {per_regime}), ('train-hard', {per_regime}),"
        f" ('interpolate', {test})]: generate_rows('{MODULE}', r, n, seed=1)")], env={"PYTHONHASHSEED": "0"})
    out = OUT / "generate_out"
    shutil.rmtree(out, ignore_errors=True)
    ours = measure([PY, "-m", "pipeline", "--source", "generate", "--train-rows-per-regime", str(per_regime),
                    "--test-rows", str(test), "--rows-per-shard", str(max(500, per_regime // 4)),
                    "--output", str(out), "--address", "local"])
    res = [{"way": "single-process generator (generation only)", **single},
           {"way": "python -m pipeline --source generate (generate+clean+tokenize+write)", **ours}]
    for x in res:
        x.update(rows=rows, rows_per_s=round(rows / x["wall_s"]), speedup=round(single["wall_s"] / x["wall_s"], 2))
    print(json.dumps(res, indent=1), flush=True)
    return res


WRITER_SCRIPT = r"""
import json, sys, time
import numpy as np, pyarrow as pa
from pathlib import Path
from cluster.core import load_tokenizer
from pipeline.config import PipelineConfig
from pipeline.job import OutputWriter
from pipeline.tokenize_step import TokenizeBatch
from pipeline.validate import prepare_text
from pipeline.write import SHUFFLE_BUCKET_ROWS, SplitWriter
from cluster.core import DATA_SCHEMA
rows, mode, out = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
# a 49,152-row base in the generator's style, tokenized once (char tokenizer) like the workers do it
rng = np.random.default_rng(0)
base = 6 * 8192
a, b, c = (rng.integers(-999, 999, base) for _ in range(3))
q = [f"Solve {x}*v + {y} = {z}*v - {x + y} for v." for x, y, z in zip(a, b, c)]
ans = [str(int(x)) for x in rng.integers(-30, 30, base)]
tok = load_tokenizer("char")
step = TokenizeBatch(tok.backend_tokenizer.to_str(), tok.eos_token_id, tok.unk_token_id, 256, 64, 0.01, seed=0)
raw = pa.table({"question": pa.array(q), "answer": pa.array(ans), "source_reject": pa.nulls(base, pa.string()),
                "regime": pa.array(["train-easy"] * base), "split": pa.array(["train"] * base),
                "module": pa.array(["algebra__linear_1d"] * base)})
t0 = time.process_time()  # CPU seconds of this process: steadier than wall time on a shared box
tokenized = step(prepare_text(raw, max_chars=2000))
tok_s = time.process_time() - t0
batches = [tokenized.slice(i, 8192) for i in range(0, base, 8192)]
cfg = PipelineConfig(output=str(out))
w = OutputWriter(cfg, out, buckets=max(1, -(-rows // SHUFFLE_BUCKET_ROWS)))
if mode == "ordered":  # the writer before the shuffle: train/validation streamed in source order
    for s in ("train", "validation"):
        w.writers[s] = SplitWriter(out / s, DATA_SCHEMA, cfg.rows_per_file)
regimes = ["train-easy", "train-medium", "train-hard"]
t0, c0 = time.perf_counter(), time.process_time()
done = 0
while done < rows:
    batch = batches[(done // 8192) % len(batches)].slice(0, rows - done)
    regime = regimes[min(2, 3 * done // rows)]  # the source's order: easy, then medium, then hard
    batch = batch.set_column(batch.schema.get_field_index("regime"), "regime", pa.array([regime] * batch.num_rows))
    w.add(batch)
    done += batch.num_rows
t_add, c_add = time.perf_counter() - t0, time.process_time() - c0
counts, files, _ = w.close()
total, cpu = time.perf_counter() - t0, time.process_time() - c0
assert counts["rows_in"] == rows, counts
print(json.dumps({"mode": mode, "rows": rows, "write_s": round(total, 2), "add_s": round(t_add, 2),
                  "close_s": round(total - t_add, 2), "cpu_s": round(cpu, 2), "add_cpu_s": round(c_add, 2),
                  "close_cpu_s": round(cpu - c_add, 2), "writer_rows_per_cpu_s": round(rows / cpu),
                  "writer_rows_per_s": round(rows / total),
                  "tokenize_rows_per_s_one_core": round(base / tok_s)}))
"""


def bench_writer(rows: int) -> list[dict]:
    """The driver's writing alone (OutputWriter fed synthetic tokenized 8,192-row batches, as Ray Data hands
    them over), with the seeded shuffle and without it (train/validation in source order, the old way);
    one fresh process each, peak RSS measured. Also the same rows' clean + tokenize rate on one core."""
    res = []
    for mode in ("ordered", "shuffled"):
        out = OUT / "writer_out"
        shutil.rmtree(out, ignore_errors=True)
        r = measure([PY, "-c", WRITER_SCRIPT, str(rows), mode, str(out)], env={"PYTHONPATH": str(ROOT)})
        res.append({"way": f"driver writer, {mode}", **json.loads(r["tail"][0]), "wall_s": r["wall_s"],
                    "peak_rss_mib": r["peak_rss_mib"]})
        print(json.dumps(res[-1]), flush=True)
    for x in res:
        x["rows_per_s"] = x["writer_rows_per_s"]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="*", default=[200_000], help="file-source sizes (rows)")
    p.add_argument("--gen-rows", type=int, default=0, help="rows for the generator comparison (0 = skip)")
    p.add_argument("--writer-rows", type=int, default=0, help="rows for the driver-writer benchmark (0 = skip)")
    p.add_argument("--skip-single", action="store_true", help="skip the seed's single-process run")
    p.add_argument("--tokenizers", nargs="*", default=["unigram-1000", "char"], help="unigram-1000 and/or char")
    args = p.parse_args()
    TOKENIZERS[:] = args.tokenizers
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(),
            "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}
    results = []
    for rows in args.rows:
        results += bench_files(rows, args.skip_single)
    if args.gen_rows:
        results += bench_generate(args.gen_rows)
    if args.writer_rows:
        results += bench_writer(args.writer_rows)
    info["load_avg_end"] = os.getloadavg()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"pipeline_bench_{int(time.time())}.json"
    path.write_text(json.dumps({"info": info, "results": results}, indent=1))
    print("| rows | tokenizer | way | wall s | rows/s | x vs num_proc=2 | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']} | {r.get('tokenizer', '-')} | {r['way']} | {r['wall_s']} | {r['rows_per_s']} | "
              f"{r.get('speedup_vs_num_proc_2', r.get('speedup'))} | {r['peak_rss_mib']} |")
    print(json.dumps(info), f"-> {path}")


if __name__ == "__main__":
    main()
