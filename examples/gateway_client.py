"""Point the `openai` client at agent-dpo's gateway: `model` is TENANT/AGENT and the `X-Call-Id` header
names the call, so every request of one call is answered by the same version (a promote or rollback
applies to new calls only). `X-Call-Ended: true` on the call's last request releases its pin.

    agent-dpo serve                       # the gateway listens on http://127.0.0.1:8080/v1
    python examples/gateway_client.py --gateway http://127.0.0.1:8080/v1 --agent acme-salons/salon-rebook
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

import openai
from openai import AsyncOpenAI


async def one_call(gateway: str, agent: str, max_tokens: int) -> list[str]:
    client = AsyncOpenAI(base_url=gateway, api_key="not-needed-by-the-gateway", max_retries=1, timeout=120)
    call_id = f"call-{uuid.uuid4().hex[:12]}"
    messages = [{"role": "system", "content": "You book salon appointments. Be brief."},
                {"role": "user", "content": "Hi, can I get a haircut on Tuesday afternoon?"}]
    served = []
    try:
        for last, follow_up in ((False, "Is 2pm possible?"), (True, None)):
            headers = {"X-Call-Id": call_id, **({"X-Call-Ended": "true"} if last else {})}
            raw = await client.chat.completions.with_raw_response.create(
                model=agent, messages=messages, max_tokens=max_tokens, extra_headers=headers)
            answer = raw.parse().choices[0].message
            version = raw.headers.get("x-model-version", "?")
            served.append(version)
            print(f"[{call_id} served by {version}] {answer.content!r}")
            messages.append({"role": "assistant", "content": answer.content or ""})
            if follow_up:
                messages.append({"role": "user", "content": follow_up})
    finally:
        await client.close()
    return served


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", default="http://127.0.0.1:8080/v1", help="the gateway's /v1 URL")
    parser.add_argument("--agent", default="acme-salons/salon-rebook", help="TENANT/AGENT (the model name)")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    try:
        served = asyncio.run(one_call(args.gateway, args.agent, args.max_tokens))
    except openai.APIConnectionError:
        print(f"gateway_client: no gateway at {args.gateway} (start `agent-dpo serve`)", file=sys.stderr)
        return 1
    except openai.APIStatusError as exc:
        print(f"gateway_client: {exc.status_code} {exc.message}", file=sys.stderr)
        return 1
    # Both requests of the call were answered by the same version: the pin holds for the whole call.
    print(f"one call, {len(served)} requests, {len(set(served))} version(s): {served[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
