"""`make run`: both tiers on this machine, sample chats, then keep serving.

Starts the inference tier (vLLM; CPU engine when there is no GPU; ``--engine transformers``
for the Transformers one) and the preprocessing tier as child processes, waits until both
report SERVING on grpc.health.v1, streams sample chats with an image (thinking dim, answer
apart), prints how to chat with it, and serves until Ctrl-C (then drains both tiers). With the
demo model (the default) the samples are two of its pictures, so the answers show that they
come from the image; with another model, one photo.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from rich.console import Console

from kimivl.chat_cli import render
from kimivl.client import Client
from kimivl_devtools.launch import NotServing, TierProcess

console = Console(highlight=False, soft_wrap=True)


def wait_serving(name: str, tier: TierProcess, timeout_s: float) -> None:
    with console.status(f"waiting for the {name} tier at {tier.target}…"):
        try:
            tier.wait_serving(timeout_s)
        except NotServing as e:
            raise SystemExit(f"{e}; see its log above") from None
    console.print(f"[green]✓[/] {name} tier SERVING at {tier.target}")


def sample_image() -> bytes:
    import io

    from PIL import Image
    try:
        from skimage import data
        img = Image.fromarray(data.astronaut())
    except ImportError:
        img = Image.linear_gradient("L").convert("RGB").resize((448, 448))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def is_demo_model(model_dir: str) -> bool:
    readme = os.path.join(model_dir, "README.md")
    return os.path.isfile(readme) and open(readme, encoding="utf-8").readline().startswith("# Tiny trained")


def demo_chats() -> list[list]:
    """Two of the demo model's pictures and questions (kimivl_devtools.demo_data)."""
    import io
    import random

    from kimivl_devtools.demo_data import Scene, render

    chats = []
    for scene, question in ((Scene("shapes", "blue", shape="triangle", count=3), "Describe this picture."),
                            (Scene("word", "red", word="SUN"), "What does it say?")):
        buf = io.BytesIO()
        render(scene, random.Random(7)).save(buf, format="PNG")
        chats.append([buf.getvalue(), question])
    return chats


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--preprocess-port", type=int, default=50051)
    ap.add_argument("--inference-port", type=int, default=50052)
    ap.add_argument("--once", action="store_true", help="stop after the sample chats")
    ap.add_argument("--engine", choices=["vllm", "transformers"], default="vllm", help="the inference tier's engine")
    a = ap.parse_args()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
               VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"))
    try:
        import torch
        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    engine_flags = [] if gpu else ["--device", "cpu", "--enforce-eager", "--max-model-len", "4096"]
    if a.engine == "transformers":
        engine_flags = ["--engine", "transformers"] + ([] if gpu else ["--device", "cpu", "--max-model-len", "4096"])
    inference = TierProcess("inference", ["--model", a.model, "--port", str(a.inference_port),
                                          "--metrics-port", "9091", *engine_flags], a.inference_port,
                            env=env, host="localhost")
    preprocess = TierProcess("preprocess", ["--model", a.model, "--port", str(a.preprocess_port),
                                            "--metrics-port", "9090", "--inference-target",
                                            f"localhost:{a.inference_port}"], a.preprocess_port,
                             env=env, host="localhost")
    tiers = [preprocess, inference]
    try:
        wait_serving("preprocessing", preprocess, 120)
        wait_serving("inference", inference, 900)
        front = f"localhost:{a.preprocess_port}"
        demo = is_demo_model(a.model)
        chats = demo_chats() if demo else [["Describe this picture.", sample_image(), "What stands out?"]]
        with Client(front, timeout_s=600) as c:
            for i, parts in enumerate(chats, 1):
                console.rule(f"sample chat {i}: a picture and a question")
                question = " ".join(p for p in parts if isinstance(p, str))
                console.print(f"[bold]user:[/] <picture> {question}")
                render(c.stream(parts, sampling={"max_tokens": 48, "temperature": 0.0}), console)
        console.rule()
        console.print(f"Front door (kimivl.v1.ChatService) at [bold]{front}[/]; metrics on :9090 and :9091.\n"
                      f"Chat with it:  [bold].venv/bin/kimivl chat --target {front} --image photo.jpg "
                      "\"What is in this picture?\"[/]")
        if demo:
            console.print("[dim](the embedded default is a tiny demo model trained in minutes on synthetic pictures: "
                          "1-4 circles, squares or triangles, or a word, in red, green, blue or yellow; "
                          "MODEL=/path/to/Kimi-VL-A3B-Thinking-2506 make run serves the real one)[/]")
        elif a.model.endswith("kimi-vl-tiny"):
            console.print("[dim](the tiny random-weight model: its words are noise; "
                          "MODEL=/path/to/Kimi-VL-A3B-Thinking-2506 make run serves the real one)[/]")
        if a.once:
            return 0
        console.print("Serving until Ctrl-C.")
        stopping = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopping.append(True))
        while not stopping and all(t.proc.poll() is None for t in tiers):
            time.sleep(0.5)
        if stopping:
            return 0
        console.print("[red]a tier exited on its own; stopping[/]")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for t in tiers:  # both drain at once
            if t.proc.poll() is None:
                t.proc.send_signal(signal.SIGTERM)
        for t in tiers:
            t.stop(timeout_s=40)


if __name__ == "__main__":
    sys.exit(main())
