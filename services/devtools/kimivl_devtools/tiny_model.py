"""A tiny random-weight Kimi-VL model directory that vLLM's built-in ``kimi_vl`` support loads.

The real architecture (MoonViT + projector + DeepSeek-V3-style MoE with MLA), shrunk so that
tests and local runs work on a CPU with no model hub. Only the MLA latent sizes stay real
(``kv_lora_rank`` 512, ``qk_rope_head_dim`` 64): vLLM's CPU MLA kernels only take a 576-wide
latent head. The vocabulary keeps Kimi's size and special-token ids, so prompts, stop ids and
placeholder handling are the same as with the real checkpoint.

Weights are N(0, 1/fan_in) (norms 1, biases 0): with the usual 0.02 the output ignores the
image, which would make image-sensitive tests meaningless. Every file is a deterministic
function of the seed; the processor comes from the ``vllm.general_plugins`` registration
(``kimivl_inference.hf_processor``), so ``preprocessor_config.json`` has no ``auto_map``.
The model code does travel with the directory, as with the real checkpoint: the project's
``kimivl_modeling`` files, which ``config.json``'s ``auto_map`` names, so Transformers loads
the directory with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``.

CLI: ``kimivl make-tiny-model DIR [--seed N] [--force]`` or
``python -m kimivl_devtools.tiny_model DIR [--seed N] [--force]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

VOCAB_SIZE = 163840
SPECIAL_BASE = 163584  # Kimi's 256 special ids are 163584..163839
SPECIAL_TOKENS = {
    "[BOS]": 163584,
    "[EOS]": 163585,
    "<|im_end|>": 163586,
    "<|im_user|>": 163587,
    "<|im_assistant|>": 163588,
    "<|im_system|>": 163594,
    "<|im_middle|>": 163601,
    "<|media_start|>": 163602,
    "<|media_content|>": 163603,
    "<|media_end|>": 163604,
    "<|media_pad|>": 163605,
    "[UNK]": 163838,
    "[PAD]": 163839,
}
EOS_TOKEN_IDS = [SPECIAL_TOKENS["[EOS]"], SPECIAL_TOKENS["<|im_end|>"]]
MAX_POSITION_EMBEDDINGS = 8192

# Kimi's tiktoken split pattern: Han runs, cased words with English contractions, digits in
# groups of at most 3, punctuation runs, newlines, spaces.
PRETOKENIZE_PATTERN = "|".join(
    [
        r"[\p{Han}]+",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

# ◁think▷ / ◁/think▷ are plain text in Kimi's tokenizer (several tokens each); the corpus has
# them so that the tiny tokenizer splits them the same way a reasoning parser will meet them.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant. Describe the image in one sentence.",
    "What is shown in this picture? Compare these two images and explain the difference.",
    "A gradient from red to blue, with green increasing from top to bottom.",
    "◁think▷The user wants a short description. The image shows a red square on a white "
    "background.◁/think▷It is a red square on a white background.",
    "◁think▷Let me count: 1, 2, 3, 4, 5. There are five circles.◁/think▷There are 5 circles.",
    "◁think▷\n2 + 2 = 4, and 4 * 3 = 12.\n◁/think▷\nThe answer is 12.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2048 65536 3.14159 2025-06-21.",
    "Colors: red, green, blue, yellow, black, white, orange, purple.",
    "请描述这张图片。图片中有一只猫坐在窗台上。",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "这是一个测试。模型应该先思考，然后回答问题。",
    "Hello, world! I'm testing the tokenizer; it's fine, isn't it?",
    "def add(a, b):\n    return a + b\n",
    '{"role": "user", "content": "What is in the image?"}',
]

# Kimi-VL's chat template, plus ``type == 'image_url'`` parts (OpenAI style) as images.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "{{'<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>'}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{'<|im_system|>'}}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{'<|im_user|>'}}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{'<|im_assistant|>'}}{%- endif -%}"
    "{{- message['role'] -}}"
    "{{'<|im_middle|>'}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] + '<|im_end|>' -}}"
    "{%- else -%}"
    "{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or content['type'] == 'image_url'"
    " or 'image' in content or 'image_url' in content -%}"
    "{{'<|media_start|>image<|media_content|><|media_pad|><|media_end|>'}}"
    "{%- else -%}"
    "{{content['text']}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{'<|im_end|>'}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{'<|im_assistant|>assistant<|im_middle|>'}}"
    "{%- endif -%}"
)

TEXT_CONFIG = {
    "model_type": "deepseek_v3",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 2.446,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": None,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 64,
    "v_head_dim": 32,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
    "rope_theta": 800000.0,
    "rope_parameters": {"rope_type": "default", "rope_theta": 800000.0},
    "attention_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": SPECIAL_TOKENS["[BOS]"],
    "eos_token_id": SPECIAL_TOKENS["[EOS]"],
    "pad_token_id": SPECIAL_TOKENS["[PAD]"],
}

VISION_CONFIG = {
    "model_type": "moonvit",
    "patch_size": 14,
    "init_pos_emb_height": 64,
    "init_pos_emb_width": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "merge_kernel_size": [2, 2],
}

MODEL_CONFIG = {
    "architectures": ["KimiVLForConditionalGeneration"],
    "model_type": "kimi_vl",
    "media_placeholder_token_id": SPECIAL_TOKENS["<|media_pad|>"],
    "ignore_index": -100,
    "bos_token_id": SPECIAL_TOKENS["[BOS]"],
    "eos_token_id": EOS_TOKEN_IDS,
    "pad_token_id": SPECIAL_TOKENS["[PAD]"],
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    # The real checkpoint's; without a version transformers 5 suspects a Mistral tokenizer.
    "transformers_version": "4.50.3",
    "vocab_size": VOCAB_SIZE,
    "text_config": TEXT_CONFIG,
    "vision_config": VISION_CONFIG,
}

GENERATION_CONFIG = {
    "bos_token_id": SPECIAL_TOKENS["[BOS]"],
    "eos_token_id": EOS_TOKEN_IDS,
    "pad_token_id": SPECIAL_TOKENS["[PAD]"],
}

PREPROCESSOR_CONFIG = {
    "image_processor_type": "KimiVLImageProcessor",
    "processor_class": "KimiVLProcessor",
    "patch_size": 14,
    "merge_kernel_size": [2, 2],
    "in_token_limit": 16384,
    "pad_input": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}

README = """\
# Tiny random-weight Kimi-VL (test model)

Generated by `kimivl make-tiny-model` (seed {seed}). NOT a trained model: its output is
meaningless, but deterministic and dependent on the image.

- Architecture of Kimi-VL-A3B-Thinking-2506 (`kimi_vl`, `KimiVLForConditionalGeneration`),
  shrunk: MoonViT hidden 64 x 2 layers (patch 14, merge 2x2, pos-emb 64x64); projector;
  DeepSeek-V3-style text model, hidden 128 x 2 layers (the first dense), 4 routed experts
  top-2 + 1 shared, MLA with the real latent sizes (kv_lora_rank 512, qk_rope_head_dim 64).
- Kimi's vocabulary size (163840) and special-token ids; a byte-level BPE trained on a tiny
  corpus, the rest of the vocabulary is `<|reserved_N|>` filler. `◁think▷`/`◁/think▷` are
  plain text (several tokens each), as in Kimi's tokenizer.
- max_position_embeddings {max_pos}; weights bfloat16, N(0, 1/fan_in), norms 1, biases 0.
- No processor code here: `preprocessor_config.json` names `KimiVLProcessor`, which the
  `kimivl` vLLM plugin (`kimivl_inference.plugin:register`) registers.
- Model code as remote code: `configuration_kimi_vl.py` and `modeling_kimi_vl.py` (the
  project's implementation, `kimivl_modeling`), named by `config.json`'s `auto_map`, so
  `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads this directory.

model.safetensors sha256: {sha}
"""

_SMALL_TRAINER_VOCAB = 4096


def _build_tokenizer(out: Path) -> None:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre
    trainer = trainers.BpeTrainer(
        vocab_size=_SMALL_TRAINER_VOCAB,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    base.train_from_iterator(CORPUS * 4, trainer=trainer)
    trained = json.loads(base.to_str())["model"]
    vocab: dict[str, int] = dict(trained["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]

    specials = {i: f"<|reserved_{i}|>" for i in range(SPECIAL_BASE, VOCAB_SIZE)}
    specials.update({i: tok for tok, i in SPECIAL_TOKENS.items()})
    vocab.update({f"<|reserved_{i}|>": i for i in range(len(vocab), SPECIAL_BASE)})
    vocab.update({tok: i for i, tok in specials.items()})
    assert sorted(vocab.values()) == list(range(VOCAB_SIZE))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(specials[i], special=True, normalized=False) for i in sorted(specials)]
    )

    named = set(SPECIAL_TOKENS) - {"[BOS]", "[EOS]", "[UNK]", "[PAD]"}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="[BOS]",
        eos_token="[EOS]",
        unk_token="[UNK]",
        pad_token="[PAD]",
        additional_special_tokens=sorted(named, key=SPECIAL_TOKENS.__getitem__),
        model_max_length=MAX_POSITION_EMBEDDINGS,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def model_config(vision: dict | None = None) -> dict:
    """MODEL_CONFIG, with vision tower sizes overridden (the demo model's is larger)."""
    return {**MODEL_CONFIG, "vision_config": {**VISION_CONFIG, **(vision or {})}}


def _weight_shapes(vision: dict | None = None) -> dict[str, tuple[int, ...]]:
    """HF Kimi-VL checkpoint names and shapes, as vLLM's ``kimi_vl.py`` loads them."""
    t, v = TEXT_CONFIG, model_config(vision)["vision_config"]
    shapes: dict[str, tuple[int, ...]] = {}

    hv, iv, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    vt = "vision_tower."
    shapes[vt + "patch_embed.proj.weight"] = (hv, 3, p, p)
    shapes[vt + "patch_embed.proj.bias"] = (hv,)
    shapes[vt + "patch_embed.pos_emb.weight"] = (v["init_pos_emb_height"], v["init_pos_emb_width"], hv)
    for i in range(v["num_hidden_layers"]):
        b = f"{vt}encoder.blocks.{i}."
        for norm in ("norm0", "norm1"):
            shapes[b + norm + ".weight"] = shapes[b + norm + ".bias"] = (hv,)
        shapes[b + "wqkv.weight"], shapes[b + "wqkv.bias"] = (3 * hv, hv), (3 * hv,)
        shapes[b + "wo.weight"], shapes[b + "wo.bias"] = (hv, hv), (hv,)
        shapes[b + "mlp.fc0.weight"], shapes[b + "mlp.fc0.bias"] = (iv, hv), (iv,)
        shapes[b + "mlp.fc1.weight"], shapes[b + "mlp.fc1.bias"] = (hv, iv), (hv,)
    shapes[vt + "encoder.final_layernorm.weight"] = shapes[vt + "encoder.final_layernorm.bias"] = (hv,)

    d = t["hidden_size"]
    merged = hv * math.prod(v["merge_kernel_size"])
    mp = "multi_modal_projector."
    shapes[mp + "pre_norm.weight"] = shapes[mp + "pre_norm.bias"] = (hv,)
    shapes[mp + "linear_1.weight"], shapes[mp + "linear_1.bias"] = (merged, merged), (merged,)
    shapes[mp + "linear_2.weight"], shapes[mp + "linear_2.bias"] = (d, merged), (d,)

    lm = "language_model."
    heads, nope, rope, vdim = (
        t[k] for k in ("num_attention_heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
    )
    lora = t["kv_lora_rank"]
    shapes[lm + "model.embed_tokens.weight"] = (t["vocab_size"], d)
    for i in range(t["num_hidden_layers"]):
        b = f"{lm}model.layers.{i}."
        shapes[b + "input_layernorm.weight"] = shapes[b + "post_attention_layernorm.weight"] = (d,)
        shapes[b + "self_attn.q_proj.weight"] = (heads * (nope + rope), d)
        shapes[b + "self_attn.kv_a_proj_with_mqa.weight"] = (lora + rope, d)
        shapes[b + "self_attn.kv_a_layernorm.weight"] = (lora,)
        shapes[b + "self_attn.kv_b_proj.weight"] = (heads * (nope + vdim), lora)
        shapes[b + "self_attn.o_proj.weight"] = (d, heads * vdim)
        if i < t["first_k_dense_replace"]:
            mlps = {"mlp.": t["intermediate_size"]}
        else:
            im = t["moe_intermediate_size"]
            shapes[b + "mlp.gate.weight"] = (t["n_routed_experts"], d)
            shapes[b + "mlp.gate.e_score_correction_bias"] = (t["n_routed_experts"],)
            mlps = {f"mlp.experts.{e}.": im for e in range(t["n_routed_experts"])}
            mlps["mlp.shared_experts."] = im * t["n_shared_experts"]
        for m, inter in mlps.items():
            shapes[b + m + "gate_proj.weight"] = shapes[b + m + "up_proj.weight"] = (inter, d)
            shapes[b + m + "down_proj.weight"] = (d, inter)
    shapes[lm + "model.norm.weight"] = (d,)
    shapes[lm + "lm_head.weight"] = (t["vocab_size"], d)
    return shapes


def _init_weights(seed: int, vision: dict | None = None) -> dict:
    """bf16 tensors: N(0, 1/fan_in) matrices, ones for norms, zeros for biases.

    Each tensor has its own generator seeded from (seed, name), so a tensor's values do
    not depend on which other tensors exist.
    """
    import torch

    tensors = {}
    for name, shape in sorted(_weight_shapes(vision).items()):
        if len(shape) == 1:
            is_norm = "norm" in name and name.endswith(".weight")
            tensors[name] = (torch.ones if is_norm else torch.zeros)(shape, dtype=torch.bfloat16)
            continue
        fan_in = math.prod(shape[1:]) if len(shape) == 4 else shape[-1]
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        w = torch.randn(shape, generator=gen, dtype=torch.float32) / math.sqrt(fan_in)
        tensors[name] = w.to(torch.bfloat16)
    return tensors


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_tiny_model(out_dir: str, seed: int = 0, vision: dict | None = None) -> dict:
    """Write the tiny model into ``out_dir`` (created; must not exist or be empty).

    The files are built in a sibling temporary directory and moved in at the end, so a
    reader never sees a half-written model. Returns a summary (path, sha256, parameter count).
    """
    from safetensors.torch import save_file

    from kimivl_modeling import install_remote_code

    out = Path(out_dir).resolve()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _build_tokenizer(tmp)
        _write_json(tmp / "config.json", model_config(vision))
        _write_json(tmp / "generation_config.json", GENERATION_CONFIG)
        _write_json(tmp / "preprocessor_config.json", PREPROCESSOR_CONFIG)
        install_remote_code(tmp)
        tensors = _init_weights(seed, vision)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        sha = _sha256(tmp / "model.safetensors")
        (tmp / "README.md").write_text(README.format(seed=seed, max_pos=MAX_POSITION_EMBEDDINGS, sha=sha))
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "path": str(out),
        "seed": seed,
        "model_safetensors_sha256": sha,
        "num_parameters": sum(t.numel() for t in tensors.values()),
        "files": sorted(p.name for p in out.iterdir()),
    }


def main(argv: list[str] | None = None) -> int:
    """``kimivl make-tiny-model DIR [--seed N] [--force]``; argv is what follows the subcommand."""
    parser = argparse.ArgumentParser(
        prog="kimivl make-tiny-model",
        description="Write a tiny random-weight Kimi-VL model directory that vLLM loads (for tests).",
    )
    parser.add_argument("dir", help="output directory (must not exist or be empty, unless --force)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0); same seed, same bytes")
    parser.add_argument("--force", action="store_true", help="replace DIR if it exists")
    args = parser.parse_args(argv)
    out = Path(args.dir)
    if not clear_output_dir(out, args.force):
        return 1
    print(json.dumps(make_tiny_model(str(out), seed=args.seed), indent=2))
    return 0


def clear_output_dir(out: Path, force: bool) -> bool:
    """A model writer's CLI: False (with the error printed) when ``out`` holds files and ``force``
    is not given; with ``force`` they are removed."""
    if out.exists() and any(out.iterdir()):
        if not force:
            print(f"error: {out} exists and is not empty (use --force to replace it)", file=sys.stderr)
            return False
        shutil.rmtree(out)
    return True


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
