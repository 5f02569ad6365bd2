#!/bin/bash
# One device call of the serving benchmark on the lent GPU machine, from the repo root, after the
# two staging calls of bench/gpu/README.md:
#   bash bench/device_serving.sh [--install] SERVING_ARGS...
# --install (the call right after staging; carry [".stage_c", ".gpu", ".whl"]): unpacks vLLM 0.26
#   into /tmp/site (bench/gpu/device_install.sh) and installs .whl/ (the wheels vllm serve needs,
#   grpcio 1.85, py-spy and this project's wheel: bench/gpu/fetch_wheels.sh). Later calls on the
#   same machine (within 30 s of the last) carry nothing and leave --install out.
# --engine-probe (after --install, if both): bench/engine_probe/ in every process (what reaches each
#   engine core, its steps and its threads' CPU); adds $OUT/engine-probe.md (bench/engine_probe_report.py
#   over the photo phases) and $OUT/engine-probe.tar.gz (the raw files): 8 files come back in all.
# Results go to $OUT (results.json, summary.md, ttft/throughput/itl.png, servers.log).
set -eu -o pipefail
t0=$(date +%s)
install=0 probe=0
[ "${1:-}" = "--install" ] && { install=1; shift; }
[ "${1:-}" = "--engine-probe" ] && { probe=1; shift; }
if [ $install = 1 ]; then
  bash bench/gpu/device_install.sh
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
elif [ ! -d /tmp/site/vllm ]; then
  echo "no vLLM in /tmp/site: this is a fresh machine (the last one went back); stage again (bench/gpu/README.md)"
  exit 3
fi
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
       VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
[ -f /tmp/kimivl/config.json ] || python3 bench/gpu/build_model_dir.py /tmp/kimivl > /dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "setup $(( $(date +%s) - t0 )) s"
if [ $probe = 0 ]; then
  python3 bench/serving.py --model /tmp/kimivl --out "$OUT" "$@"
  exit
fi
rm -rf /tmp/engine-probe
rc=0
PYTHONPATH=$PWD/bench/engine_probe:/tmp/site KIMIVL_ENGINE_PROBE_DIR=/tmp/engine-probe \
  python3 bench/serving.py --model /tmp/kimivl --out "$OUT" "$@" || rc=$?
python3 bench/engine_probe_report.py "$OUT/results.json" /tmp/engine-probe --phase 'photos/.*' \
  --out "$OUT/engine-probe.md" > /dev/null || echo "engine probe report failed"
tar -C /tmp -czf "$OUT/engine-probe.tar.gz" engine-probe
head -c 6000 "$OUT/engine-probe.md"
exit $rc
