"""The preprocessing pipeline: a chat in, a PreparedPrompt out.

Image fetching and processing run concurrently (the image pool uses every core it is
given); the prompt is rendered and tokenized meanwhile in a thread, so the event loop
only stitches results together.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from kimivl_contract.errors import RequestError
from kimivl_contract.identity import tensor_identity
from kimivl_contract.prepared import PromptLimits, check_prepared_prompt
from kimivl_hosting import tracing

from .codec import PromptWire
from .image import ImageError
from .pool import ImagePool
from .prompt import PromptBuilder, messages_from_proto, raw_prompt_images
from .sources import ImageFetcher


@dataclass
class Prepared:
    prompt: PromptWire  # serialized, tensors referenced (codec.py says why)
    prompt_text: str
    preprocess_ms: float


class Preprocessor:
    def __init__(self, model_dir: str, pool: ImagePool, fetcher: ImageFetcher, *, max_images: int = 256,
                 max_model_len: int | None = None, max_tensor_bytes: int = 1 << 30):
        self.builder = PromptBuilder(model_dir)
        self.config = pool.config  # the one reading of preprocessor_config.json
        self.pool = pool
        self.fetcher = fetcher
        self.max_images = max_images
        self.max_model_len = max_model_len or self.builder.max_model_len or 131072
        self.max_tensor_bytes = max_tensor_bytes
        self.limits = PromptLimits(
            pad_id=self.builder.pad_id, vocab_size=len(self.builder.tokenizer), max_images=max_images,
            max_model_len=self.max_model_len, merge=tuple(self.config.merge_kernel_size),
            max_grid_side=self.config.max_grid_side)

    async def prepare(self, request, dtype: str = "bfloat16", span=None) -> Prepared:
        """``request`` is a ChatRequest or PreprocessRequest (same ``input`` oneof); ``span`` the
        trace span its steps become children of (kimivl_hosting.tracing; None when off)."""
        t0 = time.perf_counter()
        kind = request.WhichOneof("input")
        if kind == "conversation":
            messages, images = messages_from_proto(request.conversation)
            render = lambda: self.builder.render_chat(messages)  # noqa: E731
            chat = True
        elif kind == "raw_prompt":
            images = raw_prompt_images(request.raw_prompt)
            render = lambda: self.builder.render_raw(request.raw_prompt.text)  # noqa: E731
            chat = False
        elif kind == "prepared_prompt":
            return self._take_prepared(request.prepared_prompt, t0)
        else:
            raise RequestError("input is not set; give conversation or raw_prompt")
        if len(images) > self.max_images:
            raise RequestError(f"the request has {len(images)} images; the limit is {self.max_images}",
                               resource_exhausted=True, field=f"{kind}", limit=self.max_images)

        def text_and_ids():
            with tracing.child("prompt.template_and_tokenize", span) as s:
                text = render()
                ids = self.builder.tokenize(text, chat=chat)
                tracing.set_attributes(s, text_tokens=len(ids))
            return text, ids

        tokenized = asyncio.create_task(asyncio.to_thread(text_and_ids))
        processed = asyncio.gather(*(self._image(field, img, dtype, span) for field, img in images))
        try:
            processed = await processed
        except BaseException:
            tokenized.cancel()
            raise
        text, ids = await tokenized
        expanded = self.builder.expand(ids, [p.num_tokens for p in processed])
        n = len(expanded.token_ids)
        if n >= self.max_model_len:
            raise RequestError(f"the prompt is {n} tokens (images included); the model's context is "
                               f"{self.max_model_len} and at least one token must be left to generate")
        total = sum(p.pixel_values.nbytes for p in processed)
        if total > self.max_tensor_bytes:
            raise RequestError(f"the images make {total} bytes of tensors; the limit is {self.max_tensor_bytes}",
                               resource_exhausted=True)
        prompt = PromptWire.from_images(expanded.token_ids, processed, dtype, expanded.placeholders)
        tracing.set_attributes(span, prompt_tokens=n)
        return Prepared(prompt, text, (time.perf_counter() - t0) * 1e3)

    async def _image(self, field: str, image, dtype: str, span=None):
        with tracing.child("image", span, field=field, source=image.WhichOneof("source")) as s:
            with tracing.child("image.fetch", s):
                data = await self.fetcher.fetch(image, field)
            try:
                with tracing.child("image.decode_and_process", s, bytes=len(data)):
                    out = await self.pool.process(data, dtype)
            except ImageError as e:
                raise RequestError(f"{field}: {e}", resource_exhausted=e.too_large, field=field) from None
            tracing.set_attributes(s, grid=f"{out.grid_hw[0]}x{out.grid_hw[1]}", image_tokens=out.num_tokens)
            return out

    def _take_prepared(self, prompt, t0: float) -> Prepared:
        tensor_data: list[bytes] = []
        check_prepared_prompt(prompt, self.limits, field="prepared_prompt", tensor_data=tensor_data)
        for img, data in zip(prompt.images, tensor_data, strict=True):
            img.content_hash = tensor_identity(img, data)  # a client's own hash is never trusted
        return Prepared(PromptWire.from_message(prompt), "", (time.perf_counter() - t0) * 1e3)
