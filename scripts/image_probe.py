"""Probe a tier started from a container image's filesystem (scripts/image_check.sh), with the
host venv's clients: grpc.health.v1 until SERVING, then what the tier must answer.

  image_probe.py health TARGET SERVICE --timeout-s 120 [--pid PID]
  image_probe.py preprocess TARGET IMAGE_FILE      a Preprocess call: tokens, one image, its tensor
  image_probe.py chat TARGET IMAGE_FILE            a Chat through the front door to the inference tier
  image_probe.py metrics URL NAME...               each NAME is a sample on the Prometheus endpoint

Exit 0 when the check holds; otherwise 1 with the reason.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def fail(message: str) -> int:
    print(f"[image-probe] FAIL: {message}", file=sys.stderr)
    return 1


def health(target: str, service: str, timeout_s: float, pid: int | None) -> int:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if pid is not None and not _alive(pid):
                return fail(f"the tier's process {pid} exited before {service or 'the server'} was SERVING "
                            f"(last health answer: {last})")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                if status == health_pb2.HealthCheckResponse.SERVING:
                    print(f"[image-probe] {target} health({service!r}) = SERVING")
                    return 0
            except grpc.RpcError as e:
                last = e.code().name
            time.sleep(0.5)
    return fail(f"{target} health({service!r}) not SERVING within {timeout_s:.0f} s (last: {last})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def preprocess(target: str, image_file: str) -> int:
    from kimivl.client import Client

    with Client(target, timeout_s=60) as client:
        r = client.preprocess(["What is in this picture?", Path(image_file)])
    prompt = r.prompt
    if len(prompt.images) != 1:
        return fail(f"Preprocess returned {len(prompt.images)} images, expected 1")
    image = prompt.images[0]
    pad = prompt.token_ids[image.placeholder_offset:image.placeholder_offset + image.placeholder_length]
    if not image.placeholder_length or len(set(pad)) != 1:
        return fail(f"placeholder run of {image.placeholder_length} tokens is not one repeated id")
    if not image.pixel_values.data or not image.grid_height or not image.grid_width:
        return fail("the image came back without pixel values or grid")
    print(f"[image-probe] Preprocess: {len(prompt.token_ids)} tokens, image grid "
          f"{image.grid_height}x{image.grid_width}, {image.placeholder_length} placeholders, "
          f"{len(image.pixel_values.data)} tensor bytes, {r.preprocess_ms:.0f} ms")
    return 0


def chat(target: str, image_file: str) -> int:
    from kimivl.client import Client

    with Client(target, timeout_s=300) as client:
        result = client.chat(["Describe the picture.", Path(image_file)],
                             sampling={"temperature": 0.0, "max_tokens": 16, "ignore_eos": True})
    if result.finish_reason != "length" or len(result.token_ids) != 16:
        return fail(f"chat finished with {result.finish_reason!r} after {len(result.token_ids)} tokens, "
                    "expected 'length' after 16")
    u = result.usage
    if not u.image_tokens:
        return fail("the chat's prompt counted no image tokens: the image did not reach the engine")
    print(f"[image-probe] Chat: {u.prompt_tokens} prompt tokens ({u.image_tokens} image), "
          f"{u.thinking_tokens} thinking + {u.answer_tokens} answer tokens, finish_reason {result.finish_reason}")
    return 0


def metrics(url: str, names: list[str]) -> int:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    missing = [n for n in names if not re.search(rf"^{re.escape(n)}(?:{{[^}}]*}})? \S+$", text, re.M)]
    if missing:
        return fail(f"{url} serves no sample of {missing}")
    print(f"[image-probe] {url} serves {', '.join(names)}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    h = sub.add_parser("health")
    h.add_argument("target")
    h.add_argument("service")
    h.add_argument("--timeout-s", type=float, default=120)
    h.add_argument("--pid", type=int)
    for name in ("preprocess", "chat"):
        p = sub.add_parser(name)
        p.add_argument("target")
        p.add_argument("image_file")
    m = sub.add_parser("metrics")
    m.add_argument("url")
    m.add_argument("names", nargs="+")
    a = ap.parse_args()
    if a.what == "health":
        return health(a.target, a.service, a.timeout_s, a.pid)
    if a.what == "preprocess":
        return preprocess(a.target, a.image_file)
    if a.what == "chat":
        return chat(a.target, a.image_file)
    return metrics(a.url, a.names)


if __name__ == "__main__":
    sys.exit(main())
