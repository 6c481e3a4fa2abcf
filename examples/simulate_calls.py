"""Publish simulated calls of the example agents to NATS JetStream, the way an agent runtime would:
through the runtime publisher (`EventPublisher`), one acknowledged message per event, with
`Nats-Msg-Id` set. Deterministic for a seed; prints event counts by type.

    python examples/simulate_calls.py --calls 2000 --seed 7 --nats-url nats://127.0.0.1:4222
    python examples/simulate_calls.py --calls 50 --agent acme-salons/salon-rebook --malformed 3 --init-bus

The stream must exist (`agent-dpo bus init`, or `--init-bus` here)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import nats

from agent_dpo.world.agents import AGENTS, example_agent
from agent_dpo.world.simulator import publish_world
from agent_dpo_adapters.nats_publisher import EventPublisher


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="how many calls to simulate (default 200)")
    parser.add_argument("--seed", type=int, default=7, help="the world's seed (default 7)")
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument("--agent", action="append", metavar="TENANT/AGENT",
                        help="only this agent (repeatable); default all: "
                             + ", ".join(a.key for a in AGENTS.values()))
    parser.add_argument("--malformed", type=int, default=0,
                        help="mix in this many contract-breaking messages (dead-letter demo)")
    parser.add_argument("--duplicate-rate", type=float, default=0.004, help="share of events re-sent (default 0.004)")
    parser.add_argument("--init-bus", action="store_true", help="create the event streams first (as `bus init`)")
    args = parser.parse_args(argv)
    try:
        args.agents = tuple(example_agent(a).agent_id for a in (args.agent or AGENTS))
    except KeyError as exc:
        parser.error(str(exc.args[0]))
    if args.calls < 0 or args.malformed < 0:
        parser.error("--calls and --malformed must not be negative")
    return args


async def run(args: argparse.Namespace) -> int:
    async def quiet(_exc: Exception) -> None:  # a failed connect is reported once, below, not per attempt
        pass

    nc = await nats.connect(args.nats_url, connect_timeout=5, max_reconnect_attempts=3, error_cb=quiet)
    try:
        js = nc.jetstream()
        if args.init_bus:
            from agent_dpo.config import BusConfig
            from agent_dpo_adapters.nats_bus import ensure_bus

            await ensure_bus(js, BusConfig())
        started = time.perf_counter()
        counts = await publish_world(EventPublisher(js), args.calls, args.seed, args.agents,
                                     malformed=args.malformed, duplicate_rate=args.duplicate_rate)
        seconds = time.perf_counter() - started
    finally:
        await nc.close()
    print(f"published {counts['events']} events of {args.calls} calls in {seconds:.1f}s "
          f"({counts['events'] / max(seconds, 1e-9):.0f} events/s)")
    for key in sorted(k for k in counts if "." in k):
        print(f"  {key:22} {counts[key]:>8}")
    print(f"  {'duplicates (re-sent)':22} {counts['duplicates']:>8}")
    print(f"  {'malformed':22} {counts['malformed']:>8}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except (OSError, nats.errors.Error) as exc:
        print(f"error: cannot publish to {args.nats_url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
