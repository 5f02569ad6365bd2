#!/bin/bash
# The serving benchmark with py-spy on the servers during chosen phases (device call; see device_serving.sh):
#   bash bench/device_profile.sh [--install] SECONDS TRIGGER=TARGET [TRIGGER=TARGET ...] -- SERVING_ARGS...
# Runs bench/device_serving.sh in the background (results to $OUT/run). Each time its log gets a
# line containing TRIGGER (e.g. "ours:12 photos/poisson@12: ok", after which the next phase
# starts), py-spy records SECONDS of TARGET with its subprocesses (vLLM's engine core too):
# TARGET is "inference" or "preprocess" (our tiers) or "bench" (the benchmark process, where the
# ceiling's AsyncLLM lives). Collapsed stacks go to $OUT/prof/<TARGET>.txt.
set -u
install=(); [ "${1:-}" = "--install" ] && { install=(--install); shift; }
secs=$1; shift
triggers=()
while [ "$1" != "--" ]; do triggers+=("$1"); shift; done
shift
mkdir -p "$OUT/run" "$OUT/prof"
OUT="$OUT/run" bash bench/device_serving.sh "${install[@]}" "$@" > /tmp/serving.log 2>&1 &
bench=$!
spy=/tmp/site/bin/py-spy
for t in "${triggers[@]}"; do
  line=${t%=*} target=${t##*=}
  until grep -q -- "$line" /tmp/serving.log 2>/dev/null || ! kill -0 $bench 2>/dev/null; do sleep 0.3; done
  case $target in
    bench) pid=$(pgrep -f "bench/serving.py" | head -1) ;;
    *) pid=$(pgrep -f "kimivl.cli serve $target" | head -1) ;;
  esac
  [ -n "$pid" ] && $spy record --pid "$pid" --subprocesses --threads --nonblocking -r 100 -d "$secs" -f raw \
      -o "$OUT/prof/$target.txt" > "/tmp/spy-$target.log" 2>&1 &
done
wait $bench; rc=$?
wait
tail -q -n 2 /tmp/spy-*.log
grep -v "built \|Capturing\|it/s\]" /tmp/serving.log | grep "serving \|^|\|Running" | cut -c1-400 | tail -70
exit $rc
