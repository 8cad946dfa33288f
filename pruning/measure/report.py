"""Run reports: the MAC-vs-revision and accuracy-vs-MACs plots, and markdown tables."""
from __future__ import annotations

import io
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def mac_plot_png(revisions: Sequence[int], macs: Sequence[float | None], in_band: Sequence[bool],
                 target: float, lower: float, upper: float, title: str = "") -> bytes:
    """PNG bytes: achieved MACs per revision against the target and the asymmetric band."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    ax.axhspan(lower / 1e9, upper / 1e9, color="tab:green", alpha=0.15, label="tolerance band")
    ax.axhline(target / 1e9, color="tab:green", lw=1.2, label="target")
    xs = [r for r, m in zip(revisions, macs) if m is not None]
    ys = [m / 1e9 for m in macs if m is not None]
    ok = [b for b, m in zip(in_band, macs) if m is not None]
    ax.plot(xs, ys, color="0.6", lw=0.8, zorder=1)
    ax.scatter([x for x, b in zip(xs, ok) if b], [y for y, b in zip(ys, ok) if b], color="tab:blue",
               label="in band", zorder=2)
    ax.scatter([x for x, b in zip(xs, ok) if not b], [y for y, b in zip(ys, ok) if not b], color="tab:red",
               marker="x", label="out of band", zorder=2)
    ax.set_xlabel("revision")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(fig, ax, "G MACs", title or "MACs per revision")


def accuracy_plot_png(macs: Sequence[float | None], accuracy: Sequence[float | None], labels: Sequence[str],
                      target: float, lower: float, upper: float, baseline: float | None = None,
                      title: str = "") -> bytes:
    """PNG bytes: validation accuracy after inline fine-tuning vs MACs of every fine-tuned candidate."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    ax.axvspan(lower / 1e9, upper / 1e9, color="tab:green", alpha=0.15, label="tolerance band")
    ax.axvline(target / 1e9, color="tab:green", lw=1.2, label="target")
    pts = [(m / 1e9, a * 100, s) for m, a, s in zip(macs, accuracy, labels) if m is not None and a is not None]
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", zorder=2, label="candidates")
    for x, y, s in pts:
        ax.annotate(s, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if baseline is not None:
        ax.axhline(baseline * 100, color="0.4", ls="--", lw=1, label="original")
    ax.set_xlabel("G MACs")
    return _png(fig, ax, "val accuracy after inline FT (%)", title or "accuracy vs MACs")


def _png(fig, ax, ylabel: str, title: str) -> bytes:
    """Label, legend and render a figure to PNG bytes (and free it)."""
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A GitHub-style markdown table from dict rows."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)
