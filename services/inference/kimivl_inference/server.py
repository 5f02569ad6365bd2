"""The inference tier's gRPC server: InferenceService on vLLM's AsyncLLM (or the Transformers engine).

Lifecycle, as an orchestrator sees it through grpc.health.v1:
  NOT_SERVING while the engine starts (the port is open at once, so probes get answers),
  SERVING once it is ready, NOT_SERVING while draining on SIGTERM (in-flight streams
  finish, new ones are refused) and when the engine dies (then the process exits
  non-zero, so it is restarted).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from kimivl.limits import RequestError, check_sampling
from kimivl.prepared import PromptLimits, check_prepared_prompt
from kimivl.v1 import inference_pb2

from .admission import PrefillGrouper
from .engine import build_engine_input, reinit_dummy_weights, start_engine
from .generation import GenerationStats, end_marker_token_ids, generate
from .pixels import PixelNormalizer, read_normalization

log = logging.getLogger("kimivl.inference")
INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
MiB = 1 << 20

TTFT = Histogram("kimivl_time_to_first_token_seconds", "Arrival at the inference tier to first token",
                 buckets=(.01, .025, .05, .1, .25, .5, 1, 2, 4, 8, 16, 32))
PREFILL_HOLD = Histogram("kimivl_prefill_hold_seconds",
                         "Time image requests were held to reach the engine together (--prefill-window-ms)",
                         buckets=(.001, .0025, .005, .01, .02, .04, .08, .16, .32))
ITL = Histogram("kimivl_inter_token_latency_seconds", "Time between generated tokens",
                buckets=(.001, .0025, .005, .01, .02, .04, .08, .16, .32, .64, 1.28))
THINKING_TOKENS = Counter("kimivl_thinking_tokens_total", "Generated tokens inside thinking segments")
ANSWER_TOKENS = Counter("kimivl_answer_tokens_total", "Generated answer tokens")
RUNNING = Gauge("kimivl_requests_running", "Requests generating (first token out)")
WAITING = Gauge("kimivl_requests_waiting", "Requests admitted, waiting for their first token")
ERRORS = Counter("kimivl_request_errors_total", "Failed requests by gRPC status code", ["code"])
# vLLM may turn prefix caching off whatever was asked (e.g. MLA models on CPUs without AMX).
PREFIX_CACHING = Gauge("kimivl_engine_prefix_caching", "1 when the engine's prefix cache is on")


class EngineNotReady(Exception):
    pass


class InferenceServicer:
    def __init__(self, max_message_bytes: int, prefill_window_s: float = 0.0):
        self.engine = None
        self.prefill_window_s = prefill_window_s
        self.grouper: PrefillGrouper | None = None
        self.in_engine = 0  # requests handed to the engine and not finished
        self.limits: PromptLimits | None = None
        self.end_marker_ids: list[int] = []
        self.model_dtype = None
        self.normalizer: PixelNormalizer | None = None
        self.prefix_caching = False
        self.max_message_bytes = max_message_bytes
        self.on_engine_dead = None

    def attach(self, engine, tokenizer, limit_mm: int):
        mc = engine.model_config
        vocab = mc.get_vocab_size()
        encoder_cache = getattr(getattr(engine, "input_processor", None), "mm_encoder_cache_size", 0) or None
        self.limits = PromptLimits(pad_id=tokenizer.convert_tokens_to_ids("<|media_pad|>"), vocab_size=vocab,
                                   max_images=limit_mm, max_model_len=mc.max_model_len,
                                   max_image_tokens=encoder_cache)
        self.end_marker_ids = end_marker_token_ids(tokenizer)
        self.model_dtype = mc.dtype
        cache = getattr(getattr(engine, "vllm_config", None), "cache_config", None)
        self.prefix_caching = bool(cache is not None and cache.enable_prefix_caching)
        PREFIX_CACHING.set(int(self.prefix_caching))
        self.normalizer = PixelNormalizer(*read_normalization(mc.model), mc.dtype)
        sched = getattr(getattr(engine, "vllm_config", None), "scheduler_config", None)
        self.grouper = PrefillGrouper(self.prefill_window_s,
                                      getattr(sched, "max_num_batched_tokens", None) or mc.max_model_len)
        self.engine = engine

    async def Generate(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        arrived = time.perf_counter()
        code = None
        stats = GenerationStats()
        WAITING.inc()
        state = "waiting"
        try:
            if self.engine is None:
                raise EngineNotReady()
            # Headers now, not with the first token: the front door's upload gate takes them as
            # "received". Not before the UNAVAILABLE above: headers commit the call, and gRPC
            # would no longer retry it on another replica.
            await context.send_initial_metadata(())
            check_sampling(request.sampling, request.thinking)
            tensor_data: list[bytes] = []
            image_tokens = check_prepared_prompt(request.prompt, self.limits, tensor_data=tensor_data)
            n = len(request.prompt.token_ids)
            if request.sampling.HasField("max_tokens") and n + request.sampling.max_tokens > self.limits.max_model_len:
                raise RequestError(f"the prompt ({n} tokens) plus sampling.max_tokens "
                                   f"({request.sampling.max_tokens}) exceeds the context of "
                                   f"{self.limits.max_model_len} tokens")
            if n >= self.limits.max_model_len:
                raise RequestError(f"the prompt is {n} tokens; the context is {self.limits.max_model_len} and "
                                   "at least one token must be left to generate")
            if not request.request_id:
                request.request_id = uuid.uuid4().hex
            build = getattr(self.engine, "build_engine_input", build_engine_input)  # vLLM's unless the engine has its own
            if request.prompt.images:  # tensor work (uint8 normalization) off the event loop
                engine_input = await asyncio.to_thread(build, request.prompt, self.model_dtype, self.normalizer,
                                                       tensor_data)
            else:
                engine_input = build(request.prompt, self.model_dtype)
            if request.prompt.images and self.grouper.enabled:
                PREFILL_HOLD.observe(await self.grouper.admit(n, engine_busy=self.in_engine > 0))
            last = None
            self.in_engine += 1
            try:
                async for msg in generate(self.engine, engine_input, request, max_model_len=self.limits.max_model_len,
                                          end_marker_ids=self.end_marker_ids, image_tokens=image_tokens, stats=stats,
                                          arrived_s=arrived):
                    if state == "waiting" and stats.first_token_s is not None:
                        WAITING.dec()
                        RUNNING.inc()
                        state = "running"
                        TTFT.observe(stats.first_token_s)
                    last = msg
                    yield msg
            finally:
                self.in_engine -= 1
            u = last.result.usage
            THINKING_TOKENS.inc(u.thinking_tokens)
            ANSWER_TOKENS.inc(u.answer_tokens)
            times = stats.token_times
            for a, b in zip(times, times[1:], strict=False):
                ITL.observe(b - a)
        except RequestError as e:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if e.resource_exhausted else grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, str(e))
        except EngineNotReady:
            code = grpc.StatusCode.UNAVAILABLE
            await context.abort(code, "the engine is still starting; retry when health reports SERVING")
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED  # the consumer left: vLLM aborts the request on cancel
            raise
        except Exception as e:
            if _engine_dead(e) or (self.engine is not None and self.engine.errored):
                code = grpc.StatusCode.UNAVAILABLE
                if self.on_engine_dead:
                    self.on_engine_dead()
                await context.abort(code, "the inference engine died; this replica is restarting")
            log.exception("request %s failed", request.request_id)
            code = grpc.StatusCode.INTERNAL
            await context.abort(code, f"internal error: {type(e).__name__}")
        finally:
            (WAITING if state == "waiting" else RUNNING).dec()
            if code is not None:
                ERRORS.labels(code.name).inc()


def _engine_dead(e: Exception) -> bool:
    """Whether e says the engine (vLLM's or the Transformers one) can serve no more."""
    from .transformers_engine import EngineDeadError

    if isinstance(e, EngineDeadError):
        return True
    try:
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDead
    except Exception:  # noqa: BLE001 - no (usable) vLLM: the Transformers engine
        return False
    return isinstance(e, VllmEngineDead)


async def serve(args) -> int:
    max_msg = args.max_message_mb * MiB
    server = grpc.aio.server(options=[
        ("grpc.max_send_message_length", max_msg),
        ("grpc.max_receive_message_length", max_msg),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # Clients only re-resolve DNS when a connection ends: cycling connections lets the
        # front door discover inference pods added by a scale-up. Streams in flight get
        # the grace period (long generations) to finish.
        ("grpc.max_connection_age_ms", 5 * 60_000),
        ("grpc.max_connection_age_grace_ms", 60 * 60_000),
    ])
    servicer = InferenceServicer(max_msg, args.prefill_window_ms / 1e3)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(INFERENCE_SERVICE, {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=inference_pb2.GenerateRequest.FromString,
            response_serializer=inference_pb2.GenerateResponse.SerializeToString),
    })])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [INFERENCE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server)
    host = f"[{args.host}]" if ":" in args.host else args.host  # IPv6 literals need brackets
    bound = server.add_insecure_port(f"{host}:{args.port}")
    if bound == 0:
        raise SystemExit(f"cannot listen on {args.host}:{args.port}")
    for name in ("", INFERENCE_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    if args.metrics_port:
        start_http_server(args.metrics_port)
    log.info("inference tier listening on %s:%d; starting the engine", args.host, bound)

    stop = asyncio.Event()
    exit_code = 0
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def engine_dead():
        nonlocal exit_code
        exit_code = 1
        stop.set()

    servicer.on_engine_dead = engine_dead
    t0 = time.perf_counter()
    start = asyncio.create_task(asyncio.to_thread(_start, args))
    done, _ = await asyncio.wait([start, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    engine = None
    if start in done:
        try:
            engine, tokenizer, preset = start.result()
        except Exception:
            log.exception("the engine failed to start")
            exit_code = 1
            stop.set()
        else:
            if args.reinit_dummy_weights and args.engine == "vllm":  # the Transformers engine made them so
                info = await engine.collective_rpc(reinit_dummy_weights, args=(args.seed,))
                log.info("dummy weights re-initialised: %s", info)
            servicer.attach(engine, tokenizer, args.limit_mm_per_prompt)
            for name in ("", INFERENCE_SERVICE):
                await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            log.info("engine ready in %.1f s (preset %s, max_model_len %d, image tokens up to %s, prefix caching %s, "
                     "torch threads here %d, prefill window %s); SERVING", time.perf_counter() - t0,
                     preset.name if preset else "none", servicer.limits.max_model_len,
                     servicer.limits.max_image_tokens, "on" if servicer.prefix_caching else "off", _torch_threads(),
                     f"{args.prefill_window_ms:g} ms" if args.prefill_window_ms else "off")
            watch = asyncio.create_task(_watch_engine(engine, engine_dead))
            stats = asyncio.create_task(_log_stats(engine, args.log_stats_interval_s))
            await stop.wait()
            watch.cancel()
            stats.cancel()
    if exit_code:
        log.error("stopping: the engine is not usable")
    else:
        log.info("draining: refusing new RPCs, up to %.0f s for in-flight ones", args.drain_timeout_s)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=0 if exit_code else args.drain_timeout_s)
    if engine is not None:
        engine.shutdown()
        # AsyncLLM.__del__ calls shutdown() again, at interpreter teardown when its module
        # globals are gone, and prints a spurious traceback: it has already run.
        engine.shutdown = lambda *a, **k: None
    elif not start.done():
        os._exit(exit_code or 0)  # interrupted mid-start: the engine thread can't be joined cleanly
    return exit_code


def _start(args):
    from transformers import AutoTokenizer

    if args.engine == "transformers":
        from .transformers_engine import start_transformers_engine

        if args.torch_threads > 0:  # the model runs in this process
            import torch

            torch.set_num_threads(args.torch_threads)
        return start_transformers_engine(args)
    engine, preset = start_engine(args)
    if args.torch_threads > 0:  # after the engine core process exists: it keeps its own thread count
        import torch

        torch.set_num_threads(args.torch_threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    return engine, tokenizer, preset


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


async def _log_stats(engine, period_s: float):
    """vLLM's periodic stats lines (as `vllm serve`): where requests wait, how busy the engine is."""
    if period_s <= 0:
        return
    while True:
        await asyncio.sleep(period_s)
        try:
            await engine.do_log_stats()
        except Exception:  # noqa: BLE001 - stats must never take the server down
            log.debug("do_log_stats failed", exc_info=True)


async def _watch_engine(engine, on_dead, period_s: float = 1.0):
    while True:
        await asyncio.sleep(period_s)
        if engine.errored:
            log.error("the engine core died: %s", engine.dead_error)
            on_dead()
            return


def main(args) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    if args.device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return asyncio.run(serve(args))
