"""Side-by-side rating in the example world: simulated raters pick between a version's own answers
(`agent-dpo sample` output) and the picks go to NATS JetStream as `feedback.preference` events, the way a
platform's rating screen would publish them. The listener turns each into an on-policy DPO pair.

    agent-dpo sample --agent acme-salons/salon-rebook --version v1 --stage sft --data train.trl-dpo.jsonl \\
        --out candidates.jsonl
    python examples/side_by_side.py --candidates candidates.jsonl --agent acme-salons/salon-rebook \\
        --nats-url nats://127.0.0.1:4222
    agent-dpo ingest --until-idle 2
    agent-dpo pairs --agent acme-salons/salon-rebook --format trl-dpo --rater sbs-panel --signal schema_retry \\
        --out onpolicy.trl-dpo.jsonl

The calls the candidates answer must already be in the store (they came from its export)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import nats

from agent_dpo.cli.common import parse_agent
from agent_dpo.sampling import read_candidates
from agent_dpo.world.raters import SIDE_BY_SIDE_RATER, side_by_side_events
from agent_dpo_adapters.nats_publisher import EventPublisher


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", required=True, type=Path, help="JSONL written by `agent-dpo sample`")
    parser.add_argument("--agent", required=True, type=parse_agent, metavar="TENANT/AGENT")
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument("--seed", type=int, default=0, help="the raters' seed (default 0)")
    parser.add_argument("--noise", type=float, default=0.03, help="rater noise on the rubric score (default 0.03)")
    parser.add_argument("--margin", type=float, default=0.05,
                        help="raters pass when the best and worst candidate are within this (default 0.05)")
    parser.add_argument("--rater", default=SIDE_BY_SIDE_RATER, help=f"rater name on the events (default {SIDE_BY_SIDE_RATER})")
    parser.add_argument("--init-bus", action="store_true", help="create the event streams first (as `bus init`)")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    tenant, agent = args.agent
    envelopes, counts = side_by_side_events(tenant, agent, read_candidates(args.candidates), args.seed,
                                            noise=args.noise, margin=args.margin, rater=args.rater)
    async def quiet(_exc: Exception) -> None:  # a failed connect is reported once, by main, not per attempt
        pass

    nc = await nats.connect(args.nats_url, connect_timeout=5, max_reconnect_attempts=3, error_cb=quiet)
    try:
        js = nc.jetstream()
        if args.init_bus:
            from agent_dpo.config import BusConfig
            from agent_dpo_adapters.nats_bus import ensure_bus

            await ensure_bus(js, BusConfig())
        publisher = EventPublisher(js)
        for envelope in envelopes:
            await publisher.publish_envelope(envelope)
    finally:
        await nc.close()
    print(f"{counts['records']} prompts: {counts['rated']} rated -> feedback.preference published, "
          f"{counts['passed_as_equal']} passed (candidates about as good)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except (OSError, nats.errors.Error) as exc:
        print(f"side_by_side: cannot publish to {args.nats_url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
