"""Command-line options and presets of `kimivl serve inference`.

Kept free of vLLM/torch imports so `--help` is instant and the k8s manifests can be
checked against it.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from kimivl_hosting.options import add_connection_arguments, add_server_tls_arguments, add_tracing_arguments


@dataclass(frozen=True)
class Preset:
    """Engine settings by GPU memory (the seed's table)."""
    name: str
    min_gpu_gb: float
    max_num_seqs: int
    gpu_memory_utilization: float
    swap_space_gb: int
    max_model_len: int


# Largest first: `auto` takes the first row the GPU fits, and falls back down the list.
PRESETS = (
    Preset("48gb", 48, 16, 0.95, 8, 131072),
    Preset("32gb", 32, 8, 0.90, 16, 131072),
    Preset("24gb", 0, 4, 0.85, 32, 65536),
)
PRESETS_BY_NAME = {p.name: p for p in PRESETS}


def pick_preset(gpu_memory_gb: float) -> Preset:
    return next(p for p in PRESETS if gpu_memory_gb >= p.min_gpu_gb)


def lower_preset(preset: Preset) -> Preset | None:
    i = PRESETS.index(preset)
    return PRESETS[i + 1] if i + 1 < len(PRESETS) else None


MAX_PREFILL_WINDOW_MS = 1000.0
MAX_WARMUP_GRIDS = 16


def parse_grids(text: str) -> list[tuple[int, int]]:
    """``"74x74,86x116"`` -> [(74, 74), (86, 116)]; ``none``, ``0`` or empty -> []."""
    text = text.strip().lower()
    if text in ("", "0", "none", "off"):
        return []
    grids = []
    for part in text.split(","):
        h, sep, w = part.strip().partition("x")
        if not sep or not h.isdigit() or not w.isdigit() or int(h) < 2 or int(w) < 2 or int(h) % 2 or int(w) % 2:
            raise ValueError(f"{part.strip()!r} is not HxW with even sides of at least 2 patches (e.g. 74x74)")
        grids.append((int(h), int(w)))
    if len(grids) > MAX_WARMUP_GRIDS:
        raise ValueError(f"{len(grids)} grids; at most {MAX_WARMUP_GRIDS}")
    return grids


def _warmup_grids(text: str) -> list[tuple[int, int]]:
    try:
        return parse_grids(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = the default), got {value}")
    return value


def _prefill_window_ms(text: str) -> float:
    value = float(text)
    # nan would turn the window off silently, inf (or minutes) would hold requests until a
    # group fills a whole engine step: refuse both rather than hang callers.
    if not 0 <= value <= MAX_PREFILL_WINDOW_MS:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_PREFILL_WINDOW_MS:g} ms, got {text}")
    return value


def _posemb_cache_mb(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 65536:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65536 MiB, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=50052)
    p.add_argument("--model", required=True, help="model directory (weights, config, tokenizer)")
    p.add_argument("--engine", choices=["vllm", "transformers"], default="vllm",
                   help="vllm (default): vLLM's AsyncLLM. transformers: the model loaded with Hugging Face "
                        "Transformers (AutoModelForCausalLM, trust_remote_code), for where vLLM does not run and as "
                        "a reference; same API, validation, thinking split and health")
    p.add_argument("--attn-implementation", choices=["auto", "flash_attention_2", "sdpa", "eager"], default="auto",
                   help="--engine transformers: attention kernels (auto: flash_attention_2 on a GPU with flash-attn "
                        "installed, else sdpa)")
    p.add_argument("--metrics-port", type=int, default=9091, help="Prometheus /metrics port (0 = off)")
    p.add_argument("--preset", choices=["auto", "none", *PRESETS_BY_NAME], default="auto",
                   help="engine settings by GPU memory: 24gb, 32gb, 48gb (48+ GB), auto (from the GPU; "
                        "falls back one row if the engine runs out of memory), none (vLLM defaults). "
                        "Explicit flags below override the preset")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--swap-space", type=float, default=None, help="CPU swap space in GiB (where vLLM has it)")
    p.add_argument("--limit-mm-per-prompt", type=int, default=256, help="most images per request")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / torch.compile")
    p.add_argument("--no-prefix-caching", action="store_true", help="prefix caching is on by default")
    p.add_argument("--load-format", default="auto", help="vLLM load format (`dummy` for benchmarks)")
    p.add_argument("--reinit-dummy-weights", action="store_true",
                   help="with --load-format dummy: re-initialise every weight N(0, 1/fan_in) from --seed, so "
                        "outputs depend on the image and MoE routing is realistic (benchmarks without a checkpoint)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-message-mb", type=int, default=256, help="largest gRPC message accepted")
    p.add_argument("--drain-timeout-s", type=float, default=30.0,
                   help="on SIGTERM: how long in-flight streams may finish while new ones are refused")
    p.add_argument("--log-level", default="info")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="CPU threads of this process's own tensor work (normalizing uint8 patches); 0 = torch's "
                        "default, a thread per core. Applied once the engine has started, so the engine's processes "
                        "keep --engine-torch-threads. Lower it where the container's CPU limit is below the host's core count")
    p.add_argument("--engine-torch-threads", type=_non_negative_int, default=1,
                   help="torch intra-op threads in the engine's processes on a GPU (given them as OMP_NUM_THREADS "
                        "when they start; an OMP_NUM_THREADS in this environment wins). 1 (default) = what vLLM "
                        "0.32 sets for serving: more only spin-wait beside the engine loop after each CPU tensor "
                        "operation. 0 = torch's default, a thread per CPU of the process")
    p.add_argument("--prefill-window-ms", type=_prefill_window_ms, default=0.0,
                   help="while the engine has work, hold an image request up to this long so that image prefills "
                        "reach the engine together (a prefill step's fixed cost is then shared; TTFT pays the "
                        "hold); a group goes at once when its prompts fill one engine step. 0 = off (default), at most 1000")
    p.add_argument("--max-waiting", type=_non_negative_int, default=0,
                   help="admission: requests admitted and not yet streaming; more wait in a queue (0 = twice the "
                        "engine's max_num_seqs)")
    p.add_argument("--max-queued", type=int, default=-1,
                   help="admission: requests waiting for a --max-waiting slot; more are refused at once with "
                        "UNAVAILABLE and a retry hint, and the front door tries another replica (-1 = as many as "
                        "--max-waiting, 0 = no queue)")
    p.add_argument("--max-queue-wait-s", type=float, default=10.0,
                   help="admission: longest wait in the queue before the request is refused (UNAVAILABLE)")
    p.add_argument("--max-tensor-mb", type=_non_negative_int, default=0,
                   help="admission: image tensor memory held by requests (as received plus the engine's copy); "
                        "past it a request is refused at once (0 = a quarter of the memory this process may use, "
                        "its cgroup limit in a container)")
    p.add_argument("--no-vision-fastpath", action="store_true",
                   help="run vLLM's Kimi-VL vision path stock. By default the engine's processes get the "
                        "project's exact fast path (no per-layer GPU sync in MoonViT, cached position "
                        "embeddings, raw 8-bit patches normalized on the device), where the installed vLLM is "
                        "one it was written for; the start-up log, kimivl_vision_fastpath_active and "
                        "`kimivl doctor` say whether it is on")
    p.add_argument("--posemb-cache-mb", type=_posemb_cache_mb, default=512.0,
                   help="GPU memory for MoonViT's interpolated position embeddings, one entry per image grid "
                        "(a 1024x1024 photo's is 12.6 MB), least recently used out; outside vLLM's memory "
                        "profile, so leave it room (0 = no cache)")
    p.add_argument("--warmup-grids", type=_warmup_grids, default="74x74,86x116",
                   help="image grids (HxW, in 14-pixel patches) run through the engine before the tier reports "
                        "SERVING, so kernels compile and caches fill before real traffic; the default covers "
                        "1024x1024 photos and 1600x1200 documents. none = no warm-up")
    p.add_argument("--log-stats-interval-s", type=float, default=10.0,
                   help="log vLLM's engine stats (running/waiting requests, throughput, KV cache use) this often, "
                        "as `vllm serve` does (0 = off)")
    add_server_tls_arguments(p, who="give the CA that signs the front doors' client certificates, so that only "
                                    "they reach this internal tier")
    # Clients only re-resolve DNS when a connection ends: cycling connections lets the front door
    # discover inference pods added by a scale-up; streams in flight get the grace to finish.
    add_connection_arguments(p, age_s=300.0, age_grace_s=3600.0)
    add_tracing_arguments(p)
