"""The systems under test, and the servers and engines they run on.

    ours:N         the inference tier as it ships (vision fast path on) + a front door with N
                   image threads (``--workers N``); load over gRPC with the SDK's AsyncClient
    ours-stock:N   the same with ``--ours-stock-args`` added to the inference tier's flags (the
                   flag that turns the fast path off): its own inference tier and engine
    vllm:K         ``vllm serve --api-server-count K``; ``vllm:K+g`` adds vLLM's encoder CUDA
                   graphs (``--vllm-graph-config``, default {"cudagraph_mm_encoder": true})
    ceiling        vLLM's AsyncLLM in this process fed ready tensors (each request preprocessed
                   before its phase, not timed), vision path stock
    ceiling-fast   the same engine with the project's vision fast path switched on in vLLM's
                   worker before each of its phases (kimivl_inference.vision_fastpath, through
                   collective_rpc) and fed raw uint8 patches, as the inference tier feeds it then;
                   with both listed, one engine serves both (switched back to stock for the other)

ours:N systems with the same inference flags share one inference tier (each its own front door).
A shared server or engine is started by the first system that needs it and stopped when no
started system needs it any more.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import sys
import time

from . import config
from .placement import Placement, read_tree, set_tree
from .processes import (
    SHIM_ENV,
    Proc,
    child_env,
    free_port,
    http_json,
    kv_cache_tokens,
    matching_lines,
    vllm_cli,
    vllm_plugins_env,
    wait_grpc,
    wait_http,
)

FAST_PATH_LOG = r"fast[ _-]?path"  # how the inference tier's log says whether the vision fast path is on


def parse_systems(text: str) -> list[dict]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        kind, _, arg = item.partition(":")
        if kind in ("ours", "ours-stock"):
            workers = int(arg) if arg else None
            name = f"{kind}:{workers}" if workers is not None else kind
            out.append({"name": name, "kind": "ours", "variant": "stock" if kind == "ours-stock" else "fast",
                        "workers": workers})
        elif kind == "vllm":
            k, plus, suffix = (arg or "1").partition("+")
            if plus and suffix != "g":
                raise SystemExit(f"system {item!r}: vllm:K or vllm:K+g (encoder CUDA graphs)")
            out.append({"name": f"vllm:{int(k)}{'+g' if plus else ''}", "kind": "vllm", "api_servers": int(k),
                        "graphs": bool(plus), "variant": "g" if plus else "stock"})
        elif kind in ("ceiling", "ceiling-fast"):
            out.append({"name": kind, "kind": "ceiling", "variant": "fast" if kind == "ceiling-fast" else "stock"})
        else:
            raise SystemExit(f"unknown system {item!r}: ours[:N], ours-stock[:N], vllm[:K][+g], ceiling, ceiling-fast")
    names = [d["name"] for d in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SystemExit(f"--systems lists {dup} twice; use --repeats to measure a system again")
    return out


def base_name(name: str) -> str:
    """The system a variant belongs to, for "its own best flags": vllm:4+g -> vllm:4."""
    return name.split("+", 1)[0]


# ---------------------------------------------------------------------------- shared servers
class Resources:
    """Inference tiers (by flags) and the ceiling's engine, shared between the systems that
    use them, counted by the systems started on them."""

    def __init__(self, args, ecfg, log_dir, placement: Placement):
        self.a, self.e, self.log_dir, self.pl = args, ecfg, log_dir, placement
        self.tiers: dict[str, InferenceTier] = {}
        self.ceiling: CeilingEngine | None = None

    def tier(self, flags: list[str], label: str) -> InferenceTier:
        key = json.dumps(flags)
        if key not in self.tiers:
            names = {t.name for t in self.tiers.values()}
            name = label if label not in names else f"{label}-{len(self.tiers)}"
            self.tiers[key] = InferenceTier(name, flags, self.a, self.log_dir, self.pl)
        return self.tiers[key]

    def ceiling_engine(self) -> CeilingEngine:
        if self.ceiling is None:
            self.ceiling = CeilingEngine(self.a, self.e, self.log_dir, self.pl)
        return self.ceiling

    async def release_unused(self, keep=()) -> None:
        """Stop what no started system uses, except what is in ``keep`` (needed next)."""
        for t in self.tiers.values():
            if t.users == 0 and t.proc is not None and t not in keep:
                t.stop()
        c = self.ceiling
        if c is not None and c.users == 0 and c.engine is not None and c not in keep:
            await c.stop()


class InferenceTier:
    def __init__(self, name, flags, args, log_dir, placement: Placement):
        self.name, self.flags, self.a, self.log_dir, self.pl = name, flags, args, log_dir, placement
        self.proc: Proc | None = None
        self.port = free_port()
        self.users = 0
        self.info: dict = {}
        self._started: asyncio.Future | None = None

    async def ensure_started(self) -> bool:
        """Start once; True if this call started it."""
        if self._started is not None:
            await self._started
            return False
        self._started = asyncio.get_running_loop().create_future()
        try:
            a = self.a
            cmd = [sys.executable, "-m", "kimivl.cli", "serve", "inference", "--model", a.model, "--host", "127.0.0.1",
                   "--port", str(self.port), "--metrics-port", "0", "--drain-timeout-s", "5", *self.flags]
            t = time.perf_counter()
            self.proc = Proc(self.name, cmd, child_env(a.cpu), self.log_dir, self.pl.engine)
            await wait_grpc(self.port, self.proc, a.start_timeout_s)
            self.info = {"start_s": round(time.perf_counter() - t, 1), "cmd": shlex.join(cmd)}
            set_tree(self.proc.pid, self.pl.engine)
            text = self.proc.log_text()
            self.info["kv_cache_tokens"] = kv_cache_tokens(text)
            self.info["fast_path_log"] = matching_lines(text, a.fast_path_log)
            self._started.set_result(True)
        except BaseException as e:
            self._started.set_exception(e)
            self._started.exception()  # retrieved: a later waiter re-raises it
            raise
        return True

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
        self._started = None
        self.port = free_port()


def _engine_threads(on_gpu: bool):
    try:
        from kimivl_inference.engine_threads import engine_threads
    except ImportError:  # a project from before it: the engine starts as vLLM starts it
        return contextlib.nullcontext("vLLM's default (this project has no kimivl_inference.engine_threads)")
    return engine_threads(1, on_gpu)


class CeilingEngine:
    """AsyncLLM in this process, with the front door's pipeline in-process to prepare its input."""

    def __init__(self, args, ecfg, log_dir, placement: Placement):
        self.a, self.e, self.log_dir, self.pl = args, ecfg, log_dir, placement
        self.engine = None
        self.sender = None      # bfloat16 patches (stock)
        self.sender_raw = None  # raw uint8 patches (the fast path normalizes them on the device)
        self.users = 0
        self.info: dict = {}
        self.switchable = False  # started with the fast path's plugin armed (ceiling-fast listed)
        self.fast: bool | None = None  # the switch's last state, None = never switched
        self._started: asyncio.Future | None = None
        self.share: float | None = None

    def tools(self, raw: bool = False):
        """The preprocessor and a sender, usable before the engine starts (to prepare payloads
        while other systems start)."""
        if self.sender is None:
            self._import_paths()
            import loadgen as lg
            import torch

            from kimivl_contract.processor import ProcessorConfig
            from kimivl_preprocess.pipeline import Preprocessor
            from kimivl_preprocess.pool import ImagePool
            from kimivl_preprocess.sources import FetchPolicy, ImageFetcher
            self.pool = ImagePool(ProcessorConfig.from_model_dir(self.a.model), workers=None)
            self.fetcher = ImageFetcher(FetchPolicy())
            pre = Preprocessor(self.a.model, self.pool, self.fetcher, max_images=self.e["limit_images"],
                               max_model_len=self.e["max_model_len"])
            self.sender = lg.EngineSender(None, pre, getattr(torch, self.e["dtype"]))
            self.sender_raw = lg.EngineSender(None, pre, getattr(torch, self.e["dtype"]), raw_pixels=True)
        return self.sender_raw if raw else self.sender

    def _import_paths(self):
        os.environ.update({k: v for k, v in child_env(self.a.cpu).items()
                           if k not in os.environ or k == "PYTHONPATH"})
        for p in reversed(os.environ["PYTHONPATH"].split(os.pathsep)):
            if p not in sys.path:
                sys.path.insert(0, p)

    async def ensure_started(self) -> bool:
        if self._started is not None:
            await self._started
            return False
        self._started = asyncio.get_running_loop().create_future()
        try:
            await self._start()
            self._started.set_result(True)
        except BaseException as e:
            self._started.set_exception(e)
            self._started.exception()
            raise
        return True

    async def _start(self):
        a = self.a
        sender = self.tools()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kw = config.ceiling_engine_kwargs(a.model, self.e, a.cpu, self.share)
        if self.switchable:  # as the project's own GPU script: plugin armed, worker switched per phase
            from kimivl_inference import vision_fastpath as vf
            os.environ[vf.ENV] = "1"
            os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(function)
        import psutil

        t = time.perf_counter()
        own = os.sched_getaffinity(0)
        before = {c.pid for c in psutil.Process().children()}
        if self.pl.engine:  # the engine core is started from this thread and inherits its CPUs
            os.sched_setaffinity(0, self.pl.engine)
        try:
            # as the inference tier starts its engine (kimivl_inference.engine_threads): on a GPU a
            # spawned engine core with one torch thread, not a fork keeping this process's count
            with _engine_threads(not a.cpu) as threads:
                self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kw))
        finally:
            os.sched_setaffinity(0, own)
        import torch

        # what a forked engine core would have kept: torch's count here, taken from this process's CPUs when it loaded
        self.info["engine_torch_threads"] = threads
        self.info["bench_torch_threads"] = torch.get_num_threads()
        self.info["start_s"] = round(time.perf_counter() - t, 1)
        self.info["engine_kwargs"] = kw
        sender.engine = self.engine
        self.sender_raw.engine = self.engine
        # This process's new children are the engine's (the other systems' servers were started
        # before, or will be by Proc): those, not every child of this process, are the ceiling's.
        self.engine_pids = {}
        for c in psutil.Process().children():
            if c.pid not in before:
                with contextlib.suppress(psutil.Error):
                    self.engine_pids[f"bench › {c.name()}"] = c.pid
        for pid in self.engine_pids.values():  # the engine on the engine's CPUs ...
            set_tree(pid, self.pl.engine)
        self.pl.apply_to_self()  # ... and this process's threads, new ones included, back on the load gen's
        with contextlib.suppress(Exception):  # the engine core reports its blocks at start-up
            cc = self.engine.vllm_config.cache_config
            if cc.num_gpu_blocks:
                self.info["kv_cache_tokens"] = int(cc.num_gpu_blocks) * int(cc.block_size)
        self.info["preprocessing"] = (f"in-process kimivl_preprocess.Preprocessor ({self.pool.workers} threads) + "
                                      "kimivl_inference.engine_input.build_engine_input, before each phase, not timed")
        if a.ceiling_stats_interval_s > 0:  # vLLM's stats lines, as the inference tier's --log-stats-interval-s
            os.makedirs(self.log_dir, exist_ok=True)  # ... also in a log of their own, for servers.log
            self._stats_log = logging.FileHandler(os.path.join(self.log_dir, "ceiling-stats.log"))
            self._stats_log.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            logging.getLogger("vllm").addHandler(self._stats_log)
            self._stats = asyncio.create_task(self._log_stats(a.ceiling_stats_interval_s))

    async def _log_stats(self, period_s: float):
        while self.engine is not None:
            await asyncio.sleep(period_s)
            if self.engine is not None:
                await self.engine.do_log_stats()

    async def reinit(self) -> dict:
        if "reinit" in self.info:
            return {**self.info["reinit"], "shared": True}
        t = time.perf_counter()
        r = await self.engine.collective_rpc("reinit_dummy_weights", args=(self.e["seed"], int(self.a.cpu_repack)))
        await self.reset_caches()
        self.info["reinit"] = {"via": "AsyncLLM.collective_rpc('reinit_dummy_weights') (worker_extension_cls)",
                               "result": r, "s": round(time.perf_counter() - t, 2)}
        return self.info["reinit"]

    async def fastpath_probes(self) -> dict:
        """bench/vision_fastpath_gpu.py's worker-side probes (exactness stock vs fast, cache bounds,
        syncs and encoder times per mode) on this engine, once, after the re-initialisation."""
        import vision_fastpath_gpu as vfg  # bench/ is on sys.path (serving.py's folder)

        t = time.perf_counter()
        res: dict = {}
        await vfg.fastpath_probes(self.engine, res, vfg.CPU if self.a.cpu else vfg.GPU, cpu=self.a.cpu)
        self.fast = None  # the probes switch the worker themselves: set the mode again before a unit
        await self.set_fast(False)
        await self.reset_caches()
        res["s"] = round(time.perf_counter() - t, 1)
        return res

    async def reset_caches(self) -> None:
        """Both ceiling systems see the same images in a repeat: no KV or encoder output may carry over."""
        for name in ("reset_prefix_cache", "reset_encoder_cache"):
            with contextlib.suppress(Exception):
                await getattr(self.engine, name)()

    async def set_fast(self, on: bool) -> dict | None:
        """The project's vision fast path on (every component its version guard allows) or off
        in vLLM's worker; a switch empties its position-embedding cache."""
        if not self.switchable or self.fast is on:
            return None
        from kimivl_inference import vision_fastpath as vf
        comps = tuple(vf.WATCHED) if on else ()
        await self.engine.collective_rpc(vf.rpc_set_components, args=(comps,))
        (state,) = await self.engine.collective_rpc(vf.rpc_state)
        self.fast = on
        return {"fast": on, "active": state.get("active"), "via": "collective_rpc(vision_fastpath.rpc_set_components)"}

    async def stop(self):
        if getattr(self, "_stats", None) is not None:
            self._stats.cancel()
            logging.getLogger("vllm").removeHandler(self._stats_log)
            self._stats_log.close()
            self._stats = None
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
            for snd in (self.sender, self.sender_raw):
                if snd is not None:
                    snd.engine = None
            import gc
            gc.collect()  # AsyncLLM.__del__ now, not at interpreter exit
        if getattr(self, "pool", None) is not None:
            self.pool.close()
            await self.fetcher.close()
            self.pool = None
            self.sender = self.sender_raw = None
        self._started = None
        self.info.pop("reinit", None)
        self.fast = None


# ---------------------------------------------------------------------------- systems
class System:
    kind = ""

    def __init__(self, sysdef, args, ecfg, log_dir, res: Resources, placement: Placement, share):
        self.d, self.a, self.e, self.log_dir, self.res, self.pl, self.share = (sysdef, args, ecfg, log_dir, res,
                                                                               placement, share)
        self.name = sysdef["name"]
        self.info: dict = {"gpu_share": None if args.cpu else (share if share is not None
                                                               else ecfg["gpu_memory_utilization"]),
                           "placement": placement.describe(self.kind)}
        self.sender = None
        self.started = False

    def resources(self) -> list:
        return []

    async def before_unit(self) -> dict | None:
        return None

    async def reinit(self):
        return None

    def probe_extra(self):
        return {"logprobs": True}

    alone = frozenset()  # roles counted without their child processes

    def record_placement(self):
        self.info["cpus_in_force"] = {role: read_tree(pid, children=role not in self.alone)
                                      for role, pid in self.roles.items()}


class OursSystem(System):
    kind = "ours"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        flags = config.ours_inference_flags(self.e, self.a.cpu, self.share) + shlex.split(self.a.ours_inference_args)
        if self.d["variant"] == "stock":
            if self.a.ours_stock_args is None:
                raise SystemExit(f"{self.name} needs --ours-stock-args: the inference tier's flag(s) that turn the "
                                 "vision fast path off")
            flags += shlex.split(self.a.ours_stock_args)
        self.tier = self.res.tier(flags, f"ours-inference-{self.d['variant']}")
        self.pre: Proc | None = None

    def resources(self):
        return [self.tier]

    @property
    def roles(self):
        out = {}
        if self.tier.proc is not None:
            out["inference tier"] = self.tier.proc.pid
        if self.pre is not None:
            out["front door"] = self.pre.pid
        return out

    async def start(self):
        a = self.a
        port = free_port()
        workers = self.d["workers"]
        cmd = [sys.executable, "-m", "kimivl.cli", "serve", "preprocess", "--model", a.model, "--host", "127.0.0.1",
               "--port", str(port), "--metrics-port", "0", "--inference-target", f"127.0.0.1:{self.tier.port}",
               "--max-model-len", str(self.e["max_model_len"]), "--max-images", str(self.e["limit_images"]),
               "--drain-timeout-s", "5", *(["--workers", str(workers)] if workers is not None else []),
               *shlex.split(a.ours_preprocess_args)]
        t = time.perf_counter()
        # The front door serves on its own (it connects to the inference tier per request), so it
        # starts while the inference tier does.
        self.pre = Proc(f"ours-preprocess-{self.d['variant']}-{workers or 'all'}", cmd, child_env(a.cpu),
                        self.log_dir, self.pl.front_door)
        self.tier.users += 1
        self.started = True  # counted on the tier from here, whether or not it comes up
        async def front_door():
            await wait_grpc(port, self.pre, 180)
            self.info["preprocess_start_s"] = round(time.perf_counter() - t, 1)

        started, _ = await asyncio.gather(self.tier.ensure_started(), front_door())
        self.info.update({"inference_" + k: v for k, v in self.tier.info.items()})
        if not started:
            self.info.pop("inference_start_s", None)
            self.info["inference_shared"] = self.tier.name
        self.info["preprocess_cmd"] = shlex.join(cmd)
        self.info["reinit"] = f"inference tier --reinit-dummy-weights (seed {self.e['seed']})"
        set_tree(self.pre.pid, self.pl.front_door)
        import loadgen as lg
        self.sender = lg.OursSender(f"127.0.0.1:{port}", clients=a.grpc_clients, timeout_s=a.request_timeout_s)

    def kv_tokens(self):
        return self.tier.info.get("kv_cache_tokens")

    def probe_extra(self):
        return None

    async def stop(self):
        if self.sender is not None:
            await self.sender.close()
            self.sender = None
        if self.pre is not None:
            self.pre.stop()
            self.pre = None
        if self.started:
            self.tier.users -= 1
        self.started = False


class VllmSystem(System):
    kind = "vllm"

    @property
    def roles(self):
        return {"vllm serve": self.proc.pid} if getattr(self, "proc", None) is not None else {}

    async def start(self):
        a = self.a
        self.port = free_port()
        extra = shlex.split(a.vllm_serve_args)
        if self.d["graphs"]:
            extra += ["--compilation-config", a.vllm_graph_config]
        cmd = [*vllm_cli(), "serve", a.model, "--host", "127.0.0.1", "--port", str(self.port),
               "--served-model-name", "bench", "--api-server-count", str(self.d["api_servers"]),
               "--disable-uvicorn-access-log", *config.vllm_serve_flags(self.e, a.cpu, self.share), *extra]
        plugins = vllm_plugins_env(a.vllm_plugins, a.cpu)
        env = child_env(a.cpu, {"VLLM_SERVER_DEV_MODE": "1", SHIM_ENV: "1", **plugins})
        t = time.perf_counter()
        self.proc = Proc(self.name.replace(":", "-"), cmd, env, self.log_dir, self.pl.vllm)
        base = f"http://127.0.0.1:{self.port}"
        await wait_http(base + "/health", self.proc, a.start_timeout_s)
        self.info["start_s"] = round(time.perf_counter() - t, 1)
        self.info["cmd"] = shlex.join(cmd)
        self.info["env"] = {"VLLM_SERVER_DEV_MODE": "1", **plugins}
        set_tree(self.proc.pid, self.pl.vllm)
        self.info["kv_cache_tokens"] = kv_cache_tokens(self.proc.log_text())
        import loadgen as lg
        self.sender = lg.VllmSender(base, "bench", timeout_s=a.request_timeout_s, token_ids=not a.vllm_no_token_ids)
        self.started = True

    def kv_tokens(self):
        return self.info.get("kv_cache_tokens")

    async def reinit(self):
        base = f"http://127.0.0.1:{self.port}"
        t = time.perf_counter()
        r = await http_json("POST", base + "/collective_rpc", {"method": "reinit_dummy_weights",
                                                              "args": [self.e["seed"], int(self.a.cpu_repack)]})
        with contextlib.suppress(Exception):  # drop any KV computed with the old weights
            await http_json("POST", base + "/reset_prefix_cache")
        return {"via": "POST /collective_rpc {method: reinit_dummy_weights} (VLLM_SERVER_DEV_MODE=1, "
                       "--worker-extension-cls reinit_ext.ReinitExtension)", "result": r,
                "s": round(time.perf_counter() - t, 2)}

    async def stop(self):
        if self.sender is not None:
            await self.sender.close()
            self.sender = None
        if getattr(self, "proc", None) is not None:
            self.proc.stop()
            self.proc = None
        self.started = False


class CeilingSystem(System):
    kind = "ceiling"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.eng = self.res.ceiling_engine()
        if self.d["variant"] == "fast":
            try:
                from kimivl_inference import vision_fastpath  # noqa: F401
            except ImportError as e:
                raise SystemExit(f"ceiling-fast needs the project's vision fast path "
                                 f"(kimivl_inference.vision_fastpath): {e}") from e
            self.eng.switchable = True
        if self.share is not None:
            if self.eng.share is not None and self.eng.share != self.share:
                raise SystemExit("ceiling and ceiling-fast share one engine: give them one --gpu-share")
            self.eng.share = self.share

    def resources(self):
        return [self.eng]

    @property
    def roles(self):
        # this process alone (load generator + AsyncLLM's front end), and the engine core it started
        return {"bench": os.getpid(), **getattr(self.eng, "engine_pids", {})}

    alone = frozenset({"bench"})  # this process's other children are other systems' servers

    async def start(self):
        self.eng.users += 1
        self.started = True
        started = await self.eng.ensure_started()
        self.info.update(self.eng.info if started else {"engine_shared": True,
                                                         "kv_cache_tokens": self.eng.info.get("kv_cache_tokens")})
        self.sender = self.eng.sender_raw if self.d["variant"] == "fast" else self.eng.sender

    def kv_tokens(self):
        return self.eng.info.get("kv_cache_tokens")

    async def reinit(self):
        out = await self.eng.reinit()
        if self.d["variant"] == "fast" and self.a.fastpath_probes and "fastpath_probes" not in self.eng.info:
            self.eng.info["fastpath_probes"] = await self.eng.fastpath_probes()
            out = {**out, "fastpath_probes": self.eng.info["fastpath_probes"]}  # kept in results.json
        return out

    async def before_unit(self):
        """The shared engine in this system's mode, with nothing cached from another system's phase."""
        sw = await self.eng.set_fast(self.d["variant"] == "fast")
        await self.eng.reset_caches()
        return sw

    async def stop(self):
        if self.started:
            self.eng.users -= 1
        self.started = False
        self.sender = None


SYSTEMS = {"ours": OursSystem, "vllm": VllmSystem, "ceiling": CeilingSystem}


def make_system(sysdef, args, ecfg, log_dir, res, placement, shares) -> System:
    default, per = shares
    share = per.get(sysdef["name"], default)
    return SYSTEMS[sysdef["kind"]](sysdef, args, ecfg, log_dir, res, placement, share)
