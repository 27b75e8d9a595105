"""The gamma sweep's accuracy-vs-speed plot (matplotlib, imported only when a plot is asked for)."""
from __future__ import annotations

from dllm_trt.runtime.config import ModelError


def plot_sweep(summaries, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ModelError("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    elastic = [s for s in summaries if s.label.startswith("elastic") and not s.label.endswith("(calibrated)")]
    ax.plot([s.tokens_per_second for s in elastic], [100 * s.accuracy for s in elastic], "o-", label="Elastic-Cache")
    for s in elastic:
        ax.annotate(s.label.split()[-1], (s.tokens_per_second, 100 * s.accuracy), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    for s in summaries:
        if s.label.startswith("elastic") and s.label.endswith("(calibrated)"):
            ax.plot([s.tokens_per_second], [100 * s.accuracy], "*", markersize=14, label=f"calibrated (gamma "
                    f"{s.label.split()[2]})")
    for s, marker in zip([s for s in summaries if not s.label.startswith("elastic")], "s^Dv"):
        ax.plot([s.tokens_per_second], [100 * s.accuracy], marker, label=s.label)
    ax.set_xlabel("tokens/s (generated tokens up to the end token)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("gamma sweep: accuracy vs speed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
