"""`agent-dpo tools check PATH...`: lint tool definitions (files or folders of JSON) before an
agent offers them; exit 1 when any definition is invalid, `--json` for scripts."""

from __future__ import annotations

import argparse
import json
import sys


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


run = run_check
