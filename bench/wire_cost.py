"""How long one gRPC hop takes to carry a prepared image: the Preprocess RPC's time at the
client minus the pipeline time the server reports = response serialization + transfer + parse.

usage: .venv/bin/python bench/wire_cost.py   (starts a preprocessing tier on loopback)
"""
import io
import os
import statistics
import sys
import time

from PIL import Image
from skimage import data

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from conftest import free_port, start_preprocess  # noqa: E402
from kimivl.client import Client  # noqa: E402


def main() -> None:
    img = Image.fromarray(data.astronaut()).resize((1633, 1225), Image.Resampling.BICUBIC)  # 2 MP
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    srv = start_preprocess(f"127.0.0.1:{free_port()}")
    try:
        srv.wait_serving(60)
        rows = []
        with Client(srv.target, timeout_s=60) as c:
            for _ in range(12):
                t = time.perf_counter()
                r = c.preprocess(["hi", jpeg])
                rows.append(((time.perf_counter() - t) * 1e3, r.preprocess_ms, r.ByteSize()))
        rows = rows[2:]  # warm-up
        total = statistics.median(x[0] for x in rows)
        pipeline = statistics.median(x[1] for x in rows)
        print(f"2 MP JPEG ({len(jpeg) / 1e6:.2f} MB): Preprocess RPC {total:.1f} ms, of which the server's "
              f"pipeline {pipeline:.1f} ms; the {rows[0][2] / 2**20:.1f} MiB response's serialization, "
              f"transfer and parse {total - pipeline:.1f} ms")
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
