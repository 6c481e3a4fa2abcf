"""The run report: every chart is written, the page references only files that exist (it renders
offline), and headless Chromium shows it without console errors."""

import json
import re
from pathlib import Path

from agent_dpo.report import AgentFunnel, ArmPoint, EvalFigures, RunReport, TimelineEntry, write_report
from tests.browser import render


def sample_report(tmp_path: Path) -> RunReport:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"step": i, "loss": 0.69 - 0.01 * i, "rewards/margins": 0.02 * i})
                                 for i in range(20)))
    return RunReport(
        title="agent-dpo run", started_at="2026-12-04T20:00:00Z", wall_s=42.0, summary=["v1 promoted"],
        funnels=[AgentFunnel("acme/salon", 1000, 100, 98, {"preference": 10}, {"thumbs": 30},
                             {"invalid_chosen_tool_call": 2}, dead_letters=1)],
        tool_failures={"acme/salon": {"book_slot": (30, 3)}},
        training_metrics={"v1": metrics},
        evals={"acme/salon": [EvalFigures("base", 0.5, 0.5, (0.4, 0.6), None, 50, tool_calls_truncated=4),
                              EvalFigures("v1", 0.92, 0.8, (0.7, 0.88), 0.95, 50)]},
        arms=[ArmPoint(1.0, "v0", "champion", 10, 0.7, 0.2), ArmPoint(2.0, "v1", "challenger", 5, 0.8, 0.1)],
        timeline=[TimelineEntry(1.0, "acme/salon", "canary_start", "v1"),
                  TimelineEntry(3.0, "acme/salon", "promote", "v1")],
        stages=[("ingest", 1.5)])


def test_report_writes_every_chart_and_references_only_local_files(tmp_path):
    index = write_report(sample_report(tmp_path), tmp_path / "report")
    page = index.read_text()
    images = re.findall(r"<img src='([^']+)'", page)
    assert sorted(images) == sorted(["funnel.png", "tool_failures.png", "training.png", "eval.png",
                                     "canary.png", "timeline.png"])
    for name in images:
        assert (index.parent / name).stat().st_size > 5000, name
    assert "http://" not in page and "https://" not in page  # offline: no CDN
    assert json.loads((index.parent / "report.json").read_text())["title"] == "agent-dpo run"
    # A side whose every call hit the token limit reads as such, not as 0% valid.
    assert "n/a (4 cut off by the token limit)" in page


def test_report_without_figures_still_renders_a_page(tmp_path):
    index = write_report(RunReport(title="empty", started_at="now"), tmp_path / "report")
    assert "<img" not in index.read_text()


def test_report_renders_in_chromium_without_console_errors(tmp_path):
    index = write_report(sample_report(tmp_path), tmp_path / "report")
    shot = render(index, tmp_path / "report.png")
    assert shot.console == []
    assert shot.screenshot.stat().st_size > 50_000  # charts drawn, not a blank page
