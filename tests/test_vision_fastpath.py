"""The vision fast path (kimivl_inference.vision_fastpath) and the start-up warm-up.

Fast tests: the version guard on a changed source, the position-embedding cache on vLLM's own
``Learnable2DInterpPosEmb`` at full size (exactness, LRU bounds, invalidation), the on-device
normalization table, the engine input. Engine tests (CPU engine, tiny model): encoder outputs
bit-identical to stock inside the engine's worker, greedy ids through the real tiers with the
fast path on and off, and the warm-up holding health at NOT_SERVING until it is done.
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from conftest import ENGINE_ENV, start_inference
from imagedata import photo_jpeg
from kimivl.client import Client
from kimivl.v1 import inference_pb2, inference_pb2_grpc, types_pb2
from kimivl_inference import vision_fastpath as vf

GRIDS = {  # vision-tower grids: one photo, a document page, a mix (64x64 = the table's own size), repeats
    "1x38x38": [(38, 38)],
    "1x86x116": [(86, 116)],
    "mixed5": [(38, 38), (30, 44), (64, 64), (16, 24), (38, 38)],
    "repeated": [(20, 20)] * 3,
}


@pytest.fixture
def stock_afterwards():
    yield
    vf.set_components(())


# --------------------------------------------------------------------------- the version guard
def _copy_watched(dst):
    root = vf.vllm_dir()
    for rel in {rel for watched in vf.WATCHED.values() for rel, _ in watched}:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / rel, dst / rel)


def test_guard_knows_the_installed_vllm():
    v = vf.check()
    assert v.ok, v.summary()
    assert v.components["pinned_h2d"].startswith(("on", "not needed"))


def test_guard_turns_off_a_component_whose_source_changed(tmp_path, stock_afterwards):
    _copy_watched(tmp_path)
    moonvit = tmp_path / "model_executor/models/moonvit.py"
    text = moonvit.read_text()
    marker = "        for _, block in enumerate(self.blocks):"
    assert text.count(marker) == 1
    moonvit.write_text(text.replace(marker, "        hidden_states = hidden_states * 1\n" + marker))
    v = vf.check(tmp_path)
    assert not v.ok and "host_seqlens" not in v.active
    assert "MoonVitEncoder.forward" in v.components["host_seqlens"]
    assert {"posemb_cache", "raw_pixels"} <= v.active  # untouched components still apply

    from vllm.model_executor.models import moonvit as live

    stock_forward = live.MoonVitEncoder.forward
    on = vf.set_components(vf.WATCHED, v)
    assert "host_seqlens" not in on and live.MoonVitEncoder.forward is stock_forward
    assert live.Learnable2DInterpPosEmb.get_pos_embeds is vf._get_pos_embeds
    vf.set_components(())
    assert live.Learnable2DInterpPosEmb.get_pos_embeds is vf._ORIGINALS[
        (vf._M_MOONVIT, "Learnable2DInterpPosEmb.get_pos_embeds")]


def test_guard_off_without_the_files(tmp_path):
    v = vf.check(tmp_path)
    assert not v.active and all(s.startswith("off") for s in v.components.values())


def test_engine_processes_get_the_environment(monkeypatch, stock_afterwards):
    monkeypatch.delenv(vf.ENV, raising=False)
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    off = vf.configure_engine_processes(False)
    assert not off.active and not off.raw_pixels and vf.ENV not in os.environ
    monkeypatch.setenv("VLLM_PLUGINS", "some_other_plugin")
    refused = vf.configure_engine_processes(True)
    assert not refused.active and "VLLM_PLUGINS" in refused.detail and vf.ENV not in os.environ
    monkeypatch.delenv("VLLM_PLUGINS")
    on = vf.configure_engine_processes(True, 64)
    assert on.active and on.raw_pixels and os.environ[vf.ENV] == "1" and os.environ[vf.ENV_POSEMB_MB] == "64"
    import vllm.model_executor.models.kimi_vl  # noqa: F401  (patched once imported, or at once if it was)

    try:
        assert vf.active_components() >= set(vf.CORE) and vf._budget["bytes"] == 64 << 20
    finally:
        vf.set_posemb_budget(max_bytes=vf.DEFAULT_POSEMB_MB << 20)


# --------------------------------------------------------------------------- the position-embedding cache
def _pos_emb(dtype):
    import torch
    from vllm.model_executor.models.moonvit import Learnable2DInterpPosEmb

    torch.manual_seed(0)
    return Learnable2DInterpPosEmb(64, 64, 1152).to(dtype)  # MoonViT's size


def _stock(pe, grids):
    return vf._ORIGINALS[(vf._M_MOONVIT, "Learnable2DInterpPosEmb.get_pos_embeds")](pe, grids)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_posemb_cache_is_exact_cold_and_warm(dtype, mode, stock_afterwards):
    import torch

    pe = _pos_emb(getattr(torch, dtype))
    vf.set_components({"posemb_cache"})
    grids = [(38, 38), (86, 116), (64, 64), (16, 24), (38, 38)]
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        ref = _stock(pe, grids)
        s0 = dict(vf.STATS)
        cold = pe.get_pos_embeds(grids)
        s1 = dict(vf.STATS)
        warm = pe.get_pos_embeds(grids)
        s2 = dict(vf.STATS)
    assert torch.equal(cold, ref) and torch.equal(warm, ref)
    # 64x64 is the weight itself (never cached); the repeated 38x38 hits within the first call
    assert (s1["misses"] - s0["misses"], s1["hits"] - s0["hits"]) == (3, 1)
    assert (s2["misses"] - s1["misses"], s2["hits"] - s1["hits"]) == (0, 4)
    assert vf.posemb_cache_state()["entries"] == 3


def test_posemb_cache_hands_out_new_tensors(stock_afterwards):
    import torch

    pe = _pos_emb(torch.bfloat16)
    vf.set_components({"posemb_cache"})
    with torch.no_grad():
        a = pe.get_pos_embeds([(30, 30)])
        a.fill_(7)  # the caller's tensor, not the cache's
        b = pe.get_pos_embeds([(30, 30)])
        assert b.data_ptr() != a.data_ptr() and torch.equal(b, _stock(pe, [(30, 30)]))


def test_posemb_cache_bounds(stock_afterwards):
    import torch

    pe = _pos_emb(torch.bfloat16)
    vf.set_components({"posemb_cache"})
    one = 20 * 20 * 1152 * 2
    try:
        vf.set_posemb_budget(max_bytes=1 << 30, max_entries=2)
        s0 = dict(vf.STATS)
        with torch.no_grad():
            out = pe.get_pos_embeds([(20, 20), (22, 20), (24, 20), (20, 20)])
        assert torch.equal(out, _stock(pe, [(20, 20), (22, 20), (24, 20), (20, 20)]))
        st = vf.posemb_cache_state()
        assert (st["misses"] - s0["misses"], st["evictions"] - s0["evictions"], st["entries"]) == (4, 2, 2)
        assert sorted(map(tuple, st["grids"])) == [(20, 20), (24, 20)]  # the least recently used went

        vf.set_posemb_budget(max_bytes=2 * one + one // 2, max_entries=64)
        with torch.no_grad():
            pe.get_pos_embeds([(20, 20), (10, 40), (40, 10)])
        st = vf.posemb_cache_state()
        assert st["entries"] == 2 and st["bytes"] == 2 * one

        vf.set_posemb_budget(max_bytes=one - 1)  # an entry larger than the budget is not kept
        with torch.no_grad():
            assert torch.equal(pe.get_pos_embeds([(20, 20)]), _stock(pe, [(20, 20)]))
        assert vf.posemb_cache_state()["entries"] == 0

        vf.set_posemb_budget(max_bytes=0)  # no cache: vLLM's own method
        with torch.no_grad():
            assert torch.equal(pe.get_pos_embeds([(20, 20)]), _stock(pe, [(20, 20)]))
        assert vf.posemb_cache_state()["entries"] == 0
    finally:
        vf.set_posemb_budget(max_bytes=vf.DEFAULT_POSEMB_MB << 20, max_entries=vf.POSEMB_MAX_ENTRIES)


@pytest.mark.parametrize("change", ["in_place", "new_storage", "dtype", "new_parameter"])
def test_posemb_cache_follows_the_weight(change, stock_afterwards):
    import torch

    pe = _pos_emb(torch.bfloat16)
    vf.set_components({"posemb_cache"})
    grid = [(30, 30)]
    with torch.no_grad():
        before = pe.get_pos_embeds(grid)
        if change == "in_place":
            pe.weight.mul_(0.5)
        elif change == "new_storage":
            pe.weight.data = pe.weight.data * 0.5
        elif change == "dtype":
            pe.to(torch.float32)
        else:
            pe.weight = torch.nn.Parameter(pe.weight.detach() * 0.5, requires_grad=False)
        s0 = dict(vf.STATS)
        after = pe.get_pos_embeds(grid)
    assert vf.STATS["misses"] - s0["misses"] == 1 and vf.STATS["invalidations"] - s0["invalidations"] == 1
    assert torch.equal(after, _stock(pe, grid)) and not torch.equal(after.to(before.dtype), before)


# --------------------------------------------------------------------------- raw pixels on the device
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_device_normalization_equals_the_tiers(dtype, monkeypatch):
    import torch

    from kimivl_contract.processor import normalized_values
    from kimivl_inference.pixels import PixelNormalizer

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    td = getattr(torch, dtype)
    table = torch.from_numpy(normalized_values(mean, std)).to(td).reshape(-1)
    # every byte in every channel, across several chunks of the gather
    monkeypatch.setattr(vf, "RAW_CHUNK_PATCHES", 7)
    raw = torch.arange(256, dtype=torch.uint8).repeat_interleave(3 * 14 * 14 // 4 + 1)[: 20 * 588].view(20, 3, 14, 14)
    raw = torch.cat([raw, raw.flip(0), torch.randint(0, 256, (9, 3, 14, 14), dtype=torch.uint8)])
    got = vf.normalize_raw_pixels(raw, table)
    assert got.dtype == td and torch.equal(got, PixelNormalizer(mean, std, td)(raw))
    with pytest.raises(ValueError, match=vf.RAW_PIXELS_KEY):
        vf.normalize_raw_pixels(raw.float(), table)


def _prompt(dtypes):
    rng = np.random.default_rng(0)
    images, ids = [], [1, 2]
    for i, dt in enumerate(dtypes):
        h, w = (4, 6) if i % 2 else (6, 4)
        n = h * w // 4
        if dt == types_pb2.TENSOR_DTYPE_UINT8:
            data = rng.integers(0, 256, (h * w, 3, 14, 14), dtype=np.uint8).tobytes()
        else:
            data = rng.standard_normal((h * w, 3, 14, 14), dtype=np.float32).tobytes()
        images.append(types_pb2.PreparedImage(
            grid_height=h, grid_width=w, placeholder_offset=len(ids) + 1, placeholder_length=n,
            content_hash=f"h{i}", pixel_values=types_pb2.Tensor(dtype=dt, shape=[h * w, 3, 14, 14], data=data)))
        ids += [3] + [9] * n + [4]
    return types_pb2.PreparedPrompt(token_ids=ids, images=images)


def _items(engine_input):
    return {k: v for item in engine_input["mm_kwargs"]["image"] for k, v in item.items()}, engine_input


def test_engine_input_hands_raw_patches_over_only_when_all_are_raw():
    import torch

    from kimivl_inference.engine_input import build_engine_input
    from kimivl_inference.pixels import PixelNormalizer

    norm = PixelNormalizer((0.5,) * 3, (0.5,) * 3, torch.bfloat16)
    u8, f32 = types_pb2.TENSOR_DTYPE_UINT8, types_pb2.TENSOR_DTYPE_FLOAT32
    raw = build_engine_input(_prompt([u8, u8]), torch.bfloat16, norm, raw_pixels=True)
    items = raw["mm_kwargs"]["image"]
    assert [set(it) for it in items] == [{vf.RAW_PIXELS_KEY, "image_grid_hws"}] * 2
    assert items[0][vf.RAW_PIXELS_KEY].data.dtype == torch.uint8
    stock = build_engine_input(_prompt([u8, u8]), torch.bfloat16, norm, raw_pixels=False)
    for a, b in zip(items, stock["mm_kwargs"]["image"], strict=True):
        assert torch.equal(norm(a[vf.RAW_PIXELS_KEY].data), b["pixel_values"].data)
        assert torch.equal(a["image_grid_hws"].data, b["image_grid_hws"].data)
    mixed = build_engine_input(_prompt([u8, f32]), torch.bfloat16, norm, raw_pixels=True)
    assert [set(it) for it in mixed["mm_kwargs"]["image"]] == [{"pixel_values", "image_grid_hws"}] * 2
    assert all(it["pixel_values"].data.dtype == torch.bfloat16 for it in mixed["mm_kwargs"]["image"])


# --------------------------------------------------------------------------- warm-up prompts
def test_warmup_grid_option():
    from kimivl_inference.options import parse_grids

    assert parse_grids("74x74, 86x116") == [(74, 74), (86, 116)]
    assert parse_grids("none") == parse_grids("0") == parse_grids("") == []
    for bad in ("74", "75x74", "0x0", "ax4", ",".join(["4x4"] * 17)):
        with pytest.raises(ValueError):
            parse_grids(bad)


def test_warmup_prompts_are_valid_and_can_never_be_a_real_image(tiny_model):
    from transformers import AutoTokenizer

    from kimivl_contract.identity import tensor_identity
    from kimivl_contract.prepared import PromptLimits, check_prepared_prompt
    from kimivl_inference.warmup import HASH_PREFIX, warmup_prompt

    tok = AutoTokenizer.from_pretrained(str(tiny_model), trust_remote_code=True)
    pad = tok.convert_tokens_to_ids("<|media_pad|>")
    limits = PromptLimits(pad_id=pad, vocab_size=len(tok), max_images=8, max_model_len=8192)
    a = warmup_prompt(tok, pad, (38, 38), "tag1", 0)
    b = warmup_prompt(tok, pad, (38, 38), "tag1", 1)
    assert check_prepared_prompt(a, limits) == 38 * 38 // 4
    assert a.images[0].pixel_values.dtype == types_pb2.TENSOR_DTYPE_UINT8
    assert a.images[0].content_hash.startswith(HASH_PREFIX) and a.images[0].content_hash != b.images[0].content_hash
    assert a.images[0].pixel_values.data != b.images[0].pixel_values.data
    real = tensor_identity(a.images[0])  # what the tiers call these very pixels in the engine's caches
    assert not real.startswith(HASH_PREFIX) and real != a.images[0].content_hash


# --------------------------------------------------------------------------- inside the engine (CPU)
@pytest.mark.engine
class TestInTheEngine:
    """One AsyncLLM with the plugin's fast path; checks run in its worker (collective_rpc)."""

    @pytest.fixture(scope="class")
    def engine(self, tiny_model):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        # (collective_rpc reads VLLM_ALLOW_INSECURE_SERIALIZATION at each call: kept while the engine lives)
        env = {**ENGINE_ENV, vf.ENV: "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        eng = None
        try:
            eng = AsyncLLM.from_engine_args(AsyncEngineArgs(
                model=str(tiny_model), trust_remote_code=True, enforce_eager=True, max_model_len=8192,
                max_num_batched_tokens=8192, limit_mm_per_prompt={"image": 8}, mm_processor_cache_gb=0))
            yield eng
        finally:
            if eng is not None:
                eng.shutdown()
                eng.shutdown = lambda *a, **k: None  # __del__ would run it again at teardown
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)

    async def test_the_plugin_patched_the_worker(self, engine):
        (state,) = await engine.collective_rpc(vf.rpc_state)
        assert set(state["active"]) >= set(vf.CORE) and state["pid"] != os.getpid()

    async def test_encoder_outputs_equal_stock(self, engine):
        from kimivl_inference import vision_fastpath_probe as probe

        (r,) = await engine.collective_rpc(probe.exactness, args=(GRIDS,))
        assert r["ok"], r
        mixed = r["cases"]["mixed5"]
        assert mixed["fast_raw_cold"]["misses"] == 3 and mixed["fast_raw_warm"] == {"equal": True, "hits": 4,
                                                                                    "misses": 0}
        assert set(r["active_after"]) >= set(vf.CORE)

    async def test_cache_bounds_and_invalidation_in_the_model(self, engine):
        from kimivl_inference import vision_fastpath_probe as probe

        (r,) = await engine.collective_rpc(probe.cache_bounds_and_invalidation)
        assert r["ok"], r
        assert not r["load_weights_bumped_version"]  # why load_weights must empty the cache itself

    async def test_attention_gets_host_seqlens(self, engine):
        from kimivl_inference import vision_fastpath_probe as probe

        (r,) = await engine.collective_rpc(probe.seqlens_seen_by_attention, args=([(38, 38), (30, 44)],))
        assert r["cu_seqlens_equal"] and r["max_seqlen_equal"] and r["fast_max_seqlen_device"] == "cpu", r


# --------------------------------------------------------------------------- through the real tiers
GREEDY = {"temperature": 0.0, "max_tokens": 12, "ignore_eos": True}


def _generate(target, prompt):
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 256 << 20)]) as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        req = inference_pb2.GenerateRequest(prompt=prompt, sampling=types_pb2.SamplingParameters(**GREEDY))
        return [t for m in stub.Generate(req, timeout=300) if m.WhichOneof("event") == "delta"
                for t in m.delta.token_ids]


def _metric(port, name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


@pytest.fixture(scope="module")
def stock_tier(tiny_model):
    """An inference tier with the fast path off, whose start is watched: health is sampled while it
    warms up two grids."""
    srv = start_inference(extra=["--no-prefix-caching", "--no-vision-fastpath", "--warmup-grids", "38x38,30x44"])
    samples: list[tuple[float, float, int | None]] = []  # (asked, answered, status)
    done = threading.Event()

    def watch():
        while not done.is_set() and srv.proc.poll() is None:
            asked = time.time()
            status = srv.health()
            samples.append((asked, time.time(), status))
            time.sleep(0.05)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        srv.wait_serving()
        time.sleep(0.3)
        done.set()
        t.join()
        srv.health_samples = samples
        port = int(srv.args[srv.args.index("--metrics-port") + 1])
        srv.requests_at_start = _metric(port, "kimivl_time_to_first_token_seconds_count")  # before any test's
        yield srv
    finally:
        done.set()
        srv.stop()


@pytest.mark.engine
def test_greedy_ids_equal_with_the_fast_path_on_and_off(front_door, inference_server, stock_tier):
    metrics = int(inference_server.args[inference_server.args.index("--metrics-port") + 1])
    assert _metric(metrics, "kimivl_vision_fastpath_active") == 1.0
    stock_metrics = int(stock_tier.args[stock_tier.args.index("--metrics-port") + 1])
    assert _metric(stock_metrics, "kimivl_vision_fastpath_active") == 0.0
    cases = [["Say something."], ["What is in this picture?", photo_jpeg("coffee")],
             ["Compare", photo_jpeg("astronaut"), "with", photo_jpeg("chelsea")]]
    with Client(front_door.target, timeout_s=300) as c:
        for parts in cases:
            prompt = c.preprocess(parts).prompt
            fast = _generate(inference_server.target, prompt)
            stock = _generate(stock_tier.target, prompt)
            assert fast == stock and len(fast) == GREEDY["max_tokens"], parts
            assert c.chat(parts, sampling=GREEDY).token_ids == stock  # the whole path, front door included
    log = inference_server.log_path.read_text(errors="replace")
    assert "vision fast path active: host_seqlens, posemb_cache, raw_pixels" in log
    assert re.search(r"(EngineCore|Worker).*Kimi-VL vision fast path in pid \d+: active", log)


@pytest.mark.engine
def test_warmup_runs_before_serving(stock_tier):
    log = stock_tier.log_path.read_text(errors="replace")
    start = re.search(r"^(\S+ \S+) INFO kimivl.inference: warm-up: grids 38x38, 30x44", log, re.M)
    done = re.search(r"^(\S+ \S+) INFO kimivl.inference: warm-up done: (\d+) requests in ([\d.]+) s", log, re.M)
    assert start and done and start.start() < done.start()
    assert "vision fast path off (--no-vision-fastpath)" in log
    assert int(done.group(2)) >= 2 * 3  # per grid: one alone, then a group of at least two

    def ts(m):
        return time.mktime(time.strptime(m.group(1).split(",")[0], "%Y-%m-%d %H:%M:%S")) + \
            int(m.group(1).split(",")[1]) / 1e3

    t_start, t_done = ts(start), ts(done)
    samples = stock_tier.health_samples
    # A SERVING answer means the flip came before it was received; the tier logs "done" before the flip.
    serving = [answered for _, answered, h in samples if h == health_pb2.HealthCheckResponse.SERVING]
    assert serving and min(serving) >= t_done, "SERVING before the warm-up was done"
    during = [h for asked, answered, h in samples if t_start < asked and answered < t_done]
    assert during and all(h == health_pb2.HealthCheckResponse.NOT_SERVING for h in during), during
    metrics = int(stock_tier.args[stock_tier.args.index("--metrics-port") + 1])
    assert _metric(metrics, "kimivl_warmup_seconds") > 0
    assert stock_tier.requests_at_start in (None, 0.0)  # the warm-up is not counted as traffic


def test_warmup_option_turns_it_off():
    import argparse

    from kimivl_inference.options import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["--model", "m"]).warmup_grids == [(74, 74), (86, 116)]
    assert p.parse_args(["--model", "m", "--warmup-grids", "none"]).warmup_grids == []
    assert p.parse_args(["--model", "m"]).no_vision_fastpath is False


_ = asyncio  # the engine tests are coroutines (pytest-asyncio, auto mode)
