"""The project's Kimi-VL HF processor, registered for vLLM's ``KimiVLConfig``.

vLLM builds an HF processor (``AutoProcessor``) at start-up, in the API process and again
in the engine's worker, even when every request arrives already preprocessed. Moonshot's
checkpoint ships its processor as remote code (``auto_map`` + ``trust_remote_code``); a
model directory without that code (the tiny test model) needs a processor registered in
each of those processes, which is what the ``vllm.general_plugins`` entry point
``kimivl = "kimivl_inference.plugin:register"`` does (:mod:`kimivl_inference.plugin`).

The image steps are those of Moonshot's ``KimiVLImageProcessor``, rendered in torch:

1. if ``(w//14)*(h//14) > in_token_limit``: resize by ``s = sqrt(limit / that)`` to
   ``(int(w*s), int(h*s))`` with PIL BICUBIC (in the image's own mode, as Moonshot does), and
   shrink an image over 512 patches a side to fit, as the front door does
   (:func:`kimivl_contract.processor.target_size` is the one rule);
2. convert to RGB, zero-pad bottom/right to multiples of ``patch * merge`` (28);
3. ``/255``, then ``(x - mean) / std`` (:func:`~kimivl_contract.processor.normalized_values`);
4. patchify ``(C,H,W) -> (C,H/14,14,W/14,14) -> (H/14,W/14,C,14,14) -> (-1,C,14,14)``;
   the grid is ``(H/14, W/14)``.

The text step expands each ``<|media_pad|>`` into ``grid_h*grid_w/4`` copies, one per
merged patch, which is what the language model's placeholder positions must match.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin

from kimivl_contract.processor import ProcessorConfig, normalized_values, target_size
from kimivl_contract.tokens import IMAGE_PAD as IMAGE_TOKEN

logger = logging.getLogger(__name__)

_EXPANDED = "<|kimivl_image_slot|>"  # transient; never reaches the tokenizer


class KimiVLImageProcessor(BaseImageProcessor):
    """Kimi-VL image preprocessing: PIL images to MoonViT patches and their grids.

    Subclasses ``BaseImageProcessor`` because ``AutoImageProcessor.register`` requires it;
    the transformers backend pipeline is bypassed by overriding ``preprocess`` (which the
    inherited ``__call__`` calls).
    """

    model_input_names = ["pixel_values", "image_grid_hws"]

    def __init__(
        self,
        patch_size: int = 14,
        merge_kernel_size: tuple[int, int] | list[int] = (2, 2),
        in_token_limit: int = 16384,
        pad_input: bool = True,
        image_mean: tuple[float, ...] | list[float] = (0.5, 0.5, 0.5),
        image_std: tuple[float, ...] | list[float] = (0.5, 0.5, 0.5),
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.merge_kernel_size = list(merge_kernel_size)
        self.in_token_limit = in_token_limit
        self.pad_input = pad_input
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)

    def _config(self) -> ProcessorConfig:
        return ProcessorConfig(patch_size=self.patch_size, merge_kernel_size=tuple(self.merge_kernel_size),
                               in_token_limit=self.in_token_limit, image_mean=tuple(self.image_mean),
                               image_std=tuple(self.image_std))

    def resize(self, image: Image.Image) -> Image.Image:
        """Shrink the image to the token limit and the vision tower's side limit."""
        size = target_size(*image.size, self._config())
        return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)

    def to_normalized_tensor(self, image: Image.Image) -> torch.Tensor:
        """RGB, zero-padded to the merge grid, normalised per byte: (C, H, W) float32."""
        pixels = np.asarray(image.convert("RGB"))
        if self.pad_input:
            mh, mw = (k * self.patch_size for k in self.merge_kernel_size)
            h, w = pixels.shape[:2]
            pixels = np.pad(pixels, ((0, (mh - h % mh) % mh), (0, (mw - w % mw) % mw), (0, 0)))
        table = torch.from_numpy(normalized_values(self.image_mean, self.image_std))  # (3, 256)
        codes = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).long()  # (C, H, W)
        return table.gather(1, codes.reshape(3, -1)).reshape(codes.shape)

    def patchify(self, t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(C, H, W) -> ((H/p)*(W/p), C, p, p) in row-major patch order, and the grid (H/p, W/p)."""
        p = self.patch_size
        c, h, w = t.shape
        patches = t.reshape(c, h // p, p, w // p, p).permute(1, 3, 0, 2, 4).reshape(-1, c, p, p)
        return patches, (h // p, w // p)

    def preprocess(self, images, **kwargs) -> BatchFeature:
        """Process one image or a (possibly once-nested) list of them, concatenating the patches.

        Returns torch tensors whatever ``return_tensors`` says, as Moonshot's processor does;
        other transformers image kwargs do not apply and are ignored.
        """
        if isinstance(images, Image.Image):
            images = [images]
        flat = [im for item in images for im in (item if isinstance(item, (list, tuple)) else [item])]
        patches, grids = [], []
        for image in flat:
            if not isinstance(image, Image.Image):
                raise TypeError(f"KimiVLImageProcessor takes PIL images, got {type(image).__name__}")
            pv, grid = self.patchify(self.to_normalized_tensor(self.resize(image)))
            patches.append(pv)
            grids.append(grid)
        p = self.patch_size
        return BatchFeature(
            data={
                "pixel_values": torch.cat(patches) if patches else torch.empty(0, 3, p, p),
                "image_grid_hws": torch.tensor(grids, dtype=torch.int64).reshape(-1, 2),
            }
        )


class KimiVLProcessorKwargs(ProcessingKwargs, total=False):
    _defaults = {"text_kwargs": {"padding": False}}


class KimiVLProcessor(ProcessorMixin):
    """Tokenizer + ``KimiVLImageProcessor``; expands each image placeholder to its token count."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        self.image_token = IMAGE_TOKEN
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def __call__(self, images=None, text=None, **kwargs) -> BatchFeature:
        out = self._merge_kwargs(
            KimiVLProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        image_inputs: dict = {}
        grids = None
        if images is not None and not (isinstance(images, (list, tuple)) and len(images) == 0):
            image_inputs = dict(self.image_processor(images, **out["images_kwargs"]))
            grids = image_inputs["image_grid_hws"]
        if text is None:
            return BatchFeature(data=image_inputs)
        texts = [text] if isinstance(text, str) else list(text)
        if grids is not None:
            texts = self._expand_image_tokens(texts, grids)
        text_inputs = self.tokenizer(texts, **out["text_kwargs"])
        return BatchFeature(data={**text_inputs, **image_inputs})

    def _expand_image_tokens(self, texts: list[str], grids: torch.Tensor) -> list[str]:
        mh, mw = self.image_processor.merge_kernel_size
        index = 0
        expanded = []
        for t in texts:
            while self.image_token in t:
                if index >= len(grids):
                    raise ValueError(f"more {self.image_token} placeholders than images ({len(grids)})")
                n = int(grids[index].prod()) // (mh * mw)
                t = t.replace(self.image_token, _EXPANDED * n, 1)
                index += 1
            expanded.append(t.replace(_EXPANDED, self.image_token))
        if index != len(grids):
            raise ValueError(f"{len(grids)} images but {index} {self.image_token} placeholders")
        return expanded

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_hws"]


_registered = False


def register() -> None:
    """Register both classes for vLLM's ``KimiVLConfig`` (the ``vllm.general_plugins`` hook).

    vLLM runs general plugins in every process it starts, so this is idempotent, cheap, and
    never raises: without vLLM or with an unexpected transformers API it logs at debug and
    returns. The registration makes ``AutoProcessor`` find ``KimiVLProcessor`` by the
    ``processor_class`` / ``image_processor_type`` names in ``preprocessor_config.json``,
    and ``AutoConfig`` read ``model_type: kimi_vl`` (vLLM itself registers that config
    class only once it loads a model config).
    Note that transformers prefers an explicitly registered class over a checkpoint's
    ``auto_map`` remote code of the same name, so the real checkpoint is then served by
    these classes too (its own remote tokenizer is still loaded, with
    ``trust_remote_code``); they implement the same steps.
    """
    global _registered
    if _registered:
        return
    try:
        from transformers import AutoConfig, AutoImageProcessor, AutoProcessor
        from vllm.transformers_utils.configs.kimi_vl import KimiVLConfig

        AutoImageProcessor.register(
            KimiVLConfig, image_processor_classes={"pil": KimiVLImageProcessor}, exist_ok=True
        )
        AutoProcessor.register(KimiVLConfig, KimiVLProcessor, exist_ok=True)
        AutoConfig.register("kimi_vl", KimiVLConfig, exist_ok=True)  # as vLLM's get_config does
    except Exception as exc:  # a plugin must never take vLLM down
        logger.debug("kimivl: Kimi-VL processor not registered: %r", exc)
        return
    _registered = True
