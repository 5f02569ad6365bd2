"""What OpenTelemetry tracing costs (issue 17: nil when off, measured when on).

1. The front door, tracing off and on side by side: two front doors in front of one scripted
   inference tier that answers at once (tests/fake_inference.py), so only the front door's work
   differs; one is started with ``--otlp-traces-endpoint`` pointing at an OTLP collector on
   loopback (the collector protocol's generated service, counting what arrives). The same 1 MP
   photo chat with a ``traceparent``, one at a time, the two doors interleaved request by request
   (order alternating); p50 time to first token and to the result per round, and on - off per
   round (median [min, max]).
2. The inference tier's spans, in process: the exact span sequence its servicer makes per request
   (the Generate server span with the caller's context, validate, engine_input, engine.generate
   with a first-token event, attributes, status) timed on the serving thread with tracing off and
   on (the real SDK, batch processor and OTLP exporter to the same collector, which runs in a
   process of its own), requests paced at a busy tier's rate, interleaved in rounds.

    .venv/bin/python bench/tracing_cost.py --out docs/bench-cpu/tracing-cost.md

Needs the tiny model (``kimivl make-tiny-model models/kimi-vl-tiny``); no engine is started.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import socket
import statistics
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # imagedata, fake_inference (shared with the tests)

from imagedata import mosaic_jpeg  # noqa: E402
from kimivl_devtools.launch import TierProcess  # noqa: E402

ENV = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1"}
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collect(port, counts, ready) -> None:
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            for rs in request.resource_spans:
                svc = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
                n = sum(len(ss.spans) for ss in rs.scope_spans)
                with counts.get_lock():
                    counts[SERVICES.index(svc) if svc in SERVICES else 2] += n
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), server)
    port.value = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ready.set()
    server.wait_for_termination()


SERVICES = ("kimivl-preprocess", "kimivl-inference")


class Collector:
    """An OTLP/gRPC trace receiver on loopback, in a process of its own (so that decoding what
    arrives does not take this process's CPU), counting spans by service."""

    def __init__(self):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.counts, port, ready = ctx.Array("q", 3), ctx.Value("i", 0), ctx.Event()
        self.proc = ctx.Process(target=_collect, args=(port, self.counts, ready), daemon=True)
        self.proc.start()
        if not ready.wait(60):
            raise SystemExit("the collector did not start")
        self.endpoint = f"http://127.0.0.1:{port.value}"

    def spans(self, service: str) -> int:
        return self.counts[SERVICES.index(service)]

    def stop(self) -> None:
        self.proc.terminate()


def start_front_door(model: str, inference_target: str, log: Path, extra: list[str]) -> TierProcess:
    port = free_port()
    door = TierProcess("preprocess", ["--model", model, "--host", "127.0.0.1", "--port", str(port),
                                      "--metrics-port", "0", "--inference-target", inference_target, *extra],
                       port, env=ENV, log=log, cwd=ROOT)
    door.wait_serving(600)
    return door


async def chat_once(stub_call, request: bytes, expected_tokens: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    ttft = None
    async for msg in stub_call(request, timeout=120, metadata=[("traceparent", TRACEPARENT)]):
        kind = msg.WhichOneof("event")
        if kind == "delta" and ttft is None:
            ttft = (time.perf_counter() - t0) * 1e3
        elif kind == "result":
            assert msg.result.usage.answer_tokens == expected_tokens
            return ttft, (time.perf_counter() - t0) * 1e3
    raise RuntimeError("the stream ended without a result")


async def part1(args, out: list[str], collector: Collector, log_dir: Path) -> None:
    import grpc

    from fake_inference import FakeInference
    from kimivl.v1 import chat_pb2, inference_pb2, types_pb2

    jpeg = mosaic_jpeg(1.0)
    request = chat_pb2.ChatRequest(
        conversation=types_pb2.Conversation(messages=[types_pb2.Message(
            role=types_pb2.ROLE_USER, content=[types_pb2.ContentPart(text="What is in this picture?"),
                                               types_pb2.ContentPart(image=types_pb2.Image(data=jpeg))])]),
        sampling=types_pb2.SamplingParameters(max_tokens=args.max_tokens, temperature=0)).SerializeToString()
    replies = [inference_pb2.GenerateResponse(delta=types_pb2.GenerationDelta(answer=f"w{i} ", token_ids=[i]))
               for i in range(args.max_tokens)]
    replies.append(inference_pb2.GenerateResponse(result=types_pb2.GenerationResult(
        finish_reason=types_pb2.FINISH_REASON_LENGTH,
        usage=types_pb2.Usage(prompt_tokens=1, answer_tokens=args.max_tokens))))
    doors = {}
    with FakeInference(replies) as fake:
        try:
            doors["off"] = start_front_door(args.model, fake.target, log_dir / "preprocess-off.log", [])
            doors["on"] = start_front_door(args.model, fake.target, log_dir / "preprocess-on.log",
                                           ["--otlp-traces-endpoint", collector.endpoint])
            channels = {k: grpc.aio.insecure_channel(d.target, options=[("grpc.max_send_message_length", 64 << 20)])
                        for k, d in doors.items()}
            calls = {k: ch.unary_stream("/kimivl.v1.ChatService/Chat", request_serializer=None,
                                        response_deserializer=chat_pb2.ChatResponse.FromString)
                     for k, ch in channels.items()}
            for k in doors:
                for _ in range(args.warmup):
                    await chat_once(calls[k], request, args.max_tokens)
            res = {k: [] for k in doors}
            for r in range(args.rounds):
                samples = {k: [] for k in doors}
                for i in range(args.requests):
                    for k in (["off", "on"] if (r + i) % 2 == 0 else ["on", "off"]):
                        samples[k].append(await chat_once(calls[k], request, args.max_tokens))
                for k, s in samples.items():
                    res[k].append((statistics.median(t for t, _ in s), statistics.median(e for _, e in s)))
                print(f"  round {r + 1}/{args.rounds}: off {res['off'][-1][0]:.2f}/{res['off'][-1][1]:.2f} ms, "
                      f"on {res['on'][-1][0]:.2f}/{res['on'][-1][1]:.2f} ms (TTFT/E2E p50)", flush=True)
            for ch in channels.values():
                await ch.close()
        finally:
            for d in doors.values():
                d.stop()
    time.sleep(1)  # the traced door's last batch
    sent = (args.warmup + args.rounds * args.requests)
    out += [f"**1. Front door, tracing off and on** (a scripted inference tier answering {args.max_tokens} tokens at "
            f"once; a 1 MP photo chat ({len(jpeg)} bytes) with a traceparent; {args.rounds} rounds of "
            f"{args.requests} requests per door, interleaved; p50 per round in ms)", "",
            "| front door | TTFT p50 by round | E2E p50 by round |", "|---|---|---|"]
    for k in ("off", "on"):
        out.append(f"| tracing {k} | {' '.join(f'{t:.2f}' for t, _ in res[k])} | "
                   f"{' '.join(f'{e:.2f}' for _, e in res[k])} |")
    diffs = [[on[j] - off[j] for on, off in zip(res["on"], res["off"], strict=True)] for j in (0, 1)]
    out += ["", "on - off per round: TTFT " + _spread(diffs[0]) + " ms, E2E " + _spread(diffs[1]) + " ms; "
            f"spans received from the traced door: {collector.spans('kimivl-preprocess')} for {sent} chats "
            f"({collector.spans('kimivl-preprocess') / sent:.1f} per chat).", ""]


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):+.3f} [{min(xs):+.3f}, {max(xs):+.3f}]"


def _inference_spans(tracing, carrier) -> None:
    """The inference servicer's spans for one request (servicer.Generate's sequence)."""
    span = tracing.start("kimivl.v1.InferenceService/Generate", kind="server", parent=tracing.extract(carrier),
                         attributes={"kimivl.request_id": "bench-0001"} if tracing.enabled else None)
    with tracing.child("validate", span, images=1, prompt_tokens=1400):
        pass
    with tracing.child("engine_input", span):
        pass
    gen = tracing.start("engine.generate", parent=span)
    tracing.add_event(gen, "first_token")
    tracing.set_attributes(gen, thinking_tokens=4, answer_tokens=12, finish_reason="length")
    tracing.end(gen)
    tracing.set_attributes(span, prompt_tokens=1400, cached_prompt_tokens=0)
    tracing.end(span, "OK")


def part2(args, out: list[str], collector: Collector) -> None:
    from kimivl_hosting import tracing

    carrier = [("traceparent", TRACEPARENT), ("user-agent", "grpc-python")]
    n = args.span_requests
    res = {"off": [], "on": []}
    for r in range(args.rounds):
        for mode in (["off", "on"] if r % 2 == 0 else ["on", "off"]):
            if mode == "on" and not tracing.enabled:
                tracing.configure("kimivl-inference", collector.endpoint)
            saved = tracing.enabled
            tracing.enabled = mode == "on"  # the module's one switch: what configure() turns on
            spent = 0.0
            for _ in range(n):  # paced at a busy tier's rate, so the exporter keeps up as it would
                t0 = time.perf_counter()
                _inference_spans(tracing, carrier)
                spent += time.perf_counter() - t0
                time.sleep(args.span_interval_ms / 1e3)
            res[mode].append(spent / n * 1e6)
            tracing.enabled = saved
    tracing.shutdown()
    time.sleep(0.5)
    out += [f"**2. The inference tier's spans per request, in process** ({n} requests a round, one every "
            f"{args.span_interval_ms:g} ms, {args.rounds} rounds, off and on interleaved; microseconds per request spent "
            "making its spans on the serving thread)", "",
            "| tracing | per request by round (µs) | median |", "|---|---|---|"]
    for k in ("off", "on"):
        out.append(f"| {k} | {' '.join(f'{x:.1f}' for x in res[k])} | {statistics.median(res[k]):.1f} |")
    out += ["", f"spans received: {collector.spans('kimivl-inference')} for {n * args.rounds} traced requests "
                f"(4 per request; the batch processor drops spans past its queue of 2048, by design).", ""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "kimi-vl-tiny"))
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=40, help="chats per door and round")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--span-requests", type=int, default=1000, help="requests per round in part 2")
    p.add_argument("--span-interval-ms", type=float, default=2.0, help="pause between part 2's requests")
    p.add_argument("--out", help="write the markdown here (e.g. docs/bench-cpu/tracing-cost.md)")
    args = p.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="tracing-bench-"))
    collector = Collector()
    out = [f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()}, {os.cpu_count()} CPUs (load average "
           f"{os.getloadavg()[0]:.1f} at the start), Python {platform.python_version()}, model {args.model}.", ""]
    asyncio.run(part1(args, out, collector, log_dir))
    part2(args, out, collector)
    out += ["Command:", "", "```bash", f"{sys.executable} bench/tracing_cost.py " + shlex.join(sys.argv[1:]), "```",
            f"(server logs: {log_dir})", ""]
    text = "\n".join(out)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text("# Tracing cost (CPU)\n\n" + text)
    collector.stop()


if __name__ == "__main__":
    main()
