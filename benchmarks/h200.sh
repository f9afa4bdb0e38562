#!/usr/bin/env bash
# One call on the H200: the whole test suite (GPU-marked tests included), `ioattn check`, the
# benchmark suites, then the kernels' first-call compile cost. Results go to $OUT in at most
# 2 logs + one JSON per suite + one compile-cost JSON (the files that come back are counted);
# a short summary is printed last.
# Each step has a time limit (env vars below; 0 skips the step) so one slow step cannot eat the
# whole lease; a bench suite stopped by its limit still reports and writes what it measured.
# FA4 joins the peers when its wheels were carried along (benchmarks/fa4_setup.sh says how).
set -u
OUT=${OUT:-/tmp/ioattn_out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
TEST_S=${TEST_S:-420}
CHECK_S=${CHECK_S:-120}
BENCH_S=${BENCH_S:-200}
COMPILE_S=${COMPILE_S:-150}
SEQLENS=${SEQLENS:-1024,2048,4096,8192,16384}
# Suites to time, in order, each NAME, NAME:SECONDS (its own limit instead of BENCH_S) or
# NAME:SECONDS:PEERS (its own peers instead of PEERS); SEQLENS applies to the paper suite, the
# others keep their own grid.
BENCH_SUITES=${BENCH_SUITES:-paper}
# Comma-separated peers (ioattn first); empty = the GPU default of `ioattn bench`
PEERS=${PEERS:-}
# What pytest runs (e.g. "-m gpu tests" for the GPU-marked tests only)
TEST_ARGS=${TEST_ARGS:-tests}
# Set PLOTS=1 for a PNG per suite too (each is one more file to bring back)
PLOTS=${PLOTS:-0}
LOG="$OUT/run.log"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,driver_version --format=csv > "$LOG" 2>&1
. benchmarks/fa4_setup.sh >> "$LOG" 2>&1
python3 -c "import flash_attn.cute; print('fa4: flash_attn.cute imports')" 2>&1 | tail -n 1 >> "$LOG"

if [ "$TEST_S" -gt 0 ]; then
    XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
    # A hung test is killed and named (pytest-timeout) instead of eating the whole step.
    PTIMEOUT=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 200")
    # -v logs each test's outcome as it ends, so a run cut short by the limit still names what
    # failed; -rfE repeats the failures in the summary.
    timeout "$TEST_S" python3 -m pytest -v -rfE --durations=15 $XDIST $PTIMEOUT -p no:cacheprovider \
        -p no:benchmark $TEST_ARGS > "$OUT/pytest.log" 2>&1
    echo "pytest rc=$?" >> "$OUT/pytest.log"
fi
if [ "$CHECK_S" -gt 0 ]; then
    echo "== ioattn check" >> "$LOG"
    timeout "$CHECK_S" python3 -m ioattn check >> "$LOG" 2>&1
    echo "check rc=$?" >> "$LOG"
fi
plot=$([ "$PLOTS" = 1 ] || echo "--no-plot")
for entry in $BENCH_SUITES; do
    [ "$BENCH_S" -gt 0 ] || break
    IFS=: read -r suite limit suite_peers <<< "$entry"
    limit=${limit:-$BENCH_S}
    suite_peers=${suite_peers:-$PEERS}
    peers=${suite_peers:+--peers $suite_peers}
    if [ "$suite" = paper ]; then lens="--seqlens $SEQLENS"; else lens=""; fi
    echo "== bench $suite (limit $limit s)" >> "$LOG"
    # SIGTERM at the limit: the suite reports what finished; SIGKILL 30 s later if it hangs
    timeout -k 30 "$limit" python3 -m ioattn bench --suite "$suite" $lens $peers $plot \
        --out "$OUT" >> "$LOG" 2>&1
    echo "bench $suite rc=$?" >> "$LOG"
done
if [ "$COMPILE_S" -gt 0 ]; then
    echo "== compile cost" >> "$LOG"
    # Two child processes (cold cache, then warm) share the limit, with a margin for the parent
    timeout -k 30 "$COMPILE_S" python3 -m ioattn bench --compile-cost --suite paper --seqlens "$SEQLENS" \
        --compile-timeout $(( (COMPILE_S - 20) / 2 )) --out "$OUT" >> "$LOG" 2>&1
    echo "compile-cost rc=$?" >> "$LOG"
fi
[ -f "$OUT/pytest.log" ] && grep -E "FAILED|ERROR|passed|failed|rc=" "$OUT/pytest.log" | tail -n 30
# The digest: each step's verdict, each suite's summary and bar, the compile cost (the tables
# are in run.log and the JSON files)
awk '/^== (bench|compile|ioattn check)/ { print; sec = $0; next }
     /^[0-9]+\/[0-9]+ passed|rc=|^peer .* not run|^suite |^interrupted|^fa4/ { print; next }
     /^== summary/ { on = 1 }
     /^wrote / { print; on = 0; next }
     on || sec ~ /^== compile/ { print }' "$LOG"
