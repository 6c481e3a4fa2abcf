"""Bus and ingest settings: defaults, overridden by a TOML file, overridden by the environment.
The NATS adapter and the CLI read these; nothing here connects to anything.

File (`--config PATH` or env `AGENT_DPO_CONFIG`), every key optional:

    [bus]                      # stream, consumer and dead-letter stream (see `agent-dpo bus init`)
    stream = "AGENT_EVENTS"
    subject_prefix = "agents"
    duplicate_window_s = 1200
    consumer = "agent-dpo-ingest"
    batch_size = 1000
    ack_wait_s = 30
    max_deliver = 10
    backoff_s = [30, 60, 120, 300, 600]
    max_ack_pending = 20000
    nak_delay_s = 5
    store_retry_s = 10
    replicas = 1
    max_age_s = 0              # 0: keep events in the stream until removed by hand

    [nats]                     # authentication and TLS; env AGENT_DPO_NATS_<KEY> wins, e.g. AGENT_DPO_NATS_TOKEN
    user = "ingest"
    password = "..."
    token = "..."
    nkey_seed_file = "/etc/agent-dpo/ingest.nk"
    creds_file = "/etc/agent-dpo/ingest.creds"
    tls_ca = "/etc/agent-dpo/ca.pem"
    tls_cert = "/etc/agent-dpo/client.pem"
    tls_key = "/etc/agent-dpo/client-key.pem"
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent_dpo.errors import AgentDpoError
from agent_dpo.events import DEFAULT_SUBJECT_PREFIX, DLQ_PREFIX, ID_PATTERN

CONFIG_ENV = "AGENT_DPO_CONFIG"


@dataclass(frozen=True)
class BusConfig:
    stream: str = "AGENT_EVENTS"
    subject_prefix: str = DEFAULT_SUBJECT_PREFIX
    # JetStream drops a re-sent Nats-Msg-Id inside this window; ingest is idempotent beyond it anyway.
    duplicate_window_s: float = 1200.0
    dlq_stream: str = "AGENT_DPO_DLQ"
    dlq_prefix: str = DLQ_PREFIX
    consumer: str = "agent-dpo-ingest"
    batch_size: int = 1000
    fetch_timeout_s: float = 1.0
    ack_wait_s: float = 30.0
    max_deliver: int = 10
    # Redelivery delays after an ack timeout (JetStream `backoff`, at most max_deliver entries). JetStream
    # uses the first entry as the ack wait of the first delivery, so it may not be below ack_wait_s.
    backoff_s: tuple[float, ...] = (30.0, 60.0, 120.0, 300.0, 600.0)
    # Bounds how many fetched-but-unacknowledged messages one ingest can hold: memory and redelivery work.
    max_ack_pending: int = 20000
    nak_delay_s: float = 5.0
    # A store error is retried in-process (with in-progress acks) this long before the batch is nak'ed.
    store_retry_s: float = 10.0
    # Stream and dead-letter stream replicas (3 on a clustered NATS).
    replicas: int = 1
    # How long the event stream keeps messages (0: until removed by hand). The store is the system
    # of record once ingested; a bound keeps the server's disk bounded. The dead-letter stream keeps all.
    max_age_s: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if not self.subject_prefix or any(c in self.subject_prefix for c in " *>") or \
                self.subject_prefix.startswith(".") or self.subject_prefix.endswith("."):
            problems.append(f"subject_prefix {self.subject_prefix!r} is not a NATS subject prefix")
        for name in ("stream", "dlq_stream", "consumer"):
            if not ID_PATTERN.match(getattr(self, name)):
                problems.append(f"{name} {getattr(self, name)!r} must be 1-64 characters of A-Z a-z 0-9 _ -")
        if self.duplicate_window_s < 600:
            problems.append("duplicate_window_s must be at least 600 (10 minutes)")
        if not 1 <= self.batch_size <= 10000:
            problems.append("batch_size must be 1..10000")
        if self.max_deliver < 2:
            problems.append("max_deliver must be at least 2")
        if len(self.backoff_s) > self.max_deliver:
            problems.append("backoff_s may not have more entries than max_deliver")
        if self.ack_wait_s <= 0 or self.fetch_timeout_s <= 0 or self.nak_delay_s < 0:
            problems.append("ack_wait_s and fetch_timeout_s must be > 0, nak_delay_s >= 0")
        if not all(math.isfinite(b) and b > 0 for b in self.backoff_s):
            problems.append("backoff_s entries must be finite numbers > 0")
        if self.backoff_s and self.backoff_s[0] < self.ack_wait_s:
            problems.append("backoff_s[0] may not be below ack_wait_s (JetStream uses it as the first ack wait)")
        if not 0 <= self.store_retry_s < self.ack_wait_s / 2:
            problems.append("store_retry_s must be >= 0 and below ack_wait_s / 2")
        if self.max_age_s < 0 or (0 < self.max_age_s < self.duplicate_window_s):
            problems.append("max_age_s must be 0 (keep) or at least duplicate_window_s")
        if not 1 <= self.replicas <= 5:
            problems.append("replicas must be 1..5")
        if self.max_ack_pending < self.batch_size:
            problems.append("max_ack_pending must be at least batch_size")
        if problems:
            raise AgentDpoError("bad bus config: " + "; ".join(problems))

    @property
    def subjects(self) -> list[str]:
        return [f"{self.subject_prefix}.>"]

    @property
    def dlq_subjects(self) -> list[str]:
        return [f"{self.dlq_prefix}.>"]


@dataclass(frozen=True)
class NatsAuth:
    """How to authenticate to NATS and whether to use TLS. Secrets are never logged (see logs.py)."""

    user: str | None = None
    password: str | None = None
    token: str | None = None
    nkey_seed_file: str | None = None
    creds_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        if bool(self.user) != bool(self.password):
            raise AgentDpoError("NATS user and password must be given together")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise AgentDpoError("NATS tls_cert and tls_key must be given together")
        for name in ("nkey_seed_file", "creds_file", "tls_ca", "tls_cert", "tls_key"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                raise AgentDpoError(f"NATS {name} {value!r} is not a readable file")

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    def describe(self) -> str:
        """What kind of auth is configured, without any secret, for logs."""
        kinds = [k for k, v in (("user", self.user), ("token", self.token), ("nkey", self.nkey_seed_file),
                                ("creds", self.creds_file), ("tls", self.uses_tls)) if v]
        return "+".join(kinds) or "none"


@dataclass(frozen=True)
class Settings:
    bus: BusConfig = field(default_factory=BusConfig)
    nats: NatsAuth = field(default_factory=NatsAuth)


_BUS_ENV = "AGENT_DPO_BUS_"  # e.g. AGENT_DPO_BUS_BATCH_SIZE=500
_NATS_ENV = "AGENT_DPO_NATS_"  # e.g. AGENT_DPO_NATS_TOKEN=...


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None,
                  **bus_overrides: Any) -> Settings:
    """Defaults < TOML file < environment < explicit overrides (CLI flags). Unknown keys are errors."""
    env = os.environ if env is None else env
    path = path or env.get(CONFIG_ENV)
    file_data: dict[str, Any] = {}
    if path:
        try:
            file_data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise AgentDpoError(f"config file {str(path)!r} not found") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
            raise AgentDpoError(f"config file {str(path)!r}: {exc}") from None
        unknown = set(file_data) - {"bus", "nats"}
        if unknown:
            raise AgentDpoError(f"config file {str(path)!r}: unknown section(s) {', '.join(sorted(unknown))}")
    bus = _section(BusConfig, file_data.get("bus", {}), env, _BUS_ENV, "bus")
    bus.update({k: v for k, v in bus_overrides.items() if v is not None})
    nats = _section(NatsAuth, file_data.get("nats", {}), env, _NATS_ENV, "nats")
    try:
        return Settings(bus=BusConfig(**bus), nats=NatsAuth(**nats))
    except TypeError as exc:
        raise AgentDpoError(f"bad config: {exc}") from None


def _section(cls: type, from_file: Any, env: Mapping[str, str], env_prefix: str, name: str) -> dict[str, Any]:
    if not isinstance(from_file, dict):
        raise AgentDpoError(f"config [{name}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(from_file) - set(fields)
    if unknown:
        raise AgentDpoError(f"config [{name}]: unknown key(s) {', '.join(sorted(unknown))}")
    values = {k: _coerce(fields[k], v, f"[{name}] {k}") for k, v in from_file.items()}
    for key, f in fields.items():
        raw = env.get(env_prefix + key.upper())
        if raw is not None and raw != "":
            values[key] = _coerce(f, raw, env_prefix + key.upper())
    return values


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    """Env values are strings; file values are TOML-typed. Both become the field's type or an error."""
    kind = str(f.type)
    try:
        if "tuple" in kind:
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            if not isinstance(value, list) or any(isinstance(v, bool) for v in value):
                raise TypeError("expected a list of numbers")
            numbers = tuple(float(v) for v in value)
            if not all(math.isfinite(n) for n in numbers):
                raise ValueError("expected finite numbers")
            return numbers
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError("expected an integer")
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError("expected a number")
            number = float(value)
            if not math.isfinite(number):
                raise ValueError("expected a finite number")
            return number
        if not isinstance(value, str):
            raise TypeError("expected a string")
        return value
    except (TypeError, ValueError) as exc:
        raise AgentDpoError(f"config {where}: {exc}") from None
