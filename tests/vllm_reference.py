"""vLLM's own path, for the equality test: chats go into vLLM as they would through its
OpenAI server (LLM.chat: its chat template handling, its image loader, the registered HF
processor), greedy, and the generated token ids come out as JSON.

usage: python tests/vllm_reference.py MODEL_DIR CASES_JSON  (prints one JSON line per case)
CASES_JSON: [{"parts": [{"text": ...} | {"image_b64": ...}], "max_tokens": N}, ...]
"""
import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def main():
    from vllm import LLM, SamplingParams

    model, cases_path = sys.argv[1], sys.argv[2]
    cases = json.load(open(cases_path))
    llm = LLM(model=model, dtype="bfloat16", enforce_eager=True, max_model_len=8192, max_num_batched_tokens=8192,
              limit_mm_per_prompt={"image": 8}, seed=0, trust_remote_code=True,
              enable_prefix_caching=False)  # as the tests' inference tier
    for case in cases:
        content = []
        for p in case["parts"]:
            if "text" in p:
                content.append({"type": "text", "text": p["text"]})
            else:
                content.append({"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + p["image_b64"]}})
        out = llm.chat([{"role": "user", "content": content}],
                       SamplingParams(temperature=0.0, max_tokens=case["max_tokens"], ignore_eos=True),
                       use_tqdm=False)
        print("RESULT " + json.dumps({"token_ids": list(out[0].outputs[0].token_ids),
                                      "prompt_len": len(out[0].prompt_token_ids)}), flush=True)


if __name__ == "__main__":
    main()
