"""The project's Kimi-VL implementation (kimivl_modeling) as the tiny model's remote code, no engine.

Equality with vLLM is in test_transformers_engine.py; here: the directory loads through
transformers' remote-code path with every checkpoint tensor used, and the fast paths (latent
decode, the batched latent cache, grouped expert matmuls) agree with the plain computation.
"""
from __future__ import annotations

import json

import pytest
import torch

from kimivl_modeling import AUTO_MAP, HERE, REMOTE_CODE_FILES

IMAGE_PART = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>"


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    m, info = AutoModelForCausalLM.from_pretrained(str(tiny_model), trust_remote_code=True, dtype=torch.float32,
                                                   output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    return m.eval()


@pytest.fixture(scope="module")
def prompt(tiny_model):
    """A chat with one image, as the processor gives it: input_ids, pixel_values, image_grid_hws."""
    from PIL import Image
    from skimage import data as skdata
    from transformers import AutoTokenizer

    from kimivl_inference.hf_processor import KimiVLImageProcessor

    tok = AutoTokenizer.from_pretrained(str(tiny_model), trust_remote_code=True)
    img = KimiVLImageProcessor()(Image.fromarray(skdata.coffee()).resize((112, 84)))
    n = int(img["image_grid_hws"].prod()) // 4
    text = tok.apply_chat_template([{"role": "user", "content": f"Look {IMAGE_PART} here"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text.replace("<|media_pad|>", "<|media_pad|>" * n), add_special_tokens=False)["input_ids"]
    return torch.tensor([ids]), img["pixel_values"], img["image_grid_hws"]


def test_the_tiny_model_writer_ships_this_code_and_auto_map_names_it(tmp_path, model):
    from kimivl_devtools.tiny_model import make_tiny_model

    make_tiny_model(str(tmp_path / "m"))
    for name in REMOTE_CODE_FILES:
        assert (tmp_path / "m" / name).read_bytes() == (HERE / name).read_bytes(), name
    assert json.loads((tmp_path / "m" / "config.json").read_text())["auto_map"] == AUTO_MAP
    # Loaded from the directory through transformers' dynamic modules, not from the package.
    assert type(model).__module__.startswith("transformers_modules.")


def test_cached_decode_equals_full_recompute(model, prompt):
    """generate() (DynamicCache, one-token steps attending in the latent space) == arg-max of a
    full forward pass over the whole sequence at every step."""
    ids, pv, grid = prompt
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv,
                             image_grid_hws=grid, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        seq = ids
        for _ in range(8):
            logits = model(input_ids=seq, pixel_values=pv, image_grid_hws=grid).logits[0, -1]
            seq = torch.cat([seq, logits.argmax().view(1, 1)], dim=1)
    assert out[0].tolist() == seq[0].tolist()


def test_latent_cache_batches_sequences_of_different_lengths(model, prompt):
    """Two sequences decoded in one batch (rows of the engine's latent cache, different
    lengths) give the logits each gives alone."""
    from kimivl_inference.latent_cache import LatentCache

    ids, pv, grid = prompt
    text = model.config.text_config
    seqs = [ids[0].tolist(), ids[0, :9].tolist()]
    nxt_tokens = [11, 12]

    def run(rows, nxt_tokens):
        cache = LatentCache(text.num_hidden_layers, text.kv_lora_rank, text.qk_rope_head_dim, max_rows=2,
                            dtype=torch.float32, device="cpu")
        cache.reserve(len(rows), 64)
        for r, s in enumerate(rows):
            has_image = model.config.media_placeholder_token_id in s
            emb = model.embed(torch.tensor([s]), pv if has_image else None, grid if has_image else None)
            cache.select(slice(r, r + 1), len(s))
            model(inputs_embeds=emb, past_key_values=cache, cache_index=torch.arange(len(s)).unsqueeze(0))
        nxt = torch.tensor([[t] for t in nxt_tokens])
        pos = torch.tensor([[len(s)] for s in rows])
        cache.select(slice(0, len(rows)), int(pos.max()) + 1)
        return model(inputs_embeds=model.get_input_embeddings()(nxt), past_key_values=cache, cache_index=pos).logits

    with torch.no_grad():
        both = run(seqs, nxt_tokens)
        alone = [run([s], [t]) for s, t in zip(seqs, nxt_tokens, strict=True)]
    for i in range(2):
        torch.testing.assert_close(both[i, -1], alone[i][0, -1], rtol=1e-4, atol=1e-4)


def test_grouped_expert_matmuls_equal_the_loop(model):
    moe = next(m for m in model.modules() if type(m).__name__ == "MoE")
    x = torch.randn(37, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ids, w = moe.gate(x)
        looped = moe._looped(x, ids, w)
        moe.stack_experts()
        grouped_fn = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
        if grouped_fn is None:
            pytest.skip("this torch has no grouped matmul")
        grouped = moe._grouped(x, ids, w, grouped_fn)
    torch.testing.assert_close(grouped, looped, rtol=1e-5, atol=1e-5)
    assert len({e.gate_proj.weight.untyped_storage().data_ptr() for e in moe.experts}) == 1  # views, no copies


def test_training_loss_reaches_the_vision_tower(model, prompt):
    ids, pv, grid = prompt
    labels = ids.clone()
    labels[ids == model.config.media_placeholder_token_id] = -100
    model.zero_grad()
    out = model(input_ids=ids, pixel_values=pv, image_grid_hws=grid, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.vision_tower.patch_embed.proj.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_loads_the_same_where_vllms_kimi_vl_config_is_registered(tiny_model, prompt):
    """Our vLLM plugin registers vLLM's ``kimi_vl`` config (its text part is transformers'
    DeepseekV2Config, RoPE base only in rope_parameters); the Auto classes then hand the remote
    code that config. The model must compute the same there. In a fresh interpreter, so the
    order this suite imports things in decides nothing."""
    import subprocess
    import sys

    ids, pv, grid = prompt
    script = f"""
import torch
from transformers import AutoModelForCausalLM
ids = torch.tensor({ids.tolist()})
def logits():
    m = AutoModelForCausalLM.from_pretrained({str(tiny_model)!r}, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        return type(m.config.text_config).__name__, m(input_ids=ids).logits[0, -1]
ours, before = logits()
from kimivl_inference.hf_processor import register
register()
theirs, after = logits()
assert (ours, theirs) == ("KimiVLTextConfig", "DeepseekV2Config"), (ours, theirs)
torch.testing.assert_close(after, before, rtol=0, atol=0)
print("same")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("same"), run.stderr[-3000:]
