"""The tiny *trained* Kimi-VL demo model: its directory, rebuilt from the committed weights.

The demo model is the tiny random model (``tiny_model``, seed 0, with a larger vision tower)
after a few minutes of training on the CPU on the synthetic pictures of :mod:`.demo_data`
(:mod:`.demo_training`), so ``make run`` shows a chat that thinks about the picture and
answers from it. Only what training changed is kept in the repository
(``demo_weights.safetensors``, float16): the trained matrices of the vision tower, projector
and text layers, and the embedding and output rows of the ~700 tokens the demo can meet.
:func:`make_demo_model` rebuilds the directory from the seed and those tensors; the output
rows of all other tokens are zero, so none of them can be predicted over a trained one.

CLI: ``kimivl make-demo-model DIR [--force]`` writes the model;
``python -m kimivl_devtools.demo_model train [--threads 2]`` retrains the weights and
evaluates them (``--help`` for the settings).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

from . import demo_data

WEIGHTS = Path(__file__).resolve().parent / "demo_weights.safetensors"
SEED = 0  # the tiny model's seed: the untrained tensors come from it
# A larger vision tower than the tiny model's (64 x 2 layers): telling a circle from a square,
# or SUN from STAR, in 14-pixel patches is where the demo's capacity goes.
VISION = {"hidden_size": 96, "num_hidden_layers": 3, "intermediate_size": 192}

README = """\
# Tiny trained Kimi-VL demo model

Written by `kimivl make-demo-model` from the tiny random model (seed {seed}) and the trained
tensors in `kimivl_devtools/demo_weights.safetensors` (`python -m kimivl_devtools.demo_model
train`: {vision_steps} vision steps and {steps} chat steps on synthetic pictures, on the CPU).
The architecture, tokenizer and remote code are the tiny model's (see its README below), but
for a larger vision tower: MoonViT hidden {vhidden} x {vlayers} layers.

It knows a toy world only: 1-4 circles, squares or triangles in red, green, blue or yellow on
white, or one of the words {words} in one of those colours, at {size}x{size} pixels. Ask it to
describe the picture, count, name the colour or the shape, or read the word; it thinks first
(`◁think▷I see 3 blue triangles.◁/think▷`), then answers. Other pictures get an answer about
the nearest thing it knows.

model.safetensors sha256: {sha}

---

"""


def base_tensors() -> dict:
    """The untrained tensors (bfloat16): the tiny model's seed with the demo's vision tower."""
    from .tiny_model import _init_weights

    return _init_weights(SEED, VISION)


def trained_settings(weights: Path = WEIGHTS) -> dict:
    """The training run recorded in the weights file (settings, seconds, history)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


def save_weights(result: dict, path: Path = WEIGHTS) -> None:
    """Write :func:`.demo_training.train`'s tensors as float16 (ids as int32) with the run's
    summary in the metadata."""
    import torch
    from safetensors.torch import save_file

    out = {k: (v if v.dtype == torch.int32 else v.to(torch.float16)).contiguous() for k, v in result["tensors"].items()}
    meta = {k: json.dumps(v) for k, v in result.items() if k != "tensors"}
    save_file(out, str(path), metadata=meta)


def demo_tensors(weights: Path = WEIGHTS) -> dict:
    """The demo model's full state (bfloat16, the checkpoint's names): the seed's tensors, the
    trained ones over them, the trained embedding/output rows, every other output row zero."""
    import torch
    from safetensors.torch import load_file

    from .demo_training import EMBED, HEAD

    trained = load_file(str(weights))
    tensors = base_tensors()
    live = trained.pop("live_token_ids").long()
    embed, head = trained.pop("embed_rows"), trained.pop("head_rows")
    for name, t in trained.items():
        if name not in tensors or tensors[name].shape != t.shape:
            raise ValueError(f"{weights}: {name} {tuple(t.shape)} does not fit the demo architecture")
        tensors[name] = t.to(torch.bfloat16)
    tensors[EMBED][live] = embed.to(torch.bfloat16)
    tensors[HEAD] = torch.zeros_like(tensors[HEAD])
    tensors[HEAD][live] = head.to(torch.bfloat16)
    return tensors


def make_demo_model(out_dir: str, weights: Path = WEIGHTS) -> dict:
    """Write the demo model directory (must not exist or be empty)."""
    from safetensors.torch import save_file

    from .tiny_model import _sha256, make_tiny_model

    out = Path(out_dir)
    summary = make_tiny_model(str(out), seed=SEED, vision=VISION)
    save_file(demo_tensors(weights), str(out / "model.safetensors"), metadata={"format": "pt"})
    settings = trained_settings(weights).get("settings", {})
    sha = _sha256(out / "model.safetensors")
    tiny_readme = (out / "README.md").read_text()
    (out / "README.md").write_text(
        README.format(seed=SEED, vision_steps=settings.get("vision_steps"), steps=settings.get("steps"),
                      words=", ".join(demo_data.WORDS), size=demo_data.SIZE, sha=sha,
                      vhidden=VISION["hidden_size"], vlayers=VISION["num_hidden_layers"]) + tiny_readme)
    return {**summary, "model_safetensors_sha256": sha}


def evaluate(model_dir: str, n: int = 60, seed: int = 12345, dtype: str = "bfloat16") -> dict:
    """Greedy replies of the model directory, loaded as remote code, to ``n`` fresh pictures
    and questions: the share whose whole reply (thinking and answer), and whose answer, is
    exactly right."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kimivl_inference.hf_processor import KimiVLImageProcessor

    from .demo_training import IM_END, THINK_END, THINK_START, encode_example
    from .tiny_model import SPECIAL_TOKENS

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=getattr(torch, dtype)).eval()
    proc = KimiVLImageProcessor()
    rng = random.Random(seed)
    full = answers = 0
    misses = []
    for _ in range(n):
        img, scene, question = demo_data.example(rng)
        pv = proc(img)
        ids, start = encode_example(tok, int(pv["image_grid_hws"].prod()) // 4, scene, question, rng)
        x = torch.tensor([ids[:start]])
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), pixel_values=pv["pixel_values"],
                                 image_grid_hws=pv["image_grid_hws"], max_new_tokens=48, do_sample=False,
                                 eos_token_id=IM_END, pad_token_id=SPECIAL_TOKENS["[PAD]"])
        text = tok.decode(out[0, start:], skip_special_tokens=True)
        want = f"{THINK_START}{scene.thinking()}{THINK_END}{scene.answer(question)}"
        full += text == want
        answers += text.split(THINK_END)[-1] == scene.answer(question)
        if text != want and len(misses) < 5:
            misses.append({"question": question, "want": want, "got": text})
    return {"examples": n, "exact": full / n, "answer_exact": answers / n, "misses": misses}


def main(argv: list[str] | None = None) -> int:
    """``kimivl make-demo-model DIR [--force]``; argv is what follows the subcommand."""
    ap = argparse.ArgumentParser(prog="kimivl make-demo-model",
                                 description="Write the tiny trained Kimi-VL demo model (what `make run` serves).")
    ap.add_argument("dir")
    ap.add_argument("--force", action="store_true", help="replace DIR if it exists")
    ap.add_argument("--weights", type=Path, default=WEIGHTS, help="trained tensors (default: the committed ones)")
    a = ap.parse_args(argv)
    from .tiny_model import clear_output_dir

    out = Path(a.dir)
    if not clear_output_dir(out, a.force):
        return 1
    print(json.dumps(make_demo_model(str(out), a.weights), indent=2))
    return 0


def train_main(argv: list[str]) -> int:
    """``python -m kimivl_devtools.demo_model train``: retrain, write the weights, evaluate."""
    from .demo_training import train

    ap = argparse.ArgumentParser(prog="python -m kimivl_devtools.demo_model train",
                                 description="Retrain the demo model's weights on the CPU and evaluate them.")
    ap.add_argument("--vision-steps", type=int, default=1000, help="steps of the vision phase")
    ap.add_argument("--vision-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=700, help="steps of the chat phase")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (on a shared machine two threads contend; 2 on an idle one)")
    ap.add_argument("--examples", type=int, default=4000, help="examples in the training pool")
    ap.add_argument("--refresh", type=int, default=8, help="pool examples replaced by new ones every step")
    ap.add_argument("--eval-every", type=int, default=100, help="steps between held-out evaluations")
    ap.add_argument("--held", type=int, default=128, help="held-out examples (another seed)")
    ap.add_argument("--eval", type=int, default=100, help="fresh pictures for the greedy evaluation at the end")
    ap.add_argument("--out", type=Path, default=WEIGHTS)
    a = ap.parse_args(argv)
    result = train(vision_steps=a.vision_steps, vision_batch=a.vision_batch, steps=a.steps, batch=a.batch, lr=a.lr,
                   seed=a.seed, threads=a.threads, examples=a.examples, refresh=a.refresh,
                   eval_every=a.eval_every, held=a.held)
    save_weights(result, a.out)
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e6:.2f} MB) after {result['seconds']:.0f} s "
          f"({result['cpu_seconds']:.0f} s of CPU)")
    tmp = Path(tempfile.mkdtemp(prefix="kimivl-demo-eval-"))
    try:
        make_demo_model(str(tmp / "m"), a.out)
        print(json.dumps(evaluate(str(tmp / "m"), n=a.eval), indent=2, ensure_ascii=False))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(train_main(args[1:]) if args[:1] == ["train"] else main(args))
