"""PNG plots of bench results: time and peak memory per case group, one colour per provider.

A provider keeps its colour in every panel of every bench (known names have fixed colours, others
take the next free one by name); an axis turns logarithmic where the values on it differ by more
than ``LOG_RATIO``; a group with a single size is drawn as bars (one per provider), a sweep as lines.
Providers that ran out of memory or failed are marked on the memory panel.
"""

from __future__ import annotations

import os
import zlib
from typing import Dict, List, Optional

from bench.spec import MIB, Result

LOG_RATIO = 10.0

# Seeds' code greys, PyTorch blues/greens, compiled variants lighter, peers purple/brown, ours red.
_FIXED = {
    "naive": "#7f7f7f",
    "unfold": "#7f7f7f",
    "original": "#7f7f7f",
    "materialising": "#7f7f7f",
    "reference": "#bcbd22",
    "compiled": "#aec7e8",
    "unfold_compiled": "#aec7e8",
    "sdpa_cat": "#1f77b4",
    "sdpa_merge": "#2ca02c",
    "flex": "#9467bd",
    "flex_clamp": "#c5b0d5",
    "natten": "#8c564b",
    "dcal": "#d62728",
    "fused": "#d62728",
    "dcal_clamp": "#ff9896",
    "cpp": "#d62728",
    "cpp_lse": "#ff9896",
    "triton": "#ff7f0e",
    "triton_lse": "#ffbb78",
}
_SPARE = ["#17becf", "#e377c2", "#9edae5", "#f7b6d2", "#98df8a", "#c49c94", "#dbdb8d", "#393b79"]


def provider_colour(name: str) -> str:
    """The colour of a provider, the same in every panel and every bench."""
    return _FIXED.get(name) or _SPARE[zlib.crc32(name.encode()) % len(_SPARE)]


def _log_if_spread(ax, values, axis: str = "y") -> None:
    pos = [v for v in values if v and v > 0]
    if len(pos) >= 2 and max(pos) / min(pos) > LOG_RATIO:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def _bars(ax, rs_by_p: Dict[str, List[Result]], providers, what: str) -> List[float]:
    vals = []
    for i, p in enumerate(providers):
        rs = rs_by_p.get(p, [])
        r = rs[0] if rs else None
        colour = provider_colour(p)
        if r is not None and r.ok and (r.median_ms if what == "time" else r.peak_bytes) is not None:
            if what == "time":
                v = r.median_ms
                err = [[v - r.min_ms], [r.max_ms - v]]
                ax.bar(i, v, color=colour, yerr=err, capsize=3)
            else:
                v = r.peak_bytes / MIB
                ax.bar(i, v, color=colour)
                if r.case.floor_bytes:
                    ax.plot([i - 0.4, i + 0.4], [r.case.floor_bytes / MIB] * 2, color="k", lw=1, ls="--")
            vals.append(v)
        elif r is not None:  # placed in axes height, so it shows on log axes too
            from matplotlib.transforms import blended_transform_factory

            ax.text(
                i,
                0.03,
                "OOM" if r.status == "OOM" else r.status.split(":")[0],
                rotation=90,
                ha="center",
                va="bottom",
                fontsize=7,
                color=colour,
                transform=blended_transform_factory(ax.transData, ax.transAxes),
            )
    ax.set_xticks(range(len(providers)))
    ax.set_xticklabels(providers, rotation=30, ha="right", fontsize=7)
    return vals


def _lines(ax, rs_by_p: Dict[str, List[Result]], providers, what: str) -> List[float]:
    vals = []
    for p in providers:
        rs = sorted((r for r in rs_by_p.get(p, []) if r.ok), key=lambda r: r.case.x)
        colour = provider_colour(p)
        if what == "time":
            tr = [r for r in rs if r.median_ms is not None]
            if tr:
                med = [r.median_ms for r in tr]
                err = [[m - r.min_ms for m, r in zip(med, tr)], [r.max_ms - m for m, r in zip(med, tr)]]
                ax.errorbar([r.case.x for r in tr], med, yerr=err, marker="o", capsize=3, label=p, color=colour)
                vals += med
        else:
            mr = [r for r in rs if r.peak_bytes is not None]
            if mr:
                ys = [r.peak_bytes / MIB for r in mr]
                ax.plot([r.case.x for r in mr], ys, marker="o", label=p, color=colour)
                vals += ys
            for r in rs_by_p.get(p, []):
                if r.status == "OOM":
                    ax.annotate(
                        f"{p}: OOM", (r.case.x, 0), textcoords="offset points", xytext=(0, 5), fontsize=7, color=colour
                    )
    return vals


def plot(path: str, name: str, results: List[Result], x_label: str = "case.x") -> Optional[str]:
    """Time (median, min..max) and peak memory (dashed: the op's floor) per case group."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        print(f"[{name}] matplotlib not installed: no plot (pip install matplotlib)")
        return None
    groups = list(dict.fromkeys(r.case.group for r in results))
    providers = list(dict.fromkeys(r.provider for r in results))
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.8 * len(groups)), squeeze=False)
    for gi, g in enumerate(groups):
        rs_g = [r for r in results if r.case.group == g]
        xs = {r.case.x for r in rs_g}
        single = len({r.case.name for r in rs_g}) == 1 or len(xs) == 1
        by_p: Dict[str, List[Result]] = {}
        for r in rs_g:
            by_p.setdefault(r.provider, []).append(r)
        shown = [p for p in providers if p in by_p]
        for col, what in ((0, "time"), (1, "memory")):
            ax = axes[gi][col]
            vals = (_bars if single else _lines)(ax, by_p, shown, what)
            _log_if_spread(ax, vals)
            if not single:
                _log_if_spread(ax, list(xs), "x")
            ax.grid(alpha=0.3, which="both")
        case_label = f" ({rs_g[0].case.name})" if single else ""
        axes[gi][0].set_title(f"{name} {g}{case_label}: time", fontsize=8)
        axes[gi][0].set_ylabel("ms (median, min..max)")
        axes[gi][1].set_title(f"{name} {g}: peak memory beyond inputs (dashed: floor)", fontsize=8)
        axes[gi][1].set_ylabel("MiB")
        if not single:
            for ax in axes[gi]:
                ax.set_xlabel(x_label)
    handles = [Patch(color=provider_colour(p), label=p) for p in providers]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(providers), 8), fontsize=8, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (3.8 * len(groups))))  # room for the legend
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
