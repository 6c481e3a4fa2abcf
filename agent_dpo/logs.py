"""Structured logging for every process: structlog, JSON or console, with context bound at the
edge (tenant_id, agent_id, call_id, event_id) and secrets scrubbed before anything is written."""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

import structlog

_SECRET_KEY = re.compile(r"(token|password|passwd|secret|api[_-]?key|authorization|seed|credential)", re.IGNORECASE)
REDACTED = "[REDACTED]"


def scrub_secrets(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop the values of keys that name a secret, at any depth of dicts in the event."""
    return {k: _scrub(k, v) for k, v in event_dict.items()}


def _scrub(key: str, value: Any) -> Any:
    if isinstance(key, str) and _SECRET_KEY.search(key) and key != "event":
        return REDACTED
    if isinstance(value, dict):
        return {k: _scrub(k, v) for k, v in value.items()}
    return value


def configure_logging(fmt: str | None = None, level: str | None = None) -> None:
    fmt = fmt or os.environ.get("AGENT_DPO_LOG_FORMAT") or ("console" if sys.stderr.isatty() else "json")
    level_name = (level or os.environ.get("AGENT_DPO_LOG_LEVEL") or "info").upper()
    level_no = logging.getLevelName(level_name)
    if not isinstance(level_no, int):
        level_no = logging.INFO
    renderer = (structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()) if fmt == "console"
                else structlog.processors.JSONRenderer())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            scrub_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        # Look sys.stderr up per logger, not once: tests and embedders swap it after configuring.
        logger_factory=lambda *_args: structlog.PrintLogger(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound: Any) -> structlog.typing.FilteringBoundLogger:
    # A lazy proxy: a module-level logger made at import still follows configure_logging() called
    # later (an eager .bind() would freeze structlog's defaults, which print to stdout).
    return structlog.get_logger(**bound)
