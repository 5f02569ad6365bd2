"""A faster, exact Kimi-VL vision path: patches to vLLM's MoonViT, applied in the engine's processes.

Each component gives outputs bit-identical to stock vLLM (tests/test_vision_fastpath.py):

- ``host_seqlens``: vLLM's ``MoonVitEncoder.forward`` leaves ``max_seqlen`` to each of its 27
  blocks, which compute it on the GPU, and the ViT attention wrapper reads it back with
  ``.item()``: 27 blocking GPU->CPU syncs per encoder call, plus a blocking copy of the grid
  to the GPU. Here ``cu_seqlens`` and ``max_seqlen`` are computed once per call on the host
  from the grid (which the engine keeps on the CPU for the inference tier's requests), and
  ``cu_seqlens`` goes to the GPU by a non-blocking copy from pinned memory. The engine's
  thread is then no longer held for the encoder's whole GPU time.
- ``posemb_cache``: MoonViT bicubic-interpolates its 64x64 position embedding to every image's
  grid on every call (~8 ms of GPU for a 1024x1024 image). A bounded LRU per grid (count and
  bytes) keeps vLLM's own interpolation of each grid; it is emptied whenever the weight's
  identity, storage, version counter, dtype or device changes, and on every ``load_weights``
  (vLLM's weight loaders write through ``.data``, which bumps no version counter). Callers
  always get a new tensor.
- ``raw_pixels``: the inference tier may hand the engine raw 8-bit patches under
  :data:`RAW_PIXELS_KEY` (half the bytes of bfloat16 over the engine's IPC and host-to-device
  copy, and no normalization on the tier's CPU); they are normalized on the device by a 3x256
  table gather: the table is :func:`kimivl_contract.processor.normalized_values`, the values the
  processor computes, so the result equals the tier's own normalization bit for bit. A
  separate key means such items never batch with floating-point ones.
- ``pinned_h2d`` (vLLM 0.26 only; 0.32 does it itself): a lone multimodal tensor went to the
  GPU by a "non-blocking" copy from pageable memory, which CUDA performs synchronously.

Version guard: each component names the vLLM functions it replaces or relies on, and is applied
only if the source text of all of them is one this module was written and tested against
(:data:`KNOWN_SOURCES`); otherwise it logs why and stays off, and that part of vLLM runs stock.

Activation: the ``vllm.general_plugins`` entry point (:mod:`kimivl_inference.plugin`) calls
:func:`apply_from_env` in every vLLM process. It does nothing unless ``KIMIVL_VISION_FASTPATH=1``
is in the environment, which ``kimivl serve inference`` sets before it starts the engine
(``--no-vision-fastpath`` leaves it unset). A plain ``vllm serve`` in the same environment thus
stays stock; ``KIMIVL_VISION_FASTPATH=1 vllm serve ...`` opts it in (``raw_pixels`` is then
inert: vLLM's own processor sends floating-point patches). ``KIMIVL_POSEMB_CACHE_MB`` bounds
the cache (default 512, 0 = no cache).
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import logging
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

# Under "vllm.": vLLM's handler prints it in the engine's processes, which configure no logging of their own.
log = logging.getLogger("vllm.kimivl.vision_fastpath")

ENV = "KIMIVL_VISION_FASTPATH"
ENV_POSEMB_MB = "KIMIVL_POSEMB_CACHE_MB"
DEFAULT_POSEMB_MB = 512
POSEMB_MAX_ENTRIES = 64
# The multimodal field of raw uint8 patches (N, 3, 14, 14) in an engine request.
RAW_PIXELS_KEY = "kimivl_pixel_bytes"
RAW_CHUNK_PATCHES = 4096  # the gather's int32 index: at most 4096 * 588 * 4 bytes (9.6 MB) at a time

_MOONVIT = "model_executor/models/moonvit.py"
_KIMI_VL = "model_executor/models/kimi_vl.py"
_VIT_ATTN = "v1/attention/ops/vit_attn_wrappers.py"
_MM_ATTN = "model_executor/layers/attention/mm_encoder_attention.py"
_MM_INPUTS = "multimodal/inputs.py"

# component -> the (file under vllm/, qualified name) whose source the component replaces or relies on
WATCHED: dict[str, tuple[tuple[str, str], ...]] = {
    "host_seqlens": (
        (_MOONVIT, "MoonVitEncoder.forward"),
        (_MOONVIT, "MoonVitEncoderLayer.forward"),
        (_MOONVIT, "MoonVitEncoderLayer.attention_qkvpacked"),
        (_MOONVIT, "Rope2DPosEmb.get_freqs_cis_by_seqlens"),
        (_MOONVIT, "MoonVitPretrainedModel.forward"),
        (_MM_ATTN, "MMEncoderAttention.forward_cuda"),
        (_MM_ATTN, "MMEncoderAttention._forward_fa"),
        (_MM_ATTN, "MMEncoderAttention._forward_triton"),
        (_VIT_ATTN, "flash_attn_maxseqlen_wrapper"),
        (_VIT_ATTN, "vit_flash_attn_wrapper"),
        (_VIT_ATTN, "triton_attn_wrapper"),
        (_VIT_ATTN, "vit_triton_attn_wrapper"),
    ),
    "posemb_cache": (
        (_MOONVIT, "Learnable2DInterpPosEmb.__init__"),
        (_MOONVIT, "Learnable2DInterpPosEmb.get_pos_embeds"),
        (_MOONVIT, "Learnable2DInterpPosEmb.forward"),
        (_KIMI_VL, "KimiVLForConditionalGeneration.load_weights"),
    ),
    "raw_pixels": (
        (_KIMI_VL, "KimiVLForConditionalGeneration.__init__"),
        (_KIMI_VL, "KimiVLForConditionalGeneration._parse_and_validate_image_input"),
        (_KIMI_VL, "KimiVLForConditionalGeneration.embed_multimodal"),
    ),
    "pinned_h2d": (
        (_MM_INPUTS, "_nested_tensors_h2d"),
        (_MM_INPUTS, "BaseMultiModalField.reduce_data"),
    ),
}
CORE = ("host_seqlens", "posemb_cache", "raw_pixels")

# sha256[:16] of each watched function's source text (decorators included), by the vLLM it was
# read from; `python -m kimivl_inference.vision_fastpath --fingerprint [VLLM_DIR]` prints them.
KNOWN_SOURCES: dict[str, dict[str, str]] = {
    "0.26.0": {
        "model_executor/models/moonvit.py:MoonVitEncoder.forward": "ba3d431308514e1e",
        "model_executor/models/moonvit.py:MoonVitEncoderLayer.forward": "d5ca451d4f556744",
        "model_executor/models/moonvit.py:MoonVitEncoderLayer.attention_qkvpacked": "cd1eca996df7dec0",
        "model_executor/models/moonvit.py:Rope2DPosEmb.get_freqs_cis_by_seqlens": "a2a0a4bdea94b01f",
        "model_executor/models/moonvit.py:MoonVitPretrainedModel.forward": "2d7f68ea4a510378",
        "model_executor/layers/attention/mm_encoder_attention.py:MMEncoderAttention.forward_cuda": "4ac2ff002b9fdc56",
        "model_executor/layers/attention/mm_encoder_attention.py:MMEncoderAttention._forward_fa": "9c4fd5edfa76dda3",
        "model_executor/layers/attention/mm_encoder_attention.py:MMEncoderAttention._forward_triton": "3530ffa509a32a13",
        "v1/attention/ops/vit_attn_wrappers.py:flash_attn_maxseqlen_wrapper": "526e825942372e32",
        "v1/attention/ops/vit_attn_wrappers.py:vit_flash_attn_wrapper": "44c88fd8ab751c2b",
        "v1/attention/ops/vit_attn_wrappers.py:triton_attn_wrapper": "fe637bcf22c87733",
        "v1/attention/ops/vit_attn_wrappers.py:vit_triton_attn_wrapper": "1f8584004082e3ae",
        "model_executor/models/moonvit.py:Learnable2DInterpPosEmb.__init__": "4ced53cf26c928e1",
        "model_executor/models/moonvit.py:Learnable2DInterpPosEmb.get_pos_embeds": "74e6abcced8f0b81",
        "model_executor/models/moonvit.py:Learnable2DInterpPosEmb.forward": "fb632d406395d14d",
        "model_executor/models/kimi_vl.py:KimiVLForConditionalGeneration.load_weights": "a55ea304d9a3396d",
        "model_executor/models/kimi_vl.py:KimiVLForConditionalGeneration.__init__": "37f75773b651ec1b",
        "model_executor/models/kimi_vl.py:KimiVLForConditionalGeneration._parse_and_validate_image_input": "6f058cf7c2cb2698",
        "model_executor/models/kimi_vl.py:KimiVLForConditionalGeneration.embed_multimodal": "2403feae783d17bb",
        "multimodal/inputs.py:_nested_tensors_h2d": "8f681532f2615c14",
        "multimodal/inputs.py:BaseMultiModalField.reduce_data": "21ee0ffd83f229f9",
    },
    "0.32.0": {
        "model_executor/models/moonvit.py:MoonVitEncoder.forward": "e5df8c7ab00a8db1",
        "model_executor/models/moonvit.py:MoonVitEncoderLayer.forward": "2877ea6dced267f8",
        "model_executor/models/moonvit.py:MoonVitEncoderLayer.attention_qkvpacked": "d7a46c3f22b14217",
        "model_executor/models/moonvit.py:Rope2DPosEmb.get_freqs_cis_by_seqlens": "0409ca5a98b14fdd",
        "model_executor/models/moonvit.py:MoonVitPretrainedModel.forward": "179e26f21316e4ab",
        "model_executor/layers/attention/mm_encoder_attention.py:MMEncoderAttention.forward_cuda": "97810d2ad19437b9",
        "model_executor/layers/attention/mm_encoder_attention.py:MMEncoderAttention._forward_fa": "9c4fd5edfa76dda3",
        "model_executor/layers/attention/mm_encoder_attention.py:MMEncoderAttention._forward_triton": "3530ffa509a32a13",
        "v1/attention/ops/vit_attn_wrappers.py:flash_attn_maxseqlen_wrapper": "2ebb2c90f49286a7",
        "v1/attention/ops/vit_attn_wrappers.py:vit_flash_attn_wrapper": "44c88fd8ab751c2b",
        "v1/attention/ops/vit_attn_wrappers.py:triton_attn_wrapper": "85d0d447f6b95a0f",
        "v1/attention/ops/vit_attn_wrappers.py:vit_triton_attn_wrapper": "1f8584004082e3ae",
        "model_executor/models/moonvit.py:Learnable2DInterpPosEmb.__init__": "4ced53cf26c928e1",
        "model_executor/models/moonvit.py:Learnable2DInterpPosEmb.get_pos_embeds": "74e6abcced8f0b81",
        "model_executor/models/moonvit.py:Learnable2DInterpPosEmb.forward": "fb632d406395d14d",
        "model_executor/models/kimi_vl.py:KimiVLForConditionalGeneration.load_weights": "a55ea304d9a3396d",
        "model_executor/models/kimi_vl.py:KimiVLForConditionalGeneration.__init__": "f96a28784995aa3a",
        "model_executor/models/kimi_vl.py:KimiVLForConditionalGeneration._parse_and_validate_image_input": "6f058cf7c2cb2698",
        "model_executor/models/kimi_vl.py:KimiVLForConditionalGeneration.embed_multimodal": "2403feae783d17bb",
        "multimodal/inputs.py:_nested_tensors_h2d": "9d250bbea7bbc623",
        "multimodal/inputs.py:BaseMultiModalField.reduce_data": "e12c9a049f014839",
    },
}
# Components whose upstream code already does what they would: not applied on that version.
NOT_NEEDED: dict[str, set[str]] = {"0.32.0": {"pinned_h2d"}}


# --------------------------------------------------------------------------- the version guard
def vllm_dir() -> Path | None:
    """The installed vllm package's directory, found without importing vLLM."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _segment(tree: ast.Module, lines: list[str], qualname: str) -> str | None:
    body = tree.body
    node = None
    for part in qualname.split("."):
        node = next((n for n in body if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                     and n.name == part), None)
        if node is None:
            return None
        body = node.body
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return "\n".join(lines[start - 1:node.end_lineno])


def fingerprints(root: Path | None = None) -> dict[str, str | None]:
    """``"file:qualname" -> sha256[:16]`` of every watched function's source (None if missing)."""
    root = root or vllm_dir()
    out: dict[str, str | None] = {}
    parsed: dict[str, tuple[ast.Module, list[str]] | None] = {}
    for watched in WATCHED.values():
        for rel, qualname in watched:
            if rel not in parsed:
                try:
                    text = (root / rel).read_text(encoding="utf-8")
                    parsed[rel] = (ast.parse(text), text.splitlines())
                except (OSError, SyntaxError, TypeError):
                    parsed[rel] = None
            seg = _segment(*parsed[rel], qualname) if parsed[rel] else None
            out[f"{rel}:{qualname}"] = hashlib.sha256(seg.encode()).hexdigest()[:16] if seg is not None else None
    return out


@dataclass(frozen=True)
class Verdict:
    """What the guard decided for this vLLM: per component, the vLLM it matched or why it is off."""
    components: dict[str, str]  # component -> "on (vLLM 0.26.0)" | "off: ..." | "not needed ..."
    active: frozenset[str] = field(default_factory=frozenset)

    @property
    def ok(self) -> bool:
        """All core components apply."""
        return all(c in self.active for c in CORE)

    def summary(self) -> str:
        return "; ".join(f"{c} {s}" for c, s in self.components.items())


def check(root: Path | None = None) -> Verdict:
    """Match every component's watched sources against :data:`KNOWN_SOURCES`."""
    root = root or vllm_dir()
    if root is None:
        return Verdict({c: "off: vLLM is not installed" for c in WATCHED})
    fp = fingerprints(root)
    comps: dict[str, str] = {}
    active = set()
    for comp, watched in WATCHED.items():
        keys = [f"{rel}:{q}" for rel, q in watched]
        matches = [v for v, known in KNOWN_SOURCES.items() if all(fp[k] == known.get(k) for k in keys)]
        if not matches:
            differ = [k.split(":", 1)[1] for k in keys
                      if all(fp[k] != known.get(k) for known in KNOWN_SOURCES.values())]
            comps[comp] = f"off: vLLM's source differs from every version this was written for ({', '.join(differ)})"
        elif all(comp in NOT_NEEDED.get(v, ()) for v in matches):
            comps[comp] = f"not needed (vLLM {'/'.join(matches)} does it)"
        else:
            comps[comp] = f"on (source of vLLM {'/'.join(matches)})"
            active.add(comp)
    return Verdict(comps, frozenset(active))


@cache
def installed_verdict() -> Verdict:
    return check()


def requested() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("1", "on", "true", "yes")


def posemb_budget_bytes() -> int:
    raw = os.environ.get(ENV_POSEMB_MB, "").strip()
    try:
        mb = float(raw) if raw else DEFAULT_POSEMB_MB
    except ValueError:
        log.warning("%s=%r is not a number; using %d", ENV_POSEMB_MB, raw, DEFAULT_POSEMB_MB)
        mb = DEFAULT_POSEMB_MB
    return max(0, int(mb * (1 << 20)))


def plugin_allowed() -> bool:
    """vLLM loads only the plugins named in VLLM_PLUGINS when it is set."""
    names = os.environ.get("VLLM_PLUGINS")
    return names is None or "kimivl" in [n.strip() for n in names.split(",")]


# --------------------------------------------------------------------------- patching
_ORIGINALS: dict[tuple[str, str], object] = {}  # (module, "Class.attr") -> vLLM's own object
_ACTIVE: set[str] = set()
_APPLIED_FROM_ENV: list[bool] = []


def _target(module_name: str, qualname: str):
    import importlib

    owner = importlib.import_module(module_name)
    *path, attr = qualname.split(".")
    for p in path:
        owner = getattr(owner, p)
    return owner, attr


def _original(module_name: str, qualname: str):
    key = (module_name, qualname)
    if key not in _ORIGINALS:
        import inspect
        import sys

        owner, attr = _target(module_name, qualname)
        fn = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        code = getattr(inspect.unwrap(fn), "__code__", None)
        if code is None or code.co_filename != sys.modules[module_name].__file__:
            # someone else's patch is in place: the fingerprinted source is not what would run
            raise RuntimeError(f"{module_name}.{qualname} is not vLLM's own ({code and code.co_filename})")
        _ORIGINALS[key] = fn
    return _ORIGINALS[key]


def _install(module_name: str, qualname: str, new) -> None:
    _original(module_name, qualname)
    owner, attr = _target(module_name, qualname)
    setattr(owner, attr, new)


def _uninstall(module_name: str, qualname: str) -> None:
    key = (module_name, qualname)
    if key in _ORIGINALS:
        owner, attr = _target(module_name, qualname)
        setattr(owner, attr, _ORIGINALS[key])


_M_MOONVIT = "vllm.model_executor.models.moonvit"
_M_KIMI_VL = "vllm.model_executor.models.kimi_vl"
_M_INPUTS = "vllm.multimodal.inputs"


def _h2d(t, device):
    import torch

    if device.type == "cpu":
        return t
    if device.type == "cuda" and torch.cuda.is_available():
        t = t.pin_memory()  # a truly asynchronous copy needs page-locked memory
    return t.to(device, non_blocking=True)


# host_seqlens -----------------------------------------------------------------------------------
def _encoder_forward(self, hidden_states, grid_hw=None, *, cu_seqlens=None, rope_freqs_cis=None,
                     max_seqlen=None):
    """MoonVitEncoder.forward with cu_seqlens and max_seqlen computed once, on the host."""
    import torch

    stock = _ORIGINALS[(_M_MOONVIT, "MoonVitEncoder.forward")]
    if grid_hw is None or cu_seqlens is not None or max_seqlen is not None or grid_hw.numel() == 0:
        return stock(self, hidden_states, grid_hw, cu_seqlens=cu_seqlens, rope_freqs_cis=rope_freqs_cis,
                     max_seqlen=max_seqlen)
    grid = grid_hw if grid_hw.device.type == "cpu" else grid_hw.cpu()  # one copy, not one per block
    # vLLM's own arithmetic, on the CPU: int32 running sum of h*w, then the largest difference.
    lengths = torch.cat((torch.zeros(1, dtype=grid.dtype), grid[:, 0] * grid[:, 1]))
    cu = lengths.cumsum(dim=0, dtype=torch.int32)
    max_seqlen = (cu[1:] - cu[:-1]).max()  # a 0-d CPU tensor: the wrappers' .item() costs no sync
    return stock(self, hidden_states, grid, cu_seqlens=_h2d(cu, hidden_states.device),
                 rope_freqs_cis=rope_freqs_cis, max_seqlen=max_seqlen)


# posemb_cache -----------------------------------------------------------------------------------
_CACHE_ATTR = "_kimivl_posemb_cache"
_PE_MODULES: weakref.WeakSet = weakref.WeakSet()
STATS = {"hits": 0, "misses": 0, "evictions": 0, "invalidations": 0, "uncacheable": 0}
_budget = {"bytes": DEFAULT_POSEMB_MB << 20, "entries": POSEMB_MAX_ENTRIES}


class _PosEmbCache:
    """Interpolated position embeddings of one module, by grid, valid for one state of its weight."""

    def __init__(self, weight):
        self.stamp = _weight_stamp(weight)
        self.entries: OrderedDict[tuple[int, int], object] = OrderedDict()
        self.bytes = 0

    def get(self, hw):
        t = self.entries.get(hw)
        if t is not None:
            self.entries.move_to_end(hw)
        return t

    def put(self, hw, t) -> None:
        size = t.numel() * t.element_size()
        if size > _budget["bytes"] or _budget["entries"] < 1:
            STATS["uncacheable"] += 1
            return
        self.entries[hw] = t
        self.bytes += size
        while len(self.entries) > _budget["entries"] or self.bytes > _budget["bytes"]:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
            STATS["evictions"] += 1


def _weight_stamp(w):
    try:
        version = w._version
    except RuntimeError:  # an inference tensor has no version counter (and cannot be written in place)
        version = None
    return (weakref.ref(w), w.data_ptr(), version, w.dtype, w.device, tuple(w.shape))


def _stamp_matches(stamp, w) -> bool:
    ref, *rest = stamp
    return ref() is w and tuple(rest) == _weight_stamp(w)[1:]


def _cache_for(module):
    cache_ = module.__dict__.get(_CACHE_ATTR)
    if cache_ is not None and _stamp_matches(cache_.stamp, module.weight):
        return cache_
    if cache_ is not None:
        STATS["invalidations"] += 1
    cache_ = _PosEmbCache(module.weight)
    module.__dict__[_CACHE_ATTR] = cache_  # a plain attribute: not a buffer, not in the state dict
    _PE_MODULES.add(module)
    return cache_


def _get_pos_embeds(self, grid_hws_list):
    """Learnable2DInterpPosEmb.get_pos_embeds, each grid's interpolation kept (exact: a miss runs
    vLLM's own method on that grid alone, and the result is the same concatenation)."""
    import torch

    stock = _ORIGINALS[(_M_MOONVIT, "Learnable2DInterpPosEmb.get_pos_embeds")]
    if _budget["bytes"] <= 0 or self.interpolation_mode != "bicubic":
        return stock(self, grid_hws_list)
    cache_ = _cache_for(self)
    weight_hw = tuple(self.weight.shape[:-1])
    pieces = []
    for shape in grid_hws_list:
        hw = (int(shape[0]), int(shape[1]))
        if hw == weight_hw:  # vLLM uses the weight itself: nothing to interpolate
            pieces.append(self.weight.flatten(end_dim=1))
            continue
        t = cache_.get(hw)
        if t is None:
            STATS["misses"] += 1
            t = stock(self, [hw])  # a fresh tensor of its own
            cache_.put(hw, t)
        else:
            STATS["hits"] += 1
        pieces.append(t)
    if not pieces:
        return stock(self, [])
    return torch.cat(pieces)  # always a new tensor: the cached ones are never handed out


def _load_weights(self, weights):
    try:
        return _ORIGINALS[(_M_KIMI_VL, "KimiVLForConditionalGeneration.load_weights")](self, weights)
    finally:  # weight loaders write through .data, which bumps no version counter
        clear_posemb_caches()


def clear_posemb_caches() -> None:
    for m in list(_PE_MODULES):
        m.__dict__.pop(_CACHE_ATTR, None)


def posemb_cache_state() -> dict:
    mods = [m.__dict__.get(_CACHE_ATTR) for m in list(_PE_MODULES)]
    mods = [c for c in mods if c is not None]
    return {**STATS, "entries": sum(len(c.entries) for c in mods), "bytes": sum(c.bytes for c in mods),
            "grids": [list(hw) for c in mods for hw in c.entries], "budget_bytes": _budget["bytes"],
            "budget_entries": _budget["entries"]}


def set_posemb_budget(max_bytes: int | None = None, max_entries: int | None = None) -> None:
    """Bounds of every module's cache (from the next insertion on; 0 bytes = no cache)."""
    if max_bytes is not None:
        _budget["bytes"] = int(max_bytes)
    if max_entries is not None:
        _budget["entries"] = int(max_entries)
    clear_posemb_caches()


# raw_pixels -------------------------------------------------------------------------------------
_TABLE_ATTR = "_kimivl_pixel_table"


def _pixel_table(model, device, dtype):
    """The processor's value of each byte of each channel, flat (3 * 256), on ``device``."""
    import torch

    from kimivl_contract.processor import ProcessorConfig, normalized_values

    tables = model.__dict__.setdefault(_TABLE_ATTR, {})
    key = (device, dtype)
    if key not in tables:
        config = ProcessorConfig.from_model_dir(model.model_config.model)
        tables[key] = torch.from_numpy(normalized_values(config.image_mean, config.image_std)).to(dtype).reshape(-1).to(device)
    return tables[key]


def normalize_raw_pixels(raw, table):
    """uint8 patches (N, 3, p, p) -> table[c * 256 + byte], in chunks to bound the index's memory."""
    import torch

    if raw.dtype != torch.uint8 or raw.dim() != 4 or raw.shape[1] != 3:
        raise ValueError(f"{RAW_PIXELS_KEY} must be uint8 (N, 3, p, p), got {raw.dtype} {tuple(raw.shape)}")
    raw = raw.contiguous()
    out = torch.empty(raw.shape, dtype=table.dtype, device=raw.device)
    offsets = (torch.arange(3, dtype=torch.int32, device=raw.device) * 256).view(1, 3, 1, 1)
    for s in range(0, raw.shape[0], RAW_CHUNK_PATCHES):
        e = min(s + RAW_CHUNK_PATCHES, raw.shape[0])
        idx = raw[s:e].to(torch.int32).add_(offsets)
        torch.index_select(table, 0, idx.view(-1), out=out[s:e].view(-1))
    return out


def _parse_and_validate_image_input(self, **kwargs):
    raw = kwargs.pop(RAW_PIXELS_KEY, None)
    if raw is not None:
        if kwargs.get("pixel_values") is not None:
            raise ValueError(f"an image batch has both pixel_values and {RAW_PIXELS_KEY}")
        import torch

        if isinstance(raw, (list, tuple)):  # vLLM hands a list when items' shapes differ
            raw = torch.cat(list(raw))
        kwargs["pixel_values"] = normalize_raw_pixels(raw, _pixel_table(self, raw.device, self.model_config.dtype))
    return _ORIGINALS[(_M_KIMI_VL, "KimiVLForConditionalGeneration._parse_and_validate_image_input")](
        self, **kwargs)


# pinned_h2d -------------------------------------------------------------------------------------
def _nested_tensors_h2d(tensors, device):
    """vLLM 0.26's _nested_tensors_h2d, staging host tensors in pinned memory first (as 0.32 does)."""
    import torch

    if device is None:
        return tensors
    from vllm.multimodal.inputs import json_map_leaves

    pin = torch.device(device).type == "cuda" and torch.cuda.is_available()

    def h2d(x):
        if not isinstance(x, torch.Tensor):
            return x
        if pin and x.is_cpu and not x.is_pinned():
            x = x.pin_memory()
        return x.to(device=device, non_blocking=True)

    return json_map_leaves(h2d, tensors)


_PATCHES: dict[str, tuple[tuple[str, str, object], ...]] = {
    "host_seqlens": ((_M_MOONVIT, "MoonVitEncoder.forward", _encoder_forward),),
    "posemb_cache": ((_M_MOONVIT, "Learnable2DInterpPosEmb.get_pos_embeds", _get_pos_embeds),
                     (_M_KIMI_VL, "KimiVLForConditionalGeneration.load_weights", _load_weights)),
    "raw_pixels": ((_M_KIMI_VL, "KimiVLForConditionalGeneration._parse_and_validate_image_input",
                    _parse_and_validate_image_input),),
    "pinned_h2d": ((_M_INPUTS, "_nested_tensors_h2d", _nested_tensors_h2d),),
}


def set_components(components, verdict: Verdict | None = None) -> set[str]:
    """Make exactly ``components`` (those the guard allows) patched in this process; return them."""
    verdict = verdict or installed_verdict()
    want = set(components) & verdict.active
    for comp, patches in _PATCHES.items():
        on = comp in want
        for module_name, qualname, new in patches:
            (_install(module_name, qualname, new) if on else _uninstall(module_name, qualname))
    clear_posemb_caches()  # a switch starts cold: weights may have changed meanwhile
    _ACTIVE.clear()
    _ACTIVE.update(want)
    return set(_ACTIVE)


def active_components() -> set[str]:
    return set(_ACTIVE)


def _apply(verdict: Verdict) -> None:
    try:
        set_posemb_budget(max_bytes=posemb_budget_bytes())
        on = set_components(WATCHED, verdict)
        log.log(logging.INFO if verdict.ok else logging.WARNING, "Kimi-VL vision fast path in pid %d: %s",
                os.getpid(), "active (" + ", ".join(sorted(on)) + ")" if on else "off")
        if not verdict.ok:
            log.warning("vision fast path: %s", verdict.summary())
    except Exception:  # a plugin must never take vLLM down: stock vLLM runs
        log.exception("Kimi-VL vision fast path not applied")
        set_components((), Verdict({}))


class _AfterImport:
    """A meta-path finder that runs a callback once ``module`` has been executed, so a process
    that never builds the model (the tier, an API server) never imports vLLM's model code."""

    def __init__(self, module: str, callback):
        self.module, self.callback = module, callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.module:
            return None
        import sys

        sys.meta_path.remove(self)  # once; and the lookup below must not find us again
        spec = next((sp for f in sys.meta_path if hasattr(f, "find_spec")
                     for sp in [f.find_spec(fullname, path, target)] if sp is not None), None)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module, callback = spec.loader.exec_module, self.callback

        def exec_then_patch(module):
            exec_module(module)
            callback()

        spec.loader.exec_module = exec_then_patch
        return spec


def apply_from_env() -> Verdict | None:
    """The plugin's hook: if KIMIVL_VISION_FASTPATH asks for it, patch this process now if vLLM's
    Kimi-VL module is loaded, else as soon as it is. Idempotent; never raises."""
    if not requested():
        return None
    import sys

    try:
        verdict = installed_verdict()
    except Exception:
        log.exception("Kimi-VL vision fast path: the version check failed; stock vLLM runs")
        return None
    if _APPLIED_FROM_ENV:  # vLLM runs its plugins more than once per process
        return verdict
    _APPLIED_FROM_ENV.append(True)
    if _M_KIMI_VL in sys.modules:
        _apply(verdict)
    else:
        sys.meta_path.insert(0, _AfterImport(_M_KIMI_VL, lambda: _apply(verdict)))
    return verdict


@dataclass(frozen=True)
class EngineSetup:
    """What the inference tier set up for its engine's processes."""
    active: bool  # the core components are on in the engine
    raw_pixels: bool  # the engine takes raw uint8 patches under RAW_PIXELS_KEY
    detail: str


def configure_engine_processes(enabled: bool, posemb_cache_mb: float | None = None) -> EngineSetup:
    """Called by the inference tier before it starts the engine: sets (or clears) the environment
    that the plugin reads in each engine process, and patches this process too (an in-process
    engine core, a forked one). Engine processes inherit this environment and the installed vLLM,
    so they reach the same verdict."""
    if not enabled:
        os.environ.pop(ENV, None)
        return EngineSetup(False, False, "off (--no-vision-fastpath)")
    if not plugin_allowed():
        os.environ.pop(ENV, None)
        return EngineSetup(False, False, "off: VLLM_PLUGINS does not name the kimivl plugin")
    os.environ[ENV] = "1"
    if posemb_cache_mb is not None:
        os.environ[ENV_POSEMB_MB] = f"{posemb_cache_mb:g}"
    verdict = apply_from_env()
    if verdict is None:
        return EngineSetup(False, False, "off: the patch failed in this process (see the log)")
    on = sorted(verdict.active)
    detail = (("active: " if verdict.ok else "partly active: ") + ", ".join(on) if on else "off") + \
        f" (posemb cache {posemb_budget_bytes() >> 20} MiB; {verdict.summary()})"
    return EngineSetup(verdict.ok, "raw_pixels" in verdict.active, detail)


# --------------------------------------------------------------------------- worker-side RPC helpers
# For AsyncLLM.collective_rpc(fn, args=...) (needs VLLM_ALLOW_INSECURE_SERIALIZATION=1).
def rpc_set_components(worker, components) -> list[str]:
    return sorted(set_components(components))


def rpc_state(worker) -> dict:
    return {"active": sorted(_ACTIVE), "posemb_cache": posemb_cache_state(), "pid": os.getpid(),
            "verdict": installed_verdict().components}


def rpc_clear_posemb_cache(worker) -> None:
    clear_posemb_caches()


def _main(argv=None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description="the vision fast path's version guard")
    ap.add_argument("--fingerprint", metavar="VLLM_DIR", nargs="?", const="",
                    help="print the watched functions' source hashes of the vllm package in VLLM_DIR "
                         "(default: the installed one)")
    a = ap.parse_args(argv)
    if a.fingerprint is not None:
        print(json.dumps(fingerprints(Path(a.fingerprint) if a.fingerprint else None), indent=1))
        return 0
    v = check()
    print(json.dumps({"ok": v.ok, "components": v.components}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
