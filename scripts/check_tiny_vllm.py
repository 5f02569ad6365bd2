"""Prove that the tiny Kimi-VL model runs in vLLM on this machine and depends on the image.

Builds the tiny model (unless a directory is given), starts ``vllm.LLM`` on it (eager, bf16,
max_model_len 4096, up to 4 images a prompt) and generates 16 tokens greedily for a
chat-template prompt with one PIL image through vLLM's own multimodal path: twice with the
same image (must be identical) and once with another image of the same size (must differ),
each with an empty prefix cache; a prefix-cache hit is shown too, for information.
Prints timings and the peak RSS of this process and of its descendants (engine core, worker).

usage: python scripts/check_tiny_vllm.py [MODEL_DIR]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; without it the CPU worker takes ~92% of RAM
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def _image(seed: int, size: tuple[int, int] = (448, 336)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _peak_rss_gib() -> dict[str, float]:
    """Peak RSS (VmHWM) of this process and of each live descendant (vLLM's engine core, worker)."""
    import psutil

    peaks = {}
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
            peaks[f"{proc.name()}[{proc.pid}]"] = kib / 2**20
        except (OSError, StopIteration, psutil.Error):
            continue
    return peaks


def main(argv: list[str]) -> int:
    t0 = time.perf_counter()
    if argv:
        model_dir = argv[0]
    else:
        from kimivl_devtools.tiny_model import make_tiny_model

        model_dir = os.path.join(tempfile.mkdtemp(prefix="kimivl-tiny-"), "model")
        make_tiny_model(model_dir, seed=0)
        print(f"tiny model built in {time.perf_counter() - t0:.1f} s: {model_dir}")

    t = time.perf_counter()
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    print(f"import vllm: {time.perf_counter() - t:.1f} s")

    t = time.perf_counter()
    llm = LLM(
        model=model_dir,
        enforce_eager=True,
        dtype="bfloat16",
        max_model_len=4096,
        limit_mm_per_prompt={"image": 4},
        seed=0,
    )
    print(f"engine start: {time.perf_counter() - t:.1f} s")

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}
    ]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)

    def generate(image: Image.Image) -> tuple[list[int], str, int, float]:
        t = time.perf_counter()
        out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": image}}, params, use_tqdm=False)[
            0
        ]
        return (
            list(out.outputs[0].token_ids),
            out.outputs[0].text,
            len(out.prompt_token_ids),
            time.perf_counter() - t,
        )

    img_a, img_b = _image(1), _image(2)
    a1, text_a, n_prompt, dt_a1 = generate(img_a)
    # A prefix-cache hit recomputes only the prompt's tail, on a different (decode-shaped) MLA
    # path whose rounding differs; random weights have near-tied logits, so compare fresh runs.
    llm.reset_prefix_cache()
    a2, _, _, dt_a2 = generate(img_a)
    a3, _, _, dt_a3 = generate(img_a)
    llm.reset_prefix_cache()
    b, text_b, _, dt_b = generate(img_b)
    print(
        f"prompt: {prompt!r} -> {n_prompt} tokens (image 448x336 -> {448 // 28 * (336 // 28)} image tokens)"
    )
    print(f"image A, fresh   ({dt_a1:.2f} s): {a1}  {text_a[:60]!r}...")
    print(f"image A, fresh   ({dt_a2:.2f} s): {a2}")
    print(f"image B, fresh   ({dt_b:.2f} s): {b}  {text_b[:60]!r}...")
    print(f"image A, prefix-cache hit ({dt_a3:.2f} s): {a3}  (informational; == fresh: {a3 == a1})")
    same, differ = a1 == a2, a1 != b
    print(f"same image -> identical: {same}; other image -> different: {differ}")
    peaks = _peak_rss_gib()
    print(
        "peak RSS (GiB): "
        + ", ".join(f"{k} {v:.2f}" for k, v in peaks.items())
        + f"; sum {sum(peaks.values()):.2f}"
    )
    print(f"total: {time.perf_counter() - t0:.1f} s")
    return 0 if same and differ else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
