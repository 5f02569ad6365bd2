"""Kimi-VL in PyTorch: the project's own implementation, loadable as remote code.

Written from the architecture (Kimi-VL technical report, DeepSeek-V3), the checkpoint's
config fields and weight names (those vLLM's ``kimi_vl`` loader reads), so a model directory
in the published safetensors layout loads with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``: the directory's
``config.json`` ``auto_map`` points at this file. Depends on torch and transformers only
(flash-attn when ``attn_implementation="flash_attention_2"``).

Data flow, with the checkpoint's module names:

* ``vision_tower`` (MoonViT): each 14x14 patch -> ``patch_embed.proj`` (a linear map of the
  flattened patch) + ``patch_embed.pos_emb`` (a learned 64x64 table, bicubically resized to
  the image's grid); ``encoder.blocks.*``: pre-norm blocks, full attention within each image
  only, 2-D rotary embedding on q/k (per pair of channels i: column angle on even pairs, row
  angle on odd pairs, base 10000), GELU(tanh) MLP; ``encoder.final_layernorm``. Then every 2x2
  block of patches is concatenated (in row-major order inside the block) into one token.
* ``multi_modal_projector``: LayerNorm per patch, then linear -> GELU -> linear to the text
  width. The result replaces the ``<|media_pad|>`` embeddings, in order.
* ``language_model`` (DeepSeek-V3 style): RMSNorm pre-norm layers; multi-head latent attention
  (a 512-wide latent ``c`` and a 64-wide rotary key shared by all heads; interleaved-pair RoPE;
  per-head keys/values expanded from ``c`` by ``kv_b_proj``); MLPs are SiLU-gated, the first
  ``first_k_dense_replace`` dense, the others mixtures of experts routed by sigmoid scores
  (top-k chosen on score + ``e_score_correction_bias``, weighted by the raw scores, normalised,
  times ``routed_scaling_factor``) plus shared experts.

The KV cache holds the latent (``c`` and the rotated rotary key, 576 values a token a layer),
not per-head keys: prefill expands it to per-head keys and values; single-token decode
attends in the latent space (the query absorbed through ``kv_b_proj``), as MLA is meant to
run. Any object with ``update(key, value, layer_idx, cache_kwargs)`` returning the full
latent serves as cache (transformers' ``DynamicCache`` for ``generate``; the project's
serving engine passes its own batched one).
"""
from __future__ import annotations

import importlib
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_kimi_vl import KimiVLConfig, KimiVLTextConfig, MoonViTConfig

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- attention kernels


def _flash_attn():
    # Imported by name: transformers refuses remote code whose imports are missing, and
    # flash-attn is optional.
    fa = importlib.import_module("flash_attn")
    return fa.flash_attn_func, fa.flash_attn_varlen_func


def _attend(q, k, v, *, scale: float, causal: bool, mask, impl: str | None):
    """q (B, H, T, D), k (B, H, L, D), v (B, H, L, Dv) -> (B, H, T, Dv).

    ``mask``: None, or bool (B, 1, T, L), True where attention is allowed. ``causal`` (only
    with mask None) aligns query t with key t (T == L).
    """
    if impl == "flash_attention_2" and mask is None and q.is_cuda:
        flash_attn_func, _ = _flash_attn()
        dv = v.shape[-1]
        if dv < q.shape[-1]:  # flash-attn wants one head size for q, k and v
            v = F.pad(v, (0, q.shape[-1] - dv))
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                              causal=causal)
        return out[..., :dv].transpose(1, 2)
    if impl == "eager":
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
        if causal:
            t, l_ = q.shape[-2], k.shape[-2]
            mask = torch.ones(t, l_, dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.matmul(scores.softmax(-1).to(v.dtype), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale)


# ---------------------------------------------------------------------------- vision tower


class MoonViTPatchEmbed(nn.Module):
    def __init__(self, config: MoonViTConfig):
        super().__init__()
        p, d = config.patch_size, config.hidden_size
        self.proj = nn.Conv2d(3, d, kernel_size=p, stride=p)
        self.pos_emb = MoonViTPosEmb(config.init_pos_emb_height, config.init_pos_emb_width, d)

    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        # One output pixel per patch: the convolution is a linear map of the flattened patch.
        x = F.linear(pixel_values.flatten(1), self.proj.weight.flatten(1), self.proj.bias)
        return x + self.pos_emb(grids)


class MoonViTPosEmb(nn.Module):
    """A learned (H0, W0, D) table, resized bicubically to each image's (h, w) patch grid."""

    def __init__(self, height: int, width: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(height, width, dim))

    def forward(self, grids: list[tuple[int, int]]) -> torch.Tensor:
        out = []
        for h, w in grids:
            if (h, w) == tuple(self.weight.shape[:2]):
                out.append(self.weight.reshape(h * w, -1))
            else:
                table = self.weight.permute(2, 0, 1).unsqueeze(0)
                out.append(F.interpolate(table, size=(h, w), mode="bicubic").squeeze(0).permute(1, 2, 0)
                           .reshape(h * w, -1))
        return torch.cat(out)


def _vision_rope(grids: list[tuple[int, int]], head_dim: int, device) -> torch.Tensor:
    """complex64 (sum h*w, head_dim/2): pair 2i turns by col * f_i, pair 2i+1 by row * f_i,
    f_i = 10000 ** (-4i / head_dim), for patches in row-major order."""
    freqs = 1.0 / (10000 ** (torch.arange(0, head_dim, 4, device=device)[: head_dim // 4].float() / head_dim))
    parts = []
    for h, w in grids:
        rows = torch.arange(h, device=device).float().repeat_interleave(w)
        cols = torch.arange(w, device=device).float().repeat(h)
        ang = torch.stack([torch.outer(cols, freqs), torch.outer(rows, freqs)], dim=-1).reshape(h * w, -1)
        parts.append(torch.polar(torch.ones_like(ang), ang))
    return torch.cat(parts)


def _rotate_complex(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """x (L, H, D) with consecutive channel pairs as complex numbers, times cis (L, D/2)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * cis.unsqueeze(1)).flatten(-2).to(x.dtype)


class MoonViTMLP(nn.Module):
    def __init__(self, config: MoonViTConfig):
        super().__init__()
        self.fc0 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc1 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc1(F.gelu(self.fc0(x), approximate="tanh"))


class MoonViTBlock(nn.Module):
    def __init__(self, config: MoonViTConfig):
        super().__init__()
        d = config.hidden_size
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.norm0 = nn.LayerNorm(d)
        self.norm1 = nn.LayerNorm(d)
        self.wqkv = nn.Linear(d, 3 * d)  # out channels: [q | k | v], each head-major
        self.wo = nn.Linear(d, d)
        self.mlp = MoonViTMLP(config)

    def attention(self, x, cis, cu_seqlens: list[int]):
        n = x.shape[0]
        q, k, v = self.wqkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = _rotate_complex(q, cis), _rotate_complex(k, cis)
        scale = self.head_dim ** -0.5
        impl = getattr(self.config, "_attn_implementation", None)
        if impl == "flash_attention_2" and x.is_cuda:
            _, varlen = _flash_attn()
            cu = torch.tensor(cu_seqlens, dtype=torch.int32, device=x.device)
            longest = max(b - a for a, b in zip(cu_seqlens, cu_seqlens[1:], strict=False))
            out = varlen(q, k, v, cu, cu, longest, longest, softmax_scale=scale, causal=False)
        else:  # each image attends only to itself
            out = torch.empty_like(q)
            for a, b in zip(cu_seqlens, cu_seqlens[1:], strict=False):
                qi, ki, vi = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
                out[a:b] = _attend(qi, ki, vi, scale=scale, causal=False, mask=None, impl=impl)[0].transpose(0, 1)
        return self.wo(out.reshape(n, -1))

    def forward(self, x, cis, cu_seqlens):
        x = x + self.attention(self.norm0(x), cis, cu_seqlens)
        return x + self.mlp(self.norm1(x))


class MoonViTEncoder(nn.Module):
    def __init__(self, config: MoonViTConfig):
        super().__init__()
        self.blocks = nn.ModuleList(MoonViTBlock(config) for _ in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size)


class MoonViT(nn.Module):
    """pixel_values (sum h*w, 3, p, p) + grids -> (sum h*w/4, 4, D): patches grouped by merge block."""

    def __init__(self, config: MoonViTConfig):
        super().__init__()
        self.config = config
        self.patch_embed = MoonViTPatchEmbed(config)
        self.encoder = MoonViTEncoder(config)

    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        x = self.patch_embed(pixel_values, grids)
        cis = _vision_rope(grids, self.config.hidden_size // self.config.num_attention_heads, x.device)
        cu = [0]
        for h, w in grids:
            cu.append(cu[-1] + h * w)
        for block in self.encoder.blocks:
            x = block(x, cis, cu)
        x = self.encoder.final_layernorm(x)
        kh, kw = self.config.merge_kernel_size
        merged = []
        for (h, w), a in zip(grids, cu, strict=False):
            img = x[a:a + h * w].view(h // kh, kh, w // kw, kw, -1).permute(0, 2, 1, 3, 4)
            merged.append(img.reshape((h // kh) * (w // kw), kh * kw, -1))
        return torch.cat(merged)


class KimiVLProjector(nn.Module):
    def __init__(self, config: KimiVLConfig):
        super().__init__()
        v = config.vision_config
        merged = v.hidden_size * math.prod(v.merge_kernel_size)
        self.pre_norm = nn.LayerNorm(v.hidden_size, eps=1e-5)
        self.linear_1 = nn.Linear(merged, merged)
        self.linear_2 = nn.Linear(merged, config.text_config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_norm(x).flatten(1)
        return self.linear_2(F.gelu(self.linear_1(x)))


# ---------------------------------------------------------------------------- language model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rope_cos_sin(positions: torch.Tensor, dim: int, theta: float):
    """cos, sin (B, T, dim/2) float32 for interleaved-pair RoPE."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    ang = positions.float().unsqueeze(-1) * inv_freq
    return ang.cos(), ang.sin()


def rope_theta(config) -> float:
    """The text model's RoPE base. Read from ``rope_parameters`` too: where vLLM's ``kimi_vl`` config
    is registered in the process (its plugin does it), the Auto classes hand this code that config,
    whose text part is transformers' DeepseekV2Config, which keeps the base only there."""
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if theta is None:
        raise ValueError("text_config has neither rope_theta nor rope_parameters['rope_theta']")
    return float(theta)


def _rotate_pairs(x: torch.Tensor, cos, sin) -> torch.Tensor:
    """x (B, T, [H,] D): rotate channel pairs (2i, 2i+1) by the angles of cos/sin (B, T, D/2)."""
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = xf[..., 0], xf[..., 1]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2).to(x.dtype)


class MLAttention(nn.Module):
    def __init__(self, config: KimiVLTextConfig, layer_idx: int):
        super().__init__()
        c = config
        self.config = c
        self.layer_idx = layer_idx
        self.num_heads = c.num_attention_heads
        self.nope, self.rope, self.vdim, self.lora = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank
        qk = self.nope + self.rope
        if c.rope_scaling and c.rope_scaling.get("rope_type", c.rope_scaling.get("type")) not in (None, "default"):
            raise NotImplementedError(f"rope_scaling {c.rope_scaling} is not implemented")
        self.scale = qk ** -0.5
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, self.num_heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, self.num_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, self.lora + self.rope, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.lora, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.lora, self.num_heads * (self.nope + self.vdim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.vdim, c.hidden_size, bias=c.attention_bias)

    def forward(self, x, cos, sin, *, cache=None, cache_index=None, key_mask=None):
        b, t, _ = x.shape
        q = self.q_proj(x) if self.config.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(b, t, self.num_heads, -1).split([self.nope, self.rope], dim=-1)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.lora, self.rope], dim=-1)
        c = self.kv_a_layernorm(c)
        q_pe, k_pe = _rotate_pairs(q_pe, cos, sin), _rotate_pairs(k_pe, cos, sin)
        if cache is not None:
            c, k_pe = cache.update(c.unsqueeze(1), k_pe.unsqueeze(1), self.layer_idx, {"cache_index": cache_index})
            c, k_pe = c.squeeze(1), k_pe.squeeze(1)
        mask = None
        # A prompt written from position 0 (L == T) needs only the causal rule, which the fused
        # kernels take without a mask; otherwise keys past each query's own index are hidden.
        plain_causal = key_mask is None and (cache_index is None or (t > 1 and c.shape[1] == t))
        if not plain_causal:
            idx = cache_index if cache_index is not None else torch.arange(t, device=x.device).expand(b, t)
            mask = torch.arange(c.shape[1], device=x.device).view(1, 1, -1) <= idx.unsqueeze(-1)
            if key_mask is not None:
                mask = mask & key_mask[:, None, :].bool()
            mask = mask.unsqueeze(1)
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.vdim, self.lora)
        if t == 1 and cache is not None:
            # Decode: attend in the latent space. q_nope . (W_uk c) = (W_uk^T q_nope) . c, and the
            # output is W_uv (sum_j p_j c_j), so the cache is never expanded per head. With one
            # query token the heads are the rows of one matmul per sequence.
            q_lat = torch.einsum("bhn,hnl->bhl", q_nope[:, 0], w[:, : self.nope])
            scores = (torch.bmm(q_lat, c.transpose(1, 2)) + torch.bmm(q_pe[:, 0], k_pe.transpose(1, 2))).float()
            scores = scores * self.scale
            if mask is not None:
                scores = scores.masked_fill(~mask[:, 0], float("-inf"))  # (B, 1, L) over the heads
            o_lat = torch.bmm(scores.softmax(-1).to(c.dtype), c)  # (B, H, lora)
            out = torch.einsum("bhl,hvl->bhv", o_lat, w[:, self.nope:]).unsqueeze(1)
        else:
            kv = F.linear(c, self.kv_b_proj.weight).view(b, -1, self.num_heads, self.nope + self.vdim)
            k_nope, v = kv.split([self.nope, self.vdim], dim=-1)
            k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.num_heads, -1)], dim=-1)
            qh = torch.cat([q_nope, q_pe], dim=-1)
            causal = mask is None
            out = _attend(qh.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=self.scale, causal=causal,
                          mask=mask, impl=getattr(self.config, "_attn_implementation", None)).transpose(1, 2)
        return self.o_proj(out.reshape(b, t, -1))


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    def __init__(self, config: KimiVLTextConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        if config.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(config.n_routed_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor):
        """x (N, D) -> expert ids (N, k), weights (N, k) float32."""
        c = self.config
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if c.scoring_func == "sigmoid" else logits.softmax(-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias.float()
        if c.n_group and c.n_group > 1:  # keep the best topk_group groups of experts
            g = choice.view(x.shape[0], c.n_group, -1)
            group_score = g.topk(2, dim=-1).values.sum(-1) if self.e_score_correction_bias is not None \
                else g.max(-1).values
            keep = torch.zeros_like(group_score).scatter_(1, group_score.topk(c.topk_group, dim=-1).indices, 1.0)
            choice = choice.masked_fill(~keep.bool().repeat_interleave(g.shape[-1], dim=1), float("-inf"))
        ids = choice.topk(c.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, ids)
        if c.norm_topk_prob and c.num_experts_per_tok > 1:
            weights = weights / weights.sum(-1, keepdim=True)
        return ids, weights * c.routed_scaling_factor


class MoE(nn.Module):
    def __init__(self, config: KimiVLTextConfig):
        super().__init__()
        self.config = config
        self.gate = MoEGate(config)
        self.experts = nn.ModuleList(GatedMLP(config.hidden_size, config.moe_intermediate_size)
                                     for _ in range(config.n_routed_experts))
        self.shared_experts = (GatedMLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
                               if config.n_shared_experts else None)
        self._stacked = None  # (gate, up, down) weights as (E, out, in) views, for grouped matmuls

    def stack_experts(self) -> None:
        """Put the experts' weights into three (E, out, in) tensors, each expert's weight a view
        of them (no extra memory), so that CUDA runs all experts in one grouped matmul each."""
        stacks = []
        for name in ("gate_proj", "up_proj", "down_proj"):
            w = torch.stack([getattr(e, name).weight.data for e in self.experts])
            for i, e in enumerate(self.experts):
                getattr(e, name).weight = nn.Parameter(w[i], requires_grad=False)
            stacks.append(w)
        self._stacked = tuple(stacks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        ids, weights = self.gate(x)
        grouped = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
        out = None
        if self._stacked is not None and grouped is not None:
            try:
                out = self._grouped(x, ids, weights, grouped)
            except RuntimeError as e:  # a kernel that refuses this dtype/device/layout: loop from now on
                logger.warning("grouped expert matmul unavailable (%s); looping over experts", e)
                self._stacked = None
        if out is None:
            out = self._looped(x, ids, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)

    def _looped(self, x, ids, weights):
        out = torch.zeros_like(x)
        flat = ids.flatten()
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            sel = order[start:start + n]
            start += n
            tok = sel // ids.shape[1]
            y = self.experts[e](x[tok]) * weights.flatten()[sel].unsqueeze(-1).to(x.dtype)
            out.index_add_(0, tok, y)
        return out

    def _grouped(self, x, ids, weights, grouped):
        wg, wu, wd = self._stacked
        k = ids.shape[1]
        flat = ids.flatten()
        order = flat.argsort()
        tok = order // k
        offs = torch.cumsum(torch.bincount(flat, minlength=wg.shape[0]), 0).to(torch.int32)
        h = x[tok]
        h = F.silu(grouped(h, wg.transpose(-2, -1), offs=offs)) * grouped(h, wu.transpose(-2, -1), offs=offs)
        y = grouped(h, wd.transpose(-2, -1), offs=offs) * weights.flatten()[order].unsqueeze(-1).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, tok, y)


class DecoderLayer(nn.Module):
    def __init__(self, config: KimiVLTextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLAttention(config, layer_idx)
        moe = (config.n_routed_experts and layer_idx >= config.first_k_dense_replace
               and layer_idx % config.moe_layer_freq == 0)
        self.mlp = MoE(config) if moe else GatedMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, **attn):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, **attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, config: KimiVLTextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, inputs_embeds, position_ids, *, cache=None, cache_index=None, key_mask=None):
        cos, sin = _rope_cos_sin(position_ids, self.config.qk_rope_head_dim, rope_theta(self.config))
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cos, sin, cache=cache, cache_index=cache_index, key_mask=key_mask)
        return self.norm(x)


class LanguageModel(nn.Module):
    def __init__(self, config: KimiVLTextConfig):
        super().__init__()
        self.model = TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


# ---------------------------------------------------------------------------- the checkpoint's class


class KimiVLPreTrainedModel(PreTrainedModel):
    config_class = KimiVLConfig
    base_model_prefix = "language_model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DecoderLayer", "MoonViTBlock"]
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        """N(0, 1/fan_in) for matrices and tables, norms 1, biases 0 (what the project's tiny
        models and dummy-weight benchmarks use; a checkpoint overwrites all of it)."""
        for name, p in module.named_parameters(recurse=False):
            if p.dim() == 1:
                p.fill_(1.0) if isinstance(module, (nn.LayerNorm, RMSNorm)) and name == "weight" else p.zero_()
            else:
                fan_in = p[0].numel() if p.dim() == 4 else p.shape[-1]
                p.normal_(0.0, fan_in ** -0.5)


class KimiVLForConditionalGeneration(KimiVLPreTrainedModel, GenerationMixin):
    def __init__(self, config: KimiVLConfig):
        super().__init__(config)
        self.vision_tower = MoonViT(config.vision_config)
        self.multi_modal_projector = KimiVLProjector(config)
        self.language_model = LanguageModel(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.model.embed_tokens

    def set_input_embeddings(self, value):
        self.language_model.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.language_model.lm_head

    def stack_experts(self) -> None:
        for m in self.modules():
            if isinstance(m, MoE):
                m.stack_experts()

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_hws) -> torch.Tensor:
        """(sum h*w, 3, p, p) patches + (n, 2) grids -> (sum h*w/4, text hidden), image by image."""
        grids = [(int(h), int(w)) for h, w in (image_grid_hws.tolist() if torch.is_tensor(image_grid_hws)
                                               else image_grid_hws)]
        pixel_values = pixel_values.to(self.vision_tower.patch_embed.proj.weight.dtype)
        return self.multi_modal_projector(self.vision_tower(pixel_values, grids))

    def embed(self, input_ids: torch.Tensor, pixel_values=None, image_grid_hws=None, image_features=None):
        """Token embeddings with each <|media_pad|> run replaced by its image's features, in order."""
        embeds = self.get_input_embeddings()(input_ids)
        if image_features is None and pixel_values is not None:
            image_features = self.get_image_features(pixel_values, image_grid_hws)
        if image_features is not None:
            slots = input_ids == self.config.media_placeholder_token_id
            if int(slots.sum()) != image_features.shape[0]:
                raise ValueError(f"{int(slots.sum())} image placeholder tokens but the images give "
                                 f"{image_features.shape[0]} features")
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), image_features.to(embeds.dtype))
        return embeds

    def forward(self, input_ids=None, pixel_values=None, image_grid_hws=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int = 0,
                cache_index=None, **kwargs):
        """The transformers contract (``generate`` and training): ``attention_mask`` (B, L) of
        1/0 over the cached and new tokens, ``past_key_values`` a cache (a DynamicCache is made
        when ``use_cache``); ``labels`` gives the shifted next-token loss. ``cache_index`` (B, T):
        each new token's row in a batched cache (the serving engine's; overrides the rest)."""
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_grid_hws)
        b, t = inputs_embeds.shape[:2]
        if use_cache and past_key_values is None:
            from transformers import DynamicCache

            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None and cache_index is None else 0
        if cache_index is None and past_key_values is not None:
            cache_index = torch.arange(past, past + t, device=inputs_embeds.device).expand(b, t)
        if position_ids is None:
            if cache_index is not None:
                position_ids = cache_index
            else:
                position_ids = torch.arange(t, device=inputs_embeds.device).expand(b, t)
        key_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_mask = attention_mask
        hidden = self.language_model.model(inputs_embeds, position_ids, cache=past_key_values,
                                           cache_index=cache_index, key_mask=key_mask)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.language_model.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=self.config.ignore_index)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      pixel_values=None, image_grid_hws=None, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, past_key_values=past_key_values,
                                                       attention_mask=attention_mask, **kwargs)
        first = past_key_values is None or past_key_values.get_seq_length() == 0
        if first:  # the images are encoded once, with the prompt
            inputs["pixel_values"] = pixel_values
            inputs["image_grid_hws"] = image_grid_hws
        return inputs
