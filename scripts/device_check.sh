#!/usr/bin/env bash
# One command that checks sgdnoise on a device and writes everything under $OUT (issue 15).
#
#   OUT=/tmp/check scripts/device_check.sh            # CUDA: paper profile, seeds 0 1 2
#   DEVICE=cpu OUT=/tmp/check scripts/device_check.sh # CPU: smoke sizes, under 5 minutes
#
# Writes, on both devices (the same set of files):
#   $OUT/tests.log, $OUT/tests.xml    the device-parity tests (the `device` fixture: CUDA when
#                                     present), among them the batched-engine equivalence tests
#   $OUT/bench/engine.json            batched engine vs per-dynamics loop (ratio in one run)
#   $OUT/fashion/                     `sgdnoise fashion --seeds 0 1 2` run directory: results,
#                                     figures and report (`sgdnoise plot`)
#   $OUT/status.txt                   one line per step: its name, exit status and seconds
# On CUDA `make bench` (every bench/bench_*.py, GPU sizes) adds its JSON files to $OUT/bench/.
# The exit status is 0 when every step passed.
set -u
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-device_check}
VENV=${VENV:-.venv}
mkdir -p "$OUT/bench"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/status.txt"
failed=0

step() {  # step NAME COMMAND...: run, log its status and time, go on after a failure
    local name=$1 start rc
    shift
    start=$(date +%s)
    "$@"
    rc=$?
    echo "$name rc=$rc seconds=$(( $(date +%s) - start ))" | tee -a "$OUT/status.txt"
    [ "$rc" -eq 0 ] || failed=1
}

if [ "$DEVICE" = cpu ]; then
    PROFILE=smoke
    BENCH_ENGINE=(--n 64 --steps 3 --seeds 1)
else
    PROFILE=paper
    BENCH_ENGINE=(--n 1200 --steps 30 --seeds 3)
fi
[ -x "$VENV/bin/python" ] || make venv VENV="$VENV" >"$OUT/venv.log" 2>&1
PY=$VENV/bin/python

step tests "$PY" -m pytest -q tests/test_engine.py tests/test_engine_fashion.py tests/test_lockstep.py --junitxml "$OUT/tests.xml" \
    >"$OUT/tests.log" 2>&1
if [ "$DEVICE" != cpu ]; then
    step make_bench "$PY" bench/run_all.py --device "$DEVICE" --out "$OUT/bench" \
        >"$OUT/bench/run_all.log" 2>&1
fi
# after make_bench, whose engine.json (default sizes) this one replaces
step bench_engine "$PY" bench/bench_engine.py --device "$DEVICE" --out "$OUT/bench/engine.json" \
    "${BENCH_ENGINE[@]}" >"$OUT/bench/engine.log" 2>&1
step fashion "$VENV/bin/sgdnoise" fashion --profile "$PROFILE" --seeds 0 1 2 --device "$DEVICE" \
    --out "$OUT/fashion" --no-progress >"$OUT/fashion.log" 2>&1
step plot "$VENV/bin/sgdnoise" plot "$OUT/fashion" >"$OUT/plot.log" 2>&1
exit "$failed"
