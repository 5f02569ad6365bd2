"""Build a full-size Kimi-VL-A3B model directory WITHOUT weights (for vLLM
load_format="dummy"): config.json (KimiVLConfig: MoonViT 27x1152 + DeepSeek-V3
style MoE/MLA text model 27 layers, 64 experts), a fast tokenizer whose vocab
spans ids 0..163839 (byte-level BPE trained on a tiny corpus + filler tokens,
Kimi special tokens at the real Kimi ids), the Kimi-VL chat template, and an
own HF processor loaded as remote code (auto_map -> processing_kimi_vl.py).

usage: python3 build_model_dir.py OUT_DIR
"""
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB_SIZE = 163840
SPECIAL_IDS = {
    "[BOS]": 163584, "[EOS]": 163585, "<|im_end|>": 163586, "<|im_user|>": 163587,
    "<|im_assistant|>": 163588, "<|im_system|>": 163594, "<|im_middle|>": 163601,
    "<|media_start|>": 163602, "<|media_content|>": 163603, "<|media_end|>": 163604,
    "<|media_pad|>": 163605, "◁think▷": 163606, "◁/think▷": 163607,
}
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{'<|im_system|>'}}"
    "{%- elif message['role'] == 'user' -%}{{'<|im_user|>'}}"
    "{%- elif message['role'] == 'assistant' -%}{{'<|im_assistant|>'}}{%- endif -%}"
    "{{- message['role'] -}}{{'<|im_middle|>'}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or content['type'] == 'image_url' or 'image' in content -%}"
    "{{'<|media_start|>image<|media_content|><|media_pad|><|media_end|>'}}"
    "{%- else -%}{{- content['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{'<|im_end|>'}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<|im_assistant|>assistant<|im_middle|>'}}{%- endif -%}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Describe the image in one sentence. What is shown in this picture?",
    "A gradient from red to blue, with green increasing from top to bottom.",
    "You are a helpful assistant. Think step by step before answering.",
    "user assistant system image video text hello world compare these two images",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Colors: red green blue yellow black white.",
] * 50


def build_tokenizer(out):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=2048, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    base.train_from_iterator(CORPUS, trainer=trainer)
    m = json.loads(base.to_str())["model"]
    vocab, merges = m["vocab"], m["merges"]
    assert max(vocab.values()) < min(SPECIAL_IDS.values())
    full = dict(vocab)
    used = set(full.values())
    for tok, i in SPECIAL_IDS.items():
        full[tok] = i
        used.add(i)
    for i in range(VOCAB_SIZE):
        if i not in used:
            full[f"<|reserved_{i}|>"] = i
    assert len(full) == VOCAB_SIZE and sorted(full.values()) == list(range(VOCAB_SIZE))
    merges = [tuple(x.split(" ")) if isinstance(x, str) else tuple(x) for x in merges]
    tok = Tokenizer(models.BPE(vocab=full, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_IDS])
    for s, i in SPECIAL_IDS.items():
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s), i)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[EOS]",
        additional_special_tokens=[s for s in SPECIAL_IDS if s not in ("[BOS]", "[EOS]")],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return len(fast)


def main():
    out = sys.argv[1]
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    n = build_tokenizer(out)
    ids = SPECIAL_IDS
    text = dict(
        model_type="deepseek_v3",
        vocab_size=VOCAB_SIZE, hidden_size=2048, intermediate_size=11264,
        moe_intermediate_size=1408, num_hidden_layers=27, first_k_dense_replace=1,
        moe_layer_freq=1, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
        topk_method="noaux_tc", scoring_func="sigmoid", n_group=1, topk_group=1,
        routed_scaling_factor=2.446, norm_topk_prob=True,
        num_attention_heads=16, num_key_value_heads=16,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, hidden_act="silu", rms_norm_eps=1e-5,
        max_position_embeddings=131072, rope_theta=800000.0,
        rope_parameters={"rope_type": "default", "rope_theta": 800000.0},
        tie_word_embeddings=False, attention_bias=False,
        bos_token_id=ids["[BOS]"], eos_token_id=ids["[EOS]"], pad_token_id=ids["[EOS]"],
    )
    vision = dict(model_type="moonvit", patch_size=14, init_pos_emb_height=64,
                  init_pos_emb_width=64, num_attention_heads=16, num_hidden_layers=27,
                  hidden_size=1152, intermediate_size=4304, merge_kernel_size=[2, 2])
    cfg = dict(
        architectures=["KimiVLForConditionalGeneration"], model_type="kimi_vl",
        media_placeholder_token_id=ids["<|media_pad|>"], ignore_index=-100,
        pad_token_id=ids["[EOS]"], bos_token_id=ids["[BOS]"],
        eos_token_id=[ids["[EOS]"], ids["<|im_end|>"]], torch_dtype="bfloat16",
        vision_config=vision, text_config=text,
    )
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)
    json.dump({"bos_token_id": ids["[BOS]"], "eos_token_id": [ids["[EOS]"], ids["<|im_end|>"]]},
              open(os.path.join(out, "generation_config.json"), "w"), indent=2)
    shutil.copy(os.path.join(HERE, "processing_kimi_vl.py"), out)
    pre = dict(image_processor_type="KimiVLImageProcessor", processor_class="KimiVLProcessor",
               patch_size=14, merge_kernel_size=[2, 2], in_token_limit=16384, pad_input=True,
               image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
               auto_map={"AutoImageProcessor": "processing_kimi_vl.KimiVLImageProcessor",
                         "AutoProcessor": "processing_kimi_vl.KimiVLProcessor"})
    json.dump(pre, open(os.path.join(out, "preprocessor_config.json"), "w"), indent=2)
    json.dump({"processor_class": "KimiVLProcessor",
               "auto_map": {"AutoProcessor": "processing_kimi_vl.KimiVLProcessor"}},
              open(os.path.join(out, "processor_config.json"), "w"), indent=2)
    tc_path = os.path.join(out, "tokenizer_config.json")
    tc = json.load(open(tc_path))
    tc["auto_map"] = {"AutoProcessor": "processing_kimi_vl.KimiVLProcessor"}
    json.dump(tc, open(tc_path, "w"), indent=2)
    print(json.dumps({"out": out, "tokenizer_len": n, "special_ids": ids}))


if __name__ == "__main__":
    main()
