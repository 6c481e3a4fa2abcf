"""The runtime side of the contract: a voice or chat agent runtime publishes its call events with
this helper. It builds v1 envelopes and publishes to JetStream with `Nats-Msg-Id` for de-duplication."""

from __future__ import annotations

import itertools
import json
import uuid
from typing import Any

from nats.js.client import JetStreamContext

from agent_dpo.events import DEFAULT_SUBJECT_PREFIX, build_envelope, subject_for


class EventPublisher:
    """Publish one call's events, or many calls', for one or more agents.

    `await pub.publish("acme", "salon-rebook", "call.turn", "call-42", {"turn": 0, ...})` returns the
    event id. Acknowledged by JetStream before it returns, so an event is either stored or raises."""

    def __init__(self, js: JetStreamContext, prefix: str = DEFAULT_SUBJECT_PREFIX, timeout: float = 10.0):
        self._js = js
        self._prefix = prefix
        self._timeout = timeout
        self._counter = itertools.count()
        self._run = uuid.uuid4().hex[:12]

    def new_event_id(self) -> str:
        return f"evt-{self._run}-{next(self._counter)}"

    async def publish(self, tenant_id: str, agent_id: str, event_type: str, call_id: str,
                      data: dict[str, Any], *, event_id: str | None = None, ts: str | None = None) -> str:
        event_id = event_id or self.new_event_id()
        envelope = build_envelope(event_id=event_id, event_type=event_type, tenant_id=tenant_id,
                                  agent_id=agent_id, call_id=call_id, data=data, ts=ts)
        await self.publish_envelope(envelope)
        return event_id

    async def publish_envelope(self, envelope: dict[str, Any]) -> None:
        subject = subject_for(envelope["tenant_id"], envelope["agent_id"], envelope["type"], self._prefix)
        payload = json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode()
        await self._js.publish(subject, payload, timeout=self._timeout,
                               headers={"Nats-Msg-Id": envelope["event_id"]})
