"""Prepared prompts as vLLM engine inputs, with no second preprocessing.

Token ids and patch tensors become vLLM's multimodal engine input with the same field layout
as its own Kimi-VL processor (pixel_values flat by image, image_grid_hws batched and kept on
the CPU), and each image's content hash is its mm hash (the identity used by the encoder,
prefix and multimodal caches). That hash is derived here from what reaches the engine
(:func:`kimivl_contract.identity.tensor_identity`), never taken from the request: a caller
could otherwise send one image's pixels under another's hash and read or plant cached results.
"""
from __future__ import annotations

import warnings

from kimivl_contract import dtypes
from kimivl_contract.identity import tensor_identity

from .vision_fastpath import RAW_PIXELS_KEY


def build_engine_input(prompt, model_dtype, normalizer=None, tensor_data: list | None = None,
                       raw_pixels: bool = False):
    """A validated PreparedPrompt as vLLM's multimodal engine input. Floating tensors are views
    of the message bytes (``tensor_data``: each image's ``pixel_values.data``, already read by
    the validation; read here if None) unless a dtype cast is needed; uint8 (raw pixel) tensors
    are normalized by ``normalizer`` (a :class:`~kimivl_inference.pixels.PixelNormalizer`), whose
    settings are part of their identity, or, with ``raw_pixels`` (the engine runs the vision fast
    path) and every image uint8, handed to the engine as they are under a key of their own, to be
    normalized on the device."""
    import torch
    from transformers import BatchFeature
    from vllm.inputs.engine import mm_input
    from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems, PlaceholderRange

    token_ids = list(prompt.token_ids)
    if not prompt.images:
        from vllm.inputs import TokensPrompt

        return TokensPrompt(prompt_token_ids=token_ids)
    raw_all = raw_pixels and all(img.pixel_values.dtype == dtypes.UINT8.proto for img in prompt.images)
    tensors, hashes = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we never write to it
        for i, img in enumerate(prompt.images):
            t = img.pixel_values
            data = tensor_data[i] if tensor_data is not None else t.data
            raw = t.dtype == dtypes.UINT8.proto
            hashes.append(tensor_identity(img, data, normalizer.fingerprint if raw and normalizer else b""))
            x = torch.frombuffer(data, dtype=getattr(torch, dtypes.BY_PROTO[t.dtype].name)).view(*t.shape)
            if raw_all:
                tensors.append(x)
            elif x.dtype == torch.uint8:
                if normalizer is None:
                    raise ValueError("uint8 pixel values need a PixelNormalizer")
                tensors.append(normalizer(x))
            else:
                tensors.append(x.to(model_dtype))  # vLLM casts processor outputs to the model dtype too
    pixel_values = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
    grid = torch.tensor([[img.grid_height, img.grid_width] for img in prompt.images], dtype=torch.int64)
    key = RAW_PIXELS_KEY if raw_all else "pixel_values"  # a key of its own: never batched with float patches
    hf = BatchFeature({key: pixel_values, "image_grid_hws": grid})
    fields = {  # = vLLM's KimiVLMultiModalProcessor._get_mm_fields_config
        key: MultiModalFieldConfig.flat_from_sizes("image", grid.prod(-1)),
        "image_grid_hws": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
    }
    return mm_input(
        prompt_token_ids=token_ids,
        mm_kwargs=MultiModalKwargsItems.from_hf_inputs(hf, fields),
        mm_hashes={"image": hashes},
        mm_placeholders={"image": [PlaceholderRange(offset=img.placeholder_offset, length=img.placeholder_length)
                                   for img in prompt.images]},
    )
