#!/usr/bin/env bash
# The GPU device check, in two calls on one lent machine (`make gpu-check` prints how to invoke it):
#
#   bash bench/gpu_check.sh 1   setup; `python -m pipeline` generates the speedrun's 2M rows on the
#                               node's CPUs in the background while the GPU runs `pytest -m gpu`, the
#                               flan-t5-large training bench (eager micro-batch sweep, compiled 512/1024), the
#                               speedrun model's step-rate probe (its optimizer and AdamW side by
#                               side), the length-bucketed bench; then the 10k-row eval bench. <= 380 s
#   bash bench/gpu_check.sh 2   the speedrun: `python -m train --max-time-s S` (S s of training steps:
#                               what the call's deadline leaves, at most the config's 300) and
#                               `python -m eval` on the 10k interpolate rows. <= 420 s (or the deadline)
#   bash bench/gpu_check.sh all --dry-run   both, at toy sizes on this CPU machine with the dev venv's
#                               Ray, the image's missing packages blocked (tests the script, not a GPU)
#
# The device image has Python 3.12, torch, transformers, pyarrow, ... but no Ray and no network:
# bench/gpu_pack.sh (`make gpu-pack`, run here) builds .gpu/ (Ray unzipped and xz'd, the small wheels it
# needs, mathematics_dataset, flan-t5's tokenizer), which the first call carries. Part 2 reuses what part
# 1 unpacked and generated (ignored folders stay on a warm machine); if the machine was recycled between
# the calls it says so and stops. To fit what is left of a session's device time:
#   GPU_CHECK_DEADLINE=S        end this call's steps by S seconds (default: part 1 380, part 2 420)
#   GPU_CHECK_TRAIN_SECONDS=S   the speedrun's seconds of training steps (train.max_time_s); by default
#                               the deadline less ~165 s (the run's start-up, validation and export, the
#                               eval, a margin: measured 2026-11-27), between 60 and 300
#   GPU_CHECK_STEPS=N           the speedrun trains N steps instead of a time
#   GPU_CHECK_SKIP="name ..."   steps left out (e.g. benches already measured by an earlier call)
# Every step has its own time limit, so one hang cannot eat the budget; a failed step is recorded and the
# others still run. Numbers, with card, date and versions, go to $OUT/RESULTS.md (bench/RESULTS.md + this run's sections); logs and raw JSON beside it.
set -uo pipefail
PART=${1:?usage: bash bench/gpu_check.sh 1|2|all [--dry-run]}
DRY=0; [ "${2:-}" = "--dry-run" ] && DRY=1
ROOT=$(cd "$(dirname "$0")/.." && pwd); cd "$ROOT" || exit 2
STATE=$ROOT/outputs/gpu-check          # ignored: survives between the two calls on a warm machine
SITE=$STATE/site                       # Ray + wheels, unpacked
LOGS=$STATE/logs
RES=$STATE/gpu-results.md              # this run's sections, accumulated over both parts
OUTDIR=${OUT:-$STATE/out}              # $OUT on the device machine: what comes back (<= 8 files)
SPEED=outputs/speedrun
mkdir -p "$LOGS" "$OUTDIR"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

say() { echo "[gpu-check $(date -u +%H:%M:%S)] $*"; }

# The device tool stops a call at 600 s: each step gets its own limit or what is left before DEADLINE,
# whichever is less, and a step with under 20 s left is skipped, so the results are written in time.
# Part 1 + part 2 + two start-ups/transfers (~30 s each, measured 2026-11-27) fit a session's 900 s.
DEADLINE=${GPU_CHECK_DEADLINE:-$(if [ $DRY -eq 1 ]; then echo 3600; elif [ "$PART" = 1 ]; then echo 380;
                                 elif [ "$PART" = 2 ]; then echo 420; else echo 560; fi)}

# step NAME TIMEOUT_S CMD...: run with a hard limit, log to $LOGS/NAME.log, record rc and seconds.
step() {
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS rc left=$((DEADLINE - SECONDS))
    if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then   # GPU_CHECK_SKIP="a b": steps left out this call
        say "$name SKIPPED: named in GPU_CHECK_SKIP"
        printf '%s\tskipped\t0\n' "$name" >>"$STATE/steps.tsv"
        return 99
    fi
    if [ $left -lt 20 ]; then
        say "$name SKIPPED: ${left}s left of this call"
        printf '%s\tskipped\t0\n' "$name" >>"$STATE/steps.tsv"
        return 99
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    say "$name (limit ${limit}s): $*"
    timeout --kill-after=15 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && say "$name TIMED OUT after ${limit}s"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$STATE/steps.tsv"
    say "$name rc=$rc in $((SECONDS - t0)) s; last lines:"; tail -n 4 "$LOGS/$name.log" | sed 's/^/    /'
    publish
    return $rc
}

publish() {  # what comes back: RESULTS.md, one log per part, the raw JSON (after every step: a call
             # stopped from outside still returns what was done)
    {
        cat bench/RESULTS.md
        echo; cat "$RES" 2>/dev/null
        echo; echo "Steps (name, exit code, seconds):"; echo '```'; cat "$STATE/steps.tsv" 2>/dev/null; echo '```'
    } >"$OUTDIR/RESULTS.md"
    # head and tail of each log: the start says how far a step got, the end why it stopped
    for f in "$LOGS"/*.log; do
        echo "===== $f"
        if [ "$(wc -l <"$f")" -le 260 ]; then cat "$f"; else head -n 60 "$f"; echo "[...]"; tail -n 200 "$f"; fi
    done >"$OUTDIR/part$PART.log" 2>/dev/null
    cp "$STATE"/train_bench.jsonl "$STATE"/eval_bench.json "$OUTDIR"/ 2>/dev/null
    cp "$SPEED/train/summary.json" "$OUTDIR/speedrun_summary.json" 2>/dev/null
    cp "$SPEED/train/metrics.jsonl" "$OUTDIR/speedrun_train_metrics.jsonl" 2>/dev/null
    cp "$SPEED/eval/metrics.json" "$OUTDIR/speedrun_metrics.json" 2>/dev/null
}
trap 'publish; say "results: $OUTDIR/RESULTS.md"' EXIT

if [ "$PART" = 1 ] || [ "$PART" = all ]; then  # a fresh run: forget the last one's numbers
    rm -f "$STATE/steps.tsv" "$STATE"/*.jsonl "$STATE/eval_bench.json"
    {
        echo "## GPU device check ($( [ $DRY -eq 1 ] && echo 'DRY RUN on CPU, toy sizes: not GPU numbers' || echo 'bench/gpu_check.sh'))"
        echo
        echo "$(date -u '+%Y-%m-%d %H:%M UTC'); $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi'); $(nproc) CPUs"
        echo
    } >"$RES"
fi

# ---------- Python with Ray ----------
if [ $DRY -eq 1 ]; then
    PY=${PYTHON:-$(if [ -x .venv/bin/python ]; then echo .venv/bin/python; else echo python3; fi)}
    # The venv's Ray stands in for the carried one. Block what the device image lacks (and we do not
    # carry), so an import the device would fail fails here too. The archive is checked, not used
    # (its Ray is built for Python 3.12).
    tar -xJf .gpu/ray.tar.xz -O ./ray/__init__.py | grep -q "__version__" || { say "no Ray in .gpu/ray.tar.xz: make gpu-pack"; exit 2; }
    mkdir -p "$STATE/dry-block"
    cat >"$STATE/dry-block/sitecustomize.py" <<'EOF'
import sys
BLOCKED = ("aiohttp_cors", "colorful", "opencensus", "opentelemetry", "smart_open", "virtualenv", "distlib",
           "platformdirs", "google.api_core", "google.auth", "proto", "datasets", "evaluate", "dill",
           "multiprocess", "fastapi", "starlette", "uvicorn", "mlflow", "git", "databricks", "cachetools",
           "cryptography", "py_spy")
def _blocked(name):
    return any(name == b or name.startswith(b + ".") for b in BLOCKED)
class _Block:
    def find_spec(self, name, path=None, target=None):
        if _blocked(name):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the GPU image lacks it)")
sys.meta_path.insert(0, _Block())
# Probes (transformers' is_mlflow_available, ...) ask importlib.util.find_spec, which says None when a
# package is absent: say that too, rather than raise.
import importlib.util
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: None if _blocked(name) else _find_spec(name, package)
EOF
    export PYTHONPATH=$STATE/dry-block:$ROOT
else
    PY=${PYTHON:-python3}
    if [ ! -f "$SITE/ray/__init__.py" ]; then
        if [ ! -f .gpu/ray.tar.xz ]; then
            say "no Ray here and no .gpu/ray.tar.xz: run 'make gpu-pack' on the dev machine and call with carry [\".gpu\"]"
            say "(part 2 on a machine that was given back between the calls: run part 1 again)"
            exit 2
        fi
        mkdir -p "$SITE"
        step unpack 120 tar -C "$SITE" -xJf .gpu/ray.tar.xz || exit 2
        step wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" .gpu/wheels/*.whl || exit 2
    fi
    export PYTHONPATH=$ROOT:$SITE
fi
step imports 120 "$PY" -c "import ray, ray.data, ray.train.torch, pydantic, jsonschema, tensorboardX, mathematics_dataset, torch, transformers; print('ray', ray.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 2
cfg() { "$PY" -c "from cluster.config import read_yaml; print(read_yaml('configs/speedrun.yaml')['$1']['$2'])"; }
BATCH=$(cfg train global_batch_size); MODEL=$(cfg train model); OPTIM=$(cfg train optimizer)

# ---------- toy sizes for the dry run (same commands, smaller numbers) ----------
if [ $DRY -eq 1 ]; then
    PIPE_X=(--train-rows-per-regime 600 --test-rows 300 --validation-size 60 --rows-per-shard 300)
    BENCH=(--model t5-tiny --device cpu --precision fp32 --steps 1 --warmup 1 --distinct-batches 2)
    MODEL=t5-tiny; SWEEP=(--micro-batch 4 8); PROBE=(--model "$MODEL" --micro-batch 32 --optimizer "$OPTIM" adamw)
    EVALB=(--rows 200 --variants "--num-actors 1 --cpus-per-actor 1 --torch-threads 2 --no-dashboard")
    TRAIN_X=(--no-use-gpu --model "$MODEL" --precision fp32 --global-batch-size 32 --warmup-steps 5
             --eval-every 50 --ckpt-every 50 --eval-samples 60 --eval-batch-size 60 --log-every 10)
    EVAL_X=(--gpus-per-actor 0 --max-rows 200 --batch-size 100)
    T_PIPE=600; T_TRAIN=600; T_EVAL=300
else
    PIPE_X=(); BENCH=(--steps 15); SWEEP=(--micro-batch 128 256 512); PROBE=(--model "$MODEL" --micro-batch "$BATCH" --optimizer "$OPTIM" adamw)
    # python -m eval outside a config starts Ray with its dashboard, whose packages the image lacks
    EVALB=(--gpu --rows 10000 --skip-baseline
           --variants "--num-actors 1 --gpus-per-actor 1 --cpus-per-actor 1 --no-dashboard")
    TRAIN_X=(); EVAL_X=()
    T_PIPE=330; T_TRAIN=320; T_EVAL=100
fi

# ---------- part 1 ----------
if [ "$PART" = 1 ] || [ "$PART" = all ]; then
    # The speedrun's data on the CPUs, while the GPU runs the benchmarks (separate resources).
    rm -rf "$SPEED"
    step pipeline "$T_PIPE" "$PY" -m pipeline --config configs/speedrun.yaml "${PIPE_X[@]}" &
    PIPE_PID=$!
    step pytest_gpu 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
    [ $? -eq 5 ] && say "no test is marked gpu"
    # --profile 3: where each step's time goes (GPU busy share, kernels per step, top kernels and CPU ops)
    step train_bench_eager 150 "$PY" -m bench.train_gpu_bench "${BENCH[@]}" "${SWEEP[@]}" --profile 3 \
        --json-out "$STATE/train_bench.jsonl"
    if [ $DRY -eq 0 ]; then
        # Compiled blocks keep ~0.42x eager's activations (23.2 GiB at 256, measured): 512 and 1024 fit an
        # 80 GB card compiled (67 GiB planned at 1024), and a host-bound step gains from every row it adds.
        # One compilation (dynamic shapes) serves both sizes; the step measured 113 s with one size.
        step train_bench_compiled 180 "$PY" -m bench.train_gpu_bench --compile "${BENCH[@]}" --micro-batch 512 1024 \
            --profile 3 --json-out "$STATE/train_bench.jsonl"
    fi
    step speedrun_probe 90 "$PY" -m bench.train_gpu_bench "${BENCH[@]}" "${PROBE[@]}" --lengths char --profile 3 \
        --json-out "$STATE/probe.jsonl"
    step train_bench_bucketed 90 "$PY" -m bench.train_gpu_bench --bucket "${BENCH[@]}" "${SWEEP[@]:0:1}" \
        "${SWEEP[@]: -1}" --json-out "$STATE/train_bench.jsonl"
    "$PY" -m bench.gpu_report train "$RES" "$STATE/train_bench.jsonl" >/dev/null
    "$PY" -m bench.gpu_report train "$RES" "$STATE/probe.jsonl" \
        --title "Speedrun model's bare step rate ($MODEL, char lengths)" >/dev/null
    say "waiting for the pipeline"; wait "$PIPE_PID"
    # After the pipeline: both start a local Ray, and the eval bench wants the CPUs for its own.
    rm -rf "$STATE/eval-bench"
    step eval_bench 200 "$PY" -m bench.eval_bench "${EVALB[@]}" --workdir "$STATE/eval-bench" --json "$STATE/eval_bench.json"
    "$PY" -m bench.gpu_report eval "$RES" "$STATE/eval_bench.json" >/dev/null
    rm -rf "$STATE/eval-bench"   # 3 GB of random weights
fi

# ---------- part 2: the speedrun ----------
if [ "$PART" = 2 ] || [ "$PART" = all ]; then
    if [ ! -f "$SPEED/data/manifest.json" ]; then
        say "no speedrun data in $SPEED/data (part 1 not run on this machine, or its pipeline failed): run part 1"
        exit 2
    fi
    # A fixed time of training steps (train.max_time_s: the run ends where it is spent, the LR decay with
    # it), what this call can give; or GPU_CHECK_STEPS steps.
    if [ -n "${GPU_CHECK_STEPS:-}" ]; then
        LENGTH=(--max-steps "$GPU_CHECK_STEPS" --max-time-s none)
    else
        if [ -n "${GPU_CHECK_TRAIN_SECONDS:-}" ]; then TS=$GPU_CHECK_TRAIN_SECONDS
        elif [ $DRY -eq 1 ]; then TS=20
        else  # around the training seconds: ~75 s of start-up, validation and export, ~65 s of eval (measured)
            TS=$((DEADLINE - SECONDS - 165)); TS=$((TS > 300 ? 300 : TS < 60 ? 60 : TS))
        fi
        LENGTH=(--max-time-s "$TS"); T_TRAIN=$((TS + 120))
    fi
    say "speedrun length: ${LENGTH[*]}"
    rm -rf "$SPEED/train" "$SPEED/eval"
    step speedrun_train "$T_TRAIN" "$PY" -m train --config configs/speedrun.yaml "${LENGTH[@]}" "${TRAIN_X[@]}"
    step speedrun_eval "$T_EVAL" "$PY" -m eval --config configs/speedrun.yaml "${EVAL_X[@]}"
    "$PY" -m bench.gpu_report speedrun "$RES" "$SPEED/data" "$SPEED/train" "$SPEED/eval" --probe "$STATE/probe.jsonl" >/dev/null
fi
