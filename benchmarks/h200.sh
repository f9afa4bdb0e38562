#!/usr/bin/env bash
# One call on the H200: the whole test suite (GPU-marked tests included), `ioattn check`, then
# the benchmark. Logs and results go to $OUT; a short summary is printed last.
# Each step has a time limit (env vars below) so one slow step cannot eat the whole lease.
set -u
OUT=${OUT:-/tmp/ioattn_out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
TEST_S=${TEST_S:-300}
CHECK_S=${CHECK_S:-120}
BENCH_S=${BENCH_S:-200}
SEQLENS=${SEQLENS:-1024,2048,4096,8192,16384}
# Suites to time, in order; SEQLENS applies to the paper suite, the others keep their own grid.
BENCH_SUITES=${BENCH_SUITES:-paper}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
# A hung test is killed and named (pytest-timeout) instead of eating the whole step.
PTIMEOUT=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 200")
# -v logs each test's outcome as it ends, so a run cut short by the limit still names what failed;
# -rfE repeats the failures in the summary.
timeout "$TEST_S" python3 -m pytest -v -rfE --durations=15 $XDIST $PTIMEOUT -p no:cacheprovider -p no:benchmark \
    --junitxml="$OUT/junit.xml" tests > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest.log"
timeout "$CHECK_S" python3 -m ioattn check > "$OUT/check.log" 2>&1
echo "check rc=$?" >> "$OUT/check.log"
: > "$OUT/bench.log"
for suite in $BENCH_SUITES; do
    if [ "$suite" = paper ]; then lens="--seqlens $SEQLENS"; else lens=""; fi
    timeout "$BENCH_S" python3 -m ioattn bench --suite "$suite" $lens --out "$OUT" >> "$OUT/bench.log" 2>&1
    echo "bench $suite rc=$?" >> "$OUT/bench.log"
done
cat "$OUT/gpu.txt"; grep -E "FAILED|ERROR|passed|failed|rc=" "$OUT/pytest.log" | tail -n 30
tail -n 25 "$OUT/check.log"; tail -n 80 "$OUT/bench.log"
