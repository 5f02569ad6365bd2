"""The inference tier's process: wiring and lifecycle, on vLLM's AsyncLLM (or the Transformers engine).

As an orchestrator sees it through grpc.health.v1: NOT_SERVING while the engine starts (the port
is open at once, so probes get answers), SERVING once it is ready, NOT_SERVING while draining on
SIGTERM (in-flight streams finish, new ones are refused) and when the engine dies (then the
process exits non-zero, so it is restarted).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time

from kimivl_hosting import tracing
from kimivl_hosting.grpc_host import GrpcHost
from kimivl_hosting.options import connection_options
from kimivl_hosting.tls import server_tls

from . import metrics
from .servicer import INFERENCE_SERVICE, InferenceServicer, handlers
from .vision_fastpath import configure_engine_processes
from .vllm_engine import start_engine
from .warmup import warm_up

log = logging.getLogger("kimivl.inference")
MiB = 1 << 20

async def serve(args) -> int:
    tracing.configure("kimivl-inference", args.otlp_traces_endpoint)
    tls = server_tls(args.tls_cert_file, args.tls_key_file, args.tls_client_ca_file)
    host = GrpcHost([INFERENCE_SERVICE], max_message_bytes=args.max_message_mb * MiB,
                    options=connection_options(args))
    servicer = InferenceServicer(args.prefill_window_ms / 1e3, budget_options=dict(
        max_waiting=args.max_waiting, max_queued=args.max_queued, max_queue_wait_s=args.max_queue_wait_s,
        max_tensor_mb=args.max_tensor_mb))
    host.add_handlers(INFERENCE_SERVICE, handlers(servicer))
    bound = host.bind(args.host, args.port, tls.credentials() if tls else None)
    if args.health_port:  # for probes that cannot do TLS
        log.info("health Check in plaintext on %s:%d", args.host, host.bind_health(args.host, args.health_port))
    await host.start(serving=False, metrics_port=args.metrics_port)
    log.info("inference tier listening on %s:%d (%s); starting the engine", args.host, bound,
             "plaintext" if tls is None else "mutual TLS" if tls.client_ca_file else "TLS")

    exit_code = 0

    def engine_dead():
        nonlocal exit_code
        exit_code = 1
        host.stop.set()

    servicer.on_engine_dead = engine_dead
    t0 = time.perf_counter()
    start = asyncio.create_task(asyncio.to_thread(_start, args))
    done, _ = await asyncio.wait([start, asyncio.create_task(host.stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    engine = None
    if start in done:
        try:
            engine, tokenizer, preset, fastpath = start.result()
        except Exception:
            log.exception("the engine failed to start")
            exit_code = 1
            host.stop.set()
        else:
            if args.reinit_dummy_weights and args.engine == "vllm":  # the Transformers engine made them so
                from kimivl_devtools.reinit import reinit_dummy_weights

                info = await engine.collective_rpc(reinit_dummy_weights, args=(args.seed,))
                log.info("dummy weights re-initialised: %s", info)
            servicer.attach(engine, tokenizer, args.limit_mm_per_prompt)
            servicer.engine_traces = bool(args.otlp_traces_endpoint) and bool(getattr(
                getattr(getattr(engine, "vllm_config", None), "observability_config", None), "otlp_traces_endpoint", None))
            cc = getattr(getattr(engine, "vllm_config", None), "compilation_config", None)
            # vLLM's encoder CUDA graphs look for "pixel_values" by name: no raw patches for them
            servicer.raw_pixels = fastpath.raw_pixels and not getattr(cc, "cudagraph_mm_encoder", False)
            metrics.VISION_FASTPATH.set(int(fastpath.active))
            log.info("vision fast path %s", fastpath.detail)
            # The warm-up compiles vLLM's graphs per grid; the Transformers engine has none to build.
            if args.warmup_grids and args.engine == "vllm" and not await _warm_up(servicer, tokenizer, args, engine):
                exit_code = 1
                host.stop.set()
        if not exit_code and not host.stop.is_set():
            await host.set_serving(True)
            log.info("engine ready in %.1f s (preset %s, max_model_len %d, image tokens up to %s, prefix caching %s, "
                     "torch threads here %d, prefill window %s, admission: %d waiting, %d queued, %.0f MiB of tensors);"
                     " SERVING", time.perf_counter() - t0,
                     preset.name if preset else "none", servicer.limits.max_model_len,
                     servicer.limits.max_image_tokens, "on" if servicer.prefix_caching else "off", _torch_threads(),
                     f"{args.prefill_window_ms:g} ms" if args.prefill_window_ms else "off",
                     servicer.budgets.waiting.capacity, servicer.budgets.waiting.max_queue,
                     servicer.budgets.tensors.capacity / MiB)
            watch = asyncio.create_task(_watch_engine(engine, engine_dead))
            stats = asyncio.create_task(_log_stats(engine, args.log_stats_interval_s))
            await host.stop.wait()
            watch.cancel()
            stats.cancel()
    if exit_code:
        log.error("stopping: the engine is not usable")
    else:
        log.info("draining: refusing new RPCs, up to %.0f s for the %d in flight", args.drain_timeout_s, host.in_flight)
    await host.drain(0 if exit_code else args.drain_timeout_s)
    if engine is not None:
        engine.shutdown()
        # AsyncLLM.__del__ calls shutdown() again, at interpreter teardown when its module
        # globals are gone, and prints a spurious traceback: it has already run.
        engine.shutdown = lambda *a, **k: None
    tracing.shutdown()  # flush what is buffered
    if engine is None and not start.done():
        os._exit(exit_code or 0)  # interrupted mid-start: the engine thread can't be joined cleanly
    return exit_code


async def _warm_up(servicer, tokenizer, args, engine) -> bool:
    """The start-up warm-up, before SERVING; False if the engine failed it."""
    grids = ", ".join(f"{h}x{w}" for h, w in args.warmup_grids)
    log.info("warm-up: grids %s", grids)
    try:
        report = await warm_up(servicer, tokenizer, args.warmup_grids, args.max_num_batched_tokens or getattr(
            getattr(getattr(engine, "vllm_config", None), "scheduler_config", None), "max_num_batched_tokens", None))
    except Exception:
        log.exception("the warm-up failed: the engine cannot serve these images%s",
                      "" if args.no_vision_fastpath else " (try --no-vision-fastpath)")
        return False
    metrics.WARMUP_SECONDS.set(report.seconds)
    log.info("warm-up done: %d requests in %.1f s%s", report.requests, report.seconds,
             f" (skipped {', '.join(report.skipped)})" if report.skipped else "")
    return True


def _start(args):
    from transformers import AutoTokenizer

    if args.engine == "transformers":
        from .transformers_engine import start_transformers_engine
        from .vision_fastpath import EngineSetup

        if args.torch_threads > 0:  # the model runs in this process
            import torch

            torch.set_num_threads(args.torch_threads)
        return (*start_transformers_engine(args), EngineSetup(False, False, "off (the Transformers engine)"))
    # Before the engine args are made: vLLM runs its plugins (ours reads this environment) from then on.
    fastpath = configure_engine_processes(not args.no_vision_fastpath, args.posemb_cache_mb)
    engine, preset = start_engine(args)
    if args.torch_threads > 0:  # after the engine core process exists: it keeps its own thread count
        import torch

        torch.set_num_threads(args.torch_threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    return engine, tokenizer, preset, fastpath


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
