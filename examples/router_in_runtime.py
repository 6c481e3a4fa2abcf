"""Use `agent_dpo.router.Router` inside an agent runtime that serves its own models (vLLM, OpenAI, ...):
resolve at call start (a dict lookup, never a network wait), stamp `call.started` with what serves the
call so outcomes attribute to versions and canary arms, call that model for every turn, and release the
pin at hang-up. Promotions, canaries and rollbacks reach new calls with no restart.

    python examples/router_in_runtime.py --nats-url nats://127.0.0.1:4222 --calls 20
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections import Counter

import nats
import nats.errors
import nats.js.errors

from agent_dpo.errors import AgentDpoError
from agent_dpo.logs import configure_logging
from agent_dpo.router import Router, stamp_call_started
from agent_dpo_adapters.nats_publisher import EventPublisher

SYSTEM = "You book salon appointments. Be brief."


async def run_calls(url: str, tenant: str, agent: str, calls: int, base_model: str) -> Counter:
    # The router keeps its own connection (it re-reads rollouts after reconnects); the runtime's
    # publisher may share one or use its own, as here.
    router = await Router.connect(url, base_model=base_model)
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=2, reconnect_time_wait=0.5)
    pub = EventPublisher(nc.jetstream())
    served: Counter = Counter()
    try:
        for _ in range(calls):
            call_id = f"call-{uuid.uuid4().hex[:12]}"
            ref = router.resolve(tenant, agent, call_id)  # pinned for the whole call
            started = stamp_call_started({"system_prompt": SYSTEM, "tools": [], "channel": "chat",
                                          "model": {"name": "my-runtime-default"}}, ref)
            await pub.publish(tenant, agent, "call.started", call_id, started)
            await pub.publish(tenant, agent, "call.turn", call_id,
                              {"turn": 0, "role": "user", "content": "Can I come in on Friday?"})
            # Here the runtime calls its model: ref.serve_name on ref.backend (a vLLM LoRA name, an
            # OpenAI ft: id, or the base model), for every turn of this call.
            answer = f"(answer from {ref.serve_name})"
            await pub.publish(tenant, agent, "call.turn", call_id, {"turn": 1, "role": "assistant", "content": answer})
            await pub.publish(tenant, agent, "call.ended", call_id, {"outcome": "completed", "duration_s": 30.0})
            assert router.resolve(tenant, agent, call_id) == ref  # still the same model at hang-up
            router.release(call_id, tenant, agent)
            served[f"{ref.version or 'base'} ({ref.arm})"] += 1
    finally:
        await nc.close()
        await router.stop()
    return served


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument("--agent", default="acme-salons/salon-rebook", help="TENANT/AGENT")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--base-model", default="smollm2-135m-instruct",
                        help="what serves an agent with no trained version yet")
    args = parser.parse_args()
    tenant, _, agent = args.agent.partition("/")
    configure_logging(level="warning")  # the router's log lines go to stderr; stdout keeps the summary
    try:
        served = asyncio.run(run_calls(args.nats_url, tenant, agent, args.calls, args.base_model))
    except AgentDpoError as exc:
        print(f"router_in_runtime: {exc}", file=sys.stderr)
        return 1
    except nats.js.errors.NoStreamResponseError:
        print("router_in_runtime: no event stream on this server (run `agent-dpo bus init`)", file=sys.stderr)
        return 1
    print(f"{sum(served.values())} calls published; served by " + ", ".join(f"{k}: {n}" for k, n in sorted(served.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
