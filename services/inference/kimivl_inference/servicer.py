"""InferenceService.Generate: validate a prepared prompt, run it on the engine, stream the result.

Everything that reaches the engine is checked first (vLLM trusts its multimodal inputs; a bad
placeholder run kills its engine core). The engine is attached once it has started; until then
requests answer UNAVAILABLE, which the front door retries on another replica.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc

from kimivl.v1 import inference_pb2, types_pb2
from kimivl_contract import errors
from kimivl_contract.errors import RequestError
from kimivl_contract.limits import check_context, check_sampling
from kimivl_contract.prepared import PromptLimits, check_prepared_prompt
from kimivl_contract.processor import ProcessorConfig
from kimivl_contract.tokens import IMAGE_PAD
from kimivl_hosting import tracing

from . import metrics
from .admission import PrefillGrouper
from .budgets import InferenceBudgets, tensor_bytes
from .engine_input import build_engine_input
from .generation import GenerationStats, end_marker_token_ids, generate
from .pixels import PixelNormalizer

log = logging.getLogger("kimivl.inference")
INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


class EngineNotReady(Exception):
    pass


class InferenceServicer:
    def __init__(self, prefill_window_s: float = 0.0, budget_options: dict | None = None):
        """``budget_options``: :meth:`InferenceBudgets.from_options` keywords (the engine's
        max_num_seqs is added once it has started)."""
        self.budget_options = budget_options or {}
        self.budgets: InferenceBudgets | None = None
        self.engine = None
        self.prefill_window_s = prefill_window_s
        self.grouper: PrefillGrouper | None = None
        self.in_engine = 0  # requests handed to the engine and not finished
        self.limits: PromptLimits | None = None
        self.end_marker_ids: list[int] = []
        self.model_dtype = None
        self.normalizer: PixelNormalizer | None = None
        self.raw_pixels = False  # hand uint8 patches to the engine (the vision fast path normalizes them)
        self.prefix_caching = False
        self.on_engine_dead = None
        self.engine_traces = False  # vLLM was given an OTLP endpoint (it then takes trace_headers)

    def attach(self, engine, tokenizer, limit_mm: int):
        mc = engine.model_config
        vocab = mc.get_vocab_size()
        encoder_cache = getattr(getattr(engine, "input_processor", None), "mm_encoder_cache_size", 0) or None
        self.limits = PromptLimits(pad_id=tokenizer.convert_tokens_to_ids(IMAGE_PAD), vocab_size=vocab,
                                   max_images=limit_mm, max_model_len=mc.max_model_len,
                                   max_image_tokens=encoder_cache)
        self.end_marker_ids = end_marker_token_ids(tokenizer)
        self.model_dtype = mc.dtype
        cache = getattr(getattr(engine, "vllm_config", None), "cache_config", None)
        self.prefix_caching = bool(cache is not None and cache.enable_prefix_caching)
        metrics.PREFIX_CACHING.set(int(self.prefix_caching))
        processor = ProcessorConfig.from_model_dir(mc.model)
        self.normalizer = PixelNormalizer(processor.image_mean, processor.image_std, mc.dtype)
        sched = getattr(getattr(engine, "vllm_config", None), "scheduler_config", None)
        self.grouper = PrefillGrouper(self.prefill_window_s,
                                      getattr(sched, "max_num_batched_tokens", None) or mc.max_model_len)
        self.budgets = InferenceBudgets.from_options(max_num_seqs=getattr(sched, "max_num_seqs", None) or 256,
                                                     **self.budget_options)
        self.engine = engine

    def _build_input(self, prompt, model_dtype, normalizer=None, tensor_data=None):
        """vLLM's engine input (raw uint8 patches where its fast path takes them), unless the engine
        builds its own (the Transformers engine)."""
        own = getattr(self.engine, "build_engine_input", None)
        if own is not None:
            return own(prompt, model_dtype, normalizer, tensor_data)
        return build_engine_input(prompt, model_dtype, normalizer, tensor_data, self.raw_pixels)

    def _trace_headers(self, span) -> dict | None:
        """The engine's own request span joins the trace when vLLM traces too (same endpoint)."""
        if span is None or not self.engine_traces:
            return None
        return dict(tracing.headers(span))

    async def Generate(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        arrived = time.perf_counter()
        code = None
        stats = GenerationStats()
        metrics.WAITING.inc()
        state = "waiting"
        held = []  # admission permits, released at the first token (waiting) and at the end
        span = tracing.start(f"{INFERENCE_SERVICE}/Generate", kind="server",
                             parent=tracing.extract(context.invocation_metadata() or ())) if tracing.enabled else None
        try:
            if self.engine is None:
                raise EngineNotReady()
            check_sampling(request.sampling, request.thinking)
            # Admission before the tensors are read or copied (vLLM's input needs both).
            itemsize = getattr(self.model_dtype, "itemsize", 2)
            with tracing.child("admission", span):
                held.append(await self.budgets.tensors.acquire(tensor_bytes(request.prompt, itemsize)))
                # A client whose deadline ends before its turn is refused now, not at the deadline.
                waiting = await self.budgets.waiting.acquire(deadline_s=context.time_remaining())
                held.append(waiting)
            # Headers now, not with the first token: the front door's upload gate takes them as
            # "received". Not before the UNAVAILABLEs above: headers commit the call, and gRPC
            # would no longer retry it on another replica.
            await context.send_initial_metadata(())
            with tracing.child("validate", span):
                tensor_data: list[bytes] = []
                image_tokens = check_prepared_prompt(request.prompt, self.limits, tensor_data=tensor_data)
                n = len(request.prompt.token_ids)
                check_context(n, request.sampling.max_tokens if request.sampling.HasField("max_tokens") else None,
                              self.limits.max_model_len)
            tracing.set_attributes(span, prompt_tokens=n, images=len(request.prompt.images), image_tokens=image_tokens)
            if not request.request_id:
                request.request_id = uuid.uuid4().hex
            with tracing.child("engine_input", span):
                build = self._build_input
                if request.prompt.images:  # tensor work (identity, normalization) off the event loop
                    engine_input = await asyncio.to_thread(build, request.prompt, self.model_dtype, self.normalizer,
                                                           tensor_data)
                else:
                    engine_input = build(request.prompt, self.model_dtype)
            if request.prompt.images and self.grouper.enabled:
                with tracing.child("admission.prefill_window", span):
                    metrics.PREFILL_HOLD.observe(await self.grouper.admit(n, engine_busy=self.in_engine > 0))
            last = None
            self.in_engine += 1
            gen = tracing.start("engine.generate", parent=span)
            try:
                async for msg in generate(self.engine, engine_input, request, max_model_len=self.limits.max_model_len,
                                          end_marker_ids=self.end_marker_ids, image_tokens=image_tokens, stats=stats,
                                          arrived_s=arrived, trace_headers=self._trace_headers(gen)):
                    if state == "waiting" and stats.first_token_s is not None:
                        waiting.release()
                        metrics.WAITING.dec()
                        metrics.RUNNING.inc()
                        state = "running"
                        metrics.TTFT.observe(stats.first_token_s)
                        tracing.add_event(gen, "first_token")
                    last = msg
                    yield msg
            finally:
                self.in_engine -= 1
                tracing.end(gen)
            u = last.result.usage
            tracing.set_attributes(span, cached_prompt_tokens=u.cached_prompt_tokens, thinking_tokens=u.thinking_tokens,
                                   answer_tokens=u.answer_tokens,
                                   finish_reason=types_pb2.FinishReason.Name(last.result.finish_reason))
            metrics.THINKING_TOKENS.inc(u.thinking_tokens)
            metrics.ANSWER_TOKENS.inc(u.answer_tokens)
            times = stats.token_times
            for a, b in zip(times, times[1:], strict=False):
                metrics.ITL.observe(b - a)
        except RequestError as e:  # answered without context.abort: see errors.answer
            code = e.code
            errors.answer(context, e, pushback="now")  # shed: the front door tries the next replica at once
        except EngineNotReady:
            code = grpc.StatusCode.UNAVAILABLE
            errors.answer_with(context, code, "the engine is still starting; retry when health reports SERVING",
                               reason=errors.Reason.UNAVAILABLE, retry_after_s=5.0)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED  # the consumer left: vLLM aborts the request on cancel
            raise
        except Exception as e:
            if _engine_dead(e) or (self.engine is not None and self.engine.errored):
                code = grpc.StatusCode.UNAVAILABLE
                if self.on_engine_dead:
                    self.on_engine_dead()
                errors.answer_with(context, code, "the inference engine died; this replica is restarting",
                                   reason=errors.Reason.UNAVAILABLE, retry_after_s=1.0)
            else:
                log.exception("request %s failed", request.request_id)
                code = grpc.StatusCode.INTERNAL
                errors.answer_with(context, code, f"internal error: {type(e).__name__}", reason=errors.Reason.INTERNAL)
        finally:
            for permit in held:
                permit.release()
            tracing.end(span, (code or grpc.StatusCode.OK).name)
            (metrics.WAITING if state == "waiting" else metrics.RUNNING).dec()
            if code is not None:
                metrics.ERRORS.labels(code.name).inc()


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


def handlers(servicer: InferenceServicer) -> dict:
    return {"Generate": grpc.unary_stream_rpc_method_handler(
        servicer.Generate, request_deserializer=inference_pb2.GenerateRequest.FromString,
        response_serializer=inference_pb2.GenerateResponse.SerializeToString)}
