"""Draw latency vs tokens from a bench results dict. In: the JSON dict. Out: a PNG, log-log axes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_latency"]


def plot_latency(results: dict[str, Any], path: Path) -> Path:
    """One line per mode (median ms), a band up to p90, a dotted line at the largest bucket."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for mode in results["config"]["modes"]:
        rows = sorted((r for r in results["results"] if r["mode"] == mode), key=lambda r: r["tokens"])
        if not rows:
            continue
        tokens = [r["tokens"] for r in rows]
        line, = ax.plot(tokens, [r["median_ms"] for r in rows], marker="o", markersize=3, label=mode)
        ax.fill_between(tokens, [r["median_ms"] for r in rows], [r["p90_ms"] for r in rows],
                        color=line.get_color(), alpha=0.15, linewidth=0)
    largest = results["config"]["buckets"][-1]
    ax.axvline(largest, color="grey", linestyle=":", linewidth=1, label=f"largest bucket ({largest})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(results["config"]["tokens"], [str(t) for t in results["config"]["tokens"]])  # 1, 2, 4, not 2^k
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("tokens per call (T)")
    ax.set_ylabel("latency per call, ms (median; band to p90)")
    ax.set_title(f"{results['device']} · torch {results['torch']} · {results['commit']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
