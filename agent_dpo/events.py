"""The event contract v1 (shared/spec/events-v1.md) as pydantic models: bytes from the bus come in,
a typed `Event` or a `Rejection` with a precise reason comes out. Nothing else parses events."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCHEMA_V1 = "agent-dpo.event.v1"
DEFAULT_SUBJECT_PREFIX = "agents"
MAX_PAYLOAD_BYTES = 1024 * 1024
DLQ_PREFIX = "agentdpo.dlq"
DLQ_UNKNOWN = f"{DLQ_PREFIX}._unknown"

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PRINTABLE_ASCII = r"^[\x20-\x7e]{1,128}$"
# RFC 3339 date-time with a zone (Z or +hh:mm); fractional seconds optional.
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")

TenantId = Annotated[str, Field(pattern=ID_PATTERN.pattern)]
PrintableId = Annotated[str, Field(pattern=_PRINTABLE_ASCII)]
TurnIndex = Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    # strict: "3" is not a number and 1 is not a bool; unknown keys inside data are kept (forward compatible).
    model_config = ConfigDict(strict=True, extra="allow", frozen=True, allow_inf_nan=False)


# ---- messages and tools ---------------------------------------------------------------------------

class FunctionCall(_Strict):
    name: str = Field(min_length=1)
    arguments: str  # the JSON text exactly as the model produced it; may be invalid JSON


class ToolCall(_Strict):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    """An assistant message in OpenAI chat shape; `content` may be null only when tool calls exist."""

    role: Literal["assistant"]
    content: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_validator(mode="after")
    def _content_or_calls(self) -> Message:
        if self.content is None and not self.tool_calls:
            raise ValueError("content is null and there are no tool_calls")
        return self


class FunctionDef(_Strict):
    name: str = Field(min_length=1)
    description: str
    parameters: dict[str, Any]
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class ModelRef(_Strict):
    name: str = Field(min_length=1)
    version: str | None = None


# ---- data of each type ----------------------------------------------------------------------------

class CallStarted(_Strict):
    system_prompt: str
    tools: list[Tool]
    model: ModelRef
    channel: Literal["voice", "chat", "sms"]
    locale: str | None = None


class CallTurn(_Strict):
    turn: TurnIndex
    role: Literal["user", "assistant"]
    content: str
    asr_confidence: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    interrupted: bool | None = None


class CallToolCall(_Strict):
    turn: TurnIndex
    tool_call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    result: Any = None
    error: str | None = None


class CallEnded(_Strict):
    outcome: Literal["completed", "transferred", "escalated", "abandoned", "failed"]
    duration_s: Annotated[float, Field(ge=0.0)] | None = None


class FeedbackCsat(_Strict):
    score: float
    scale_max: Annotated[float, Field(gt=0.0)]
    source: Literal["survey", "sms", "ivr", "csm"]
    comment: str | None = None

    @model_validator(mode="after")
    def _in_scale(self) -> FeedbackCsat:
        if not 0.0 <= self.score <= self.scale_max:
            raise ValueError(f"score {self.score} is outside 0..scale_max ({self.scale_max})")
        return self


class FeedbackThumbs(_Strict):
    turn: TurnIndex
    up: bool
    rater: Literal["caller", "csm", "judge"]
    comment: str | None = None


# The contract names `rater` for preferences and corrections without listing values: any short label.
Rater = Annotated[str, Field(min_length=1, max_length=64)]


class FeedbackPreference(_Strict):
    turn: TurnIndex
    chosen: Message
    rejected: Message
    rater: Rater
    reason: str | None = None


class FeedbackCorrection(_Strict):
    turn: TurnIndex
    corrected: Message
    rater: Rater


DATA_MODELS: dict[str, type[_Strict]] = {
    "call.started": CallStarted,
    "call.turn": CallTurn,
    "call.tool_call": CallToolCall,
    "call.ended": CallEnded,
    "feedback.csat": FeedbackCsat,
    "feedback.thumbs": FeedbackThumbs,
    "feedback.preference": FeedbackPreference,
    "feedback.correction": FeedbackCorrection,
}
EVENT_TYPES = tuple(DATA_MODELS)
FEEDBACK_TYPES = tuple(t for t in EVENT_TYPES if t.startswith("feedback."))


class Envelope(BaseModel):
    # Unknown top-level keys are ignored (forward compatible), unlike `data` they are not kept.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    schema_: Literal["agent-dpo.event.v1"] = Field(alias="schema")
    event_id: PrintableId
    type: str
    tenant_id: TenantId
    agent_id: TenantId
    call_id: PrintableId
    ts: str
    data: dict[str, Any]

    @field_validator("ts")
    @classmethod
    def _rfc3339(cls, value: str) -> str:
        if not _RFC3339.match(value):
            raise ValueError("not an RFC 3339 date-time with a zone")
        try:
            datetime.fromisoformat(value.replace("z", "Z"))
        except ValueError as exc:
            raise ValueError(f"not a valid date-time: {exc}") from None
        return value


# ---- results of parsing ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Subject:
    tenant_id: str
    agent_id: str
    type: str


@dataclass(frozen=True)
class Event:
    """One accepted event: the envelope's fields, its typed data, and the original bytes."""

    event_id: str
    type: str
    tenant_id: str
    agent_id: str
    call_id: str
    ts: datetime
    ts_text: str
    data: Any  # the DATA_MODELS instance for `type`
    payload: bytes

    @property
    def subject_suffix(self) -> str:
        return f"{self.tenant_id}.{self.agent_id}.{self.type}"


# Rejection codes, stable for dashboards and tests; the detail says exactly what was wrong.
REASONS = (
    "payload_too_large", "invalid_utf8", "invalid_json", "not_an_object", "bad_subject",
    "unknown_schema", "unknown_type", "invalid_envelope", "subject_mismatch", "invalid_data",
)


@dataclass(frozen=True)
class Rejection:
    code: str
    detail: str
    tenant_id: str | None = None  # from the subject when it parses: where the dead letter goes
    agent_id: str | None = None

    @property
    def reason(self) -> str:
        """The `Agent-Dpo-Reason` header value."""
        return f"{self.code}: {self.detail}"[:1024]

    @property
    def dlq_subject(self) -> str:
        if self.tenant_id and self.agent_id:
            return f"{DLQ_PREFIX}.{self.tenant_id}.{self.agent_id}"
        return DLQ_UNKNOWN


def subject_for(tenant_id: str, agent_id: str, event_type: str, prefix: str = DEFAULT_SUBJECT_PREFIX) -> str:
    return f"{prefix}.{tenant_id}.{agent_id}.{event_type}"


_SUBJECTS: dict[tuple[str, str], Subject | None] = {}  # a bus carries few distinct subjects: parse each once


def parse_subject(subject: str, prefix: str = DEFAULT_SUBJECT_PREFIX) -> Subject | None:
    """`agents.<tenant>.<agent>.<type>` with a two-token type such as `call.turn`; None if it does not parse."""
    key = (subject, prefix)
    try:
        return _SUBJECTS[key]
    except KeyError:
        pass
    parsed = _parse_subject(subject, prefix)
    if len(_SUBJECTS) >= 10_000:
        _SUBJECTS.clear()
    _SUBJECTS[key] = parsed
    return parsed


def _parse_subject(subject: str, prefix: str) -> Subject | None:
    head = prefix + "."
    if not subject.startswith(head):
        return None
    parts = subject[len(head):].split(".")
    if len(parts) != 4 or not ID_PATTERN.match(parts[0]) or not ID_PATTERN.match(parts[1]):
        return None
    return Subject(parts[0], parts[1], f"{parts[2]}.{parts[3]}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# One decoder for all events: `json.loads(..., parse_constant=...)` would build a new one per call.
_JSON = json.JSONDecoder(parse_constant=_reject_constant)


def _first_error(exc: ValidationError, prefix: str = "") -> str:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"]) or "(root)"
    if where == "schema_":
        where = "schema"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{prefix}{where}: {err['msg']}{more}"


def parse_event(subject: str, payload: bytes, prefix: str = DEFAULT_SUBJECT_PREFIX) -> Event | Rejection:
    """Validate one bus message against the contract. Never raises on bad input."""
    parsed = parse_subject(subject, prefix)
    where = {"tenant_id": parsed.tenant_id, "agent_id": parsed.agent_id} if parsed else {}

    def reject(code: str, detail: str) -> Rejection:
        return Rejection(code, detail, **where)

    if parsed is None:
        return reject("bad_subject", f"subject {subject[:200]!r} is not {prefix}.<tenant_id>.<agent_id>.<type>")
    if len(payload) > MAX_PAYLOAD_BYTES:
        return reject("payload_too_large", f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return reject("invalid_utf8", str(exc))
    try:
        obj = _JSON.decode(text)
    except (ValueError, RecursionError) as exc:
        return reject("invalid_json", str(exc)[:300])
    if not isinstance(obj, dict):
        return reject("not_an_object", f"payload is a JSON {type(obj).__name__}, not an object")
    if obj.get("schema") != SCHEMA_V1:
        return reject("unknown_schema", f"schema {str(obj.get('schema'))[:100]!r} is not {SCHEMA_V1!r}")
    if obj.get("type") not in DATA_MODELS:
        return reject("unknown_type", f"type {str(obj.get('type'))[:100]!r} is not one of {', '.join(EVENT_TYPES)}")
    try:
        env = Envelope.model_validate(obj)
    except ValidationError as exc:
        return reject("invalid_envelope", _first_error(exc))
    mismatched = [f"{k} {getattr(env, k)!r} != subject's {getattr(parsed, k)!r}"
                  for k in ("tenant_id", "agent_id", "type") if getattr(env, k) != getattr(parsed, k)]
    if mismatched:
        return reject("subject_mismatch", "; ".join(mismatched))
    try:
        data = DATA_MODELS[env.type].model_validate(env.data)
    except ValidationError as exc:
        return reject("invalid_data", _first_error(exc, "data."))
    ts = datetime.fromisoformat(env.ts.replace("z", "Z").replace("Z", "+00:00").replace("t", "T"))
    return Event(env.event_id, env.type, env.tenant_id, env.agent_id, env.call_id, ts, env.ts, data, payload)


def build_envelope(*, event_id: str, event_type: str, tenant_id: str, agent_id: str, call_id: str,
                   data: dict[str, Any], ts: str | None = None) -> dict[str, Any]:
    """An envelope dict for publishing; `ts` defaults to now in UTC with milliseconds."""
    if ts is None:
        from datetime import UTC

        ts = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"schema": SCHEMA_V1, "event_id": event_id, "type": event_type, "tenant_id": tenant_id,
            "agent_id": agent_id, "call_id": call_id, "ts": ts, "data": data}


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
