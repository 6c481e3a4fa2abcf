"""Calls for pairing and export tests, built the way production builds them: envelope dicts are
serialized, parsed by the real event parser, and assembled by `assemble_call`."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from agent_dpo.calls import Call, StoredEvent, assemble_call
from agent_dpo.events import Event, build_envelope, parse_event, subject_for
from agent_dpo.toolcheck import catalog_dir, load_tool_catalog

SALON_TOOLS = load_tool_catalog(catalog_dir() / "salon-rebook")
SYSTEM = "You are the booking assistant of Bella Salon. Offer concrete slots politely."

FIND_SLOTS_OK = {"service": "haircut", "date_from": "2026-12-08", "date_to": None, "time_of_day": "afternoon",
                 "stylist_id": None, "location_id": "loc-downtown", "max_results": 3}
FIND_SLOTS_BAD = {**FIND_SLOTS_OK, "date_from": "next tuesday"}  # violates the date pattern
BOOK_OK = {"slot_id": "slot-0a1b2c3d", "service": "haircut",
           "customer": {"name": "Ana Ruiz", "phone": "+14155550123", "email": "ana@example.com",
                        "returning": True},
           "notes": None, "send_confirmation": "sms"}


def args(value: dict) -> str:
    return json.dumps(value)


def assistant(content: str | None, *calls: tuple[str, str]) -> dict[str, Any]:
    """A feedback Message: `calls` are (name, arguments text)."""
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        msg["tool_calls"] = [{"id": f"tc-{i}", "type": "function", "function": {"name": n, "arguments": a}}
                             for i, (n, a) in enumerate(calls)]
    return msg


class CallBuilder:
    """Collects one call's envelopes; `call()` parses and assembles them."""

    def __init__(self, call_id: str = "call-1", tenant: str = "acme-salons", agent: str = "salon-rebook",
                 tools: list[dict] | None = None, system: str = SYSTEM) -> None:
        self.call_id, self.tenant, self.agent = call_id, tenant, agent
        self.envelopes: list[dict[str, Any]] = []
        self._t0 = datetime(2026, 12, 4, 19, 0, tzinfo=UTC)
        self._n = 0
        self.tools = SALON_TOOLS if tools is None else tools
        self.system = system

    def event(self, event_type: str, data: dict[str, Any], event_id: str | None = None) -> str:
        self._n += 1
        ts = (self._t0 + timedelta(seconds=self._n)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        event_id = event_id or f"{self.call_id}-e{self._n}"
        self.envelopes.append(build_envelope(event_id=event_id, event_type=event_type, tenant_id=self.tenant,
                                             agent_id=self.agent, call_id=self.call_id, data=data, ts=ts))
        return event_id

    def started(self) -> CallBuilder:
        self.event("call.started", {"system_prompt": self.system, "tools": self.tools,
                                    "model": {"name": "smollm2-135m", "version": "v1"}, "channel": "voice"})
        return self

    def user(self, turn: int, content: str) -> CallBuilder:
        self.event("call.turn", {"turn": turn, "role": "user", "content": content, "asr_confidence": 0.93})
        return self

    def assistant(self, turn: int, content: str, *calls: tuple[str, str], result: Any = "ok") -> CallBuilder:
        self.event("call.turn", {"turn": turn, "role": "assistant", "content": content})
        for i, (name, arguments) in enumerate(calls):
            self.event("call.tool_call", {"turn": turn, "tool_call_id": f"t{turn}-{i}", "name": name,
                                          "arguments": arguments, "result": result})
        return self

    def ended(self, outcome: str = "completed") -> CallBuilder:
        self.event("call.ended", {"outcome": outcome, "duration_s": 42.0})
        return self

    def csat(self, score: float, scale_max: float = 5, source: str = "survey") -> CallBuilder:
        self.event("feedback.csat", {"score": score, "scale_max": scale_max, "source": source})
        return self

    def thumbs(self, turn: int, up: bool, rater: str = "caller") -> CallBuilder:
        self.event("feedback.thumbs", {"turn": turn, "up": up, "rater": rater})
        return self

    def preference(self, turn: int, chosen: dict, rejected: dict, rater: str = "csm") -> CallBuilder:
        self.event("feedback.preference", {"turn": turn, "chosen": chosen, "rejected": rejected, "rater": rater})
        return self

    def correction(self, turn: int, corrected: dict, rater: str = "csm") -> CallBuilder:
        self.event("feedback.correction", {"turn": turn, "corrected": corrected, "rater": rater})
        return self

    def basic(self) -> CallBuilder:
        """started, user 0, assistant 1 (find_slots), user 2, assistant 3 (text), ended."""
        return (self.started().user(0, "Hi, I need a haircut next Tuesday afternoon.")
                .assistant(1, "Let me look.", ("find_slots", args(FIND_SLOTS_OK)),
                           result={"slots": [{"slot_id": "slot-0a1b2c3d", "start": "14:00"}]})
                .user(2, "2pm is great.")
                .assistant(3, "Booked you for Tuesday at 2pm. See you then!"))

    def stored(self, first_seq: int = 1) -> list[StoredEvent]:
        out = []
        for i, env in enumerate(self.envelopes):
            subject = subject_for(env["tenant_id"], env["agent_id"], env["type"])
            parsed = parse_event(subject, json.dumps(env).encode())
            assert isinstance(parsed, Event), parsed
            out.append(StoredEvent(parsed, first_seq + i))
        return out

    def call(self, first_seq: int = 1) -> Call:
        return assemble_call(self.stored(first_seq))


def sqlite_store_with(path, *builders: CallBuilder):
    """A real SQLite store holding the builders' events, with increasing stream sequences."""
    from agent_dpo_adapters.sqlite_store import SqliteStore

    store = SqliteStore(path)
    seq = 1
    for builder in builders:
        events = builder.stored(seq)
        seq += len(events)
        store.write_batch(events)
    return store
