"""`agent-dpo bench NAME`: the project's benchmarks. Every module in agent_dpo/benchmarks/ that defines
`register(subparsers)` adds one NAME; each measures side by side in one run and prints a ratio last."""

from __future__ import annotations

import argparse
import importlib
import pkgutil

import agent_dpo.benchmarks
from agent_dpo.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="run a benchmark (ingest, toolcheck, dpo, swap, ...)")
    sub = p.add_subparsers(dest="bench_name", metavar="NAME", parser_class=type(p))
    for info in sorted(pkgutil.iter_modules(agent_dpo.benchmarks.__path__), key=lambda m: m.name):
        try:
            module = importlib.import_module(f"agent_dpo.benchmarks.{info.name}")
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] in ("agent_dpo", "agent_dpo_adapters"):
                raise
            continue  # an optional dependency (e.g. the training extra) is not installed here
        if hasattr(module, "register"):
            module.register(sub)
    p.set_defaults(func=run_missing)


def run_missing(_args: argparse.Namespace) -> int:
    raise UsageError("bench needs a NAME (see agent-dpo bench --help)")
