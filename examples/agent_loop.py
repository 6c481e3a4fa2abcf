"""A minimal tool-calling agent loop, as a runtime would run one call: the model comes from agent-dpo's
gateway (pinned per call, hot-swapped between calls), every turn and tool call is published through
`EventPublisher`, and the call ends with the caller's CSAT. What agent-dpo learns from is exactly this.

    agent-dpo serve                                   # NATS + gateway on http://127.0.0.1:8080/v1
    python examples/agent_loop.py --nats-url nats://127.0.0.1:4222 --gateway http://127.0.0.1:8080/v1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.error
import urllib.request
import uuid

import nats
import nats.errors
import nats.js.errors
import openai
from openai import AsyncOpenAI

from agent_dpo_adapters.nats_publisher import EventPublisher

SYSTEM = "You book salon appointments. Use find_slots before offering times and book_slot to book. Be brief."
TOOLS = [
    {"type": "function", "function": {
        "name": "find_slots", "description": "Open slots on a day.",
        "parameters": {"type": "object", "properties": {"day": {"type": "string"}}, "required": ["day"],
                       "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "book_slot", "description": "Book one slot.",
        "parameters": {"type": "object", "properties": {"day": {"type": "string"}, "time": {"type": "string"}},
                       "required": ["day", "time"], "additionalProperties": False}}},
]
CALLER = ["Hi, can I get a haircut on Tuesday?", "2pm would be great.", "Thanks, bye!"]
MAX_MODEL_ROUNDS = 3  # per caller utterance: answer, or call tools and answer with their results


def run_tool(name: str, arguments: str) -> tuple[object | None, str | None]:
    """The runtime's own tools (here: a fake calendar). Returns (result, error)."""
    try:
        args = json.loads(arguments or "{}")
    except ValueError:
        return None, "arguments are not JSON"
    if name == "find_slots":
        return {"day": args.get("day"), "slots": ["10:00", "14:00", "16:30"]}, None
    if name == "book_slot":
        if not args.get("day") or not args.get("time"):
            return None, "day and time are required"
        return {"booked": True, "day": args["day"], "time": args["time"]}, None
    return None, f"unknown tool {name}"


def gateway_call(gateway: str, tenant: str, agent: str, call_id: str, method: str) -> dict:
    """Pin the call before its first turn (GET) to stamp call.started; DELETE hangs up."""
    req = urllib.request.Request(f"{gateway}/calls/{tenant}/{agent}/{call_id}", method=method)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


async def one_call(nats_url: str, gateway: str, tenant: str, agent: str, max_tokens: int) -> str:
    async def quiet(_exc: Exception) -> None:  # an unreachable server is reported once, by main()
        pass

    nc = await nats.connect(nats_url, connect_timeout=5, max_reconnect_attempts=2, reconnect_time_wait=0.5,
                            error_cb=quiet)
    client = AsyncOpenAI(base_url=gateway, api_key="not-needed-by-the-gateway", max_retries=1, timeout=120)
    pub = EventPublisher(nc.jetstream())
    call_id = f"call-{uuid.uuid4().hex[:12]}"

    async def emit(event_type: str, data: dict) -> None:
        await pub.publish(tenant, agent, event_type, call_id, data)

    try:
        pinned = await asyncio.to_thread(gateway_call, gateway, tenant, agent, call_id, "GET")
        await emit("call.started", {"system_prompt": SYSTEM, "tools": TOOLS, "model": pinned["model"],
                                    "channel": "chat", "locale": "en-US"})
        messages: list[dict] = [{"role": "system", "content": SYSTEM}]
        turn = 0
        for utterance in CALLER:
            await emit("call.turn", {"turn": turn, "role": "user", "content": utterance})
            messages.append({"role": "user", "content": utterance})
            turn += 1
            for _ in range(MAX_MODEL_ROUNDS):
                response = await client.chat.completions.create(
                    model=f"{tenant}/{agent}", messages=messages, tools=TOOLS, max_tokens=max_tokens,
                    extra_headers={"X-Call-Id": call_id})
                answer = response.choices[0].message
                await emit("call.turn", {"turn": turn, "role": "assistant", "content": answer.content or ""})
                messages.append(answer.model_dump(exclude_none=True))
                if not answer.tool_calls:
                    turn += 1
                    break
                for tc in answer.tool_calls:  # run each tool, publish it, hand the result back
                    result, error = run_tool(tc.function.name, tc.function.arguments)
                    await emit("call.tool_call", {"turn": turn, "tool_call_id": tc.id, "name": tc.function.name,
                                                  "arguments": tc.function.arguments,
                                                  **({"error": error} if error else {"result": result})})
                    messages.append({"role": "tool", "tool_call_id": tc.id,
                                     "content": json.dumps(result if error is None else {"error": error})})
                turn += 1
        await emit("call.ended", {"outcome": "completed", "duration_s": 42.0})
        await emit("feedback.csat", {"score": 4, "scale_max": 5, "source": "sms"})
        print(f"call {call_id}: {turn} turns served by {pinned['model'].get('version', 'base')} "
              f"({pinned['arm']}); events published")
    finally:
        try:
            await asyncio.to_thread(gateway_call, gateway, tenant, agent, call_id, "DELETE")
        except (OSError, urllib.error.URLError):
            pass
        await client.close()
        await nc.close()
    return call_id


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument("--gateway", default="http://127.0.0.1:8080/v1", help="the gateway's /v1 URL")
    parser.add_argument("--agent", default="acme-salons/salon-rebook", help="TENANT/AGENT")
    parser.add_argument("--calls", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    tenant, _, agent = args.agent.partition("/")
    try:
        for _ in range(args.calls):
            asyncio.run(one_call(args.nats_url, args.gateway, tenant, agent, args.max_tokens))
    except (urllib.error.URLError, openai.APIConnectionError):
        print(f"agent_loop: no gateway at {args.gateway} (start `agent-dpo serve`)", file=sys.stderr)
        return 1
    except (OSError, nats.errors.NoServersError):
        print(f"agent_loop: cannot reach NATS at {args.nats_url}", file=sys.stderr)
        return 1
    except nats.js.errors.NoStreamResponseError:
        print("agent_loop: no event stream on this server (run `agent-dpo bus init`)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
