"""The inference tier's own Prometheus metrics (vLLM's vllm:* metrics are served beside them)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TTFT = Histogram("kimivl_time_to_first_token_seconds", "Arrival at the inference tier to first token",
                 buckets=(.01, .025, .05, .1, .25, .5, 1, 2, 4, 8, 16, 32))
PREFILL_HOLD = Histogram("kimivl_prefill_hold_seconds",
                         "Time image requests were held to reach the engine together (--prefill-window-ms)",
                         buckets=(.001, .0025, .005, .01, .02, .04, .08, .16, .32))
ITL = Histogram("kimivl_inter_token_latency_seconds", "Time between generated tokens",
                buckets=(.001, .0025, .005, .01, .02, .04, .08, .16, .32, .64, 1.28))
THINKING_TOKENS = Counter("kimivl_thinking_tokens_total", "Generated tokens inside thinking segments")
ANSWER_TOKENS = Counter("kimivl_answer_tokens_total", "Generated answer tokens")
RUNNING = Gauge("kimivl_requests_running", "Requests generating (first token out)")
WAITING = Gauge("kimivl_requests_waiting", "Requests admitted, waiting for their first token")
ERRORS = Counter("kimivl_request_errors_total", "Failed requests by gRPC status code", ["code"])
# vLLM may turn prefix caching off whatever was asked (e.g. MLA models on CPUs without AMX).
PREFIX_CACHING = Gauge("kimivl_engine_prefix_caching", "1 when the engine's prefix cache is on")
VISION_FASTPATH = Gauge("kimivl_vision_fastpath_active",
                        "1 when the engine runs the project's vision fast path (--no-vision-fastpath turns it off)")
WARMUP_SECONDS = Gauge("kimivl_warmup_seconds", "How long the start-up warm-up (--warmup-grids) took")
