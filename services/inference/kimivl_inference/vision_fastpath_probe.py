"""Worker-side checks of the vision fast path, run inside a vLLM worker by ``collective_rpc``.

Used by the tests (CPU engine) and ``bench/vision_fastpath_gpu.py`` (H200): encoder outputs of
stock vLLM and of the fast path compared with ``torch.equal``, the position-embedding cache's
bounds and invalidation, GPU->CPU syncs per encoder call, and encoder timings. Every function
takes the worker first (``AsyncLLM.collective_rpc(fn, args=...)``, which needs
``VLLM_ALLOW_INSECURE_SERIALIZATION=1``) and leaves the fast path as it found it.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

from . import vision_fastpath as vf

ALL = tuple(vf.WATCHED)


def _model(worker):
    return worker.model_runner.get_model()


def _device_dtype(model):
    p = next(model.vision_tower.parameters())
    return p.device, p.dtype


@contextmanager
def _restoring():
    before = vf.active_components()
    try:
        yield
    finally:
        vf.set_components(before)


def make_inputs(model, grids, seed: int):
    """Seeded raw patches for ``grids`` and their normalization as the tier does it on its CPU."""
    import torch

    from kimivl_contract.processor import ProcessorConfig

    from .pixels import PixelNormalizer

    g = torch.Generator().manual_seed(seed)
    n = sum(h * w for h, w in grids)
    raw = torch.randint(0, 256, (n, 3, 14, 14), dtype=torch.uint8, generator=g)
    config = ProcessorConfig.from_model_dir(model.model_config.model)
    normalized = PixelNormalizer(config.image_mean, config.image_std, model.model_config.dtype)(raw)
    return raw, normalized, torch.tensor(grids, dtype=torch.int64)


def encode(model, grid, *, pixel_values=None, raw=None):
    """model.embed_multimodal as the engine calls it (grid on the CPU), outputs concatenated."""
    import torch

    device, _ = _device_dtype(model)
    kw = {"image_grid_hws": grid}
    if raw is not None:
        kw[vf.RAW_PIXELS_KEY] = raw.to(device)
    else:
        kw["pixel_values"] = pixel_values.to(device)
    with torch.inference_mode():
        out = model.embed_multimodal(**kw)
        return torch.cat(list(out)), [o.shape[0] for o in out]


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def exactness(worker, cases: dict, seed: int = 1234) -> dict:
    """Per case (name -> list of (h, w) grids): stock output vs the fast path with floating-point
    patches, with raw patches on a cold cache, and again warm. All must be torch.equal."""
    import torch

    model = _model(worker)
    out = {"ok": True, "cases": {}}
    with _restoring():
        for i, (name, grids) in enumerate(cases.items()):
            grids = [tuple(int(x) for x in g) for g in grids]
            raw, normalized, grid = make_inputs(model, grids, seed + i)
            vf.set_components(())
            ref, sizes = encode(model, grid, pixel_values=normalized)
            res = {"grids": grids, "tokens": sizes}
            runs = (("fast_float", dict(pixel_values=normalized), True),
                    ("fast_raw_cold", dict(raw=raw), True),
                    ("fast_raw_warm", dict(raw=raw), False))
            for label, kw, fresh in runs:
                if fresh:
                    vf.set_components(ALL)  # empties the cache
                s0 = dict(vf.STATS)
                o, osizes = encode(model, grid, **kw)
                _sync(o.device)
                equal = bool(torch.equal(o, ref)) and osizes == sizes
                res[label] = {"equal": equal, "hits": vf.STATS["hits"] - s0["hits"],
                              "misses": vf.STATS["misses"] - s0["misses"]}
                out["ok"] &= equal
            pe = model.vision_tower.patch_embed.pos_emb
            stock_pe = vf._ORIGINALS[(vf._M_MOONVIT, "Learnable2DInterpPosEmb.get_pos_embeds")]
            with torch.inference_mode():
                res["posemb_equal"] = bool(torch.equal(pe.get_pos_embeds(grids), stock_pe(pe, grids)))
            out["ok"] &= res["posemb_equal"]
            out["cases"][name] = res
    out["active_after"] = sorted(vf.active_components())
    return out


def cache_bounds_and_invalidation(worker) -> dict:
    """The LRU by count and by bytes, and the cache following in-place and load_weights changes."""
    import torch

    model = _model(worker)
    pe = model.vision_tower.patch_embed.pos_emb
    stock_pe = vf._ORIGINALS[(vf._M_MOONVIT, "Learnable2DInterpPosEmb.get_pos_embeds")]
    res: dict = {}
    saved = dict(vf._budget)
    with _restoring():
        vf.set_components(ALL)
        try:
            grids = [(20, 20), (22, 20), (24, 20), (20, 20)]
            vf.set_posemb_budget(max_entries=2)
            s0 = dict(vf.STATS)
            with torch.inference_mode():
                got = pe.get_pos_embeds(grids)
                equal = bool(torch.equal(got, stock_pe(pe, grids)))
            d = {k: vf.STATS[k] - s0[k] for k in ("hits", "misses", "evictions")}
            res["by_count"] = {**d, "entries": vf.posemb_cache_state()["entries"], "equal": equal}
            entry = 20 * 20 * pe.weight.shape[-1] * pe.weight.element_size()
            vf.set_posemb_budget(max_bytes=2 * entry + entry // 2, max_entries=64)
            with torch.inference_mode():
                pe.get_pos_embeds([(20, 20), (20, 20), (20, 20)])  # grids of 400 patches each...
                pe.get_pos_embeds([(10, 40), (40, 10)])  # ...three in all: one must go
            st = vf.posemb_cache_state()
            res["by_bytes"] = {"entries": st["entries"], "bytes": st["bytes"], "budget": st["budget_bytes"]}
            vf.set_posemb_budget(max_bytes=entry - 1)  # an entry larger than the budget is not kept
            with torch.inference_mode():
                pe.get_pos_embeds([(20, 20)])
            res["too_big_entries"] = vf.posemb_cache_state()["entries"]
            vf.set_posemb_budget(max_bytes=saved["bytes"], max_entries=saved["entries"])

            # a returned tensor is the caller's: writing into it leaves the cache exact
            with torch.inference_mode():
                a = pe.get_pos_embeds([(30, 30)])
                a.zero_()
                res["returned_is_new"] = bool(torch.equal(pe.get_pos_embeds([(30, 30)]), stock_pe(pe, [(30, 30)])))

            w0 = pe.weight.detach().clone()
            try:
                # in place (bumps the version counter, as reinit_dummy_weights' writes do)
                with torch.no_grad():
                    pe.weight.mul_(0.5)
                s0 = dict(vf.STATS)
                with torch.inference_mode():
                    a = pe.get_pos_embeds([(30, 30)])
                    res["in_place"] = {"misses": vf.STATS["misses"] - s0["misses"],
                                       "equal": bool(torch.equal(a, stock_pe(pe, [(30, 30)])))}
                # through .data, as vLLM's weight loaders write (no version bump): load_weights empties it
                with torch.inference_mode():
                    pe.get_pos_embeds([(30, 30)])
                new = (w0 * 0.25).to(pe.weight.dtype)
                version0 = pe.weight._version
                s0 = dict(vf.STATS)
                model.load_weights([("vision_tower.patch_embed.pos_emb.weight", new)])
                res["load_weights_bumped_version"] = pe.weight._version != version0
                with torch.inference_mode():
                    a = pe.get_pos_embeds([(30, 30)])
                    res["load_weights"] = {"misses": vf.STATS["misses"] - s0["misses"],
                                           "weight_changed": bool(torch.equal(pe.weight, new)),
                                           "equal": bool(torch.equal(a, stock_pe(pe, [(30, 30)])))}
            finally:
                with torch.no_grad():
                    pe.weight.copy_(w0)
            res["weight_restored"] = bool(torch.equal(pe.weight, w0))
        finally:
            vf.set_posemb_budget(max_bytes=saved["bytes"], max_entries=saved["entries"])
    res["ok"] = (res["by_count"] == {"hits": 0, "misses": 4, "evictions": 2, "entries": 2, "equal": True}
                 and res["by_bytes"]["entries"] == 2 and res["by_bytes"]["bytes"] <= res["by_bytes"]["budget"]
                 and res["too_big_entries"] == 0 and res["returned_is_new"]
                 and res["in_place"] == {"misses": 1, "equal": True}
                 and res["load_weights"] == {"misses": 1, "weight_changed": True, "equal": True}
                 and res["weight_restored"])
    return res


def seqlens_seen_by_attention(worker, grids) -> dict:
    """What the first block's attention receives, stock vs fast: cu_seqlens must be equal and
    max_seqlen a CPU tensor of the same value under the fast path (no per-layer sync)."""
    import torch

    model = _model(worker)
    raw, normalized, grid = make_inputs(model, [tuple(g) for g in grids], 7)
    attn = model.vision_tower.encoder.blocks[0].attn
    seen = []

    def hook(mod, args, kwargs):
        seen.append((kwargs.get("cu_seqlens"), kwargs.get("max_seqlen")))

    h = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with _restoring():
            vf.set_components(())
            encode(model, grid, pixel_values=normalized)
            vf.set_components(ALL)
            encode(model, grid, pixel_values=normalized)
    finally:
        h.remove()
    (cu0, m0), (cu1, m1) = seen
    return {"cu_seqlens_equal": bool(torch.equal(cu0.cpu(), cu1.cpu())) and cu0.dtype == cu1.dtype,
            "cu_seqlens_device": [str(cu0.device), str(cu1.device)],
            "stock_max_seqlen_device": str(m0.device) if m0 is not None else None,
            "fast_max_seqlen_device": str(m1.device), "max_seqlen_equal": int(m0) == int(m1)}


def count_syncs(worker, grids, components) -> dict:
    """GPU->CPU synchronizations of one encoder call (torch.cuda.set_sync_debug_mode), after a warm call."""
    import warnings

    import torch

    model = _model(worker)
    raw, normalized, grid = make_inputs(model, [tuple(g) for g in grids], 11)
    device, _ = _device_dtype(model)
    use_raw = "raw_pixels" in components
    kw = {"image_grid_hws": grid}
    kw.update({vf.RAW_PIXELS_KEY: raw.to(device)} if use_raw else {"pixel_values": normalized.to(device)})
    with _restoring():
        vf.set_components(components)
        with torch.inference_mode():
            model.embed_multimodal(**kw)  # warm: the cache is filled, one-time notices are out
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    model.embed_multimodal(**kw)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
    # torch says "called a synchronizing CUDA operation"; its one-time notice about the mode is no sync
    msgs = [str(x.message) for x in w if "synchroniz" in str(x.message).lower()
            and not any(n in str(x.message).lower() for n in ("prototype", "experimental"))]
    return {"syncs": len(msgs), "messages": sorted({m[:160] for m in msgs})}


def time_encoder(worker, grids, components, iters: int = 15, warm: int = 3) -> dict:
    """Encoder wall time (synchronized) and CPU time until the call returns, median of ``iters``."""
    import torch

    model = _model(worker)
    raw, normalized, grid = make_inputs(model, [tuple(g) for g in grids], 13)
    device, _ = _device_dtype(model)
    use_raw = "raw_pixels" in components
    kw = {"image_grid_hws": grid}
    kw.update({vf.RAW_PIXELS_KEY: raw.to(device)} if use_raw else {"pixel_values": normalized.to(device)})
    wall, cpu = [], []
    with _restoring():
        vf.set_components(components)
        with torch.inference_mode():
            for i in range(warm + iters):
                _sync(device)
                t0 = time.perf_counter()
                model.embed_multimodal(**kw)
                t1 = time.perf_counter()
                _sync(device)
                t2 = time.perf_counter()
                if i >= warm:
                    cpu.append(1e3 * (t1 - t0))
                    wall.append(1e3 * (t2 - t0))
    return {"wall_ms": round(statistics.median(wall), 3), "wall_min_ms": round(min(wall), 3),
            "wall_max_ms": round(max(wall), 3), "cpu_return_ms": round(statistics.median(cpu), 3), "n": iters}


def pageable_h2d_blocks(worker, mb: int = 8, busy_ms: float = 50.0) -> dict:
    """Does a 'non-blocking' host-to-device copy of a pageable tensor wait for queued GPU work? Time
    the copy call while ~busy_ms of matmuls are queued, pageable vs pinned (what pinned_h2d changes)."""
    import torch

    dev = torch.device("cuda", torch.cuda.current_device())
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    host = torch.empty(mb << 20, dtype=torch.uint8)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    per = (time.perf_counter() - t0) / 10
    n = max(1, int(busy_ms / 1e3 / per))
    res = {"queued_gpu_ms": round(n * per * 1e3, 1)}
    for label, src in (("pageable", host), ("pinned", host.pin_memory())):
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            for _ in range(n):
                a @ a
            t = time.perf_counter()
            src.to(dev, non_blocking=True)
            times.append(1e3 * (time.perf_counter() - t))
            torch.cuda.synchronize()
        res[f"{label}_copy_call_ms"] = round(statistics.median(times), 2)
    return res
