"""Load generation for bench/serving.py: request files, clients, arrival patterns, statistics.

Everything a system needs for a request is built before a phase is timed (gRPC messages,
JSON bodies with base64 data URIs, or for the engine ceiling the preprocessed engine input);
the timed part only sends and reads streams. One asyncio loop drives all requests.

Request files are deterministic: a request's images depend only on the workload, the phase, the
repeat and the request's index (``harness/workloads.py``), so every system (and every invocation,
e.g. on another machine) gets the same bytes; each phase records a sha256 over them.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import math
import os
import random
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
QUESTIONS = ("What is in this picture?", "Describe this photo briefly.", "What do you see here?",
             "What is the main subject of this image?", "Describe the scene in one sentence.")
WORDS = ("invoice total amount customer account payment due date reference shipping address order "
         "quantity price tax service period contract clause party agreement section schedule annex "
         "report summary revenue quarter growth margin forecast table figure note page chapter "
         "meeting minutes attendees action item owner deadline project status risk budget approval").split()


# ---------------------------------------------------------------------------- images
@cache
def _photo(name: str):
    import numpy as np
    from skimage import data

    return np.ascontiguousarray(getattr(data, name)()[..., :3])


def _mosaic(rng: random.Random, width: int, height: int):
    """Real photos tiled at native scale (a resized-up photo would be unrealistically smooth),
    in a per-request order, mirrored at random, from a random offset."""
    from PIL import Image

    canvas = Image.new("RGB", (width, height))
    names = list(PHOTOS)
    rng.shuffle(names)
    y, k = -rng.randrange(0, 200), 0
    while y < height:
        x, row = -rng.randrange(0, 200), rng.randint(360, 520)  # rows of one height: no gaps
        while x < width:
            tile = Image.fromarray(_photo(names[k % len(names)]))
            tile = tile.resize((max(1, round(tile.width * row / tile.height)), row), Image.Resampling.BILINEAR)
            if rng.random() < 0.5:
                tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            canvas.paste(tile, (x, y))
            x, k = x + tile.width, k + 1
        y += row
    return canvas


def photo_jpeg(seed: int, mp_lo: float, mp_hi: float) -> bytes:
    """A distinct JPEG photo of mp_lo..mp_hi megapixels: photo mosaic, a small rotation, a
    brightness change, quality 85-95."""
    from PIL import Image, ImageEnhance

    rng = random.Random(seed)
    mp = rng.uniform(mp_lo, mp_hi)
    aspect = rng.choice((4 / 3, 3 / 2, 16 / 9, 3 / 4, 1.0))
    h = max(28, round((mp * 1e6 / aspect) ** 0.5))
    w = max(28, round(h * aspect))
    img = _mosaic(rng, w, h)
    img = img.rotate(rng.uniform(-4, 4), resample=Image.Resampling.BILINEAR, fillcolor=(127, 127, 127))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.9, 1.1))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.randint(85, 95))
    return buf.getvalue()


_DOCUMENTS: dict[tuple[int, int, int], bytes] = {}


def document_png(seed: int, width: int, height: int) -> bytes:
    """A distinct text page: black text in PIL's default font on white, as RGB PNG."""
    cached = _DOCUMENTS.get((seed, width, height))
    return cached if cached is not None else _render_document(seed, width, height)


def prerender_documents(keys: list[tuple[int, int, int]]) -> None:
    """Render (seed, width, height) pages in worker processes: the text layout loop holds
    the GIL, so threads don't help, and a phase of 130 pages took a minute in one thread.
    Same function, same bytes."""
    from concurrent.futures import ProcessPoolExecutor

    todo = [k for k in keys if k not in _DOCUMENTS]
    if len(todo) < 4:
        return
    with ProcessPoolExecutor(min(len(todo), os.cpu_count() or 1)) as ex:
        for k, data in zip(todo, ex.map(_render_document, *zip(*todo, strict=True), chunksize=2), strict=True):
            _DOCUMENTS[k] = data


def _render_document(seed: int, width: int, height: int) -> bytes:
    from PIL import Image, ImageDraw, ImageFont

    rng = random.Random(seed)
    page = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    size = max(8, round(rng.uniform(16, 22) * height / 1200))
    font = ImageFont.load_default(size=size)
    margin = round(width * rng.uniform(0.04, 0.08))
    y = margin
    draw.text((margin, y), f"Document {seed} - page {rng.randint(1, 40)}", fill=(0, 0, 0),
              font=ImageFont.load_default(size=round(size * 1.5)))
    y += round(size * 3)
    while y < height - margin - size:
        words, line = [], ""
        target = rng.uniform(0.6, 1.0) * (width - 2 * margin)
        while draw.textlength(line, font=font) < target:
            words.append(rng.choice(WORDS) if rng.random() > 0.15 else str(rng.randint(1, 99999)))
            line = " ".join(words)
        draw.text((margin, y), line, fill=(0, 0, 0), font=font)
        y += round(size * rng.uniform(1.4, 1.8)) + (size * 2 if rng.random() < 0.08 else 0)
    buf = io.BytesIO()
    page.save(buf, format="PNG")
    return buf.getvalue()


def mime_of(data: bytes) -> str:
    return "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"


# ---------------------------------------------------------------------------- requests
@dataclass
class Req:
    """One request, the same for every system: content parts in order (str text, bytes image)."""
    key: str
    parts: list
    max_tokens: int

    @property
    def images(self) -> list[bytes]:
        return [p for p in self.parts if isinstance(p, bytes)]


def build_requests(make, n: int, threads: int | None = None) -> list[Req]:
    """``make(i) -> Req`` for i in range(n), in threads (Pillow releases the GIL)."""
    with ThreadPoolExecutor(threads or min(32, os.cpu_count() or 1)) as ex:
        return list(ex.map(make, range(n)))


def payload_sha256(reqs: list[Req]) -> str:
    h = hashlib.sha256()
    for r in reqs:
        for p in r.parts:
            h.update(p if isinstance(p, bytes) else p.encode())
        h.update(str(r.max_tokens).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------- records
@dataclass
class Record:
    key: str
    t_sched: float = 0.0          # planned send time, s from the phase start
    t_send: float | None = None   # actual send time
    t_first: float | None = None  # first token arrived
    t_last: float | None = None   # last token arrived
    t_end: float | None = None    # stream closed
    n_tokens: int = 0
    chunks: list = field(default_factory=list)  # [t, tokens in that message]
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    token_ids: list | None = None
    server: dict = field(default_factory=dict)
    error: str | None = None

    def token(self, now: float, n: int) -> None:
        if n <= 0:
            return
        if self.t_first is None:
            self.t_first = now
        self.t_last = now
        self.n_tokens += n
        self.chunks.append((now, n))

    def to_json(self, t0: float, keep_chunks: bool = True) -> dict:
        def rel(t):
            return None if t is None else round(t - t0, 5)

        out = {"key": self.key, "t_sched": round(self.t_sched, 5), "t_send": rel(self.t_send),
               "ttft": None if self.t_first is None else round(self.t_first - self.t_send, 5),
               "t_first": rel(self.t_first), "t_last": rel(self.t_last), "t_end": rel(self.t_end),
               "n_tokens": self.n_tokens, "prompt_tokens": self.prompt_tokens,
               "cached_tokens": self.cached_tokens, "error": self.error}
        if self.n_tokens > 1 and self.t_last is not None:
            out["itl"] = round((self.t_last - self.t_first) / (self.n_tokens - 1), 6)
        if self.server:
            out["server"] = self.server
        if keep_chunks:
            out["chunks"] = [[round(t - self.t_send, 5), n] for t, n in self.chunks]
        return out


# ---------------------------------------------------------------------------- senders
class OursSender:
    """The front door (kimivl.v1.ChatService) through the Python SDK's AsyncClient."""
    kind = "ours"

    def __init__(self, target: str, clients: int = 1, timeout_s: float = 600.0):
        from kimivl.client import AsyncClient

        self.clients = [AsyncClient(target, timeout_s=timeout_s) for _ in range(max(1, clients))]
        self._next = 0

    async def prepare(self, req: Req, extra: dict | None = None):
        from kimivl.client import build_request

        return build_request(req.parts, sampling={"max_tokens": req.max_tokens, "temperature": 0.0,
                                                  "ignore_eos": True})

    async def send(self, payload, rec: Record, want_ids: bool = False) -> None:
        client = self.clients[self._next % len(self.clients)]
        self._next += 1
        ids = [] if want_ids else None
        rec.t_send = time.perf_counter()
        async for ev in client.stream(request=payload):
            now = time.perf_counter()
            if ev.result is not None:
                r = ev.result
                rec.prompt_tokens = r.usage.prompt_tokens
                rec.cached_tokens = r.usage.cached_prompt_tokens
                rec.server = {"preprocess_ms": round(r.timings.preprocess_ms, 2),
                              "ttft_ms": round(r.timings.time_to_first_token_ms, 2),
                              "image_tokens": r.usage.image_tokens,
                              "generated": r.usage.thinking_tokens + r.usage.answer_tokens}
                continue
            rec.token(now, len(ev.token_ids))
            if ids is not None:
                ids.extend(ev.token_ids)
        rec.t_end = time.perf_counter()
        rec.token_ids = ids

    async def close(self) -> None:
        for c in self.clients:
            await c.close()


class VllmSender:
    """vLLM's OpenAI server: /v1/chat/completions, stream, images as base64 data URIs.

    Every token is counted: ``return_token_ids`` makes each SSE chunk carry its token ids (and
    makes vLLM send a chunk even where a token adds no text); ``stream_options.include_usage``
    gives the totals, which are checked against them."""
    kind = "vllm"

    def __init__(self, base_url: str, model: str, timeout_s: float = 600.0, token_ids: bool = True):
        self.url = base_url.rstrip("/") + "/v1/chat/completions"
        self.model = model
        self.timeout_s = timeout_s
        self.token_ids = token_ids
        self.session = None

    async def _session(self):
        import aiohttp

        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=2.0),  # < uvicorn's 5 s: never reuse a closed one
                timeout=aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=30))
        return self.session

    def body(self, req: Req, extra: dict | None = None) -> bytes:
        content = []
        for p in req.parts:
            if isinstance(p, bytes):
                uri = f"data:{mime_of(p)};base64,{base64.b64encode(p).decode()}"
                content.append({"type": "image_url", "image_url": {"url": uri}})
            else:
                content.append({"type": "text", "text": p})
        body = {"model": self.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": req.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        if self.token_ids:
            body["return_token_ids"] = True
        body.update(extra or {})
        return json.dumps(body).encode()

    async def prepare(self, req: Req, extra: dict | None = None) -> bytes:
        return self.body(req, extra)

    async def send(self, payload: bytes, rec: Record, want_ids: bool = False) -> None:
        session = await self._session()
        ids, logprobs = [], []
        usage = None
        rec.t_send = time.perf_counter()
        async with session.post(self.url, data=payload, headers={"Content-Type": "application/json"}) as resp:
            if resp.status != 200:
                text = (await resp.text())[:300]
                raise RuntimeError(f"HTTP {resp.status}: {text}")
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for ch in chunk.get("choices") or ():
                    tids = ch.get("token_ids")
                    if tids is not None:
                        n = len(tids)
                        ids.extend(tids)
                    else:  # without return_token_ids: a chunk with text counts as one token
                        d = ch.get("delta") or {}
                        n = 1 if (d.get("content") or d.get("reasoning") or d.get("reasoning_content")) else 0
                    rec.token(now, n)
                    lp = ch.get("logprobs")
                    if lp and lp.get("content"):
                        logprobs.extend(round(x["logprob"], 5) for x in lp["content"])
        rec.t_end = time.perf_counter()
        if usage:
            rec.prompt_tokens = usage.get("prompt_tokens")
            details = usage.get("prompt_tokens_details") or {}
            rec.cached_tokens = details.get("cached_tokens")
            total = usage.get("completion_tokens")
            if self.token_ids and total is not None and total != rec.n_tokens:
                rec.server["usage_mismatch"] = [total, rec.n_tokens]
            if not self.token_ids and total is not None:
                rec.n_tokens = total  # ITL from the usage total; first/last from the chunks
        if want_ids:
            rec.token_ids = ids
            if logprobs:
                rec.server["logprobs"] = logprobs

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class EngineSender:
    """The engine ceiling: vLLM AsyncLLM in this process fed preprocessed tensors.

    ``prepare`` runs the front door's own pipeline in-process (kimivl_preprocess) and turns the
    PreparedPrompt into engine input with the inference tier's build_engine_input: not timed."""
    kind = "ceiling"

    def __init__(self, engine, preprocessor, model_dtype, raw_pixels: bool = False):
        self.engine = engine
        self.pre = preprocessor
        self.dtype = model_dtype
        # raw_pixels: the engine runs the vision fast path, which takes the raw uint8 patches and
        # normalizes them on the device (as the inference tier hands them over then); else
        # bfloat16 patches, normalized here beforehand (as the stock tier does on its CPU).
        self.raw_pixels = raw_pixels
        self.prepared_bytes = 0  # tensor bytes prepared so far (the harness bounds what it keeps ahead)

    async def prepare(self, req: Req, extra: dict | None = None):
        from kimivl.client import build_request
        from kimivl_inference.engine_input import build_engine_input

        prepared = await self.pre.prepare(build_request(req.parts), "uint8" if self.raw_pixels else "bfloat16")
        msg = prepared.prompt.message()
        self.prepared_bytes += sum(img.pixel_values.ByteSize() for img in msg.images)  # no copy of the bytes
        kw = {"raw_pixels": True} if self.raw_pixels else {}
        return build_engine_input(msg, self.dtype, **kw), req.max_tokens, bool(extra)

    async def send(self, payload, rec: Record, want_ids: bool = False) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        prompt, max_tokens, logprobs = payload
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA, logprobs=0 if logprobs else None)
        ids, lps = [], []
        rec.t_send = time.perf_counter()
        async for out in self.engine.generate(prompt, sp, f"{rec.key}-{uuid.uuid4().hex[:8]}"):
            now = time.perf_counter()
            if rec.prompt_tokens is None and out.prompt_token_ids is not None:
                rec.prompt_tokens = len(out.prompt_token_ids)
                rec.cached_tokens = out.num_cached_tokens
            o = out.outputs[0]
            rec.token(now, len(o.token_ids))
            ids.extend(o.token_ids)
            if o.logprobs:
                for tid, lp in zip(o.token_ids, o.logprobs, strict=False):
                    lps.append(round(lp[tid].logprob, 5))
        rec.t_end = time.perf_counter()
        if want_ids:
            rec.token_ids = ids
            if lps:
                rec.server["logprobs"] = lps

    async def close(self) -> None:
        pass


# ---------------------------------------------------------------------------- arrival patterns
async def _one(sender, payload, rec: Record, timeout_s: float, want_ids: bool = False) -> None:
    try:
        await asyncio.wait_for(sender.send(payload, rec, want_ids), timeout_s)
    except asyncio.TimeoutError:
        rec.error = f"timeout after {timeout_s:.0f} s"
    except asyncio.CancelledError:
        rec.error = rec.error or "cancelled (phase time limit)"
    except Exception as e:  # noqa: BLE001 - every failure is a recorded error
        rec.error = f"{type(e).__name__}: {str(e)[:300]}"
    if rec.t_end is None:
        rec.t_end = time.perf_counter()


async def _finish(tasks, limit_s: float | None) -> None:
    done, pending = await asyncio.wait(tasks, timeout=limit_s)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending, timeout=30)


async def run_burst(sender, payloads, recs, *, timeout_s, limit_s=None) -> float:
    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(_one(sender, p, r, timeout_s)) for p, r in zip(payloads, recs, strict=True)]
    await _finish(tasks, limit_s)
    return t0


async def run_closed(sender, payloads, recs, *, concurrency, timeout_s, limit_s=None, stagger_s=0.0) -> float:
    """``concurrency`` streams, each sending its next request when the last one ends. Stream k
    starts at k/concurrency x ``stagger_s``: streams of fixed-length requests started together
    stay in phase, and each wave then arrives as a burst (TTFT measures the waves, not the system)."""
    t0 = time.perf_counter()
    it = iter(range(len(payloads)))
    n = max(1, concurrency)

    async def worker(k: int):
        await asyncio.sleep(k * stagger_s / n)
        for i in it:
            recs[i].t_sched = time.perf_counter() - t0
            await _one(sender, payloads[i], recs[i], timeout_s)

    await _finish([asyncio.ensure_future(worker(k)) for k in range(n)], limit_s)
    return t0


async def run_poisson(sender, payloads, recs, *, rate, seed, timeout_s, limit_s=None) -> float:
    rng = random.Random(seed)
    t, offsets = 0.0, []
    for _ in payloads:
        offsets.append(t)
        t += rng.expovariate(rate)
    t0 = time.perf_counter()
    tasks = []
    for off, p, r in zip(offsets, payloads, recs, strict=True):
        r.t_sched = off
        delay = t0 + off - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(_one(sender, p, r, timeout_s)))
    await _finish(tasks, None if limit_s is None else max(1.0, limit_s - (time.perf_counter() - t0)))
    return t0


async def run_sequential(sender, payloads, recs, *, timeout_s, gap_s=0.05, limit_s=None) -> float:
    t0 = time.perf_counter()
    for p, r in zip(payloads, recs, strict=True):
        if limit_s is not None and time.perf_counter() - t0 > limit_s:
            r.error = "skipped (phase time limit)"
            continue
        r.t_sched = time.perf_counter() - t0
        await _one(sender, p, r, timeout_s)
        await asyncio.sleep(gap_s)
    return t0


# ---------------------------------------------------------------------------- samplers
class Samplers:
    """Whole-machine CPU (psutil, every 0.25 s) and GPU utilisation (nvidia-smi -lms 200, if
    present), kept with their times so that any window can be averaged."""

    def __init__(self, cpu_period_s: float = 0.25, gpu_period_ms: int = 200):
        import psutil

        self.psutil = psutil
        self.cpu_period, self.gpu_period = cpu_period_s, gpu_period_ms / 1e3
        self.cpu: list[tuple[float, float]] = []
        self.gpu: list[tuple[float, float, float]] = []
        self.gpu_name = None
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._cpu_loop, args=(cpu_period_s,), daemon=True)]
        self._smi = None
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            if q.returncode == 0 and q.stdout.strip():
                self.gpu_name = q.stdout.strip().splitlines()[0]
                self._smi = subprocess.Popen(
                    ["nvidia-smi", "-i", "0", "--query-gpu=utilization.gpu,memory.used",
                     "--format=csv,noheader,nounits", "-lms", str(gpu_period_ms)],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                self._threads.append(threading.Thread(target=self._gpu_loop, daemon=True))
        except (OSError, subprocess.SubprocessError):
            self._smi = None
        for t in self._threads:
            t.start()

    def _cpu_loop(self, period: float) -> None:
        self.psutil.cpu_percent(interval=None)
        while not self._stop.is_set():
            pct = self.psutil.cpu_percent(interval=period)
            self.cpu.append((time.perf_counter(), pct))

    def _gpu_loop(self) -> None:
        for line in self._smi.stdout:
            try:
                util, mem = (float(x) for x in line.strip().split(",")[:2])
            except ValueError:
                continue
            self.gpu.append((time.perf_counter(), util, mem))
            if self._stop.is_set():
                break

    def window(self, t0: float, t1: float) -> dict:
        """Means over the samples whose interval overlaps [t0, t1] (a CPU sample at t covers the
        period before t)."""
        cpu = [p for t, p in self.cpu if t >= t0 and t - self.cpu_period <= t1]
        out = {"cpu_util_pct": round(sum(cpu) / len(cpu), 1) if cpu else None, "cpu_samples": len(cpu)}
        if self._smi is None:
            out["gpu_util_pct"] = "n/a"
        else:
            g = [(u, m) for t, u, m in self.gpu if t >= t0 and t - self.gpu_period <= t1]
            out["gpu_util_pct"] = round(sum(u for u, _ in g) / len(g), 1) if g else None
            out["gpu_mem_used_mib_max"] = max((m for _, m in g), default=None)
            out["gpu_samples"] = len(g)
        return out

    async def settle(self, t1: float, limit_s: float = 1.0) -> None:
        """Wait until the samples covering time t1 are in (each is recorded at its period's end)."""
        deadline = time.perf_counter() + limit_s
        while time.perf_counter() < deadline:
            cpu_in = bool(self.cpu) and self.cpu[-1][0] >= t1
            gpu_in = self._smi is None or (bool(self.gpu) and self.gpu[-1][0] >= t1)
            if cpu_in and gpu_in:
                return
            await asyncio.sleep(0.05)

    def series(self, t_ref: float) -> dict:
        """The raw samples, times in s from t_ref."""
        return {"cpu_period_s": self.cpu_period, "cpu": [[round(t - t_ref, 3), p] for t, p in self.cpu],
                "gpu": [[round(t - t_ref, 3), u, m] for t, u, m in self.gpu] if self._smi is not None else None}

    def close(self) -> None:
        self._stop.set()
        if self._smi is not None:
            self._smi.terminate()
            try:
                self._smi.wait(5)
            except subprocess.TimeoutExpired:
                self._smi.kill()


def cpu_seconds_by_process(roles: dict[str, int], alone: frozenset = frozenset()) -> dict[int, tuple[str, float]]:
    """pid -> (label, user+system CPU seconds) for these process trees (alive now; a role in
    ``alone`` without its children). A root is labelled with its role, a child with ``role ›
    its name`` (vLLM titles its engine core ``VLLM::EngineCore``): where a system's CPU goes,
    process by process."""
    import psutil

    out = {}
    for role, pid in roles.items():
        try:
            root = psutil.Process(pid)
            procs = [root] if role in alone else [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for q in procs:
            try:
                t = q.cpu_times()
                label = role if q.pid == pid else f"{role} › {q.name()}"
                out[q.pid] = (label, t.user + t.system)
            except psutil.Error:
                pass
    return out


def cpu_delta_by_label(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds between two ``cpu_seconds_by_process`` readings, summed per label."""
    out: dict[str, float] = {}
    for pid, (label, s) in after.items():
        out[label] = out.get(label, 0.0) + s - before.get(pid, (label, 0.0))[1]
    return out


# ---------------------------------------------------------------------------- statistics
def pct(values, q: float):
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    k = (len(v) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def engine_steps(recs: list[dict], *, gap_s: float = 0.0015, skip_s: float = 0.0) -> dict | None:
    """Engine steps as the client sees them, from the records' per-message token times.

    One engine step hands a token to every running request at once, so the client receives a
    step's tokens within a millisecond or so, and steps are >= ~6 ms apart on the GPU: tokens
    closer than gap_s belong to one step. A step that delivers some request's first token is one
    that ran a prefill (and the vision encoder); how many first tokens it delivers is how many
    prefills the engine batched into it. This names where decode time goes without a profiler:
    whether prefills run one per step or batched, and what share of the wall they take.
    The window runs from skip_s after the first token (leave out a ramp-up) to the last first
    token (after it the engine only drains). None without chunks."""
    events = []
    for r in recs:
        if r.get("error") is not None or not r.get("chunks") or r.get("t_send") is None:
            continue
        for i, (t, _n) in enumerate(r["chunks"]):
            events.append((r["t_send"] + t, i == 0))
    if len(events) < 2:
        return None
    events.sort()
    steps = []  # [first arrival, first tokens delivered, last arrival so far]
    for t, first in events:
        if steps and t - steps[-1][2] <= gap_s:
            steps[-1][1] += first
            steps[-1][2] = t
        else:
            steps.append([t, int(first), t])
    t_lo = events[0][0] + skip_s
    t_hi = max(s[0] for s in steps if s[1] > 0) if any(s[1] for s in steps) else steps[-1][0]
    # A step's duration: from the previous step's delivery to this one's (what the step cost).
    durs = [(b[0] - a[0], b[1]) for a, b in zip(steps, steps[1:], strict=False) if t_lo <= b[0] <= t_hi]
    if not durs:
        return None
    wall = sum(d for d, _ in durs)
    pre = [n for _, n in durs if n > 0]
    plain = [d for d, n in durs if n == 0]
    decode = pct(plain, .5) if plain else None
    # Time beyond a plain decode step, summed over all steps: what the prefills stalled the streams.
    stall = sum(max(0.0, d - decode) for d, _ in durs) if decode is not None else None
    return {
        "steps": len(durs), "wall_s": round(wall, 3), "prefills": sum(pre),
        "prefills_per_prefill_step": round(sum(pre) / len(pre), 2) if pre else None,
        "decode_step_ms_p50": None if decode is None else round(decode * 1e3, 2),
        "stall_share": None if stall is None or not wall else round(stall / wall, 3),
        "stall_ms_per_prefill": round(stall / sum(pre) * 1e3, 1) if stall is not None and pre else None,
    }


def summarize(recs: list[dict], *, offered_rate: float | None = None) -> dict:
    """Summary of one phase from its JSON records (times relative to the phase start)."""
    ok = [r for r in recs if r["error"] is None and r["n_tokens"] > 0]
    errs = [r for r in recs if r not in ok]
    out = {"n": len(recs), "ok": len(ok), "errors": len(errs)}
    if errs:
        out["error_examples"] = sorted({(r["error"] or "no tokens")[:160] for r in errs})[:3]
    if offered_rate is not None:
        out["offered_rate"] = offered_rate
    if not ok:
        return out
    start = min(r["t_send"] for r in ok)
    end = max(r["t_end"] for r in ok)
    dur = max(end - start, 1e-9)
    ttft = [r["ttft"] for r in ok]
    itl = [r["itl"] for r in ok if r.get("itl") is not None]
    e2e = [r["t_end"] - r["t_send"] for r in ok]
    tokens = sum(r["n_tokens"] for r in ok)
    r3 = lambda x: None if x is None else round(x, 4)  # noqa: E731
    out.update({
        "duration_s": round(dur, 3), "req_per_s": round(len(ok) / dur, 3), "out_tok_per_s": round(tokens / dur, 1),
        "ttft_p50_s": r3(pct(ttft, .5)), "ttft_p90_s": r3(pct(ttft, .9)), "ttft_p99_s": r3(pct(ttft, .99)),
        "ttft_mean_s": r3(sum(ttft) / len(ttft)), "ttft_max_s": r3(max(ttft)),
        "itl_p50_ms": None if not itl else round(pct(itl, .5) * 1e3, 2),
        "itl_p90_ms": None if not itl else round(pct(itl, .9) * 1e3, 2),
        "e2e_p50_s": r3(pct(e2e, .5)), "e2e_p90_s": r3(pct(e2e, .9)),
        "tokens_per_req": round(tokens / len(ok), 2),
        "prompt_tokens_mean": None if any(r["prompt_tokens"] is None for r in ok)
        else round(sum(r["prompt_tokens"] for r in ok) / len(ok), 1),
    })
    pre = [r["server"]["preprocess_ms"] for r in ok if r.get("server", {}).get("preprocess_ms") is not None]
    if pre:
        out["server_preprocess_ms_p50"] = round(pct(pre, .5), 2)
    mism = [r for r in ok if r.get("server", {}).get("usage_mismatch")]
    if mism:
        out["usage_mismatches"] = len(mism)
    if offered_rate is not None:
        sends = [r["t_sched"] for r in recs]
        out["arrival_span_s"] = round(max(sends), 3) if sends else None
    return out
