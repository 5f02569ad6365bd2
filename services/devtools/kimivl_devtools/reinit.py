"""Realistic random weights for benchmarks without a checkpoint (``--reinit-dummy-weights``)."""
from __future__ import annotations


def reinit_dummy_weights(worker, seed: int = 0) -> dict:
    """Runs in each vLLM worker (collective_rpc). vLLM's dummy weights are uniform ±1e-3 and
    identical across same-shaped tensors: the output ignores the image and MoE routing is
    degenerate. Replace them in place (CUDA graphs stay valid) with N(0, 1/fan_in), norms 1,
    biases 0, and re-derive MLA's absorbed matrices from kv_b_proj."""
    import math

    import torch

    model = worker.model_runner.model
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    n = mla = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            if p.dim() == 1:
                p.fill_(1.0) if "norm" in name else p.zero_()
            else:
                fan_in = p[0].numel() if p.dim() == 4 else p.shape[-1]
                p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=g)
            n += 1
        for m in model.modules():
            if hasattr(m, "W_UV") and hasattr(m, "W_UK_T") and hasattr(m, "kv_b_proj"):
                w = m.kv_b_proj.weight.T.reshape(m.kv_lora_rank, m.num_heads, m.qk_nope_head_dim + m.v_head_dim)
                w_uk, w_uv = w.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
                m.W_UV.copy_(w_uv.transpose(0, 1))
                m.W_UK_T.copy_(w_uk.permute(1, 2, 0))
                mla += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"params": n, "mla_layers_rederived": mla}
