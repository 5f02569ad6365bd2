"""Command-line options of `kimivl serve preprocess` (kept free of heavy imports so
`--help` is instant and the k8s manifests can be checked against it)."""
from __future__ import annotations

import argparse

from kimivl_hosting.options import add_connection_arguments, add_server_tls_arguments, add_tracing_arguments

MiB = 1 << 20


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = no limit), got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--model", required=True, help="model directory (tokenizer, chat template, configs)")
    p.add_argument("--inference-target", default="localhost:50052",
                   help="gRPC target of the inference tier, e.g. dns:///kimivl-inference:50052 "
                        "(round_robin over every address it resolves to)")
    p.add_argument("--workers", type=int, default=None,
                   help="image worker threads (default: one per CPU this process may use; decode, resize, numpy "
                        "and hashing release the GIL, and threads measured faster than processes)")
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port (0 = off)")
    p.add_argument("--max-images", type=int, default=256, help="most images per request")
    p.add_argument("--max-image-bytes", type=int, default=32 * MiB, help="largest encoded image or URL body")
    p.add_argument("--max-image-pixels", type=int, default=178_956_970, help="largest decoded image (w*h)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length for prompt checks (default: the model config's)")
    p.add_argument("--max-text-chars", type=_non_negative_int, default=0,
                   help="most characters of text per request, refused before tokenizing (0 = 8 per token of the "
                        "context: text longer than that cannot fit)")
    p.add_argument("--max-request-pixels", type=_non_negative_int, default=1 << 30,
                   help="most image pixels per request, all images together, known from the headers before any "
                        "decoding (default 2^30)")
    p.add_argument("--max-preparing", type=_non_negative_int, default=0,
                   help="admission: requests being prepared at once (fetch, decode, tokenize); 0 = 4 per CPU "
                        "this process may use")
    p.add_argument("--max-queued", type=int, default=-1,
                   help="admission: requests waiting for a --max-preparing slot; more are refused at once with "
                        "UNAVAILABLE and a retry hint (-1 = 16 per CPU, 0 = no queue)")
    p.add_argument("--max-queue-wait-s", type=float, default=10.0,
                   help="admission: longest wait in the queue (for a request slot or image memory) before the "
                        "request is refused with UNAVAILABLE and a retry hint")
    p.add_argument("--max-decode-mb", type=_non_negative_int, default=0,
                   help="admission: memory for images being decoded and processed at once, each image's share "
                        "estimated from its header (0 = a quarter of the memory this process may use, its cgroup "
                        "limit in a container; at least one largest image)")
    p.add_argument("--max-message-mb", type=int, default=256, help="largest gRPC message in or out")
    p.add_argument("--wire-dtype", choices=["uint8", "bfloat16", "float16", "float32"], default="uint8",
                   help="dtype of patch tensors sent to the inference tier: uint8 sends the raw pixels, half "
                        "the bytes of bfloat16, and the inference tier normalizes them (same values)")
    p.add_argument("--inference-uploads", type=_non_negative_int, default=0,
                   help="prepared prompts uploading to the inference tier at once, the rest queued in arrival "
                        "order (0 = no limit). A slot is freed when the inference tier acknowledges the "
                        "request, which waits on its event loop: on the H200 a limit of 4 cut a photo "
                        "burst to 0.82x the engine ceiling (docs/benchmarks.md)")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="let image URLs reach non-public addresses (private, loopback, link-local, shared, "
                        "NAT64/6to4 forms of those, ...); refused by default")
    p.add_argument("--url-timeout-s", type=float, default=10.0)
    p.add_argument("--url-max-redirects", type=int, default=3)
    add_server_tls_arguments(p, who="e.g. internal callers only; API keys are the usual front-door credential")
    g = p.add_argument_group("TLS towards the inference tier")
    g.add_argument("--inference-tls-ca-file",
                   help="reach the inference tier over TLS, verifying it against this PEM CA (default: plaintext)")
    g.add_argument("--inference-tls-cert-file",
                   help="present this PEM client certificate to the inference tier (mutual TLS; with "
                        "--inference-tls-key-file). The three files are read again when they change: new calls "
                        "use the new ones, calls in flight finish on the old connection")
    g.add_argument("--inference-tls-key-file", help="PEM private key for --inference-tls-cert-file")
    g.add_argument("--inference-tls-server-name",
                   help="the name the inference tier's certificate carries, when it is not the target's host")
    # Public clients behind L4 balancers: bounded connection age lets them rebalance across pods.
    add_connection_arguments(p, age_s=1800.0, age_grace_s=3600.0)
    add_tracing_arguments(p)
    p.add_argument("--http-port", type=int, default=0,
                   help="serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, /health, /ready) "
                        "on this port beside the gRPC one, on the same pipeline (0 = off); HTTPS with the --tls-* "
                        "files when given")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) the HTTP API answers to (default: the --model directory's name)")
    p.add_argument("--api-keys-file", default=None,
                   help="require an API key on every ChatService/PreprocessService RPC and /v1 HTTP request "
                        "(authorization: Bearer KEY): one key a line, # comments; re-read when it changes, so "
                        "keys rotate without a restart. Unset or empty: no authentication (logged at start)")
    p.add_argument("--drain-timeout-s", type=float, default=30.0,
                   help="on SIGTERM: how long in-flight RPCs may finish while new ones are refused")
    p.add_argument("--log-level", default="info")
