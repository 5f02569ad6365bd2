"""Both tiers on a GPU with the full-size Kimi-VL-A3B architecture, then vLLM's own path.

1. Starts the inference tier (dummy weights re-initialised N(0, 1/fan_in) from a seed, prefix
   caching off) and the preprocessing tier as processes; streams one chat with a real photo
   (thinking and answer apart); measures idle time to first token through the front door.
2. Runs greedy equality cases through the two tiers, stops them, then runs the same chats
   through vLLM's own path (LLM.chat: its image loader and the model dir's HF processor) on
   an engine with the same seed-initialised weights, and compares the token ids.

usage: python3 bench/gpu_e2e.py MODEL_DIR OUT_DIR   (MODEL_DIR from .gpu/build_model_dir.py)
"""
from __future__ import annotations

import base64
import io
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ENGINE = ["--load-format", "dummy", "--reinit-dummy-weights", "--seed", "0", "--no-prefix-caching",
          "--max-model-len", "8192", "--max-num-batched-tokens", "8192", "--gpu-memory-utilization", "0.85",
          "--preset", "none", "--limit-mm-per-prompt", "8"]
T0 = time.perf_counter()


def log(*a):
    print(f"[gpu_e2e {time.perf_counter() - T0:7.1f}s]", *a, flush=True)


def jpeg(arr, quality=90) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def images():
    import numpy as np
    from PIL import Image
    from skimage import data
    big = np.asarray(Image.fromarray(data.astronaut()).resize((1600, 1200), Image.Resampling.BICUBIC))
    return {"astronaut": jpeg(data.astronaut()), "coffee": jpeg(data.coffee()), "chelsea": jpeg(data.chelsea()),
            "photo_1600x1200": jpeg(big)}


def cases(imgs):
    return [
        ["What is in this picture?", imgs["astronaut"]],
        [imgs["coffee"], "and", imgs["chelsea"], "compare them"],
        ["Describe", imgs["photo_1600x1200"]],
        ["What is in this picture?", imgs["chelsea"]],
    ]


def run_tiers(model, out_dir, imgs):
    from kimivl.client import Client
    from kimivl_devtools.launch import TierProcess

    t = time.perf_counter()
    inf = TierProcess("inference", ["--model", model, "--port", "50052", "--metrics-port", "0", *ENGINE], 50052,
                      host="localhost", log=os.path.join(out_dir, "inference.log"))
    pre = TierProcess("preprocess", ["--model", model, "--port", "50051", "--metrics-port", "0",
                                     "--inference-target", "localhost:50052", "--workers", "4"], 50051,
                      host="localhost", log=os.path.join(out_dir, "preprocess.log"))
    res = {}
    try:
        pre.wait_serving(120)
        inf.wait_serving(420)
        res["inference_tier_ready_s"] = round(time.perf_counter() - t, 1)
        log("tiers SERVING", res["inference_tier_ready_s"])
        with Client("localhost:50051", timeout_s=300) as c:
            c.chat(["warm up", imgs["coffee"]], sampling={"max_tokens": 4})  # first image request JITs
            t = time.perf_counter()
            first = None
            thinking, answer, n = [], [], 0
            for ev in c.stream(["Describe this photo.", imgs["astronaut"]], sampling={"max_tokens": 64}):
                if ev.result is not None:
                    res["streamed_chat"] = {
                        "client_ttft_ms": round(first * 1e3, 1), "tokens": n,
                        "server_timings_ms": {"preprocess": round(ev.result.timings.preprocess_ms, 1),
                                              "ttft": round(ev.result.timings.time_to_first_token_ms, 1),
                                              "total": round(ev.result.timings.total_ms, 1),
                                              "mean_itl": round(ev.result.timings.mean_inter_token_ms, 2)},
                        "usage": {"prompt": ev.result.usage.prompt_tokens, "image": ev.result.usage.image_tokens,
                                  "thinking": ev.result.usage.thinking_tokens,
                                  "answer": ev.result.usage.answer_tokens},
                        "thinking_head": "".join(thinking)[:120], "answer_head": "".join(answer)[:120]}
                    break
                if first is None and ev.token_ids:
                    first = time.perf_counter() - t
                n += len(ev.token_ids)
                thinking.append(ev.thinking)
                answer.append(ev.answer)
            log("streamed chat", res["streamed_chat"])
            ttfts = []
            for i in range(10):  # idle TTFT: one request at a time, each image new to the caches
                from PIL import Image
                im = Image.open(io.BytesIO(imgs["photo_1600x1200"])).rotate(i * 7 + 1)
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=90)
                r = c.chat(["What is in this picture?", buf.getvalue()], sampling={"max_tokens": 1})
                ttfts.append(r.timings.time_to_first_token_ms)
            res["idle_ttft_ms_1600x1200_jpeg"] = {"median": round(statistics.median(ttfts), 1),
                                                  "min": round(min(ttfts), 1), "max": round(max(ttfts), 1)}
            log("idle ttft", res["idle_ttft_ms_1600x1200_jpeg"])
            res["ours"] = [c.chat(p, sampling={"temperature": 0.0, "max_tokens": 32, "ignore_eos": True}).token_ids
                           for p in cases(imgs)]
    finally:
        for tier in (pre, inf):
            tier.proc.terminate()
        for tier in (pre, inf):
            tier.stop(timeout_s=90)
    return res


def run_vllm_own_path(model, imgs):
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    from vllm import LLM, SamplingParams

    from kimivl_devtools.reinit import reinit_dummy_weights
    llm = LLM(model=model, trust_remote_code=True, load_format="dummy", dtype="bfloat16", seed=0,
              max_model_len=8192, max_num_batched_tokens=8192, gpu_memory_utilization=0.85,
              limit_mm_per_prompt={"image": 8}, enable_prefix_caching=False)
    llm.collective_rpc(reinit_dummy_weights, args=(0,))
    # The same warm-up request the tiers got: the first multimodal request JIT-compiles
    # kernels, and the comparison should not hinge on that.
    warm = [{"type": "text", "text": "warm up"},
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(imgs["coffee"]).decode()}}]
    llm.chat([{"role": "user", "content": warm}], SamplingParams(max_tokens=4), use_tqdm=False)
    out = []
    for parts in cases(imgs):
        content = [{"type": "text", "text": p} if isinstance(p, str) else
                   {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(p).decode()}}
                   for p in parts]
        o = llm.chat([{"role": "user", "content": content}],
                     SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True), use_tqdm=False)
        out.append(list(o[0].outputs[0].token_ids))
    return out


def main():
    model, out_dir = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    imgs = images()
    res = run_tiers(model, out_dir, imgs)
    ref = run_vllm_own_path(model, imgs)
    res["equality"] = [{"case": i, "equal": a == b, "ours_head": a[:8], "vllm_head": b[:8]}
                       for i, (a, b) in enumerate(zip(res.pop("ours"), ref, strict=True))]
    res["other_image_changes_output"] = ref[0] != ref[3]
    res["all_equal"] = all(e["equal"] for e in res["equality"])
    log("equality", res["equality"], "other image differs:", res["other_image_changes_output"])
    json.dump(res, open(os.path.join(out_dir, "gpu_e2e.json"), "w"), indent=2)
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
