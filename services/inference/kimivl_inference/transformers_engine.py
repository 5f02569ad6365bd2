"""The inference tier's second engine: the model through Hugging Face Transformers.

The deployment guide's other path ("Transformers库集成使用方法"): the model directory loaded with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` (the checkpoint's own
modeling code, or the project's ``kimivl_modeling`` in the tiny models), for machines where
vLLM does not run and as a reference to check vLLM against. Nothing here imports vLLM.

:class:`TransformersEngine` offers the part of vLLM's ``AsyncLLM`` that the server and the
generation loop use — ``generate(engine_input, params, request_id)`` as an async iterator of
delta ``RequestOutput``s (aborted when the iterator is closed), ``abort``, ``errored`` /
``dead_error``, ``model_config``, ``do_log_stats``, ``shutdown`` — so those stay
engine-agnostic. Its inputs are the prepared tensors exactly as the checkpoint's processor
gives them (``pixel_values`` (sum h*w, 3, 14, 14), ``image_grid_hws`` (n, 2)).

Scheduling (one worker thread owns the model): each step admits waiting requests in arrival
order while rows are free (``max_num_seqs``) and their prompts fit ``max_num_batched_tokens``
(at least one a step), prefilling each (its images encoded with it) and sampling its first
token; then one batched decode step advances every other running request by one token. So
requests are served first come, first served, decode is batched across all of them, and
every token is streamed as soon as it is sampled. The KV cache keeps MLA latents in rows of
one tensor per layer (:mod:`.latent_cache`).
"""
from __future__ import annotations

import asyncio
import collections
import importlib.util
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from prometheus_client import Gauge

from .options import PRESETS_BY_NAME, Preset, pick_preset
from .pixels import prompt_patches
from .text_stream import TextStream

log = logging.getLogger("kimivl.transformers_engine")

DEFAULT_MAX_NUM_SEQS = 8  # the guide's standard preset, where no GPU picks one
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192

# The counterparts of vLLM's vllm:num_requests_running / _waiting.
RUNNING = Gauge("kimivl_engine_requests_running", "Transformers engine: requests holding a cache row")
WAITING = Gauge("kimivl_engine_requests_waiting", "Transformers engine: requests waiting for a cache row")


class EngineDeadError(RuntimeError):
    """The engine's worker failed; no request can be served any more."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    repetition_penalty: float
    stop: list | None
    ignore_eos: bool
    max_tokens: int
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0


@dataclass
class CompletionOutput:
    text: str
    token_ids: list
    finish_reason: str | None = None
    index: int = 0


@dataclass
class RequestOutput:
    request_id: str
    outputs: list
    num_cached_tokens: int = 0
    finished: bool = False


@dataclass
class ModelConfig:
    model: str
    dtype: object
    max_model_len: int
    vocab_size: int

    def get_vocab_size(self) -> int:
        return self.vocab_size


@dataclass(eq=False)
class _Request:
    id: str
    prompt: list
    pixel_values: object
    grid: object
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    aborted: bool = False
    row: int = -1
    length: int = 0  # tokens in the cache
    generated: int = 0
    last: int = -1  # the latest sampled token (not yet in the cache)
    sampling: object = None
    arrived: float = field(default_factory=time.monotonic)


def init_dummy_weights(model, seed: int) -> int:
    """Random weights for benchmarks without a checkpoint: N(0, 1/fan_in) from ``seed``, norms
    1, biases 0 (as ``--reinit-dummy-weights`` on the vLLM engine). Returns the tensor count."""
    import torch
    from torch import nn

    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, nn.LayerNorm) or type(m).__name__ == "RMSNorm"}
    n = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0) if id(p) in norms else p.zero_()
            else:
                fan_in = p[0].numel() if p.dim() == 4 else p.shape[-1]
                p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=g)
            n += 1
    return n


class TransformersEngine:
    def __init__(self, model, tokenizer, *, model_dir: str, max_num_seqs: int, max_model_len: int,
                 max_num_batched_tokens: int, eos_token_ids, device):
        import torch

        from .latent_cache import LatentCache

        self.model, self.tokenizer, self.device = model, tokenizer, device
        text = model.config.text_config
        self.model_config = ModelConfig(model=model_dir, dtype=model.dtype, max_model_len=max_model_len,
                                        vocab_size=text.vocab_size)
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.eos = frozenset(eos_token_ids)
        # What the server reads from AsyncLLM: the most tokens one image may have (vLLM's
        # encoder cache), the step size, and prefix caching (not done here).
        self.input_processor = SimpleNamespace(mm_encoder_cache_size=max_num_batched_tokens)
        self.vllm_config = SimpleNamespace(cache_config=SimpleNamespace(enable_prefix_caching=False),
                                           scheduler_config=SimpleNamespace(max_num_batched_tokens=max_num_batched_tokens))
        self.cache = LatentCache(text.num_hidden_layers, text.kv_lora_rank, text.qk_rope_head_dim,
                                 max_rows=max_num_seqs, dtype=model.dtype, device=device)
        self._torch = torch
        self.errored = False
        self.dead_error: BaseException | None = None
        self._inbox: collections.deque = collections.deque()
        self._waiting: collections.deque = collections.deque()
        self._running: list[_Request] = []
        self._wake = threading.Event()
        self._stop = False
        self._stats = {"prompt": 0, "generated": 0, "t": time.monotonic()}
        self._thread = threading.Thread(target=self._run, name="kimivl-transformers-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the AsyncLLM subset

    @staticmethod
    def make_sampling_params(sampling, max_tokens: int) -> SamplingParams:
        from .generation import sampling_fields  # (the gRPC types; the engine itself does not need them)

        return SamplingParams(**sampling_fields(sampling, max_tokens))

    @staticmethod
    def build_engine_input(prompt, model_dtype, normalizer=None, tensor_data: list | None = None) -> dict:
        pixel_values, grid = prompt_patches(prompt, model_dtype, normalizer, tensor_data)
        return {"prompt_token_ids": list(prompt.token_ids), "pixel_values": pixel_values, "image_grid_hws": grid}

    async def generate(self, engine_input: dict, params: SamplingParams, request_id: str):
        if self.errored:
            raise EngineDeadError(f"the engine died: {self.dead_error!r}")
        req = _Request(id=request_id, prompt=list(engine_input["prompt_token_ids"]),
                       pixel_values=engine_input.get("pixel_values"), grid=engine_input.get("image_grid_hws"),
                       params=params, loop=asyncio.get_running_loop(), queue=asyncio.Queue())
        self._inbox.append(req)
        self._wake.set()
        stream = TextStream(self.tokenizer, params.stop)
        done = False
        try:
            while True:
                item = await req.queue.get()
                if isinstance(item, BaseException):
                    raise item
                token, finish = item
                if token is None:  # aborted: no new token
                    done = True
                    yield RequestOutput(request_id, [CompletionOutput("", [], finish)], 0, True)
                    return
                text = stream.push(token)
                if stream.stopped:
                    finish = "stop"
                elif finish is not None:
                    text += stream.finish()
                done = finish is not None
                yield RequestOutput(request_id, [CompletionOutput(text, [token], finish)], 0, done)
                if done:
                    return
        finally:
            if not done or stream.stopped:
                req.aborted = True  # the worker drops it at its next step
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        for r in [*self._inbox, *self._waiting, *self._running]:
            if r.id == request_id:
                r.aborted = True
                r.loop.call_soon_threadsafe(r.queue.put_nowait, (None, "abort"))
        self._wake.set()

    async def do_log_stats(self) -> None:
        now = time.monotonic()
        s = self._stats
        dt = max(now - s["t"], 1e-9)
        log.info("Transformers engine: %d running, %d waiting; %.1f prompt tok/s, %.1f generation tok/s; "
                 "cache %d rows x %d positions", len(self._running), len(self._waiting) + len(self._inbox),
                 s["prompt"] / dt, s["generated"] / dt, self.cache.rows, self.cache.capacity)
        self._stats = {"prompt": 0, "generated": 0, "t": now}

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ the worker thread

    def _run(self) -> None:
        try:
            with self._torch.inference_mode():
                while not self._stop:
                    self._wake.clear()  # before the step: a request arriving during it is not missed
                    if not self._step():
                        self._wake.wait(0.5)
        except BaseException as e:  # noqa: BLE001 - anything here leaves the engine unusable
            log.exception("the Transformers engine failed")
            self.dead_error = e
            self.errored = True
            dead = EngineDeadError(f"the engine died: {e!r}")
            for r in [*self._inbox, *self._waiting, *self._running]:
                r.loop.call_soon_threadsafe(r.queue.put_nowait, dead)

    def _step(self) -> bool:
        """One scheduling step; False when there was nothing to do."""
        while self._inbox:
            self._waiting.append(self._inbox.popleft())
        self._waiting = collections.deque(r for r in self._waiting if not r.aborted)
        for r in [r for r in self._running if r.aborted]:
            self._release(r)
        decoding = len(self._running)
        budget = self.max_num_batched_tokens
        admitted = False
        while self._waiting and len(self._running) < self.max_num_seqs:
            r = self._waiting[0]
            if admitted and len(r.prompt) > budget:
                break
            self._waiting.popleft()
            budget -= len(r.prompt)
            admitted = True
            self._prefill(r)
        if decoding:
            self._decode(decoding)
        for r in [r for r in self._running if r.aborted]:
            self._release(r)
        RUNNING.set(len(self._running))
        WAITING.set(len(self._waiting) + len(self._inbox))
        return admitted or decoding > 0

    def _prefill(self, r: _Request) -> None:
        torch = self._torch
        from .sampler import RequestSampling

        n = len(self._running)
        t = len(r.prompt)
        try:
            self.cache.reserve(n + 1, t + 1)
        except torch.OutOfMemoryError:
            self._fail(r, "the KV cache cannot grow for this request (out of memory)")
            return
        r.row = n
        self._running.append(r)
        ids = torch.tensor([r.prompt], device=self.device)
        pv = None if r.pixel_values is None else r.pixel_values.to(self.device)
        self.cache.select(slice(n, n + 1), t)
        try:
            embeds = self.model.embed(ids, pv, r.grid)
            out = self.model(inputs_embeds=embeds, past_key_values=self.cache,
                             cache_index=torch.arange(t, device=self.device).unsqueeze(0), logits_to_keep=1)
        except torch.OutOfMemoryError:
            self._running.pop()
            r.row = -1
            self._fail(r, f"out of memory prefilling {t} prompt tokens")
            return
        r.length = t
        r.sampling = RequestSampling(r.params, r.prompt, self.device)
        self._stats["prompt"] += t
        self._emit([r], out.logits[:, -1].float())

    def _decode(self, n: int) -> None:
        torch = self._torch
        rows = self._running[:n]
        longest = max(r.length for r in rows) + 1
        self.cache.reserve(n, longest)
        self.cache.select(slice(0, n), longest)
        ids = torch.tensor([[r.last] for r in rows], device=self.device)
        pos = torch.tensor([[r.length] for r in rows], device=self.device)
        embeds = self.model.get_input_embeddings()(ids)
        out = self.model(inputs_embeds=embeds, past_key_values=self.cache, cache_index=pos)
        for r in rows:
            r.length += 1
        self._emit(rows, out.logits[:, -1].float())

    def _emit(self, rows: list[_Request], logits) -> None:
        from .sampler import sample

        tokens = sample(logits, [r.sampling for r in rows])
        for r, tok in zip(rows, tokens, strict=True):
            r.generated += 1
            r.last = tok
            r.sampling.observe(tok)
            finish = None
            if tok in self.eos and not r.params.ignore_eos:
                finish = "stop"
            elif r.generated >= r.params.max_tokens or r.length + 1 >= self.model_config.max_model_len:
                finish = "length"
            self._stats["generated"] += 1
            r.loop.call_soon_threadsafe(r.queue.put_nowait, (tok, finish))
            if finish is not None:
                r.aborted = True  # finished: released at the end of the step

    def _release(self, r: _Request) -> None:
        """Free r's row, moving the last running request into it."""
        last = self._running.pop()
        if last is not r:
            self.cache.move(last.row, r.row, last.length)
            last.row = r.row
            self._running[r.row] = last
        r.row = -1

    def _fail(self, r: _Request, message: str) -> None:
        from kimivl_contract.errors import RequestError

        r.loop.call_soon_threadsafe(r.queue.put_nowait, RequestError(message, resource_exhausted=True))


# ---------------------------------------------------------------------- start-up


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def checkpoint_classes(model_dir: str):
    """(config class, model class): the checkpoint's own code where its config.json's ``auto_map``
    names it (what trust_remote_code means), else the Auto classes. Resolved explicitly because
    the Auto classes prefer a class registered for the same ``model_type`` in this process, and
    vLLM's config for ``kimi_vl`` is registered wherever our vLLM plugin ran (it needs it for the
    processor), whose text config lacks the fields this code reads."""
    import json
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    auto_map = json.loads((Path(model_dir) / "config.json").read_text()).get("auto_map", {})
    if "AutoConfig" in auto_map and "AutoModelForCausalLM" in auto_map:
        return (get_class_from_dynamic_module(auto_map["AutoConfig"], model_dir),
                get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], model_dir))
    return AutoConfig, AutoModelForCausalLM


def start_transformers_engine(args):
    """(engine, tokenizer, preset) from the CLI options: the model loaded with trust_remote_code, on the
    GPU when there is one (``--device``), presets as for vLLM (max_num_seqs, max_model_len)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    gpu_gb = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None
    if args.preset == "none" or (args.preset == "auto" and gpu_gb is None):
        preset: Preset | None = None
    elif args.preset == "auto":
        preset = pick_preset(gpu_gb)
    else:
        preset = PRESETS_BY_NAME[args.preset]
    config_cls, model_cls = checkpoint_classes(args.model)
    auto = model_cls is AutoModelForCausalLM
    remote = {"trust_remote_code": True} if auto else {}  # the checkpoint's classes need no flag
    config = config_cls.from_pretrained(args.model, **remote)
    dtype = getattr(config, "dtype", None) if args.dtype == "auto" else getattr(torch, args.dtype)
    dtype = dtype or torch.bfloat16
    attn = args.attn_implementation
    if attn == "auto":
        attn = "flash_attention_2" if cuda and flash_attn_available() else "sdpa"
    text = config.text_config
    max_model_len = args.max_model_len or (preset.max_model_len if preset else None) or text.max_position_embeddings
    max_model_len = min(max_model_len, text.max_position_embeddings)
    max_num_seqs = args.max_num_seqs or (preset.max_num_seqs if preset else DEFAULT_MAX_NUM_SEQS)
    t0 = time.perf_counter()
    if args.load_format == "dummy":
        with torch.device(device):
            model = (model_cls.from_config(config, dtype=dtype, attn_implementation=attn, **remote) if auto
                     else model_cls._from_config(config, dtype=dtype, attn_implementation=attn))
        log.info("dummy weights: %d tensors N(0, 1/fan_in) from seed %d", init_dummy_weights(model, args.seed),
                 args.seed)
    else:
        # No device_map: it needs accelerate, which this path does not require.
        model = model_cls.from_pretrained(args.model, config=config, dtype=dtype, attn_implementation=attn,
                                          **remote).to(device)
    model.eval().requires_grad_(False)
    if hasattr(model, "stack_experts"):
        model.stack_experts()  # one grouped matmul per expert projection (the project's modeling code)
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    eos = set(config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id])
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.eos_token_id is not None:
        eos |= set(gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id])
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    eos.discard(None)
    engine = TransformersEngine(model, tokenizer, model_dir=args.model, max_num_seqs=max_num_seqs,
                                max_model_len=max_model_len,
                                max_num_batched_tokens=args.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS,
                                eos_token_ids=sorted(eos), device=device)
    log.info("Transformers engine: %s on %s, %s, attention %s, max_num_seqs %d, max_model_len %d, loaded in %.1f s",
             type(model).__name__, device, str(dtype).removeprefix("torch."), attn, max_num_seqs, max_model_len,
             time.perf_counter() - t0)
    if args.gpu_memory_utilization is not None or args.swap_space is not None or (preset and cuda):
        log.info("gpu_memory_utilization and swap_space are vLLM settings: the Transformers engine's cache grows "
                 "with its requests, bounded by max_num_seqs x max_model_len")
    return engine, tokenizer, preset
