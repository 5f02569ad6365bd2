#!/bin/bash
# The serving benchmark with py-spy on our tiers during one phase (device call; carry .gpu, .whl):
#   bash bench/device_profile.sh [--install] AFTER_LINE SECONDS SERVING_ARGS...
# Runs bench/device_serving.sh in the background (results to $OUT/run); once its log has a line
# containing AFTER_LINE (e.g. "idle/sequential: ok"), records SECONDS of the inference tier (and
# its engine core, --subprocesses) and of the front door with py-spy, as collapsed stacks in
# $OUT/prof/{inference,preprocess}.txt (fold them with any flame-graph tool, or read the top).
set -u
install=(); [ "${1:-}" = "--install" ] && { install=(--install); shift; }
after=$1 secs=$2; shift 2
mkdir -p "$OUT/run" "$OUT/prof"
OUT="$OUT/run" bash bench/device_serving.sh "${install[@]}" "$@" > /tmp/serving.log 2>&1 &
bench=$!
until grep -q -- "$after" /tmp/serving.log 2>/dev/null || ! kill -0 $bench 2>/dev/null; do sleep 0.5; done
spy=/tmp/site/bin/py-spy
for tier in inference preprocess; do
  pid=$(pgrep -f "kimivl.cli serve $tier" | head -1)
  [ -n "$pid" ] && $spy record --pid "$pid" --subprocesses --threads --nonblocking -r 100 -d "$secs" -f raw \
      -o "$OUT/prof/$tier.txt" > "/tmp/spy-$tier.log" 2>&1 &
done
wait $bench; rc=$?
wait
cat /tmp/spy-*.log | tail -5
grep -v "built \|Capturing\|it/s\]" /tmp/serving.log | grep "serving \|^|\|Running" | tail -60
exit $rc
