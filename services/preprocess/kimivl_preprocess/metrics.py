"""The preprocessing tier's Prometheus metrics (served on --metrics-port)."""
from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter("kimivl_preprocess_requests_total", "RPCs by method and gRPC status", ["method", "code"])
PREPROCESS_SECONDS = Histogram("kimivl_preprocess_seconds", "Image fetch/decode/processing and tokenization",
                               buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
IMAGES = Counter("kimivl_preprocess_images_total", "Images preprocessed")
UPLOAD_SECONDS = Histogram("kimivl_preprocess_upload_seconds",
                           "Chat: wait for an upload slot and the inference tier's receipt "
                           "(--inference-uploads; ~0 without a limit, where the call starts at once)",
                           buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5))
CHAT_TTFT = Histogram("kimivl_chat_time_to_first_token_seconds", "Chat: arrival to first relayed token",
                      buckets=(.025, .05, .1, .25, .5, 1, 2, 4, 8, 16, 32))
HTTP_REQUESTS = Counter("kimivl_preprocess_http_requests_total", "OpenAI-port HTTP requests by route and status",
                        ["route", "status"])
