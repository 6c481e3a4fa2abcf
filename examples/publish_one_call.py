"""Publish one complete call (start, turns, a tool call, end, feedback) the way an agent runtime would,
with `EventPublisher`. Then `agent-dpo ingest --until-idle 2` and `agent-dpo status` show it stored.

    python examples/publish_one_call.py [--nats-url nats://127.0.0.1:4222] [--tenant acme-salons]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import uuid

import nats

from agent_dpo_adapters.nats_publisher import EventPublisher

BOOK_SLOT = {"type": "function", "function": {
    "name": "book_slot", "description": "Book an appointment slot.",
    "parameters": {"type": "object", "properties": {"date": {"type": "string"}, "time": {"type": "string"}},
                   "required": ["date", "time"], "additionalProperties": False}}}


async def publish_call(nats_url: str, tenant: str, agent: str) -> str:
    nc = await nats.connect(nats_url)
    try:
        pub = EventPublisher(nc.jetstream())
        call_id = f"call-{uuid.uuid4().hex[:8]}"

        async def send(event_type: str, data: dict) -> None:
            await pub.publish(tenant, agent, event_type, call_id, data)

        await send("call.started", {"system_prompt": "You book salon appointments. Be brief.",
                                    "tools": [BOOK_SLOT], "model": {"name": "salon-rebook", "version": "v1"},
                                    "channel": "voice", "locale": "en-GB"})
        await send("call.turn", {"turn": 0, "role": "user", "content": "Can I come in Tuesday at 2pm?",
                                 "asr_confidence": 0.93})
        await send("call.turn", {"turn": 1, "role": "assistant", "content": "Booking Tuesday 2pm for you."})
        await send("call.tool_call", {"turn": 1, "tool_call_id": "tc-1", "name": "book_slot",
                                      "arguments": json.dumps({"date": "2026-12-08", "time": "14:00"}),
                                      "result": {"booked": True}})
        await send("call.turn", {"turn": 2, "role": "user", "content": "Great, thanks!"})
        await send("call.turn", {"turn": 3, "role": "assistant", "content": "You're booked. See you Tuesday!"})
        await send("call.ended", {"outcome": "completed", "duration_s": 41.5})
        await send("feedback.thumbs", {"turn": 3, "up": True, "rater": "caller"})
        await send("feedback.csat", {"score": 5, "scale_max": 5, "source": "sms"})
        return call_id
    finally:
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats-url", default=os.environ.get("AGENT_DPO_NATS_URL", "nats://127.0.0.1:4222"))
    parser.add_argument("--tenant", default="acme-salons")
    parser.add_argument("--agent", default="salon-rebook")
    args = parser.parse_args()
    call_id = asyncio.run(publish_call(args.nats_url, args.tenant, args.agent))
    print(f"published call {call_id} for {args.tenant}/{args.agent} (9 events)")


if __name__ == "__main__":
    main()
