"""Per-step training metrics: one JSON line per logged step in `metrics.jsonl` (phase, step, loss,
rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, kl for KTO, ...) and a PNG plot
of them, so a run can be watched while it goes and compared afterwards."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

PLOTTED = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "kl")


class MetricsLog:
    """Appends step records to a JSONL file (flushed per line: a crash keeps what was logged) and
    forwards each record to the run's progress callback."""

    def __init__(self, path: Path, on_progress: Callable[[dict], None] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("", encoding="utf-8")
        self._on_progress = on_progress

    def record(self, phase: str, step: int, values: dict[str, Any], **context: Any) -> dict:
        row = {"phase": phase, "step": int(step)}
        row.update({k: _number(v) for k, v in values.items() if _number(v) is not None})
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self._on_progress:
            self._on_progress({**row, **context})
        return row


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_metrics(metrics_file: Path, plot_file: Path, title: str = "") -> Path | None:
    """One panel per metric that was logged, one line per phase; None when nothing was logged."""
    rows = read_metrics(metrics_file)
    keys = [k for k in PLOTTED if any(k in r for r in rows)]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    phases = list(dict.fromkeys(r["phase"] for r in rows))
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=False, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        for phase in phases:
            points = [(r["step"], r[key]) for r in rows if r["phase"] == phase and key in r]
            if points:
                ax.plot(*zip(*points), marker=".", label=phase)
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[-1, 0].set_xlabel("step")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    plot_file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot_file, dpi=90)
    plt.close(fig)
    return plot_file


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
