"""Pipeline benchmark: the seed's `datasets.map` way vs `python -m pipeline`, whole processes, same rows,
same tokenizer; and `--source generate` vs the single-process generator (with and without the sympy fast paths).

    python -m bench.pipeline_bench --rows 200000 2000000      # file runs (hub's wrapped Parquet form)
    python -m bench.pipeline_bench --gen-rows 8000             # generator runs
    python -m bench.pipeline_bench --rows --module-rows 20      # the generator's cost per module, all of them
    python -m bench.pipeline_bench --rows --writer-rows 2000000  # the writing alone: workers' and driver's CPU
    python -m bench.pipeline_bench --rows --driver-rows 400000   # the driver's own CPU in a whole run

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
        peak, driver_cpu = 0, 0.0
        while proc.poll() is None:
            try:
                t = ps.cpu_times()  # the measured process alone (the pipeline's driver), not its children
                driver_cpu = t.user + t.system
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
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(peak / 2**20), "tail": out.strip().splitlines()[-1:],
            "driver_cpu_s": round(driver_cpu, 2)}  # sampled every 0.2 s: up to 0.2 s of the end missing


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
    """`--source generate` (parallel Ray tasks, whole pipeline) vs generating the same rows in one process,
    with and without pipeline.generate's sympy fast paths (the baseline: the generator's own sympy calls)."""
    per_regime, test = rows // 4, rows - 3 * (rows // 4)

    def single(fast_paths: bool) -> dict:
        off = "" if fast_paths else "g._sympy_fast_paths = lambda: None\n"
        return measure([PY, "-c", (
            f"import pipeline.generate as g\n{off}"
            f"for r, n in [('train-easy', {per_regime}), ('train-medium', {per_regime}), ('train-hard', {per_regime}),"
            f" ('interpolate', {test})]: g.generate_rows('{MODULE}', r, n, seed=1)")], env={"PYTHONHASHSEED": "0"})

    plain, fast = single(False), single(True)
    out = OUT / "generate_out"
    shutil.rmtree(out, ignore_errors=True)
    ours = measure([PY, "-m", "pipeline", "--source", "generate", "--train-rows-per-regime", str(per_regime),
                    "--test-rows", str(test), "--rows-per-shard", str(max(500, per_regime // 4)),
                    "--output", str(out), "--address", "local"])
    res = [{"way": "single-process generator, its own sympy calls (generation only)", **plain},
           {"way": "single-process generator, sympy fast paths (generation only)", **fast},
           {"way": "python -m pipeline --source generate (generate+clean+tokenize+write)", **ours}]
    for x in res:
        x.update(rows=rows, rows_per_s=round(rows / x["wall_s"]), speedup=round(plain["wall_s"] / x["wall_s"], 2))
    print(json.dumps(res, indent=1), flush=True)
    return res


MODULES_SCRIPT = r"""
import json, sys, time
import pipeline.generate as g
rows, fast = int(sys.argv[1]), sys.argv[2] == "1"
if not fast:
    g._sympy_fast_paths = lambda: None
gen = g._load_generator()
out = {}
for regime in ("train-easy", "train-medium", "train-hard", "interpolate", "extrapolate"):
    for module in sorted(gen.filtered_modules[regime]):
        g.generate_rows(module, regime, 1, seed=7)  # not timed: a module's first row fills sympy's caches
        c0 = time.process_time()
        g.generate_rows(module, regime, rows, seed=1)
        out[f"{module}/{regime}"] = (time.process_time() - c0) / rows
print(json.dumps(out))
"""


def bench_modules(rows: int) -> list[dict]:
    """CPU seconds per generated row of every module x regime, the generator's own sympy calls vs
    pipeline.generate's fast paths, one fresh process each; and what `configs/all-modules.yaml` costs:
    666,666 rows per module and train regime, 10,000 interpolate and 10,000 extrapolate (where the module
    has it)."""
    res = {}
    for fast in (False, True):
        proc = subprocess.run([PY, "-c", MODULES_SCRIPT, str(rows), str(int(fast))], capture_output=True, text=True,
                              cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": "0"}, check=True)
        res[fast] = json.loads(proc.stdout.strip().splitlines()[-1])
    size = {"train-easy": 666_666, "train-medium": 666_666, "train-hard": 666_666, "interpolate": 10_000,
            "extrapolate": 10_000}

    def core_hours(per_row: dict) -> float:
        return sum(s * size[k.split("/")[1]] for k, s in per_row.items()) / 3600

    print("| module | regime | ms per row, generator's sympy | ms per row, fast paths | x |")
    print("|---|---|---|---|---|")
    for k in sorted(res[True], key=lambda k: -res[True][k])[:15]:
        m, r = k.split("/")
        print(f"| {m} | {r} | {1000 * res[False][k]:.1f} | {1000 * res[True][k]:.1f} | "
              f"{res[False][k] / res[True][k]:.2f} |")
    train = [k for k in res[True] if k.split("/")[1].startswith("train-")]
    out = []
    for fast in (False, True):
        mean_ms = 1000 * sum(res[fast][k] for k in train) / len(train)
        way = "fast paths" if fast else "the generator's own sympy"
        out.append({"way": f"all modules, {way}", "rows": rows,
                    "pairs": len(res[fast]), "train_mean_ms_per_row": round(mean_ms, 2),
                    "all_modules_core_hours": round(core_hours(res[fast]), 1)})
    print(json.dumps(out, indent=1), flush=True)
    return out


WRITER_SCRIPT = r"""
import json, sys, time
import numpy as np, pyarrow as pa
from pathlib import Path
from cluster.core import load_tokenizer
from pipeline.config import PipelineConfig
from pipeline.job import Totals, write_splits
from pipeline.tokenize_step import TokenizeBatch
from pipeline.validate import prepare_text
from pipeline.write import SHUFFLE_BUCKET_ROWS, UnitWriter
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
buckets = max(1, -(-rows // SHUFFLE_BUCKET_ROWS))
regimes = ["train-easy", "train-medium", "train-hard"]
UNIT = 50_000  # rows per read unit: a Parquet read range or a generator shard
t0, c0 = time.perf_counter(), time.process_time()
summaries, done, unit = [], 0, 0
while done < rows:  # the workers' first step: each unit's rows into its own spill files, a summary back
    w = UnitWriter(out / ".shuffle", unit, strict=False)
    end = min(rows, done + UNIT)
    regime = regimes[min(2, 3 * done // rows)]  # the source's order: easy, then medium, then hard
    while done < end:
        batch = batches[(done // 8192) % len(batches)].slice(0, min(8192, end - done))
        w.add(batch.set_column(batch.schema.get_field_index("regime"), "regime", pa.array([regime] * batch.num_rows)))
        done += batch.num_rows
    summaries.append(json.dumps(w.close()))
    unit += 1
c_units = time.process_time() - c0
c1 = time.process_time()
totals = Totals(len(summaries))  # the driver: add up the summaries (all it does per unit)
for s in summaries:
    totals.add(json.loads(s))
totals.check_complete()
counts = totals.counts()
totals.length_stats()
c_driver = time.process_time() - c1
c2 = time.process_time()
files = write_splits(totals, cfg, out, buckets, run_tasks=lambda fn, calls: [fn(*a) for a in calls])
c_tasks = time.process_time() - c2
total, cpu = time.perf_counter() - t0, time.process_time() - c0
assert counts["rows_in"] == rows, counts
print(json.dumps({"mode": mode, "rows": rows, "units": len(summaries), "buckets": buckets, "write_s": round(total, 2),
                  "cpu_s": round(cpu, 2), "unit_write_cpu_s": round(c_units, 2),
                  "driver_cpu_s": round(c_driver, 3), "scatter_and_parts_cpu_s": round(c_tasks, 2),
                  "driver_rows_per_cpu_s": round(rows / max(c_driver, 1e-6)),
                  "worker_rows_per_cpu_s": round(rows / (c_units + c_tasks)),
                  "summary_bytes_per_unit": round(sum(map(len, summaries)) / len(summaries)),
                  "writer_rows_per_s": round(rows / total),
                  "tokenize_rows_per_s_one_core": round(base / tok_s)}))
"""


def bench_writer(rows: int) -> list[dict]:
    """The pipeline's writing alone (no Ray), fed synthetic tokenized 8,192-row batches in 50k-row read units:
    the workers' side (UnitWriter per unit, then the scatter and part tasks, run here one after another) and
    the driver's side (adding up the units' summaries), in CPU seconds of one fresh process, peak RSS
    measured. Also the same rows' clean + tokenize rate on one core. (Before the workers wrote, the driver
    did all of it: main's `OutputWriter`, measured by this benchmark's earlier version; bench/RESULTS.md.)"""
    out = OUT / "writer_out"
    shutil.rmtree(out, ignore_errors=True)
    r = measure([PY, "-c", WRITER_SCRIPT, str(rows), "workers", str(out)], env={"PYTHONPATH": str(ROOT)})
    res = {"way": "workers write, driver adds summaries", **json.loads(r["tail"][0]), "wall_s": r["wall_s"],
           "peak_rss_mib": r["peak_rss_mib"]}
    res["rows_per_s"] = res["writer_rows_per_s"]
    print(json.dumps(res), flush=True)
    return [res]


def bench_driver(rows: int) -> list[dict]:
    """`python -m pipeline` over a synthetic Parquet source (train files of 50k rows in linear_1d's style,
    already clean, plus 10k test rows; char tokenizer): the driver process's own CPU seconds per row, the
    number that limits a large cluster when the driver writes. Run it from a checkout of the code to compare
    (the fixture is made once per checkout in its bench/out/)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = OUT / f"synthetic_{rows}"
    if not (src / "done").exists():
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i, start in enumerate(range(0, rows + TEST_ROWS, 50_000)):
            n = min(50_000, rows + TEST_ROWS - start)
            a, b, c = (rng.integers(-999, 999, n) for _ in range(3))
            q = [f"Solve {x}*v + {y} = {z}*v - {x + y} for v." for x, y, z in zip(a, b, c, strict=True)]
            ans = [str(int(x)) for x in rng.integers(-30, 30, n)]
            name = f"test-{i:05d}.parquet" if start >= rows else f"train-{i:05d}.parquet"
            pq.write_table(pa.table({"question": q, "answer": ans}), src / name)
        (src / "done").write_text("")
    out = OUT / "driver_out"
    shutil.rmtree(out, ignore_errors=True)
    r = measure([PY, "-m", "pipeline", "--source", str(src), "--tokenizer", "char", "--output", str(out),
                 "--address", "local"], env={"HF_HUB_OFFLINE": "1"})
    manifest = json.loads((out / "manifest.json").read_text())
    res = {"way": "python -m pipeline, driver CPU", "rows": manifest["rows_in"], **r, "rows_per_s":
           round(manifest["rows_in"] / r["wall_s"]), "driver_rows_per_cpu_s": round(manifest["rows_in"] / r["driver_cpu_s"]),
           "timings_s": manifest["timings_s"]}
    print(json.dumps(res), flush=True)
    return [res]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="*", default=[200_000], help="file-source sizes (rows)")
    p.add_argument("--gen-rows", type=int, default=0, help="rows for the generator comparison (0 = skip)")
    p.add_argument("--writer-rows", type=int, default=0, help="rows for the writing benchmark (0 = skip)")
    p.add_argument("--driver-rows", type=int, default=0, help="rows for the driver-CPU run (0 = skip)")
    p.add_argument("--module-rows", type=int, default=0,
                   help="rows per module x regime for the per-module generator cost (0 = skip)")
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
    if args.driver_rows:
        results += bench_driver(args.driver_rows)
    if args.module_rows:
        results += bench_modules(args.module_rows)
    info["load_avg_end"] = os.getloadavg()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"pipeline_bench_{int(time.time())}.json"
    path.write_text(json.dumps({"info": info, "results": results}, indent=1))
    print("| rows | tokenizer | way | wall s | rows/s | x vs num_proc=2 | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in (r for r in results if "wall_s" in r):  # the per-module table printed its own
        print(f"| {r['rows']} | {r.get('tokenizer', '-')} | {r['way']} | {r['wall_s']} | {r['rows_per_s']} | "
              f"{r.get('speedup_vs_num_proc_2', r.get('speedup'))} | {r['peak_rss_mib']} |")
    print(json.dumps(info), f"-> {path}")


if __name__ == "__main__":
    main()
