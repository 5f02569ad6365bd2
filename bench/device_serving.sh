#!/bin/bash
# One device call of the serving benchmark on the lent GPU machine, after the vLLM 0.26 payload
# is staged (shared/gpu/README.md: .stage_a/.stage_b in the first two calls). Run from the repo
# root; carry .gpu and .whl (and .stage_c in the call that installs):
#   bash bench/device_serving.sh [--install] SERVING_ARGS...
# --install unpacks the payload (.gpu/device_install.sh) and the wheels vllm serve needs (.whl).
# Results go to $OUT (results.json, summary.md, plots, servers.log).
set -eu -o pipefail
if [ "${1:-}" = "--install" ]; then
  shift
  bash .gpu/device_install.sh
  # vllm serve's extra wheels, grpcio 1.85 (the generated stubs need it; the image has 1.84), the
  # health/reflection services, py-spy and this project's wheel (pip wheel --no-deps -w .whl .)
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
       VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
[ -f /tmp/kimivl/config.json ] || python3 .gpu/build_model_dir.py /tmp/kimivl > /dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 bench/serving.py --model /tmp/kimivl --out "$OUT" "$@"
