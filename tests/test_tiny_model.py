"""The tiny Kimi-VL model directory and the project's HF processor, without a vLLM engine."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kimivl_devtools.tiny_model import SPECIAL_TOKENS, main, make_tiny_model
from kimivl_inference import hf_processor
from kimivl_inference.hf_processor import KimiVLImageProcessor, KimiVLProcessor

PAD = SPECIAL_TOKENS["<|media_pad|>"]
IMAGE_PART = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny_model(str(out), seed=0)
    return out


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _random_image(seed: int, w: int, h: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def numpy_reference(image: Image.Image, patch=14, merge=2, limit=16384, mean=0.5, std=0.5):
    """Kimi-VL preprocessing written independently in numpy: (patches, (grid_h, grid_w))."""
    w, h = image.size
    if (w // patch) * (h // patch) > limit:
        s = math.sqrt(limit / ((w // patch) * (h // patch)))
        image = image.resize((int(w * s), int(h * s)), Image.Resampling.BICUBIC)
    a = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255)
    m = patch * merge
    a = np.pad(a, ((0, -a.shape[0] % m), (0, -a.shape[1] % m), (0, 0)))
    a = (a - np.float32(mean)) / np.float32(std)
    gh, gw = a.shape[0] // patch, a.shape[1] // patch
    patches = a.reshape(gh, patch, gw, patch, 3).transpose(0, 2, 4, 1, 3).reshape(-1, 3, patch, patch)
    return patches, (gh, gw)


def test_same_seed_gives_identical_files_and_another_seed_other_weights(model_dir, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    summary = make_tiny_model(str(again), seed=0)
    make_tiny_model(str(other), seed=1)
    names = sorted(p.name for p in model_dir.iterdir())
    assert names == summary["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(names)
    assert all(_sha(model_dir / n) == _sha(again / n) for n in names)
    assert summary["model_safetensors_sha256"] == _sha(model_dir / "model.safetensors")
    assert _sha(other / "model.safetensors") != _sha(model_dir / "model.safetensors")


def test_weights_are_bf16_and_scaled_by_fan_in(model_dir):
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        emb = f.get_tensor("language_model.model.embed_tokens.weight")
        conv = f.get_tensor("vision_tower.patch_embed.proj.weight")
        norm = f.get_tensor("language_model.model.layers.0.self_attn.kv_a_layernorm.weight")
        bias = f.get_tensor("vision_tower.encoder.blocks.0.wqkv.bias")
        dtypes = {str(f.get_tensor(n).dtype) for n in names}
    assert dtypes == {"torch.bfloat16"}
    assert any(n.startswith("language_model.model.layers.1.mlp.experts.3.") for n in names)
    assert "language_model.model.layers.1.mlp.gate.e_score_correction_bias" in names
    assert "language_model.lm_head.weight" in names
    assert emb.shape == (163840, 128)
    assert abs(emb.float().std().item() - 1 / math.sqrt(128)) < 1e-3
    assert abs(conv.float().std().item() - 1 / math.sqrt(3 * 14 * 14)) < 2e-3
    assert norm.float().eq(1).all() and bias.float().eq(0).all()


def test_config_keeps_the_real_ids_and_the_cpu_mla_latent(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    gen = json.loads((model_dir / "generation_config.json").read_text())
    pre = json.loads((model_dir / "preprocessor_config.json").read_text())
    assert cfg["model_type"] == "kimi_vl" and cfg["architectures"] == ["KimiVLForConditionalGeneration"]
    assert cfg["media_placeholder_token_id"] == PAD
    assert cfg["eos_token_id"] == gen["eos_token_id"] == [163585, 163586]
    text = cfg["text_config"]
    assert (text["kv_lora_rank"], text["qk_rope_head_dim"], text["vocab_size"]) == (512, 64, 163840)
    assert text["max_position_embeddings"] == 8192
    assert "auto_map" not in pre and pre["processor_class"] == "KimiVLProcessor"
    assert (pre["in_token_limit"], pre["patch_size"], pre["merge_kernel_size"]) == (16384, 14, [2, 2])


def test_special_tokens_sit_at_kimis_ids(tokenizer):
    assert len(tokenizer) == 163840
    for token, token_id in SPECIAL_TOKENS.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id, token
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id], token
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        163584,
        163585,
        163839,
    )
    assert tokenizer.encode("hi", add_special_tokens=True) == tokenizer.encode("hi", add_special_tokens=False)


@pytest.mark.parametrize("marker", ["◁think▷", "◁/think▷"])
def test_think_markers_are_several_plain_tokens(tokenizer, marker):
    ids = tokenizer.encode(marker, add_special_tokens=False)
    assert len(ids) > 1
    assert not set(ids) & set(tokenizer.all_special_ids)
    assert tokenizer.decode(ids) == marker


def test_text_round_trips(tokenizer):
    text = "◁think▷图片里有 3 只猫, I'm sure.\n◁/think▷The answer is 12345."
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_chat_template_interleaves_text_and_images(tokenizer):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare "},
                {"type": "image", "image": "a.png"},
                {"type": "text", "text": " with "},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "."},
            ],
        }
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>"
        f"<|im_user|>user<|im_middle|>Compare {IMAGE_PART} with {IMAGE_PART}.<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>"
    )
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    prompt_end = tokenizer.encode("<|im_assistant|>assistant<|im_middle|>")
    assert ids.count(PAD) == 2 and ids[-len(prompt_end) :] == prompt_end


def test_chat_template_keeps_a_given_system_prompt_and_string_turns(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": [{"image": "x.png"}, {"type": "text", "text": "And this?"}]},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_system|>system<|im_middle|>Be brief.<|im_end|>"
        "<|im_user|>user<|im_middle|>Hi<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>Hello<|im_end|>"
        f"<|im_user|>user<|im_middle|>{IMAGE_PART}And this?<|im_end|>"
    )


def test_registered_processor_matches_an_independent_numpy_rendering(model_dir, tokenizer):
    from transformers import AutoProcessor

    hf_processor.register()
    processor = AutoProcessor.from_pretrained(str(model_dir))
    assert isinstance(processor, KimiVLProcessor)
    assert isinstance(processor.image_processor, KimiVLImageProcessor)

    images = [_random_image(0, 50, 30), _random_image(1, 100, 60).convert("L")]
    out = processor(images=images, text=f"a {IMAGE_PART} b {IMAGE_PART}", return_tensors="pt")
    refs = [numpy_reference(im) for im in images]
    np.testing.assert_array_equal(out["pixel_values"].numpy(), np.concatenate([p for p, _ in refs]))
    assert out["image_grid_hws"].tolist() == [[4, 4], [6, 8]] == [list(g) for _, g in refs]  # padded to 28s

    ids = out["input_ids"][0].tolist()
    expected = tokenizer.encode(f"a {IMAGE_PART} b {IMAGE_PART}", add_special_tokens=False)
    first = expected.index(PAD)
    second = expected.index(PAD, first + 1)
    expected = (
        expected[:first] + [PAD] * 4 + expected[first + 1 : second] + [PAD] * 12 + expected[second + 1 :]
    )
    assert ids == expected


def test_large_images_are_resized_like_the_reference():
    image = _random_image(2, 150, 100)  # 10*7 = 70 patches > 20: 80x53, padded 84x56
    out = KimiVLImageProcessor(in_token_limit=20)(image)
    ref, grid = numpy_reference(image, limit=20)
    np.testing.assert_array_equal(out["pixel_values"].numpy(), ref)
    assert out["image_grid_hws"].tolist() == [list(grid)] == [[4, 6]]


def test_placeholder_and_image_counts_must_agree(model_dir):
    processor = KimiVLProcessor.from_pretrained(str(model_dir))
    image = _random_image(3, 28, 28)
    with pytest.raises(ValueError):
        processor(images=[image, image], text=f"{IMAGE_PART}")
    with pytest.raises(ValueError):
        processor(images=[image], text=f"{IMAGE_PART}{IMAGE_PART}")


def test_register_is_idempotent_and_never_raises(monkeypatch):
    hf_processor.register()
    hf_processor.register()
    monkeypatch.setattr(hf_processor, "_registered", False)
    monkeypatch.setitem(sys.modules, "vllm.transformers_utils.configs.kimi_vl", None)  # import fails
    hf_processor.register()
    assert hf_processor._registered is False


def test_a_checkpoint_with_remote_code_still_loads(model_dir, tmp_path):
    """Like the real checkpoint: auto_map to its own processor and tokenizer code.

    transformers prefers the explicitly registered processor classes over remote code of the
    same name; the checkpoint's own tokenizer class is still loaded through trust_remote_code.
    """
    from transformers import AutoProcessor

    hf_processor.register()
    real = tmp_path / "real"
    real.mkdir()
    for f in model_dir.iterdir():
        (real / f.name).write_bytes(f.read_bytes())
    (real / "processing_kimi_vl.py").write_text(
        "class KimiVLImageProcessor:\n    def __init__(self, *a, **k):\n        raise AssertionError\n"
        "class KimiVLProcessor(KimiVLImageProcessor):\n    pass\n"
    )
    (real / "tokenization_moonshot.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\nclass MoonshotTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    pre = json.loads((real / "preprocessor_config.json").read_text())
    pre["auto_map"] = {
        "AutoImageProcessor": "processing_kimi_vl.KimiVLImageProcessor",
        "AutoProcessor": "processing_kimi_vl.KimiVLProcessor",
    }
    (real / "preprocessor_config.json").write_text(json.dumps(pre))
    tok_cfg = json.loads((real / "tokenizer_config.json").read_text())
    tok_cfg["auto_map"] = {"AutoTokenizer": ["tokenization_moonshot.MoonshotTokenizer", None]}
    tok_cfg["tokenizer_class"] = "MoonshotTokenizer"
    (real / "tokenizer_config.json").write_text(json.dumps(tok_cfg))

    processor = AutoProcessor.from_pretrained(str(real), trust_remote_code=True)
    assert isinstance(processor, KimiVLProcessor)
    assert type(processor.tokenizer).__name__ == "MoonshotTokenizer"
    out = processor(images=[_random_image(4, 56, 56)], text=IMAGE_PART, return_tensors="pt")
    assert out["input_ids"][0].tolist().count(PAD) == 4


def test_vllm_config_loader_accepts_the_dir(model_dir):
    from vllm.transformers_utils.config import get_config
    from vllm.transformers_utils.configs.kimi_vl import KimiVLConfig

    cfg = get_config(str(model_dir), trust_remote_code=False)
    assert isinstance(cfg, KimiVLConfig)
    text, vision = cfg.text_config, cfg.vision_config
    assert (text.kv_lora_rank, text.qk_rope_head_dim, text.max_position_embeddings) == (512, 64, 8192)
    assert (text.n_routed_experts, text.num_experts_per_tok, text.topk_method) == (4, 2, "noaux_tc")
    assert (vision.hidden_size, vision.patch_size, list(vision.merge_kernel_size)) == (64, 14, [2, 2])
    assert cfg.media_placeholder_token_id == PAD


def test_cli_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "m"
    assert main([str(out), "--seed", "3"]) == 0
    sha = _sha(out / "model.safetensors")
    assert main([str(out)]) == 1
    assert main([str(out), "--seed", "3", "--force"]) == 0
    assert _sha(out / "model.safetensors") == sha
    assert json.loads(capsys.readouterr().out.split("\n}\n")[0] + "\n}")["seed"] == 3


def test_module_entry_point():
    run = subprocess.run(
        [sys.executable, "-m", "kimivl_devtools.tiny_model", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and "make-tiny-model" in run.stdout
