#!/usr/bin/env bash
# make gpu-pack: build .gpu/, everything bench/gpu_check.sh needs on a lent GPU machine that has no Ray
# and no network (Python 3.12, torch, transformers, pyarrow, pandas, numpy, sympy, absl-py, click,
# filelock, msgpack, protobuf, pyyaml, requests, aiohttp, grpcio already there: /work/.library/device).
# Run it here (needs PyPI); the device tool then carries .gpu/ (`carry: [".gpu"]`, 64 MiB limit).
#
# .gpu/ray.tar.xz  ray 2.60.0's cp312 manylinux wheel, unzipped, minus ray/jars (Java, 33 MB) and
#                  ray/rllib (8 MB), xz -9: the whole wheel (79 MB) is over the carry limit.
# .gpu/wheels/     the small wheels `import ray.data, ray.train.torch` and the project need that the
#                  image lacks, pinned to the versions the dev venv runs (one version each: two stop
#                  pip --no-index).
# .gpu/t5-tokenizer/  flan-t5's tokenizer files (2.2 MB), if $T5_TOKENIZER (default /work/shared/...) exists.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$(if [ -x .venv/bin/python ]; then echo .venv/bin/python; else echo python3; fi)}
OUT=.gpu
CACHE=.gpu-cache   # the 79 MB ray wheel stays out of what travels
LIMIT_MIB=60
# pip matches manylinux tags exactly: list the ones these wheels use.
PLAT="--python-version 3.12 --implementation cp --only-binary=:all: --no-deps
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
SMALL=(
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0                 # pydantic 2.14 needs >= 4.16; the image's may be older
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  tensorboardX==2.6.5                       # ray.train's tune layer imports it
  mathematics_dataset==1.0.1                # DeepMind's generator (py2.py3 wheel; absl/numpy/six/sympy are there)
)
rm -rf "$OUT/wheels" && mkdir -p "$OUT/wheels" "$CACHE"
# shellcheck disable=SC2086
"$PY" -m pip download -q $PLAT -d "$CACHE" ray==2.60.0
# shellcheck disable=SC2086
"$PY" -m pip download -q $PLAT -d "$OUT/wheels" "${SMALL[@]}"
n=$(ls "$OUT/wheels" | wc -l)
[ "$n" -eq "${#SMALL[@]}" ] || { echo "gpu-pack: expected ${#SMALL[@]} wheels in $OUT/wheels, found $n (stale files?)"; exit 1; }

rm -rf "$OUT/unz" && mkdir -p "$OUT/unz"
# unzip, not python -m zipfile: it keeps the exec bits of gcs_server, raylet and the other binaries.
unzip -q "$CACHE"/ray-2.60.0-cp312-*.whl -d "$OUT/unz"
# Java jars, RLlib, and the dashboard's web client (the device run starts Ray without a dashboard).
rm -rf "$OUT/unz/ray/jars" "$OUT/unz/ray/rllib" "$OUT/unz/ray/dashboard/client/build"
test -f "$OUT/unz/ray/__init__.py" && test -f "$OUT/unz/ray/data/__init__.py" && test -d "$OUT/unz/ray/train/torch"
test -x "$OUT/unz/ray/core/src/ray/gcs/gcs_server" && test -x "$OUT/unz/ray/core/src/ray/raylet/raylet"
XZ_OPT=-9 tar -C "$OUT/unz" -cJf "$OUT/ray.tar.xz" .
rm -rf "$OUT/unz"

# Optional: flan-t5's tokenizer, to check real-token shapes by hand on the device (the benchmarks use the
# lengths embedded in bench/flops.py and do not need it).
T5_TOKENIZER=${T5_TOKENIZER:-/work/shared/t5-tokenizer}
rm -rf "$OUT/t5-tokenizer"
if [ -d "$T5_TOKENIZER" ]; then cp -r "$T5_TOKENIZER" "$OUT/t5-tokenizer"; fi

total=$(du -cb "$OUT" | tail -1 | cut -f1)
mib=$((total / 1048576))
ls -la "$OUT" "$OUT/wheels"
echo "gpu-pack: $OUT holds $mib MiB to carry (limit $LIMIT_MIB; the device tool carries at most 64 MiB with the tree)"
[ "$mib" -lt "$LIMIT_MIB" ] || { echo "gpu-pack: $OUT is too big to carry"; exit 1; }
