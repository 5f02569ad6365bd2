"""Training of the demo model's weights (``python -m kimivl_devtools.demo_model train``).

The project's own Kimi-VL implementation (``kimivl_modeling``) in float32 on the CPU, from the
tiny random model's seed-0 tensors, on pictures drawn by :mod:`.demo_data`, in two phases:

1. **Vision.** The vision tower and projector alone learn to tell the picture's attributes
   (shapes or word, colour, shape, count, word) from their mean image token, through a small
   linear head that is then thrown away. A picture costs a third of what it costs in the whole
   model, and its gradient comes straight from the attribute, so this is where the vision
   tower learns to see.
2. **Chat.** Everything trains on whole replies (the chat prompt with the picture, then
   ``◁think▷ thinking ◁/think▷ answer <|im_end|>``) with the attribute loss kept on. 20% of
   the replies have their thinking cut short, as the server's thinking budget cuts it, so the
   model also answers after a forced ``◁/think▷``.

Only the ~700 tokens the demo can meet have trained embedding and output rows; the loss is
still the full-vocabulary cross-entropy (every other output row is zero in the model, a logit
of 0, and enters the softmax exactly as one column of log(count)). Examples come from a pool
with a few replaced every step (cheaper than drawing every batch afresh; the model keeps
meeting new pictures). Every random choice comes from ``seed``: the same torch version and
thread count give the same tensors.
"""
from __future__ import annotations

import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import demo_data
from .tiny_model import MODEL_CONFIG, SPECIAL_TOKENS

THINK_START, THINK_END = "◁think▷", "◁/think▷"
IM_END = SPECIAL_TOKENS["<|im_end|>"]
PAD = SPECIAL_TOKENS["<|media_pad|>"]
# Not trained: the frozen tensors are rebuilt from the seed (the position embedding is the
# largest vision tensor; the router's bias is a statistic, not a weight).
FROZEN = ("vision_tower.patch_embed.pos_emb.weight", "gate.e_score_correction_bias")
EMBED = "language_model.model.embed_tokens.weight"
HEAD = "language_model.lm_head.weight"
# The attribute head's outputs: shapes-or-word, colour, shape, count (1-4), word.
ATTRIBUTES = (2, len(demo_data.COLOURS), len(demo_data.SHAPES), 5, len(demo_data.WORDS))


def live_token_ids(tokenizer) -> list[int]:
    """Ids the demo can meet: the tokenizer's learned tokens and its named special tokens."""
    vocab = tokenizer.get_vocab()
    first_special = min(SPECIAL_TOKENS.values())
    learned = [i for t, i in vocab.items() if i < first_special and not t.startswith("<|reserved_")]
    return sorted(set(learned) | set(SPECIAL_TOKENS.values()))


def encode_example(tokenizer, image_tokens: int, scene, question: str, rng: random.Random,
                   image_first: bool = True, cut_thinking: bool = False) -> tuple[list[int], int]:
    """(token ids, prompt length): the chat prompt with the image's pad run expanded, then the
    reply: ◁think▷ thinking ◁/think▷ answer <|im_end|>, each part tokenized on its own (as
    the server appends the end marker's own tokens when it closes thinking)."""
    image = {"type": "image", "image": "picture"}
    text = {"type": "text", "text": question}
    content = [image, text] if image_first else [text, image]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    prompt = tokenizer.encode(rendered, add_special_tokens=False)
    at = prompt.index(PAD)
    prompt = prompt[:at] + [PAD] * image_tokens + prompt[at + 1:]

    def enc(s: str) -> list[int]:
        return tokenizer.encode(s, add_special_tokens=False)

    thinking = enc(scene.thinking())
    if cut_thinking:
        thinking = thinking[: rng.randint(1, len(thinking) - 1)]
    reply = enc(THINK_START) + thinking + enc(THINK_END) + enc(scene.answer(question)) + [IM_END]
    return prompt + reply, len(prompt)


def attribute_labels(scene) -> list[int]:
    """Targets of the attribute head; -100 where an attribute does not apply."""
    word = scene.kind == "word"
    return [int(word), list(demo_data.COLOURS).index(scene.colour),
            -100 if word else demo_data.SHAPES.index(scene.shape), -100 if word else scene.count,
            demo_data.WORDS.index(scene.word) if word else -100]


@dataclass
class Example:
    ids: list[int]
    start: int  # prompt length: the reply starts here
    pixel_values: object  # (h*w, 3, 14, 14) float32
    grid: object  # (1, 2)
    labels: list[int]


def build_model(dtype=None):
    """The demo architecture in kimivl_modeling with the seed's tensors (float32 by default)."""
    import torch

    from kimivl_modeling.configuration_kimi_vl import KimiVLConfig
    from kimivl_modeling.modeling_kimi_vl import KimiVLForConditionalGeneration

    from .demo_model import VISION, base_tensors
    from .tiny_model import model_config

    config = KimiVLConfig(**{k: v for k, v in model_config(VISION).items() if k not in ("architectures", "model_type")})
    config._attn_implementation = "sdpa"
    model = KimiVLForConditionalGeneration(config)
    model.load_state_dict({k: v.float() for k, v in base_tensors().items()})
    return model.to(dtype or torch.float32)


def _schedule(opt, steps: int):
    import torch

    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def train(vision_steps: int = 1000, vision_batch: int = 32, steps: int = 700, batch: int = 16, lr: float = 3e-3,
          seed: int = 1, threads: int = 1, examples: int = 4000, refresh: int = 8, held: int = 128,
          log_every: int = 25, eval_every: int = 100) -> dict:
    """Train; returns the trained tensors (float32) and a summary of the run."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    from kimivl_inference.hf_processor import KimiVLImageProcessor

    from .demo_model import SEED, VISION
    from .tiny_model import make_tiny_model

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = random.Random(seed)
    wall0, cpu0 = time.perf_counter(), time.process_time()

    def clock() -> str:
        return f"{time.perf_counter() - wall0:6.0f} s  cpu {time.process_time() - cpu0:6.0f} s"

    tmp = Path(tempfile.mkdtemp(prefix="kimivl-demo-train-"))
    try:  # the tokenizer is the tiny model's
        make_tiny_model(str(tmp / "m"), seed=SEED, vision=VISION)
        tokenizer = AutoTokenizer.from_pretrained(str(tmp / "m"), trust_remote_code=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    processor = KimiVLImageProcessor()
    model = build_model()
    model.train()
    live = live_token_ids(tokenizer)
    remap = torch.full((MODEL_CONFIG["vocab_size"],), -1, dtype=torch.long)
    remap[torch.tensor(live)] = torch.arange(len(live))
    embed = torch.nn.Parameter(model.language_model.model.embed_tokens.weight.detach()[live].clone())
    head = torch.nn.Parameter(model.language_model.lm_head.weight.detach()[live].clone())
    log_dead = math.log(MODEL_CONFIG["vocab_size"] - len(live))
    for name, p in model.named_parameters():
        p.requires_grad = not (name in (EMBED, HEAD) or any(name.endswith(f) for f in FROZEN))
    attr_head = torch.nn.Linear(MODEL_CONFIG["text_config"]["hidden_size"], sum(ATTRIBUTES))

    def draw(r: random.Random, cut: float = 0.2) -> Example:
        img, scene, question = demo_data.example(r)
        pv = processor(img)
        ids, start = encode_example(tokenizer, int(pv["image_grid_hws"].prod()) // 4, scene, question, r,
                                    image_first=r.random() < 0.5, cut_thinking=r.random() < cut)
        return Example(ids, start, pv["pixel_values"], pv["image_grid_hws"], attribute_labels(scene))

    def attribute_logits(picked: list[Example], feats=None):
        grids = torch.cat([e.grid for e in picked])
        if feats is None:
            feats = model.get_image_features(torch.cat([e.pixel_values for e in picked]), grids)
        pooled = torch.stack([f.mean(0) for f in feats.split((grids.prod(-1) // 4).tolist())])
        return attr_head(pooled).split(ATTRIBUTES, dim=-1), torch.tensor([e.labels for e in picked])

    def attribute_loss(logits, labels):
        return sum(F.cross_entropy(lg, labels[:, i], ignore_index=-100)
                   for i, lg in enumerate(logits) if (labels[:, i] != -100).any())

    def forward(picked: list[Example]):
        """(logits over the live tokens plus one column for all dead ones, targets, example
        index) at every reply position, and the image features."""
        n, width = len(picked), max(len(e.ids) for e in picked)
        ids = torch.full((n, width), SPECIAL_TOKENS["[PAD]"], dtype=torch.long)
        target = torch.full((n, width), -100, dtype=torch.long)
        for i, e in enumerate(picked):
            ids[i, : len(e.ids)] = torch.tensor(e.ids)
            target[i, e.start - 1: len(e.ids) - 1] = remap[torch.tensor(e.ids[e.start:])]  # t predicts t+1
        feats = model.get_image_features(torch.cat([e.pixel_values for e in picked]),
                                         torch.cat([e.grid for e in picked]))
        x = embed[remap[ids].clamp(min=0)].masked_scatter((ids == PAD).unsqueeze(-1), feats)
        # Right padding under the causal rule: no real token sees a pad, so no key mask (the
        # fused attention kernel's path); the pads' own outputs are outside the loss.
        h = model.language_model.model(x, torch.arange(width).expand(n, width))
        sel = target != -100
        logits = h[sel] @ head.T
        full = torch.cat([logits, torch.full_like(logits[:, :1], log_dead)], dim=-1)
        return full, target[sel], sel.nonzero()[:, 0], feats

    def held_out_exact() -> float:
        """Share of held-out examples whose every reply token is the argmax given the right
        prefix: exactly the share a greedy decoder gets entirely right (in float32)."""
        hits = 0
        with torch.no_grad():
            for i in range(0, len(held_out), 32):
                chunk = held_out[i:i + 32]
                full, tgt, row, _ = forward(chunk)
                wrong = torch.zeros(len(chunk), dtype=torch.long).index_add_(0, row, (full.argmax(-1) != tgt).long())
                hits += int((wrong == 0).sum())
        return hits / len(held_out)

    def held_out_attributes() -> float:
        """Share of held-out pictures with every attribute right (the attribute head)."""
        with torch.no_grad():
            logits, labels = attribute_logits(held_out)
        ok = torch.ones(len(held_out), dtype=torch.bool)
        for i, lg in enumerate(logits):
            applies = labels[:, i] != -100
            ok &= ~applies | (lg.argmax(-1) == labels[:, i])
        return ok.float().mean().item()

    data = [draw(rng) for _ in range(examples)]
    held_rng = random.Random(seed + 10_000)
    held_out = [draw(held_rng, cut=0.0) for _ in range(held)]
    print(f"{examples} + {held} held-out examples drawn  {clock()}", flush=True)
    history: list[dict] = []

    def run_phase(name: str, n_steps: int, size: int, params: list, step_loss, evaluate) -> None:
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
        sched = _schedule(opt, n_steps)
        for step in range(n_steps):
            for _ in range(refresh):
                data[rng.randrange(examples)] = draw(rng)
            loss, extra = step_loss([data[rng.randrange(examples)] for _ in range(size)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            last = step == n_steps - 1
            if step % log_every == 0 or last:
                entry = {"phase": name, "step": step, "loss": round(loss.item(), 4), **extra}
                if held and (last or (step and step % eval_every == 0)):
                    entry["held_out"] = round(evaluate(), 4)
                history.append(entry)
                print("  ".join(f"{k} {v}" for k, v in entry.items()) + f"  {clock()}", flush=True)

    vision_params = ([p for p in model.vision_tower.parameters() if p.requires_grad]
                     + list(model.multi_modal_projector.parameters()) + list(attr_head.parameters()))

    def vision_loss(picked):
        return attribute_loss(*attribute_logits(picked)), {}

    def chat_loss(picked):
        full, tgt, _, feats = forward(picked)
        acc = (full.argmax(-1) == tgt).float().mean().item()
        return F.cross_entropy(full, tgt) + attribute_loss(*attribute_logits(picked, feats)), {"token_acc": round(acc, 4)}

    model.language_model.requires_grad_(False)
    run_phase("vision", vision_steps, vision_batch, vision_params, vision_loss, held_out_attributes)
    for name, p in model.language_model.named_parameters():
        p.requires_grad = not (f"language_model.{name}" in (EMBED, HEAD) or any(name.endswith(f) for f in FROZEN))
    chat_params = [p for p in model.parameters() if p.requires_grad] + [embed, head] + list(attr_head.parameters())
    run_phase("chat", steps, batch, chat_params, chat_loss, held_out_exact)

    tensors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tensors["live_token_ids"] = torch.tensor(live, dtype=torch.int32)
    tensors["embed_rows"] = embed.detach().clone()
    tensors["head_rows"] = head.detach().clone()
    return {"tensors": tensors, "seconds": round(time.perf_counter() - wall0, 1),
            "cpu_seconds": round(time.process_time() - cpu0, 1), "history": history,
            "settings": {"vision_steps": vision_steps, "vision_batch": vision_batch, "steps": steps, "batch": batch,
                         "lr": lr, "seed": seed, "threads": threads, "examples": examples, "refresh": refresh},
            "torch": torch.__version__}
