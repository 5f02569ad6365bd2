"""Image work off the event loop, on a pool of threads.

Threads rather than processes, by measurement (docs/benchmarks.md, "Preprocessing (CPU)"):
Pillow's decoders and resampler, numpy's copies and lookups and blake3 all release the GIL,
so threads scale with cores, while a process pool must move every result (megabytes of
patches) through a pipe into this process. On 2 cores, 2 threads did 65 images/s against 43
for 2 worker processes; on 16 cores, 178 against 92 (the parent's unpickling saturates).
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from PIL import Image

from kimivl_hosting import memory

from .cancel import CancelToken
from .image import (
    DEFAULT_MAX_PIXELS,
    ProcessedImage,
    ProcessorConfig,
    decode,
    open_image,
    preprocess_image_bytes,
    process_decoded,
)


class ImagePool:
    """Decodes and processes images for coroutines without blocking the event loop.

    ``workers`` (also an attribute): images processed at once, one thread each; None -> the
    CPUs this process may run on; 0 -> one thread (all work is in-process anyway).
    """

    def __init__(self, config: ProcessorConfig, workers: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        if workers is not None and workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.workers = len(os.sched_getaffinity(0)) if workers is None else max(workers, 1)
        self.config = config
        self._max_pixels = max_pixels
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="kimivl-image")

    async def open(self, data: bytes, cancel: CancelToken | None = None) -> Image.Image:
        """The image's header read (:func:`~kimivl_preprocess.image.open_image`: size, mode, the pixel limit)."""
        work = partial(open_image, data, max_pixels=self._max_pixels, cancel=cancel)
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    async def process(self, data: bytes | Image.Image, dtype: str = "bfloat16",
                      cancel: CancelToken | None = None) -> ProcessedImage:
        """Encoded bytes, or an image from :meth:`open`, to patches
        (:func:`~kimivl_preprocess.image.preprocess_image_bytes`, same errors). Once ``cancel`` is
        set the work stops at its next step (raising :class:`~kimivl_preprocess.cancel.Abandoned`)."""
        if isinstance(data, Image.Image):
            work = partial(_process_opened, data, self.config, dtype, cancel)
        else:
            work = partial(preprocess_image_bytes, data, self.config, dtype, max_pixels=self._max_pixels,
                           cancel=cancel)
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    def close(self, wait: bool = True) -> None:
        """Stop the threads (once running work is done, unless ``wait`` is False); queued work is
        cancelled. Idempotent."""
        self._executor.shutdown(wait=wait, cancel_futures=True)


LARGE_IMAGE_PIXELS = 16_000_000


def _process_opened(image: Image.Image, config: ProcessorConfig, dtype: str, cancel: CancelToken | None):
    large = image.width * image.height > LARGE_IMAGE_PIXELS
    try:
        return process_decoded(decode(image, cancel), config, dtype, cancel)
    finally:
        if large:  # its freed bands and intermediates would stay in this thread's malloc arena
            del image
            memory.trim_now()
