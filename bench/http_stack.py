"""Which HTTP server for the front door's OpenAI port: aiohttp.web or uvicorn (+ Starlette / FastAPI)?

Each stack serves the same handler, run on the default asyncio event loop as the front door's
grpc.aio server needs it (grpc.aio does not support uvloop): read a JSON body the size of a
1 MP photo chat (base64 JPEG in a data URI), parse it, and stream ``--chunks`` SSE events.
One client (aiohttp) sends requests one at a time, the stacks interleaved round by round;
the report is the p50 latency to the last byte per stack and round, and each stack's median
over rounds with its min-max spread.

    .venv/bin/python bench/http_stack.py --rounds 5 --requests 200
"""

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import time

STACKS = ("aiohttp", "starlette", "fastapi")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chunks(n: int) -> list[bytes]:
    return [b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":'
            b'{"content":"word "},"finish_reason":null}]}\n\n' for _ in range(n)] + [b"data: [DONE]\n\n"]


def serve(stack: str, port: int, chunks: int) -> None:
    out = _chunks(chunks)
    if stack == "aiohttp":
        from aiohttp import web

        async def handler(request: web.Request) -> web.StreamResponse:
            body = json.loads(await request.read())
            assert body["messages"]
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for c in out:
                await resp.write(c)
            await resp.write_eof()
            return resp

        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/chat/completions", handler)
        web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
        return
    import uvicorn
    from starlette.requests import Request
    from starlette.responses import StreamingResponse

    async def body_stream():
        for c in out:
            yield c

    if stack == "starlette":
        from starlette.applications import Starlette
        from starlette.routing import Route

        async def handler(request: Request):
            body = json.loads(await request.body())
            assert body["messages"]
            return StreamingResponse(body_stream(), media_type="text/event-stream")

        app = Starlette(routes=[Route("/v1/chat/completions", handler, methods=["POST"])])
    else:
        from fastapi import FastAPI

        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def handler(request: Request):
            body = json.loads(await request.body())
            assert body["messages"]
            return StreamingResponse(body_stream(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, loop="asyncio", http="httptools", access_log=False,
                log_level="warning")


def _payload() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    # A photo-like 1 MP JPEG: smooth gradients plus noise (about 300-400 KB at quality 90).
    y, x = np.mgrid[0:1000, 0:1000]
    img = np.stack([(x * 0.25) % 256, (y * 0.25) % 256, ((x + y) * 0.125) % 256], -1)
    img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"}, {"type": "image_url", "image_url": {"url": uri}}]}],
        "stream": True, "max_completion_tokens": 8}).encode()


async def _wait(port: int) -> None:
    for _ in range(200):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


async def run(args) -> None:
    import aiohttp

    payload = _payload()
    procs, ports = {}, {}
    for stack in args.stacks:
        ports[stack] = _free_port()
        procs[stack] = subprocess.Popen([sys.executable, __file__, "--serve", stack, "--port", str(ports[stack]),
                                         "--chunks", str(args.chunks)])
    try:
        for port in ports.values():
            await _wait(port)
        results: dict[str, list[float]] = {s: [] for s in args.stacks}
        async with aiohttp.ClientSession() as session:
            async def one(stack: str) -> float:
                t = time.perf_counter()
                async with session.post(f"http://127.0.0.1:{ports[stack]}/v1/chat/completions", data=payload,
                                        headers={"Content-Type": "application/json"}) as r:
                    assert r.status == 200, (stack, r.status, await r.text())
                    await r.read()
                return (time.perf_counter() - t) * 1e3

            for stack in args.stacks:  # warm up connections and code paths
                for _ in range(20):
                    await one(stack)
            for rnd in range(args.rounds):
                for stack in (args.stacks if rnd % 2 == 0 else args.stacks[::-1]):
                    times = [await one(stack) for _ in range(args.requests)]
                    results[stack].append(statistics.median(times))
        print(f"body {len(payload)} bytes, {args.chunks} SSE chunks, {args.requests} requests x {args.rounds} rounds "
              f"(python {sys.version.split()[0]}, {os.cpu_count()} CPUs)")
        print("| stack | p50 per round (ms) | median of rounds | spread |")
        print("|---|---|---|---|")
        for stack, p50s in results.items():
            print(f"| {stack} | {' '.join(f'{v:.2f}' for v in p50s)} | {statistics.median(p50s):.2f} | "
                  f"{min(p50s):.2f}-{max(p50s):.2f} |")
    finally:
        for p in procs.values():
            p.terminate()
            p.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stacks", nargs="+", default=list(STACKS), choices=STACKS)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--serve", choices=STACKS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.chunks)
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
