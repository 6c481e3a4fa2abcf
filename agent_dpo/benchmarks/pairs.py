"""`agent-dpo bench pairs`: is pair building linear? Simulated calls of the salon agent go into a real
SQLite store; then, in one run, pairing over the first tenth of the calls and over all of them is
timed (store reads excluded), and a full `trl-dpo` export of all of them. Last line: per-call build
time at N calls over per-call time at N/10 (1.00 = perfectly linear)."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

from agent_dpo.calls import Call, StoredEvent
from agent_dpo.events import Event, parse_event, subject_for


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pairs", help="pair building at N vs N/10 calls (linearity), and a full export",
                              description=__doc__)
    p.add_argument("--calls", type=int, default=100_000, help="calls to simulate (default 100000)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--no-export", action="store_true", help="skip the full export")
    p.set_defaults(func=run)


class _Timed:
    """Wraps the store's call iterator and adds up the time spent inside it (SQLite + call assembly),
    so the time outside it is pairing's own."""

    def __init__(self, calls: Iterable[Call]) -> None:
        self._it = iter(calls)
        self.seconds = 0.0
        self.count = 0

    def __iter__(self) -> Iterator[Call]:
        while True:
            t = time.perf_counter()
            try:
                call = next(self._it)
            except StopIteration:
                self.seconds += time.perf_counter() - t
                return
            self.seconds += time.perf_counter() - t
            self.count += 1
            yield call


def fill_store(store, n_calls: int, seed: int, batch: int = 5000) -> int:
    from agent_dpo.world.simulator import simulate

    events, seq = [], 0
    for env in simulate(n_calls, seed, ("salon-rebook",), duplicate_rate=0.0):
        seq += 1
        parsed = parse_event(subject_for(env["tenant_id"], env["agent_id"], env["type"]),
                             json.dumps(env, separators=(",", ":")).encode())
        if isinstance(parsed, Event):
            events.append(StoredEvent(parsed, seq))
        if len(events) >= batch:
            store.write_batch(events)
            events = []
    if events:
        store.write_batch(events)
    return seq


def run(args: argparse.Namespace) -> int:
    from agent_dpo.export import export_calls
    from agent_dpo.pairing import build_examples
    from agent_dpo.world.agents import AGENTS
    from agent_dpo_adapters.sqlite_store import SqliteStore

    agent = AGENTS["salon-rebook"]
    tenant, agent_id = agent.tenant_id, agent.agent_id
    n = max(args.calls, 10)
    with tempfile.TemporaryDirectory(prefix="agent-dpo-bench-pairs-") as tmp:
        store = SqliteStore(Path(tmp) / "store", synchronous="OFF")
        t = time.perf_counter()
        events = fill_store(store, n, args.seed)
        print(f"simulated {n} calls, {events} events into SQLite in {time.perf_counter() - t:.1f}s", flush=True)

        per_call = {}
        for size in (n // 10, n):
            timed = _Timed(islice(store.calls(tenant, agent_id), size))
            t = time.perf_counter()
            ex = build_examples(timed, tenant, agent_id)
            total = time.perf_counter() - t
            build = total - timed.seconds
            per_call[size] = build / timed.count
            signals = dict(sorted(ex.signal_counts().items()))
            print(f"build {timed.count:>7} calls: {build:7.2f}s pairing ({per_call[size] * 1e6:6.0f} us/call), "
                  f"{timed.seconds:7.2f}s store read+assembly; {len(ex.pairs)} pairs, {len(ex.kto)} KTO "
                  f"examples {signals}", flush=True)
        if not args.no_export:
            t = time.perf_counter()
            summary = export_calls(store.calls(tenant, agent_id), tenant, agent_id, "trl-dpo",
                                   Path(tmp) / "out.jsonl", split="train")
            size_mb = summary.out.stat().st_size / 1e6
            print(f"export trl-dpo (train) of {n} calls: {time.perf_counter() - t:.1f}s end to end, "
                  f"{summary.rows} rows, {size_mb:.0f} MB", flush=True)
        store.close()
    ratio = per_call[n] / per_call[n // 10]
    print(f"pairs: ratio {ratio:.2f} per-call pairing time at {n} vs {n // 10} calls (1.00 = linear)")
    return 0
