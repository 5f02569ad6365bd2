#!/bin/bash
# Device side: reassemble the payload parts in /tmp/stage, check them against the sha256 the build
# wrote (.gpu/payload.sha256, carried), install into /tmp/site, check imports (~35 s).
# Usage (from the repo root on the device): bash bench/gpu/device_install.sh
set -eu -o pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
STAGE=/tmp/stage; SITE=/tmp/site
SHA=${PAYLOAD_SHA256:-.gpu/payload.sha256}
[ -f "$SHA" ] || SHA=$HERE/payload.sha256   # a copy of this script inside .gpu/ (older layout)
mkdir -p $STAGE
for d in .stage_a .stage_b .stage_c .stage_d; do
  if [ -d "$d" ] && ls $d/payload.tar.xz.part_* >/dev/null 2>&1; then mv -f $d/payload.tar.xz.part_* $STAGE/; fi
done
ls -la $STAGE
t0=$(date +%s.%N)
cat $STAGE/payload.tar.xz.part_* | sha256sum -c "$SHA"
rm -rf $STAGE/w && mkdir -p $STAGE/w
cat $STAGE/payload.tar.xz.part_* | python3 -c "import sys,tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('$STAGE/w')"
t1=$(date +%s.%N)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE $STAGE/w/*.whl
t2=$(date +%s.%N)
export PYTHONPATH=$SITE
python3 - <<'PY'
import time; t=time.time()
import vllm
from vllm.v1.engine.async_llm import AsyncLLM
from vllm import LLM
import vllm.model_executor.models.kimi_vl
import vllm.vllm_flash_attn as fa
from vllm import _custom_ops
import torch
print("IMPORT OK vllm", vllm.__version__, "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0), "FA3", fa.is_fa_version_supported(3), f"{time.time()-t:.1f}s")
PY
t3=$(date +%s.%N)
python3 -c "print('unpack %.1fs pip %.1fs import %.1fs' % ($t1-$t0, $t2-$t1, $t3-$t2))"
