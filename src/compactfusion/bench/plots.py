"""Plot and table helpers shared by the benchmarks (matplotlib, Agg backend; nothing interactive)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def md_table(header: list, rows: Iterable[list]) -> str:
    """A GitHub-flavoured Markdown table (cells are str()-ed; '|' escaped)."""
    def cell(x):
        return str(x).replace("|", "\\|")
    out = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(out)


def fmt_bytes(x: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g} {unit}"
    return f"{x:.0f} B"


def _save(fig, path: Path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return str(path)


def grouped_bars(path, groups: list, series: list, value: Callable, ylabel: str, title: str, logy=False) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups)), 4))
    width = 0.8 / max(1, len(series))
    for i, s in enumerate(series):
        xs, ys = [], []
        for j, g in enumerate(groups):
            v = value(g, s)
            if v is not None and v > 0:
                xs.append(j + (i - (len(series) - 1) / 2) * width)
                ys.append(v)
        ax.bar(xs, ys, width, label=str(s))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([str(g) for g in groups], rotation=15, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def lines(path, series: dict, xlabel: str, ylabel: str, title: str, logx=False, logy=False, hline=None,
          markers=True) -> str:
    """series: label -> [(x, y), ...]. hline: (y, label) reference line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in series.items():
        pts = [(x, y) for x, y in pts if y is not None and math.isfinite(y)]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if markers else None, ms=3, label=label)
    if hline is not None:
        ax.axhline(hline[0], color="k", ls="--", lw=1, label=hline[1])
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)


def pareto(path, points: list[dict], x: str, y: str, label: str, xlabel: str, ylabel: str, title: str,
           group: str | None = None) -> str:
    """Scatter of points (dicts) with log x, the upper-left Pareto front drawn, every point labelled."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 6.5))
    pts = [p for p in points if p.get(x) and p.get(y) is not None and math.isfinite(p[y]) and p[x] > 0]
    groups = list(dict.fromkeys(p.get(group, "") for p in pts)) if group else [""]
    for g in groups:
        sel = [p for p in pts if not group or p.get(group, "") == g]
        ax.scatter([p[x] for p in sel], [p[y] for p in sel], s=18, label=str(g) if group else None)
    for p in pts:
        ax.annotate(str(p[label]), (p[x], p[y]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    front, best = [], -math.inf
    for p in sorted(pts, key=lambda p: p[x]):
        if p[y] > best:
            front.append(p)
            best = p[y]
    if len(front) > 1:
        ax.plot([p[x] for p in front], [p[y] for p in front], "k--", lw=0.8, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)


def image_grid(path, rows: list[tuple[str, list]], col_labels: list[str] | None = None, title: str = "") -> str:
    """rows: (label, [H x W (x1) arrays in [0, 1]]); one row per method."""
    import numpy as np
    plt = _plt()
    n_rows, n_cols = len(rows), max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(0.75 * n_cols + 1.6, 0.75 * n_rows + 0.4), squeeze=False)
    for i, (label, imgs) in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(imgs):
                a = np.asarray(imgs[j], dtype=np.float32)
                ax.imshow(a[..., 0] if a.ndim == 3 else a, cmap="gray", vmin=0, vmax=1)
            if j == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
            if i == 0 and col_labels and j < len(col_labels):
                ax.set_title(col_labels[j], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def panels(path, panels: dict, xlabel: str, ylabel: str, title: str, logy=False) -> str:
    """One subplot per entry: title -> {label: [(x, y), ...]}; the same label gets the same colour everywhere."""
    plt = _plt()
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False, sharey=True)
    colors: dict = {}
    for ax, (ptitle, series) in zip(axes[0], panels.items()):
        for label, pts in series.items():
            pts = [(x, y) for x, y in pts if y is not None and math.isfinite(y) and (y > 0 or not logy)]
            if not pts:
                continue
            line, = ax.plot(*zip(*pts), marker="o", ms=3, label=label, color=colors.get(label))
            colors.setdefault(label, line.get_color())
        ax.set_title(ptitle, fontsize=9)
        ax.set_xlabel(xlabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel(ylabel)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
