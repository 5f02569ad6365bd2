"""What reaches vLLM's engine core, request by request and step by step (a benchmark probe).

Loaded by this folder's ``sitecustomize.py`` in every Python process started with this folder on
``PYTHONPATH`` and ``KIMIVL_ENGINE_PROBE_DIR`` set; it patches vLLM only where the engine core
runs (``EngineCore.preprocess_add_request``, the step functions, ``Scheduler.schedule``) and
writes JSON lines to ``$KIMIVL_ENGINE_PROBE_DIR/<pid>.jsonl``:

- ``proc``: once: pid, title, torch threads, OMP/MKL environment, CPU affinity;
- ``req``: each EngineCoreRequest as the core received it: every field summarised (tensors as
  dtype/shape/contiguity/pinning, multimodal items per key with their field kind), the receive
  time (``time.perf_counter()``: CLOCK_MONOTONIC, the benchmark's clock too) and the
  input thread's CPU seconds for ``preprocess_add_request``;
- ``step``: each engine step: start/end, the main thread's CPU seconds, and the scheduler's
  output (requests scheduled, new ones, tokens, prefill tokens, encoder inputs, waiting/running);
- ``threads``: every second while the core works, every thread of the core and of its child
  processes (CPU backend: ``VLLM::Worker``) with its CPU seconds so far: which threads burn CPU.

Nothing here changes what vLLM computes. ``bench/engine_probe_report.py`` reads the files.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

DIR = os.environ.get("KIMIVL_ENGINE_PROBE_DIR", "")
FLUSH_S = 1.0
_TICK = os.sysconf("SC_CLK_TCK")


class _Sink:
    def __init__(self):
        self.lines: list[str] = []
        self.lock = threading.Lock()
        self.last_flush = time.perf_counter()
        self.started = False
        self.path = os.path.join(DIR, f"{os.getpid()}.jsonl")

    def emit(self, rec: dict) -> None:
        line = json.dumps(rec, default=str)
        with self.lock:
            if not self.started:
                self.started = True
                self.lines.append(json.dumps(_proc_info(), default=str))
            self.lines.append(line)
        if time.perf_counter() - self.last_flush > FLUSH_S:
            self.flush()

    def flush(self) -> None:
        with self.lock:
            if not self.started:
                return
            self.last_flush = time.perf_counter()
            self.lines.append(json.dumps(_threads(), default=str))
            lines, self.lines = self.lines, []
        with open(self.path, "a") as f:
            f.write("\n".join(lines) + "\n")


SINK = _Sink()


def _proc_info() -> dict:
    info = {"kind": "proc", "pid": os.getpid(), "ppid": os.getppid(), "t": time.perf_counter(),
            "argv0": sys.argv[:1], "comm": _read(f"/proc/{os.getpid()}/comm").strip(),
            "affinity": sorted(os.sched_getaffinity(0)),
            "env": {k: v for k, v in os.environ.items()
                    if k.startswith(("OMP_", "MKL_", "KMP_", "GOMP_", "VLLM_", "CUDA_", "TORCH", "PYTORCH"))}}
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        info["torch_interop_threads"] = torch.get_num_interop_threads()
    return info


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _task_cpu(pid: int) -> list:
    """[tid, name, user_s, system_s] for every thread of ``pid``."""
    names = {}
    if pid == os.getpid():
        names = {t.native_id: t.name for t in threading.enumerate()}
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        stat = _read(f"/proc/{pid}/task/{tid}/stat")
        if not stat:
            continue
        rest = stat.rsplit(")", 1)[1].split()
        comm = stat[stat.find("(") + 1:stat.rfind(")")]
        name = names.get(int(tid)) or f"native:{comm}"
        out.append([int(tid), name, int(rest[11]) / _TICK, int(rest[12]) / _TICK])
    return out


def _children(pid: int) -> list[int]:
    kids = []
    for tid in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else ():
        kids += [int(c) for c in _read(f"/proc/{pid}/task/{tid}/children").split()]
    for k in list(kids):
        kids += _children(k)
    return kids


def _threads() -> dict:
    procs = {}
    for pid in [os.getpid(), *_children(os.getpid())]:
        procs[str(pid)] = {"comm": _read(f"/proc/{pid}/comm").strip(), "threads": _task_cpu(pid)}
    return {"kind": "threads", "t": time.perf_counter(), "procs": procs}


def summarize(x, depth: int = 0):
    """A JSON-able description of a value as it reached the core (no tensor data)."""
    if depth > 6:
        return type(x).__name__
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        d = {"tensor": str(x.dtype).replace("torch.", ""), "shape": list(x.shape), "device": str(x.device),
             "contiguous": x.is_contiguous()}
        if x.device.type == "cpu":
            try:
                d["pinned"] = x.is_pinned()
            except RuntimeError:
                pass
        return d
    if x is None or isinstance(x, (bool, int, float, str)):
        return x if not isinstance(x, str) or len(x) <= 80 else x[:40] + f"...({len(x)})"
    if isinstance(x, (list, tuple)):
        if len(x) > 8 and all(isinstance(v, int) for v in x[:64]):
            return {type(x).__name__: len(x), "ints": True}
        return [summarize(v, depth + 1) for v in x[:8]] + ([f"...({len(x)})"] if len(x) > 8 else [])
    if isinstance(x, dict):
        return {str(k): summarize(v, depth + 1) for k, v in list(x.items())[:32]}
    if hasattr(type(x), "__struct_fields__"):  # msgspec structs (EngineCoreRequest, ...)
        return {"__type__": type(x).__name__,
                **{f: summarize(getattr(x, f, None), depth + 1) for f in type(x).__struct_fields__}}
    if type(x).__name__ == "MultiModalKwargsItem":
        return {"__type__": "MultiModalKwargsItem",
                **{k: {"field": type(getattr(v, "field", None)).__name__, "data": summarize(v.data, depth + 1)}
                   for k, v in x.items()}}
    if hasattr(x, "__dataclass_fields__"):
        return {"__type__": type(x).__name__,
                **{f: summarize(getattr(x, f, None), depth + 1) for f in x.__dataclass_fields__}}
    if hasattr(x, "__slots__") or hasattr(x, "__dict__"):
        fields = getattr(x, "__dict__", None) or {s: getattr(x, s, None) for s in getattr(type(x), "__slots__", ())}
        return {"__type__": type(x).__name__, **{k: summarize(v, depth + 1) for k, v in list(fields.items())[:40]
                                                 if not k.startswith("__")}}
    return repr(x)[:80]


def _patch_core(mod) -> None:
    core = mod.EngineCore
    orig_pre = core.preprocess_add_request

    def preprocess_add_request(self, request):
        t, c = time.perf_counter(), time.thread_time()
        desc = summarize(request)
        out = orig_pre(self, request)
        SINK.emit({"kind": "req", "t": t, "pre_cpu_s": time.thread_time() - c, "n_prompt":
                   len(request.prompt_token_ids or ()), "prompt_ids_type": type(request.prompt_token_ids).__name__,
                   "req": desc})
        return out

    core.preprocess_add_request = preprocess_add_request
    for name in ("step", "step_with_batch_queue"):
        orig = getattr(core, name, None)
        if orig is None:
            continue

        def step(self, _orig=orig, _name=name):
            t, c = time.perf_counter(), time.thread_time()
            outs, executed = _orig(self)
            n_out = sum(len(getattr(o, "outputs", ()) or ()) for o in (outs or {}).values())
            sched = _LAST_SCHED.pop("s", None)
            SINK.emit({"kind": "step", "fn": _name, "t": t, "wall_s": time.perf_counter() - t,
                       "cpu_s": time.thread_time() - c, "executed": bool(executed), "outputs": n_out,
                       **(sched or {})})
            return outs, executed

        setattr(core, name, step)


_LAST_SCHED: dict = {}


def _patch_scheduler(mod) -> None:
    sched = mod.Scheduler
    orig = sched.schedule

    def schedule(self, *a, **kw):
        t, c = time.perf_counter(), time.thread_time()
        so = orig(self, *a, **kw)
        n = so.num_scheduled_tokens
        _LAST_SCHED["s"] = {
            "sched_cpu_s": time.thread_time() - c, "sched_t": t, "n_sched": len(n),
            "n_new": len(so.scheduled_new_reqs), "tokens": so.total_num_scheduled_tokens,
            "prefill_tokens": sum(v for v in n.values() if v > 1),
            "prefill_reqs": sum(1 for v in n.values() if v > 1),
            "enc_inputs": sum(len(v) for v in so.scheduled_encoder_inputs.values()),
            "waiting": len(self.waiting), "running": len(self.running)}
        return so

    sched.schedule = schedule


_TARGETS = {"vllm.v1.engine.core": _patch_core, "vllm.v1.core.sched.scheduler": _patch_scheduler}


class _Finder:
    """Patches the target modules right after they are first executed."""

    def find_spec(self, name, path=None, target=None):
        if name not in _TARGETS:
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            try:
                _TARGETS[name](module)
            except Exception as e:  # noqa: BLE001 - a probe must never break the engine
                print(f"kimivl_engine_probe: could not patch {name}: {e!r}", file=sys.stderr)

        loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    if not DIR:
        return
    os.makedirs(DIR, exist_ok=True)
    sys.meta_path.insert(0, _Finder())
    import atexit

    atexit.register(SINK.flush)

    def ticker():  # the thread table also while the core waits between bursts
        while True:
            time.sleep(5 * FLUSH_S)
            if SINK.started:
                SINK.flush()

    threading.Thread(target=ticker, name="engine-probe", daemon=True).start()
