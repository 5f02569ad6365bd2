"""ttft.png, throughput.png, itl.png: medians over repeats, bars with min–max whiskers."""
from __future__ import annotations

import os

from . import log
from .results import cells, median, phase_order, system_order, value

COLORS = ["#1f77b4", "#2ca02c", "#17becf", "#9467bd", "#d62728", "#ff7f0e", "#7f7f7f", "#8c564b", "#e377c2"]


def plots(results: dict, out: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plots")
        return []
    cs = cells(results)
    systems = system_order(results)
    color = {s: COLORS[i % len(COLORS)] for i, s in enumerate(systems)}
    slo = results["invocations"][0].get("slo_ttft_p90_s", 2.0)
    phases = phase_order(results)

    def stat(s, w, p, key):
        vals = [value(e, key) for e in cs.get((s, w, p), [])]
        vals = [v for v in vals if v is not None]
        return (median(vals), min(vals), max(vals)) if vals else (None, None, None)

    def rate(w, p):
        return cs[next(k for k in cs if k[1:] == (w, p))][0]["ph"]["rate"]

    panels = []  # (title, workload, [phases], kind)
    for w in dict.fromkeys(w for w, _ in phases):
        for p in [pp for ww, pp in phases if ww == w and not pp.startswith("poisson")]:
            panels.append((f"{w} / {p}", w, [p], "single"))
        rates = [pp for ww, pp in phases if ww == w and pp.startswith("poisson")]
        if rates:
            panels.append((f"{w} / Poisson", w, rates, "rates"))
    if not panels:
        return []
    written = []

    def save(fig, name: str) -> str:
        fig.tight_layout()
        path = os.path.join(out, f"{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def grid(n):
        cols = min(3, n)
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
        for ax in axes.flat[n:]:
            ax.axis("off")
        return fig, list(axes.flat)

    def bars(ax, w, p, keys, labels, scale=1.0):
        present = [s for s in systems if (s, w, p) in cs]
        width = 0.8 / max(1, len(keys))
        for j, (k, lab) in enumerate(zip(keys, labels, strict=True)):
            st = [stat(s, w, p, k) for s in present]
            vals = [(m or 0) * scale for m, _, _ in st]
            err = [[max(0.0, (m or 0) - (lo or 0)) * scale for m, lo, _ in st],
                   [max(0.0, (hi or 0) - (m or 0)) * scale for m, _, hi in st]]
            xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(present))]
            ax.bar(xs, vals, width, color=[color[s] for s in present], alpha=1.0 if j == 0 else 0.5,
                   hatch=None if j == 0 else "//", label=lab, edgecolor="black", linewidth=0.4,
                   yerr=err, capsize=2, error_kw={"elinewidth": 0.6})
        ax.set_xticks(range(len(present)))
        ax.set_xticklabels(present, rotation=30, ha="right", fontsize=8)

    def rate_lines(ax, w, ps, key, style, label_suffix=""):
        for s in systems:
            pts = [(rate(w, p), stat(s, w, p, key)[0]) for p in ps if (s, w, p) in cs]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, color=color[s], label=f"{s}{label_suffix}", marker="o", ms=3)
        ax.set_xlabel("offered rate (req/s)")

    fig, axes = grid(len(panels))
    for ax, (title, w, ps, kind) in zip(axes, panels, strict=False):
        if kind == "single":
            bars(ax, w, ps[0], ["ttft_p50_s", "ttft_p90_s"], ["p50", "p90 (hatched)"])
        else:
            rate_lines(ax, w, ps, "ttft_p50_s", "-", " p50")
            rate_lines(ax, w, ps, "ttft_p90_s", "--", " p90")
            top = max((line.get_ydata().max() for line in ax.get_lines()), default=0)
            if top > slo / 3:
                ax.axhline(slo, color="gray", lw=0.8, ls=":", label=f"{slo:g} s")
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=6)
        ax.set_title(f"TTFT: {title}", fontsize=9)
        ax.set_ylabel("s")
    written.append(save(fig, "ttft"))
    fig, axes = grid(len(panels))
    for ax, (title, w, ps, kind) in zip(axes, panels, strict=False):
        if kind == "single":
            bars(ax, w, ps[0], ["req_per_s"], ["req/s"])
            ax.set_ylabel("requests/s (median, min–max)")
            ax2 = ax.twinx()
            present = [s for s in systems if (s, w, ps[0]) in cs]
            ax2.plot(range(len(present)), [stat(s, w, ps[0], "out_tok_per_s")[0] or 0 for s in present], "k*", ms=7)
            ax2.set_ylabel("output tok/s (*)", fontsize=8)
            ax2.set_ylim(bottom=0)
        else:
            rate_lines(ax, w, ps, "req_per_s", "-")
            top = max(rate(w, p) for p in ps)
            ax.plot([0, top], [0, top], color="gray", lw=0.8, ls=":")
            ax.set_ylabel("achieved requests/s")
            ax.legend(fontsize=6)
        ax.set_title(f"throughput: {title}", fontsize=9)
    written.append(save(fig, "throughput"))
    fig, axes = grid(len(panels))
    for ax, (title, w, ps, kind) in zip(axes, panels, strict=False):
        if kind == "single":
            bars(ax, w, ps[0], ["itl_p50_ms", "itl_p90_ms"], ["p50", "p90 (hatched)"])
        else:
            rate_lines(ax, w, ps, "itl_p50_ms", "-", " p50")
            rate_lines(ax, w, ps, "itl_p90_ms", "--", " p90")
            ax.legend(fontsize=6)
        ax.set_title(f"inter-token latency: {title}", fontsize=9)
        ax.set_ylabel("ms")
    written.append(save(fig, "itl"))
    return written
