"""`agent-dpo tools check PATH...`: lint tool definitions (files or folders of JSON) before an
agent offers them; exit 1 when any definition is invalid, `--json` for scripts.
`agent-dpo tools stats`: how the recorded tool calls in the store fare, per agent and tool."""

from __future__ import annotations

import argparse
import json
import sys

from agent_dpo.cli.common import add_store_option, parse_agent, store_dir
from agent_dpo.errors import AgentDpoError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tools", help="check tool definitions and recorded tool calls")
    verbs = parser.add_subparsers(dest="tools_verb", metavar="SUBVERB", required=True,
                                  parser_class=type(parser))
    check = verbs.add_parser(
        "check", help="validate tool definitions: JSON Schema validity, names, OpenAI strict mode",
        description="Each definition's parameters must be a valid JSON Schema (by its $schema, default "
                    "2020-12) and its name must match ^[a-zA-Z0-9_-]{1,64}$ and be unique. What OpenAI "
                    "strict mode would refuse is an error for tools marked strict, a warning otherwise. "
                    "Exit 1 when anything is invalid.")
    check.add_argument("paths", nargs="+", metavar="PATH", help="a tool JSON file or a folder of them")
    check.add_argument("--json", action="store_true", help="print findings and a summary as one JSON object")
    check.set_defaults(func=run_check)

    stats = verbs.add_parser(
        "stats", help="recorded tool calls per agent and tool: calls, failures, top failure reasons",
        description="Checks every tool call in the store against the tools its call offered.")
    add_store_option(stats)
    stats.add_argument("--agent", type=parse_agent, action="append", metavar="TENANT/AGENT",
                       help="only this agent (repeatable; default every agent in the store)")
    stats.add_argument("--top", type=int, default=3, help="failure reasons to list per tool (default 3)")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.set_defaults(func=run_stats)


def run_check(args: argparse.Namespace) -> int:
    from agent_dpo.toollint import lint_paths

    report = lint_paths(args.paths)
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for finding in report.findings:
            print(finding.line())
        print(f"checked {report.tools} tools in {report.files} files: "
              f"{report.errors} errors, {report.warnings} warnings")
    return 0 if report.ok else 1


def run_stats(args: argparse.Namespace) -> int:
    from agent_dpo.toolcheck import store_tool_stats
    from agent_dpo_adapters.sqlite_store import STORE_FILE, SqliteStore

    path = store_dir(args)
    if not (path / STORE_FILE).exists():
        raise AgentDpoError(f"no store at {path} (run `agent-dpo ingest --store {path}` first)")
    with SqliteStore(path) as store:
        rows = store_tool_stats(store, args.agent).rows(top=args.top)
    if args.json:
        print(json.dumps({"store": str(path), "tools": rows}, indent=2))
    elif not rows:
        print("no recorded tool calls")
    else:
        print(render_stats(rows))
    return 0


def render_stats(rows: list[dict]) -> str:
    header = ("tenant", "agent", "tool", "calls", "failures", "rate", "top failure reasons")
    table = [header] + [
        (r["tenant_id"], r["agent_id"], r["tool"], r["calls"], r["failures"], f"{r['failure_rate']:.1%}",
         "; ".join(f"{reason} ({n})" for reason, n in r["top_reasons"]) or "-") for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header) - 1)]

    def line(row: tuple) -> str:
        cells = [str(v).rjust(w) if 3 <= i <= 5 else str(v).ljust(w) for i, (v, w) in enumerate(zip(row, widths))]
        return "  ".join([*cells, str(row[-1])])

    return "\n".join(line(r) for r in table)


run = run_check
