"""What carrying a prepared image from the front door to the inference tier costs, side by side.

1. Building the serialized GenerateRequest for one 2 MP photo: protobuf messages built the
   straightforward way (Tensor(data=...), PreparedImage, PreparedPrompt, GenerateRequest,
   SerializeToString; what the front door did before) vs the codec
   (kimivl_preprocess.codec: small fields by protobuf, tensor bytes joined once from numpy),
   for bfloat16 and uint8 patches. Both are parsed and checked equal.
2. One real gRPC hop: a preprocessing tier on loopback answers Preprocess; the RPC's time at
   the client minus the pipeline time the server reports = response serialization + transfer
   + parse, per wire dtype.

usage: .venv/bin/python bench/wire_cost.py
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
from kimivl.v1 import inference_pb2, types_pb2  # noqa: E402
from kimivl_contract import dtypes  # noqa: E402
from kimivl_contract.processor import ProcessorConfig  # noqa: E402
from kimivl_preprocess.codec import PromptWire, generate_request  # noqa: E402
from kimivl_preprocess.image import preprocess_image_bytes  # noqa: E402

ROUNDS = 12


def protobuf_built(p, dtype: str, ids: list[int]) -> bytes:
    pv = p.pixel_values
    image = types_pb2.PreparedImage(
        pixel_values=types_pb2.Tensor(dtype=dtypes.from_name(dtype).proto, shape=list(pv.shape), data=pv.tobytes()),
        grid_height=p.grid_hw[0], grid_width=p.grid_hw[1], placeholder_offset=1, placeholder_length=p.num_tokens,
        content_hash=p.content_hash)
    prompt = types_pb2.PreparedPrompt(token_ids=ids, images=[image])
    return inference_pb2.GenerateRequest(prompt=prompt, request_id="r").SerializeToString()


def codec_built(p, dtype: str, ids: list[int]) -> bytes:
    return generate_request(PromptWire.from_images(ids, [p], dtype, [(1, p.num_tokens)]), request_id="r")


def median_ms(fn, rounds: int = ROUNDS) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times[2:])


def main() -> None:
    img = Image.fromarray(data.astronaut()).resize((1633, 1225), Image.Resampling.BICUBIC)  # 2 MP
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    print(f"2 MP JPEG ({len(jpeg) / 1e6:.2f} MB), medians of {ROUNDS - 2} rounds\n")
    print("| wire dtype | tensor MiB | protobuf-built request ms | codec ms | protobuf / codec |")
    print("|---|---:|---:|---:|---:|")
    for dtype in ("bfloat16", "uint8"):
        p = preprocess_image_bytes(jpeg, ProcessorConfig(), dtype)
        ids = [7] + [163605] * p.num_tokens + [8]
        a, b = protobuf_built(p, dtype, ids), codec_built(p, dtype, ids)
        assert inference_pb2.GenerateRequest.FromString(a) == inference_pb2.GenerateRequest.FromString(b)
        slow = median_ms(lambda p=p, dtype=dtype, ids=ids: protobuf_built(p, dtype, ids))
        fast = median_ms(lambda p=p, dtype=dtype, ids=ids: codec_built(p, dtype, ids))
        print(f"| {dtype} | {p.pixel_values.nbytes / 2**20:.1f} | {slow:.1f} | {fast:.1f} | {slow / fast:.1f} |")

    srv = start_preprocess(f"127.0.0.1:{free_port()}")
    try:
        srv.wait_serving(60)
        print("\n| wire dtype | Preprocess RPC ms | server pipeline ms | hop (serialize + transfer + parse) ms |")
        print("|---|---:|---:|---:|")
        with Client(srv.target, timeout_s=60) as c:
            for name, dtype in (("bfloat16", types_pb2.TENSOR_DTYPE_BFLOAT16), ("uint8", types_pb2.TENSOR_DTYPE_UINT8)):
                rows = []
                for _ in range(ROUNDS):
                    t = time.perf_counter()
                    r = c.preprocess(["hi", jpeg], dtype=dtype)
                    rows.append(((time.perf_counter() - t) * 1e3, r.preprocess_ms))
                rows = rows[2:]  # warm-up
                total = statistics.median(x[0] for x in rows)
                pipeline = statistics.median(x[1] for x in rows)
                print(f"| {name} | {total:.1f} | {pipeline:.1f} | {total - pipeline:.1f} |")
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
