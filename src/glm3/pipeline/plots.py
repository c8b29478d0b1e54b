"""The pipeline's plots as PNG images: the training loss curve and C-Eval accuracy per category.

DVC's own plots are Vega-Lite specs that its HTML page renders with a script fetched from the internet, so
offline they are blank. Images drawn here with matplotlib (Agg, no display) are what `dvc plots show` embeds
as they are, and what a user can open directly. Same data, same bytes: no timestamps in the files.
"""

from __future__ import annotations

import csv

from glm3.io import atomic_file

# PNG text chunks matplotlib would add: its version only, so the bytes depend on the data and the version.
_METADATA = {"Software": None}


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # a Figure without pyplot: no global state, nothing shown

    return Figure(figsize=(width, height), dpi=100)


def _save(fig, path: str) -> str:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", metadata=_METADATA)
    return path


def loss_curve(log_tsv: str, path: str) -> str:
    """The loss per step of a train_log.tsv (step, loss, ... columns) as a line plot at `path`."""
    with open(log_tsv, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    steps = [int(r["step"]) for r in rows]
    losses = [float(r["loss"]) for r in rows]
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot()
    ax.plot(steps, losses, marker="." if len(steps) <= 60 else None, linewidth=1.2, color="#1f77b4")
    ax.set(xlabel="step", ylabel="loss", title="training loss")
    ax.grid(alpha=0.3)
    if not steps:
        ax.text(0.5, 0.5, "no steps logged", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return _save(fig, path)


def category_bars(accuracy: dict[str, float], path: str, title: str = "C-Eval accuracy per category") -> str:
    """Horizontal bars of {category: accuracy in %} at `path`."""
    names = list(accuracy)
    fig = _figure(6.4, 0.5 + 0.45 * max(1, len(names)))
    ax = fig.add_subplot()
    ax.barh(names, [accuracy[n] for n in names], color="#4c72b0")
    for i, name in enumerate(names):
        ax.text(accuracy[name] + 1, i, f"{accuracy[name]:.1f}", va="center", fontsize=8)
    ax.set(xlim=(0, 100), xlabel="accuracy (%)", title=title)
    ax.invert_yaxis()
    fig.tight_layout()
    return _save(fig, path)


__all__ = ["category_bars", "loss_curve"]
