"""`agent-dpo status [--json]`: what the store holds, per tenant and agent: events, calls, complete
calls, feedback by kind and dead letters. Reads the store only; does not need NATS."""

from __future__ import annotations

import argparse
import dataclasses
import json

from agent_dpo.cli.common import add_store_option, store_dir
from agent_dpo.errors import AgentDpoError

FEEDBACK_KINDS = ("csat", "thumbs", "preference", "correction")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("status", help="events, calls, feedback and dead letters per tenant/agent")
    add_store_option(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--dead-letters", type=count, default=5, metavar="N",
                   help="also list the N most recent dead letters with their reasons (default 5; 0: none)")
    p.set_defaults(func=run)


def count(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a count (0 or more)")
    return int(value)


def run(args: argparse.Namespace) -> int:
    from agent_dpo_adapters.sqlite_store import STORE_FILE, SqliteStore

    path = store_dir(args)
    if not (path / STORE_FILE).exists():
        raise AgentDpoError(f"no store at {path} (run `agent-dpo ingest --store {path}` first)")
    with SqliteStore(path) as store:
        rows = store.status()
        recent = store.dead_letters(limit=args.dead_letters) if args.dead_letters else []
    if args.json:
        print(json.dumps({"store": str(path), "agents": [dataclasses.asdict(r) for r in rows],
                          "recent_dead_letters": [dataclasses.asdict(d) for d in recent]}, indent=2))
        return 0
    print(render_table(rows))
    if recent:
        print("\nrecent dead letters (newest first; their bytes are in the dead-letter stream):")
        for d in recent:
            print(f"  seq {d.stream_seq}  {d.subject[:80]}  {d.reason[:160]}")
    return 0


def render_table(rows: list) -> str:
    header = ("tenant", "agent", "events", "calls", "complete", *FEEDBACK_KINDS, "dead_letters")
    table = [header] + [
        (r.tenant_id, r.agent_id, r.events, r.calls, r.complete_calls,
         *(r.feedback.get(k, 0) for k in FEEDBACK_KINDS), r.dead_letters) for r in rows]
    if not rows:
        return "store is empty: no events and no dead letters yet"
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]

    def line(row: tuple) -> str:
        return "  ".join(str(v).ljust(w) if i < 2 else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths)))

    return "\n".join([line(table[0]), *(line(r) for r in table[1:])])
