"""The pure half of ingest: one fetched batch of bus messages becomes accepted events (for the store)
and rejections (for the dead-letter stream). adapters/nats_bus.py does the I/O around it."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent_dpo.calls import StoredEvent
from agent_dpo.events import (
    DEFAULT_SUBJECT_PREFIX,
    DLQ_PREFIX,
    DLQ_UNKNOWN,
    Event,
    Rejection,
    parse_event,
    parse_subject,
)
from agent_dpo.store import DeadLetter

# Headers on a dead letter, next to the original bytes.
REASON_HEADER = "Agent-Dpo-Reason"
SUBJECT_HEADER = "Agent-Dpo-Subject"
SEQ_HEADER = "Agent-Dpo-Stream-Seq"
CODE_HEADER = "Agent-Dpo-Code"

# Not a contract violation: the message was fine but could not be stored within max-deliver attempts.
STORE_FAILED = "store_failed"
MAX_DELIVERIES = "max_deliveries"


@dataclass(slots=True)
class Incoming:
    """What ingest needs of one bus message; `index` points back to the transport's message.
    (Not frozen: frozen dataclasses are slow to build, and ingest builds tens of thousands a second.)"""

    index: int
    subject: str
    payload: bytes
    stream_seq: int
    num_delivered: int = 1


@dataclass(frozen=True)
class Rejected:
    incoming: Incoming
    rejection: Rejection

    def dead_letter(self) -> DeadLetter:
        return DeadLetter(
            subject=self.incoming.subject, dlq_subject=self.rejection.dlq_subject,
            reason=self.rejection.reason, code=self.rejection.code, stream_seq=self.incoming.stream_seq,
            tenant_id=self.rejection.tenant_id, agent_id=self.rejection.agent_id,
            payload_size=len(self.incoming.payload))

    def headers(self) -> dict[str, str]:
        return dead_letter_headers(self.incoming, self.rejection)


@dataclass
class Triage:
    accepted: list[tuple[Incoming, StoredEvent]] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def events(self) -> list[StoredEvent]:
        return [s for _, s in self.accepted]


def triage(batch: list[Incoming], prefix: str = DEFAULT_SUBJECT_PREFIX) -> Triage:
    """Validate every message of a batch; never raises on bad input."""
    out = Triage()
    for item in batch:
        result = parse_event(item.subject, item.payload, prefix)
        if isinstance(result, Event):
            out.accepted.append((item, StoredEvent(result, item.stream_seq)))
        else:
            out.rejected.append(Rejected(item, result))
    return out


def store_failure(item: Incoming, event: Event, error: BaseException) -> Rejected:
    """A valid event the store kept refusing until its last delivery: dead-lettered with the error."""
    detail = f"{type(error).__name__}: {error}"[:900]
    rejection = Rejection(STORE_FAILED, f"not stored after {item.num_delivered} deliveries: {detail}",
                          tenant_id=event.tenant_id, agent_id=event.agent_id)
    return Rejected(item, rejection)


def undeliverable(item: Incoming, prefix: str = DEFAULT_SUBJECT_PREFIX) -> Rejected:
    """A message JetStream gave up on (max deliveries) without it being stored or dead-lettered,
    e.g. because the ingest process died on each delivery."""
    parsed = parse_subject(item.subject, prefix)
    rejection = Rejection(MAX_DELIVERIES, f"delivered {item.num_delivered} times without being stored",
                          tenant_id=parsed.tenant_id if parsed else None,
                          agent_id=parsed.agent_id if parsed else None)
    return Rejected(item, rejection)


def dead_letter_headers(item: Incoming, rejection: Rejection) -> dict[str, str]:
    # Header values must be one line of ASCII for NATS.
    def clean(text: str) -> str:
        return "".join(c if " " <= c <= "~" else "?" for c in text)

    return {
        REASON_HEADER: clean(rejection.reason),
        CODE_HEADER: rejection.code,
        SUBJECT_HEADER: clean(item.subject)[:1024],
        SEQ_HEADER: str(item.stream_seq),
    }


def dead_letter_msg_id(stream: str, stream_seq: int) -> str:
    """Nats-Msg-Id of a dead letter: replaying the same stream message after a crash is de-duplicated."""
    return f"agentdpo-dlq-{stream}-{stream_seq}"


__all__ = [
    "DLQ_PREFIX",
    "DLQ_UNKNOWN",
    "Incoming",
    "Rejected",
    "Triage",
    "dead_letter_headers",
    "dead_letter_msg_id",
    "store_failure",
    "triage",
    "undeliverable",
]
