"""The run report: what the demo (or an operator's run) did, as `report/index.html` plus PNG charts.
Takes plain figures gathered along the loop; renders offline (no CDN, no script needed)."""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class AgentFunnel:
    agent: str  # tenant/agent
    events: int
    calls: int
    complete_calls: int
    pairs_by_signal: dict[str, int]
    kto_by_signal: dict[str, int]
    drops_by_reason: dict[str, int]
    dead_letters: int = 0


@dataclass
class EvalFigures:
    label: str  # e.g. "SFT base", "tuned v1"
    preference_accuracy: float | None
    win_rate: float | None
    win_rate_ci: tuple[float, float] | None
    tool_call_validity: float | None
    n: int = 0
    tool_calls_truncated: int = 0  # calls the generation limit cut off: not counted in tool_call_validity


@dataclass
class TimelineEntry:
    t: float  # seconds since the run started
    agent: str
    action: str  # e.g. "canary_step", "promote", "rollback", "swap"
    version: str | None
    detail: str = ""


@dataclass
class ArmPoint:
    t: float
    version: str
    arm: str  # "champion" or "challenger"
    calls: int
    csat_mean: float | None
    thumbs_down_rate: float | None


@dataclass
class RunReport:
    title: str
    started_at: str
    wall_s: float = 0.0
    summary: list[str] = field(default_factory=list)
    funnels: list[AgentFunnel] = field(default_factory=list)
    tool_failures: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)  # agent -> tool -> (calls, failures)
    training_metrics: dict[str, Path] = field(default_factory=dict)  # version -> metrics.jsonl
    evals: dict[str, list[EvalFigures]] = field(default_factory=dict)  # agent -> [before, after...]
    arms: list[ArmPoint] = field(default_factory=list)
    timeline: list[TimelineEntry] = field(default_factory=list)
    stages: list[tuple[str, float]] = field(default_factory=list)  # (stage, seconds)


def write_report(report: RunReport, out_dir: Path) -> Path:
    """Write index.html, the PNGs and report.json under `out_dir`; returns the index path."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str, str]] = []  # (png name, heading, caption)
    for name, heading, caption, draw in _charts(report):
        if draw(out_dir / name):
            figures.append((name, heading, caption))
    (out_dir / "report.json").write_text(json.dumps(asdict(report), default=str, indent=2))
    index = out_dir / "index.html"
    index.write_text(_html(report, figures))
    return index


def _charts(report: RunReport):
    yield ("funnel.png", "Data funnel", "Events to calls to training examples, and what was dropped why.",
           lambda p: _funnel_chart(report, p))
    yield ("tool_failures.png", "Tool-call failure rate by tool",
           "Share of recorded tool calls that failed their JSON Schema, by agent and tool.",
           lambda p: _tool_chart(report, p))
    yield ("training.png", "Training curves", "DPO loss and reward margin per step, per trained version.",
           lambda p: _training_chart(report, p))
    yield ("eval.png", "Held-out evaluation", "Preference accuracy and judge win rate (95% interval) before and after tuning.",
           lambda p: _eval_chart(report, p))
    yield ("canary.png", "Canary arms", "Live CSAT and thumbs-down rate of champion and challenger over the canary.",
           lambda p: _canary_chart(report, p))
    yield ("timeline.png", "Rollout timeline", "Canary steps, promotions, rollbacks and swaps as they happened.",
           lambda p: _timeline_chart(report, p))


def _plt():
    import matplotlib.pyplot as plt

    return plt


def _funnel_chart(report: RunReport, path: Path) -> bool:
    if not report.funnels:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(report.funnels), figsize=(6.5 * len(report.funnels), 4.8), squeeze=False)
    for ax, f in zip(axes[0], report.funnels):
        labels = ["events", "calls", "complete calls"]
        values = [f.events, f.calls, f.complete_calls]
        colors = ["#4c72b0"] * 3
        for sig, n in sorted(f.pairs_by_signal.items()):
            labels.append(f"pairs: {sig}")
            values.append(n)
            colors.append("#55a868")
        for sig, n in sorted(f.kto_by_signal.items()):
            labels.append(f"KTO: {sig}")
            values.append(n)
            colors.append("#8172b2")
        for reason, n in sorted(f.drops_by_reason.items(), key=lambda kv: -kv[1])[:6]:
            labels.append(f"dropped: {reason}")
            values.append(n)
            colors.append("#c44e52")
        if f.dead_letters:
            labels.append("dead letters")
            values.append(f.dead_letters)
            colors.append("#dd8452")
        y = list(range(len(labels)))[::-1]
        ax.barh(y, values, color=colors)
        ax.set_yticks(y, labels, fontsize=8)
        ax.set_xscale("symlog")
        for yi, v in zip(y, values):
            ax.text(v, yi, f" {v:,}", va="center", fontsize=7)
        ax.set_title(f.agent, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _tool_chart(report: RunReport, path: Path) -> bool:
    rows = [(f"{agent.split('/')[-1]}: {tool}", calls, fails)
            for agent, tools in report.tool_failures.items() for tool, (calls, fails) in sorted(tools.items())]
    if not rows:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.2))
    y = list(range(len(rows)))[::-1]
    rates = [100.0 * f / c if c else 0.0 for _, c, f in rows]
    ax.barh(y, rates, color="#c44e52")
    ax.set_yticks(y, [r[0] for r in rows], fontsize=8)
    ax.set_xlabel("failed tool calls (%)")
    for yi, rate, (_, c, f) in zip(y, rates, rows):
        ax.text(rate, yi, f" {f}/{c}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _preference_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The DPO/KTO phase of a run that also logged SFT steps (each phase counts its own steps)."""
    preference = [r for r in rows if r.get("phase") in ("dpo", "kto")]
    return preference or rows


def _training_chart(report: RunReport, path: Path) -> bool:
    series = {v: _preference_rows(_read_metrics(p)) for v, p in report.training_metrics.items()}
    series = {v: rows for v, rows in series.items() if rows}
    if not series:
        return False
    plt = _plt()
    fig, (ax_loss, ax_margin) = plt.subplots(1, 2, figsize=(11, 3.8))
    for version, rows in series.items():
        steps = [r.get("step", i) for i, r in enumerate(rows)]
        ax_loss.plot(steps, [r.get("loss") for r in rows], label=version)
        margins = [r.get("rewards/margins") for r in rows]
        if any(m is not None for m in margins):
            ax_margin.plot(steps, margins, label=version)
    ax_loss.set_title("loss")
    ax_margin.set_title("reward margin (chosen - rejected)")
    for ax in (ax_loss, ax_margin):
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _eval_chart(report: RunReport, path: Path) -> bool:
    items = [(agent, e) for agent, evals in report.evals.items() for e in evals]
    if not items:
        return False
    plt = _plt()
    fig, (ax_acc, ax_win) = plt.subplots(1, 2, figsize=(11, 3.8))
    labels = [f"{agent.split('/')[-1]}\n{e.label}" for agent, e in items]
    x = list(range(len(items)))
    ax_acc.bar(x, [e.preference_accuracy or 0.0 for _, e in items], color="#4c72b0")
    ax_acc.set_xticks(x, labels, fontsize=8)
    ax_acc.set_ylim(0, 1)
    ax_acc.set_title("held-out preference accuracy")
    wins = [e.win_rate if e.win_rate is not None else 0.0 for _, e in items]
    err_lo = [w - (e.win_rate_ci[0] if e.win_rate_ci else w) for w, (_, e) in zip(wins, items)]
    err_hi = [(e.win_rate_ci[1] if e.win_rate_ci else w) - w for w, (_, e) in zip(wins, items)]
    ax_win.bar(x, wins, yerr=[err_lo, err_hi], capsize=4, color="#55a868")
    ax_win.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax_win.set_xticks(x, labels, fontsize=8)
    ax_win.set_ylim(0, 1)
    ax_win.set_title("judge win rate vs baseline")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _canary_chart(report: RunReport, path: Path) -> bool:
    if not report.arms:
        return False
    plt = _plt()
    fig, (ax_csat, ax_thumbs) = plt.subplots(1, 2, figsize=(11, 3.8))
    for version in sorted({p.version for p in report.arms}):
        points = [p for p in report.arms if p.version == version]
        arm = points[-1].arm
        ax_csat.plot([p.t for p in points], [p.csat_mean for p in points], marker="o", label=f"{version} ({arm})")
        ax_thumbs.plot([p.t for p in points], [p.thumbs_down_rate for p in points], marker="o",
                       label=f"{version} ({arm})")
    ax_csat.set_title("CSAT mean (0-1)")
    ax_thumbs.set_title("thumbs-down rate")
    for ax in (ax_csat, ax_thumbs):
        ax.set_xlabel("seconds into the run")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


_ACTION_COLORS = {"promote": "#55a868", "rollback": "#c44e52", "canary_step": "#4c72b0",
                  "canary_start": "#8172b2", "swap": "#dd8452", "hold": "#999999"}


def _timeline_chart(report: RunReport, path: Path) -> bool:
    if not report.timeline:
        return False
    plt = _plt()
    agents = sorted({e.agent for e in report.timeline})
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.9 * len(agents)))
    for e in report.timeline:
        y = agents.index(e.agent)
        ax.scatter([e.t], [y], color=_ACTION_COLORS.get(e.action, "#333333"), s=60, zorder=3)
        ax.annotate(f"{e.action} {e.version or ''}", (e.t, y), textcoords="offset points", xytext=(0, 8),
                    fontsize=7, rotation=30)
    ax.set_yticks(range(len(agents)), agents, fontsize=8)
    ax.set_ylim(-0.5, len(agents) - 0.3)
    ax.set_xlabel("seconds into the run")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
h1{font-size:1.6rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;font-size:.85rem}td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:left}
th{background:#f4f4f4}img{max-width:100%;border:1px solid #eee}.summary li{margin:.2rem 0}
.caption{color:#666;font-size:.85rem}
"""


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, tuple):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _validity_cell(validity: float | None, truncated: int) -> Any:
    if not truncated:
        return validity
    return f"{'n/a' if validity is None else _fmt(validity)} ({truncated} cut off by the token limit)"


def _html(report: RunReport, figures: list[tuple[str, str, str]]) -> str:
    parts = [(f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(report.title)}</title>"
              f"<style>{_CSS}</style></head><body>"),
             f"<h1>{html.escape(report.title)}</h1>",
             f"<p class='caption'>Started {html.escape(report.started_at)}; wall time {report.wall_s:.0f} s.</p>"]
    if report.summary:
        parts.append("<h2>Summary</h2><ul class='summary'>"
                     + "".join(f"<li>{html.escape(s)}</li>" for s in report.summary) + "</ul>")
    for name, heading, caption in figures:
        parts.append(f"<h2>{html.escape(heading)}</h2><p class='caption'>{html.escape(caption)}</p>"
                     f"<img src='{name}' alt='{html.escape(heading)}'>")
    if report.evals:
        rows = [[agent, e.label, e.n, e.preference_accuracy, e.win_rate, e.win_rate_ci,
                 _validity_cell(e.tool_call_validity, e.tool_calls_truncated)]
                for agent, evals in report.evals.items() for e in evals]
        parts.append("<h2>Evaluation figures</h2>" + _table(
            ["agent", "model", "n", "preference accuracy", "win rate", "95% interval", "tool-call validity"], rows))
    if report.timeline:
        rows = [[f"{e.t:.1f}", e.agent, e.action, e.version, e.detail] for e in report.timeline]
        parts.append("<h2>Rollout decisions</h2>" + _table(["t (s)", "agent", "action", "version", "detail"], rows))
    if report.stages:
        parts.append("<h2>Stages</h2>" + _table(["stage", "seconds"], [[s, f"{t:.1f}"] for s, t in report.stages]))
    parts.append("</body></html>")
    return "\n".join(parts)
