"""The preprocessing pipeline: a chat in, a PreparedPrompt out.

Every limit is checked before the work it bounds, cheapest first: image count and text size
on arrival, then admission (:mod:`.admission`), then each image's pixels and tokens from its
header and the whole prompt's length against the context (``max_tokens`` included) before any
image is decoded; only then are images decoded, each once it fits the decode budget. Image
fetching and processing run concurrently (the image pool uses every core it is given); the
prompt is rendered and tokenized meanwhile on the text threads, so the event loop only
stitches results together. When the request ends for any reason (done, refused, its client
gone) its :class:`~kimivl_preprocess.cancel.CancelToken` stops whatever work of it is still
running in those threads within one step. Each step is a trace span (kimivl_hosting.tracing)
under the span the transport gives.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image

from kimivl_contract.errors import Reason, RequestError
from kimivl_contract.identity import tensor_identity
from kimivl_contract.limits import check_context
from kimivl_contract.prepared import PromptLimits, check_prepared_prompt
from kimivl_contract.processor import grid_size, image_tokens
from kimivl_hosting import machine, tracing

from .admission import CHARS_PER_TOKEN, FrontDoorBudgets
from .cancel import CancelToken
from .codec import PromptWire
from .image import ImageError, memory_estimate, numpy_dtype
from .pool import ImagePool
from .prompt import PromptBuilder, TextPart, messages_from_proto, prompt_text, raw_prompt_images
from .sources import ImageFetcher


@dataclass
class Prepared:
    prompt: PromptWire  # serialized, tensors referenced (codec.py says why)
    prompt_text: str
    preprocess_ms: float


class Preprocessor:
    def __init__(self, model_dir: str, pool: ImagePool, fetcher: ImageFetcher, *, max_images: int = 256,
                 max_model_len: int | None = None, max_tensor_bytes: int = 1 << 30, max_text_chars: int = 0,
                 max_request_pixels: int = 1 << 30, budgets: FrontDoorBudgets | None = None,
                 text_workers: int | None = None):
        """``max_text_chars`` 0: CHARS_PER_TOKEN per token of the context; ``budgets`` None: no admission limits."""
        self.builder = PromptBuilder(model_dir)
        self.config = pool.config  # the one reading of preprocessor_config.json
        self.pool = pool
        self.fetcher = fetcher
        self.max_images = max_images
        self.max_model_len = max_model_len or self.builder.max_model_len or 131072
        self.max_tensor_bytes = max_tensor_bytes
        self.max_text_chars = max_text_chars or CHARS_PER_TOKEN * self.max_model_len
        self.max_request_pixels = max_request_pixels
        self.budgets = budgets or FrontDoorBudgets.unlimited()
        self.limits = PromptLimits(
            pad_id=self.builder.pad_id, vocab_size=len(self.builder.tokenizer), max_images=max_images,
            max_model_len=self.max_model_len, merge=tuple(self.config.merge_kernel_size),
            max_grid_side=self.config.max_grid_side)
        # Tokenizing has threads of its own: a long text never waits behind image work (or blocks
        # the event loop: the tokenizers release the GIL), and stopping the server can tell them apart.
        self.text_pool = ThreadPoolExecutor(text_workers or machine.cpu_count(), thread_name_prefix="kimivl-text")

    def close(self, wait: bool = True) -> None:
        self.text_pool.shutdown(wait=wait, cancel_futures=True)

    async def prepare(self, request, dtype: str = "bfloat16", *, max_tokens: int | None = None,
                      span=None, admitted=None) -> Prepared:
        """``request`` is a ChatRequest or PreprocessRequest (same ``input`` oneof); ``max_tokens``:
        the generation's, checked with the prompt against the context before any image is decoded;
        ``span`` the trace span its steps become children of (None when tracing is off);
        ``admitted``: called once the request holds its admission permit, before any work (it
        may refuse the request: what changed while it waited for the permit)."""
        admitted = admitted or (lambda: None)
        t0 = time.perf_counter()
        kind = request.WhichOneof("input")
        if kind == "conversation":
            messages, images = messages_from_proto(request.conversation)
            chars = sum(len(p.text) for m in messages for p in m.parts if isinstance(p, TextPart))
            segments = lambda: self.builder.chat_segments(messages)  # noqa: E731
            where = "the conversation's text"
        elif kind == "raw_prompt":
            images = raw_prompt_images(request.raw_prompt)
            chars = len(request.raw_prompt.text)
            segments = lambda: self.builder.raw_segments(request.raw_prompt.text)  # noqa: E731
            where = "raw_prompt.text"
        elif kind == "prepared_prompt":
            async with self.budgets.requests.hold():
                admitted()
                return self._take_prepared(request.prepared_prompt, t0)
        else:
            raise RequestError("input is not set; give conversation or raw_prompt")
        if len(images) > self.max_images:
            raise RequestError(f"the request has {len(images)} images; the limit is {self.max_images}",
                               resource_exhausted=True, field=f"{kind}", limit=self.max_images)
        if chars > self.max_text_chars:
            raise RequestError(f"{where} is {chars} characters; the limit is {self.max_text_chars} (the "
                               f"{self.max_model_len}-token context cannot hold more)", resource_exhausted=True,
                               field=kind if kind == "conversation" else "raw_prompt.text", limit=self.max_text_chars)
        numpy_dtype(dtype)
        async with self.budgets.requests.hold():
            admitted()
            cancel = CancelToken()
            try:
                return await self._prepare(segments, kind == "raw_prompt", images, dtype, max_tokens, cancel, t0,
                                           span)
            finally:
                cancel.cancel()  # stops this request's work still running in threads (a sibling's failure, a cancel)

    async def _prepare(self, segments, raw: bool, images, dtype: str, max_tokens: int | None,
                       cancel: CancelToken, t0: float, span=None) -> Prepared:
        def text_and_ids():
            with tracing.child("prompt.template_and_tokenize", span) as s:
                segs = segments()
                ids = self.builder.tokenize_segments(segs, raw=raw, cancel=cancel)
                tracing.set_attributes(s, text_tokens=len(ids))
            return prompt_text(segs), ids

        tokenized = asyncio.get_running_loop().run_in_executor(self.text_pool, text_and_ids)
        # One span per image from its fetch to its tensor (header read, checks, decode between).
        spans = [tracing.start("image", parent=span, attributes={"kimivl.field": field,
                                                                 "kimivl.source": img.WhichOneof("source")})
                 if span is not None else None for field, img in images]
        status = "ERROR"
        try:
            opened = await asyncio.gather(*(self._open(field, img, cancel, s)
                                            for (field, img), s in zip(images, spans, strict=True)))
            self._check_images(opened, dtype)
            text, ids = await tokenized
            # Each image is one pad token in ``ids`` until expanded to its count.
            n = len(ids) + sum(image_tokens(*im.size, self.config) - 1 for _, im in opened)
            self._check_context(n, max_tokens)
            processed = await asyncio.gather(*(self._process(field, im, dtype, cancel, s)
                                               for (field, im), s in zip(opened, spans, strict=True)))
            status = None
        except BaseException:
            tokenized.cancel()
            raise
        finally:
            for s in spans:
                tracing.end(s, status)
        expanded = self.builder.expand(ids, [p.num_tokens for p in processed])
        n = len(expanded.token_ids)
        self._check_context(n, max_tokens)  # the same count, now exact
        prompt = PromptWire.from_images(expanded.token_ids, processed, dtype, expanded.placeholders)
        tracing.set_attributes(span, prompt_tokens=n)
        return Prepared(prompt, text, (time.perf_counter() - t0) * 1e3)

    async def _open(self, field: str, image, cancel: CancelToken, span=None) -> tuple[str, Image.Image]:
        with tracing.child("image.fetch", span):
            data = await self.fetcher.fetch(image, field)
        try:
            with tracing.child("image.open", span, bytes=len(data)):
                im = await self.pool.open(data, cancel)
        except ImageError as e:
            raise RequestError(f"{field}: {e}", resource_exhausted=e.too_large, field=field) from None
        tracing.set_attributes(span, width=im.width, height=im.height)
        return field, im

    def _check_images(self, opened: list[tuple[str, Image.Image]], dtype: str) -> None:
        pixels = sum(im.width * im.height for _, im in opened)
        if pixels > self.max_request_pixels:
            raise RequestError(f"the request's images are {pixels} pixels in all; the limit is "
                               f"{self.max_request_pixels}", resource_exhausted=True,
                               limit=self.max_request_pixels)
        per_patch = 3 * self.config.patch_size ** 2 * numpy_dtype(dtype).itemsize
        total = sum(gh * gw for gh, gw in (grid_size(*im.size, self.config) for _, im in opened)) * per_patch
        if total > self.max_tensor_bytes:
            raise RequestError(f"the images make {total} bytes of tensors; the limit is {self.max_tensor_bytes}",
                               resource_exhausted=True, limit=self.max_tensor_bytes)

    def _check_context(self, n: int, max_tokens: int | None) -> None:
        if max_tokens is not None:
            check_context(n, max_tokens, self.max_model_len)
        if n >= self.max_model_len:
            raise RequestError(f"the prompt is {n} tokens (images included); the model's context is "
                               f"{self.max_model_len} and at least one token must be left to generate",
                               reason=Reason.CONTEXT_EXCEEDED, limit=self.max_model_len)

    async def _process(self, field: str, image: Image.Image, dtype: str, cancel: CancelToken, span=None):
        async with self.budgets.decode.hold(memory_estimate(image, self.config, dtype)):
            try:
                with tracing.child("image.decode_and_process", span):
                    out = await self.pool.process(image, dtype, cancel)
            except ImageError as e:
                raise RequestError(f"{field}: {e}", resource_exhausted=e.too_large, field=field) from None
        tracing.set_attributes(span, grid=f"{out.grid_hw[0]}x{out.grid_hw[1]}", image_tokens=out.num_tokens)
        return out

    def _take_prepared(self, prompt, t0: float) -> Prepared:
        tensor_data: list[bytes] = []
        check_prepared_prompt(prompt, self.limits, field="prepared_prompt", tensor_data=tensor_data)
        for img, data in zip(prompt.images, tensor_data, strict=True):
            img.content_hash = tensor_identity(img, data)  # a client's own hash is never trusted
        return Prepared(PromptWire.from_message(prompt), "", (time.perf_counter() - t0) * 1e3)
