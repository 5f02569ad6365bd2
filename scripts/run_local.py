"""`make run`: both tiers on this machine, one sample chat, then keep serving.

Starts the inference tier (vLLM; CPU engine when there is no GPU) and the preprocessing
tier as child processes, waits until both report SERVING on grpc.health.v1, streams one
chat with an image (thinking and answer shown apart), prints how to chat with it, and
serves until Ctrl-C (then drains both tiers).
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--preprocess-port", type=int, default=50051)
    ap.add_argument("--inference-port", type=int, default=50052)
    ap.add_argument("--once", action="store_true", help="stop after the sample chat")
    a = ap.parse_args()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
               VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"))
    try:
        import torch
        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    engine_flags = [] if gpu else ["--device", "cpu", "--enforce-eager", "--max-model-len", "4096"]
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
        console.rule("sample chat: an image and a question")
        with Client(front, timeout_s=600) as c:
            render(c.stream(["Describe this picture.", sample_image(), "What stands out?"],
                            sampling={"max_tokens": 48, "temperature": 0.0}), console)
        console.rule()
        console.print(f"Front door (kimivl.v1.ChatService) at [bold]{front}[/]; metrics on :9090 and :9091.\n"
                      f"Chat with it:  [bold].venv/bin/kimivl chat --target {front} --image photo.jpg "
                      "\"What is in this picture?\"[/]")
        if a.model.endswith("kimi-vl-tiny"):
            console.print("[dim](the embedded default is a tiny random-weight model: its words are noise; "
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
