"""Call assembly: the events of one call, arriving in any order, late or twice, become one `Call`.
Stores hand events here; pairing and status read the assembled calls and never raw events."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agent_dpo.events import (
    CallEnded,
    CallStarted,
    CallToolCall,
    CallTurn,
    Event,
    FeedbackCorrection,
    FeedbackCsat,
    FeedbackPreference,
    FeedbackThumbs,
)


@dataclass(frozen=True)
class StoredEvent:
    """An accepted event as a store keeps it: `seq` is the bus order (JetStream stream sequence)."""

    event: Event
    seq: int


@dataclass(frozen=True)
class ToolCallRecord:
    turn: int
    tool_call_id: str
    name: str
    arguments: str
    result: Any
    has_result: bool  # `result` was present in the event (it may legitimately be null)
    error: str | None
    event_id: str
    seq: int


@dataclass(frozen=True)
class TurnRecord:
    turn: int
    role: str
    content: str
    asr_confidence: float | None
    interrupted: bool | None
    event_id: str
    ts: datetime


@dataclass(frozen=True)
class FeedbackRecord:
    kind: str  # "csat", "thumbs", "preference", "correction"
    data: FeedbackCsat | FeedbackThumbs | FeedbackPreference | FeedbackCorrection
    event_id: str
    ts: datetime
    seq: int


@dataclass
class Call:
    tenant_id: str
    agent_id: str
    call_id: str
    started: CallStarted | None = None
    ended: CallEnded | None = None
    turns: dict[int, TurnRecord] = field(default_factory=dict)
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    feedback: list[FeedbackRecord] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)
    first_seq: int | None = None
    last_seq: int | None = None
    # Turn numbers that arrived twice with different content under different event ids.
    conflicting_turns: set[int] = field(default_factory=set)

    @property
    def complete(self) -> bool:
        """A call is complete for training once `call.ended` has arrived."""
        return self.ended is not None

    @property
    def tools(self) -> list[dict[str, Any]]:
        return [t.model_dump(exclude_none=True) for t in self.started.tools] if self.started else []

    def ordered_turns(self) -> list[TurnRecord]:
        return [self.turns[k] for k in sorted(self.turns)]

    def tool_calls_of(self, turn: int) -> list[ToolCallRecord]:
        return [tc for tc in self.tool_calls if tc.turn == turn]

    def feedback_of(self, kind: str) -> list[FeedbackRecord]:
        return [f for f in self.feedback if f.kind == kind]

    @property
    def served_version(self) -> str | None:
        return self.started.model.version if self.started else None


def assemble_call(events: Iterable[StoredEvent]) -> Call:
    """Fold one call's events into a `Call`. The result does not depend on arrival order:
    events are applied in (ts, event_id) order, and tool calls keep their bus order."""
    ordered = sorted(events, key=lambda s: (s.event.ts, s.event.event_id))
    if not ordered:
        raise ValueError("a call needs at least one event")
    first = ordered[0].event
    call = Call(first.tenant_id, first.agent_id, first.call_id)
    seen: set[str] = set()
    for stored in ordered:
        ev = stored.event
        if ev.event_id in seen:
            continue  # idempotent on event_id
        seen.add(ev.event_id)
        call.event_ids.append(ev.event_id)
        call.first_seq = stored.seq if call.first_seq is None else min(call.first_seq, stored.seq)
        call.last_seq = stored.seq if call.last_seq is None else max(call.last_seq, stored.seq)
        _apply(call, ev, stored.seq)
    call.tool_calls.sort(key=lambda tc: (tc.turn, tc.seq, tc.event_id))
    call.feedback.sort(key=lambda f: (f.ts, f.event_id))
    return call


def _apply(call: Call, ev: Event, seq: int) -> None:
    data = ev.data
    if isinstance(data, CallStarted):
        call.started = call.started or data  # the earliest call.started wins
    elif isinstance(data, CallEnded):
        call.ended = call.ended or data
    elif isinstance(data, CallTurn):
        record = TurnRecord(data.turn, data.role, data.content, data.asr_confidence, data.interrupted,
                            ev.event_id, ev.ts)
        existing = call.turns.get(data.turn)
        if existing is None:
            call.turns[data.turn] = record
        elif (existing.role, existing.content) != (record.role, record.content):
            call.conflicting_turns.add(data.turn)  # keep the earliest; pairing drops such turns
    elif isinstance(data, CallToolCall):
        call.tool_calls.append(ToolCallRecord(
            data.turn, data.tool_call_id, data.name, data.arguments, data.result,
            "result" in data.model_fields_set, data.error, ev.event_id, seq))
    else:
        kind = ev.type.split(".", 1)[1]
        call.feedback.append(FeedbackRecord(kind, data, ev.event_id, ev.ts, seq))
