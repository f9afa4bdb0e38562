#!/usr/bin/env bash
# One call on the H200: the whole test suite (GPU-marked tests included), `ioattn check`, then
# the benchmark. Logs and results go to $OUT (and benchmarks/results/ in the tree there);
# a short summary is printed last. Budget per step is set by the env vars below.
set -u
OUT=${OUT:-/tmp/ioattn_out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
TEST_S=${TEST_S:-240}
BENCH_S=${BENCH_S:-200}
SEQLENS=${SEQLENS:-1024,2048,4096,8192,16384}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
timeout "$TEST_S" python3 -m pytest -q $XDIST -p no:cacheprovider tests > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest.log"
timeout 60 python3 -m ioattn check > "$OUT/check.log" 2>&1
echo "check rc=$?" >> "$OUT/check.log"
timeout "$BENCH_S" python3 -m ioattn bench --suite paper --seqlens "$SEQLENS" --out "$OUT" > "$OUT/bench.log" 2>&1
echo "bench rc=$?" >> "$OUT/bench.log"
cat "$OUT/gpu.txt"; tail -n 15 "$OUT/pytest.log"; tail -n 25 "$OUT/check.log"; tail -n 60 "$OUT/bench.log"
