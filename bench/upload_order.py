"""When does each request of a burst reach the inference tier? Prepared prompts of photo size
sent over one real gRPC channel on loopback, all at once vs through the front door's
UploadGate (kimivl_preprocess.uploads), side by side in one run.

    .venv/bin/python bench/upload_order.py [--n 100] [--mb 5] [--limits 0,4,1]

The server notes each request's arrival and answers with headers at once, as the inference
tier does. A burst that all uploads at once shares the connection frame by frame, so the
first request arrives when nearly all have and the engine idles until then.

This server answers at once; the real inference tier answers when its event loop gets to the
request, and on the H200 that made a limit of 4 cost a burst 18 % of its throughput (the front
door's default is therefore no limit; docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "services", "preprocess"))
from kimivl_preprocess.uploads import UploadGate  # noqa: E402


async def burst(n: int, payload: bytes, limit: int) -> list[float]:
    arrivals: list[float] = []

    async def handle(request, context):
        arrivals.append(time.perf_counter())
        await context.send_initial_metadata(())
        yield b"ok"

    opts = [("grpc.max_receive_message_length", 1 << 30), ("grpc.max_send_message_length", 1 << 30)]
    server = grpc.aio.server(options=opts)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Upload", {
        "Generate": grpc.unary_stream_rpc_method_handler(handle)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts)
    generate = channel.unary_stream("/bench.Upload/Generate")
    await channel.channel_ready()
    gate = UploadGate(limit)

    async def one():
        call = await gate.start(lambda: generate(payload))
        async for _ in call:
            pass

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    await channel.close()
    await server.stop(0)
    return sorted(a - t0 for a in arrivals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="requests in the burst")
    ap.add_argument("--mb", type=float, default=5.0, help="MiB per request (a 2 MP photo in uint8: ~4.7)")
    ap.add_argument("--limits", default="0,4,1", help="UploadGate limits to compare (0 = no gate)")
    a = ap.parse_args()
    payload = os.urandom(int(a.mb * 2**20))
    limits = [int(x) for x in a.limits.split(",")]
    rows = {lim: asyncio.run(burst(a.n, payload, lim)) for lim in limits}
    base = rows[limits[0]]
    print(f"{a.n} requests of {a.mb:g} MiB at once, one channel, loopback: arrival at the server, ms "
          f"(ratio: limit {limits[0]} / this)")
    print(f"{'limit':>6} {'first':>12} {'10th':>12} {'median':>12} {'last':>12}")
    for lim, arr in rows.items():
        cells = []
        for q in (0, 9, len(arr) // 2, len(arr) - 1):
            cells.append(f"{arr[q] * 1e3:6.0f} ({base[q] / arr[q]:4.1f}x)")
        print(f"{lim:>6} " + " ".join(f"{c:>12}" for c in cells))


if __name__ == "__main__":
    main()
