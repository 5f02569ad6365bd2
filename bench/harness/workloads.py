"""Workloads, their phases and request files.

A phase's request files depend only on the workload, the phase, the repeat and the index, so
every system of a repeat gets the same bytes, every repeat new ones (no system's prefix cache
sees an image twice), and separate invocations (split GPU calls) get the same bytes for the
same repeat. Repeat 0 keeps the seeds the harness had before repeats existed.
"""
from __future__ import annotations

import zlib

# GPU defaults are the issue's; --cpu switches to tiny versions that prove the harness.
WORKLOADS = {
    "photos": {"n": 300, "mp": "1,2", "tokens": 16, "rates": "4,8,12,16", "duration_s": 10.0},
    "documents": {"n": 0, "size": "1600x1200", "tokens": 32, "rates": "4,7,10,13", "duration_s": 10.0},
    "small": {"n": 300, "side": 512, "tokens": 16},
    "decode": {"n": 512, "concurrency": 64, "mp": "1,2", "tokens": 512, "stagger_s": 8.0},
    "multi": {"n": 64, "images": 4, "mp": "0.5,1", "tokens": 128},
    "idle": {"n": 20, "mp": "1,2", "tokens": 16},
}
CPU_WORKLOADS = {
    "photos": {"n": 6, "mp": "0.04,0.08", "tokens": 4, "rates": "1,2", "duration_s": 5.0},
    "documents": {"n": 0, "size": "448x336", "tokens": 4, "rates": "0.5,1", "duration_s": 6.0},
    "small": {"n": 6, "side": 224, "tokens": 4},
    "decode": {"n": 4, "concurrency": 4, "mp": "0.04,0.08", "tokens": 32, "stagger_s": 0.0},
    "multi": {"n": 4, "images": 4, "mp": "0.02,0.04", "tokens": 8},
    "idle": {"n": 4, "mp": "0.04,0.08", "tokens": 4},
}
ALIASES = {"decode-heavy": "decode", "multi-image": "multi", "document": "documents", "photo": "photos"}
HELP = {
    "n": "requests (burst / closed loop / one at a time); 0 = no burst phase",
    "mp": "photo size range in megapixels, 'lo,hi'", "tokens": "output tokens (ignore_eos)",
    "rates": "Poisson arrival rates, req/s, comma-separated ('' = none)",
    "duration_s": "seconds of arrivals per Poisson rate", "size": "page size WxH",
    "side": "square image side", "concurrency": "concurrent streams (closed loop)",
    "images": "photos per request",
    "stagger_s": "closed loop: stream k starts at k/concurrency x this; about one request's duration "
                 "keeps fixed-length streams from running in phase (0 = all at once)",
}
FRESH_PHASE = "burst-fresh"  # a fresh system's first burst (before any warm-up), its own images


def workload_specs(args) -> dict:
    base = CPU_WORKLOADS if args.cpu else WORKLOADS
    specs = {}
    for w in [ALIASES.get(x.strip(), x.strip()) for x in args.workloads.split(",") if x.strip()]:
        if w not in base:
            raise SystemExit(f"unknown workload {w!r}: {', '.join(base)}")
        spec = dict(base[w])
        for k, v in spec.items():
            given = getattr(args, f"{w}_{k}")
            if given is not None:
                spec[k] = type(v)(given)
        specs[w] = spec
    return specs


def default_photos(specs: dict, cpu: bool) -> dict:
    return specs.get("photos") or (CPU_WORKLOADS if cpu else WORKLOADS)["photos"]


def mp_range(text: str) -> tuple[float, float]:
    lo, _, hi = str(text).partition(",")
    return float(lo), float(hi or lo)


def rates(text) -> list[float]:
    return [float(x) for x in str(text).split(",") if x.strip()]


def seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def _rseed(w: str, phase: str, repeat: int, *rest) -> int:
    return seed(w, phase, *rest) if repeat == 0 else seed(w, phase, f"r{repeat}", *rest)


def phases_of(w: str, spec: dict, repeat: int = 0) -> list[dict]:
    """A workload's phases: name, arrival pattern, request count and a request factory."""
    import loadgen as lg

    def photo_req(phase, mp, tokens):
        lo, hi = mp_range(mp)
        return lambda i: lg.Req(f"{w}/{phase}/{i}", [lg.photo_jpeg(_rseed(w, phase, repeat, i), lo, hi),
                                                     lg.QUESTIONS[i % len(lg.QUESTIONS)]], int(tokens))

    out = []
    if w == "photos":
        if spec["n"]:
            out.append({"phase": "burst", "pattern": "burst", "n": spec["n"],
                        "make": photo_req("burst", spec["mp"], spec["tokens"])})
        for r in rates(spec["rates"]):
            out.append({"phase": f"poisson@{r:g}", "pattern": "poisson", "rate": r,
                        "n": max(1, round(r * spec["duration_s"])),
                        "make": photo_req(f"poisson@{r:g}", spec["mp"], spec["tokens"])})
    elif w == "documents":
        wd, _, ht = spec["size"].partition("x")

        def doc_req(phase):
            return lambda i: lg.Req(f"{w}/{phase}/{i}", [lg.document_png(_rseed(w, phase, repeat, i), int(wd), int(ht)),
                                                         "Read this page and summarize it."], int(spec["tokens"]))

        def pages(phase, n):
            return [(_rseed(w, phase, repeat, i), int(wd), int(ht)) for i in range(n)]
        if spec["n"]:
            out.append({"phase": "burst", "pattern": "burst", "n": spec["n"], "make": doc_req("burst"),
                        "pages": pages("burst", spec["n"])})
        for r in rates(spec["rates"]):
            n = max(1, round(r * spec["duration_s"]))
            out.append({"phase": f"poisson@{r:g}", "pattern": "poisson", "rate": r, "n": n,
                        "make": doc_req(f"poisson@{r:g}"), "pages": pages(f"poisson@{r:g}", n)})
    elif w == "small":
        mp = spec["side"] ** 2 / 1e6

        def small_req(i):
            data = lg.photo_jpeg(_rseed(w, "burst", repeat, i), mp, mp)
            return lg.Req(f"{w}/burst/{i}", [square(data, spec["side"]), lg.QUESTIONS[i % len(lg.QUESTIONS)]],
                          int(spec["tokens"]))
        out.append({"phase": "burst", "pattern": "burst", "n": spec["n"], "make": small_req})
    elif w == "decode":
        c = spec["concurrency"]
        out.append({"phase": f"closed@{c}", "pattern": "closed", "concurrency": c, "n": spec["n"],
                    "stagger_s": float(spec["stagger_s"]), "make": photo_req(f"closed@{c}", spec["mp"], spec["tokens"])})
    elif w == "multi":
        lo, hi = mp_range(spec["mp"])

        def multi_req(i):
            parts = []
            for k in range(int(spec["images"])):
                parts += [f"Photo {k + 1}:", lg.photo_jpeg(_rseed(w, "burst", repeat, i, k), lo, hi)]
            parts.append("What do these photos have in common? Compare them.")
            return lg.Req(f"{w}/burst/{i}", parts, int(spec["tokens"]))
        out.append({"phase": "burst", "pattern": "burst", "n": spec["n"], "make": multi_req})
    elif w == "idle":
        out.append({"phase": "sequential", "pattern": "sequential", "n": spec["n"],
                    "make": photo_req("sequential", spec["mp"], spec["tokens"])})
    return out


def fresh_phase(specs: dict, cpu: bool) -> dict:
    """A fresh system's first burst: the photos burst's size and kind, its own images."""
    import loadgen as lg

    spec = default_photos(specs, cpu)
    lo, hi = mp_range(spec["mp"])
    n = spec["n"] or (CPU_WORKLOADS if cpu else WORKLOADS)["photos"]["n"]
    return {"phase": FRESH_PHASE, "pattern": "burst", "n": n, "fresh": True,
            "make": lambda i: lg.Req(f"photos/{FRESH_PHASE}/{i}", [lg.photo_jpeg(seed("photos", FRESH_PHASE, i), lo, hi),
                                                                    lg.QUESTIONS[i % len(lg.QUESTIONS)]],
                                     int(spec["tokens"]))}


def warmup_requests(w: str, spec: dict, phase: str, repeat: int, n: int, photos: dict) -> list:
    """Untimed requests before a measured phase, the same for every system of a repeat: a page
    for the documents workload, else a photo of the workload's size (8 output tokens)."""
    import loadgen as lg

    out = []
    for i in range(n):
        s = seed("warmup", w, phase, repeat, i)
        if w == "documents":
            wd, _, ht = spec["size"].partition("x")
            img = lg.document_png(s, int(wd), int(ht))
        elif "side" in spec:
            mp = spec["side"] ** 2 / 1e6
            img = square(lg.photo_jpeg(s, mp, mp), spec["side"])
        else:
            lo, hi = mp_range(spec.get("mp") or photos["mp"])
            img = lg.photo_jpeg(s, lo, hi)
        out.append(lg.Req(f"warmup/{w}/{phase}/{repeat}/{i}", [img, "Warm up."], 8))
    return out


def square(jpeg: bytes, side: int) -> bytes:
    """Center-crop/resize a photo to exactly side x side (the 'small' workload's 512² JPEG)."""
    import io

    from PIL import Image, ImageOps
    img = ImageOps.fit(Image.open(io.BytesIO(jpeg)).convert("RGB"), (side, side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()
