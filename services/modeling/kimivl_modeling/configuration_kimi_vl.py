"""Configuration of Kimi-VL (``model_type: kimi_vl``): MoonViT + projector + DeepSeek-V3-style text model.

Part of the project's own implementation of the architecture (see ``modeling_kimi_vl.py``). A
model directory ships this file next to ``config.json``, whose ``auto_map`` points at it, so
``AutoConfig.from_pretrained(dir, trust_remote_code=True)`` loads it from the directory, as
with the published checkpoint. It reads the checkpoint's ``config.json`` unchanged; fields it
does not know are kept as attributes. Depends on transformers only.
"""
from __future__ import annotations

from transformers import PretrainedConfig


class MoonViTConfig(PretrainedConfig):
    """The vision tower: a ViT over 14x14 patches at native resolution, with a learned 2-D
    position table (interpolated to each grid) and 2-D rotary attention; merge_kernel_size
    patches are concatenated into one language-model token."""

    model_type = "moonvit"

    def __init__(self, patch_size: int = 14, init_pos_emb_height: int = 64, init_pos_emb_width: int = 64,
                 num_attention_heads: int = 16, num_hidden_layers: int = 27, hidden_size: int = 1152,
                 intermediate_size: int = 4304, merge_kernel_size=(2, 2), **kwargs):
        self.patch_size = patch_size
        self.init_pos_emb_height = init_pos_emb_height
        self.init_pos_emb_width = init_pos_emb_width
        self.num_attention_heads = num_attention_heads
        self.num_hidden_layers = num_hidden_layers
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.merge_kernel_size = list(merge_kernel_size)
        super().__init__(**kwargs)


class KimiVLTextConfig(PretrainedConfig):
    """The language model: DeepSeek-V3 layout (multi-head latent attention, sigmoid-routed MoE
    with a score-correction bias and shared experts, the first layers dense)."""

    model_type = "deepseek_v3"

    def __init__(self, vocab_size: int = 163840, hidden_size: int = 2048, intermediate_size: int = 11264,
                 moe_intermediate_size: int = 1408, num_hidden_layers: int = 27, first_k_dense_replace: int = 1,
                 moe_layer_freq: int = 1, n_routed_experts: int | None = 64, n_shared_experts: int | None = 2,
                 num_experts_per_tok: int = 6, topk_method: str = "noaux_tc", scoring_func: str = "sigmoid",
                 n_group: int = 1, topk_group: int = 1, routed_scaling_factor: float = 2.446,
                 norm_topk_prob: bool = True, num_attention_heads: int = 16, num_key_value_heads: int = 16,
                 q_lora_rank: int | None = None, kv_lora_rank: int = 512, qk_nope_head_dim: int = 128,
                 qk_rope_head_dim: int = 64, v_head_dim: int = 128, hidden_act: str = "silu",
                 rms_norm_eps: float = 1e-5, max_position_embeddings: int = 131072, rope_theta: float = 800000.0,
                 rope_scaling: dict | None = None, attention_bias: bool = False, tie_word_embeddings: bool = False,
                 **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.first_k_dense_replace = first_k_dense_replace
        self.moe_layer_freq = moe_layer_freq
        self.n_routed_experts = n_routed_experts
        self.n_shared_experts = n_shared_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.topk_method = topk_method
        self.scoring_func = scoring_func
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.norm_topk_prob = norm_topk_prob
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.q_lora_rank = q_lora_rank
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class KimiVLConfig(PretrainedConfig):
    model_type = "kimi_vl"
    sub_configs = {"vision_config": MoonViTConfig, "text_config": KimiVLTextConfig}

    def __init__(self, vision_config=None, text_config=None, media_placeholder_token_id: int = 163605,
                 ignore_index: int = -100, tie_word_embeddings: bool = False, **kwargs):
        if not isinstance(vision_config, MoonViTConfig):
            vision_config = MoonViTConfig(**(vision_config or {}))
        if not isinstance(text_config, KimiVLTextConfig):
            text_config = KimiVLTextConfig(**(text_config or {}))
        self.vision_config = vision_config
        self.text_config = text_config
        self.media_placeholder_token_id = media_placeholder_token_id
        self.ignore_index = ignore_index
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

