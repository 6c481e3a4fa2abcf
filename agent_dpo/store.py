"""The store port: where accepted events and dead letters land, and where calls are read back.
SQLite (adapters/sqlite_store.py) implements it by default; a server database can implement it too."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from agent_dpo.calls import Call, StoredEvent


@dataclass(frozen=True)
class DeadLetter:
    """A message that broke the contract: what came in, where it went, and why."""

    subject: str
    dlq_subject: str
    reason: str
    code: str
    stream_seq: int | None
    tenant_id: str | None
    agent_id: str | None
    payload_size: int


@dataclass(frozen=True)
class WriteResult:
    inserted: int  # new events
    duplicates: int  # events whose (tenant_id, event_id) was already stored
    dead_letters: int


@dataclass
class AgentStatus:
    tenant_id: str
    agent_id: str
    events: int = 0
    calls: int = 0
    complete_calls: int = 0
    feedback: dict[str, int] = field(default_factory=dict)  # by kind: csat, thumbs, preference, correction
    dead_letters: int = 0
    last_seq: int | None = None


class EventStore(Protocol):
    """Every write is one transaction; replaying the same events changes nothing."""

    def write_batch(self, events: Sequence[StoredEvent], dead_letters: Sequence[DeadLetter] = ()) -> WriteResult: ...

    def agents(self) -> list[tuple[str, str]]: ...

    def calls(self, tenant_id: str, agent_id: str, *, complete_only: bool = False) -> Iterator[Call]:
        """Assembled calls of one agent, in call_id order."""
        ...

    def call(self, tenant_id: str, agent_id: str, call_id: str) -> Call | None: ...

    def status(self) -> list[AgentStatus]: ...

    def event_range(self, tenant_id: str, agent_id: str) -> tuple[int, int] | None:
        """(lowest, highest) stream sequence of the agent's stored events."""
        ...

    def close(self) -> None: ...
