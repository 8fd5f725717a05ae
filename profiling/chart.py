"""PNG chart of a bench result: throughput side by side, and where each step's time goes."""
from __future__ import annotations

from typing import Any, Dict

from .ranges import PHASES

_COLORS = {"engine": "#1f77b4", "variant": "#ff7f0e", "reference": "#b0b0b0"}


def bench_chart(report: Dict[str, Any], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    sides = [s for s in ("engine", "variant", "reference") if s in report["sides"]]
    fig, (ax_tp, ax_ph) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 2]})

    values = [report["sides"][s]["images_per_s"] for s in sides]
    bars = ax_tp.bar(sides, values, color=[_COLORS[s] for s in sides])
    for bar, side in zip(bars, sides):
        mfu = report["sides"][side].get("mfu")
        label = f"{bar.get_height():.4g}" + (f"\nMFU {100 * mfu:.1f}%" if mfu is not None else "")
        ax_tp.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=9)
    ax_tp.set_ylabel("images / s")
    title = "throughput"
    if report.get("speedup"):
        title += f" (speedup {report['speedup']:.2f}x)"
    ax_tp.set_title(title)
    ax_tp.margins(y=0.25)

    # Stacked horizontal bars: mean ms per step in each phase, the rest as "other".
    names = [p for p in PHASES if any(p in report["sides"][s].get("phases", {}) for s in sides)] + ["other"]
    cmap = plt.get_cmap("tab10")
    for row, side in enumerate(sides):
        info = report["sides"][side]
        left = 0.0
        for k, name in enumerate(names):
            ms = info.get("phase_other_ms", 0.0) if name == "other" else info.get("phases", {}).get(name, {}).get("ms_per_step", 0.0)
            ms = max(ms or 0.0, 0.0)
            ax_ph.barh(row, ms, left=left, color=cmap(k % 10), label=name if row == 0 else None)
            left += ms
    ax_ph.set_yticks(range(len(sides)), sides)
    ax_ph.set_xlabel("ms per step")
    ax_ph.set_title("per-phase breakdown")
    ax_ph.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=min(len(names), 5), fontsize=8)

    dev = report["meta"]["device"]["name"]
    fig.suptitle(f"flashdino bench: {report['config']['label']} on {dev}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
