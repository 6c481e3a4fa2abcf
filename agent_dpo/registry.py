"""The model registry's data and rules: immutable version manifests, one rollout document per agent
(every alias in one place, so a swap is one write), and the pure functions that move aliases.
The NATS KV storage lives in `agent_dpo_adapters.nats_registry`; the router reads the documents."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent_dpo.errors import AgentDpoError

ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
Backend = Literal["local", "vllm", "openai"]
RolloutState = Literal["stable", "canary", "rolled_back"]
Arm = Literal["base", "champion", "challenger"]
DEFAULT_STEPS = (0.05, 0.25, 0.5, 1.0)


class RegistryError(AgentDpoError):
    """A registry rule was broken (unknown version, nothing to promote, manifest already written...)."""


def _check_id(value: str, what: str) -> str:
    if not ID_RE.match(value):
        raise ValueError(f"{what} {value!r} must be 1-64 characters of A-Z a-z 0-9 _ -")
    return value


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ArtifactRef(BaseModel):
    """Where a version's weights are (object-store name, or a path / remote id) and their digest."""

    model_config = ConfigDict(extra="allow")
    store: Literal["nats-object", "path", "none"] = "nats-object"
    name: str = ""
    digest: str = ""  # "sha256:<hex>"; empty only when there is nothing to load (OpenAI ft: ids)


class VersionManifest(BaseModel):
    """One trained version of one agent; written once, never changed."""

    model_config = ConfigDict(extra="allow")
    schema_: str = Field("agent-dpo.manifest.v1", alias="schema")
    tenant_id: str
    agent_id: str
    version: str
    base_model: str
    backend: Backend = "local"
    serve_name: str = ""
    artifact: ArtifactRef = Field(default_factory=ArtifactRef)
    data_digest: str = ""
    event_range: dict[str, Any] = Field(default_factory=dict)
    method: str = ""
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    eval: dict[str, Any] = Field(default_factory=dict)
    parent: str | None = None
    created_at: str = Field(default_factory=utc_now)

    @field_validator("tenant_id", "agent_id", "version")
    @classmethod
    def _ids(cls, v: str, info) -> str:
        return _check_id(v, info.field_name)


class RolloutDoc(BaseModel):
    """Every alias of one agent. Changed only by compare-and-set, so readers never see half a swap."""

    model_config = ConfigDict(extra="allow")
    schema_: str = Field("agent-dpo.rollout.v1", alias="schema")
    tenant_id: str
    agent_id: str
    champion: str | None = None
    challenger: str | None = None
    previous: str | None = None
    canary_weight: float = Field(0.0, ge=0.0, le=1.0)
    step: int = 0
    state: RolloutState = "stable"
    reason: str = ""
    changed_by: str = ""
    changed_at: str = Field(default_factory=utc_now)

    def aliased(self) -> set[str]:
        """Versions an alias holds; the serving backend must keep these loaded."""
        held = {self.champion}
        if self.state == "canary":
            held.add(self.challenger)
        return {v for v in held if v}


@dataclass(frozen=True, slots=True)
class ModelRef:
    """What serves one call: the router pins one of these per call id for the call's whole life."""

    tenant_id: str
    agent_id: str
    version: str | None  # None: the base model, no trained version
    backend: str
    serve_name: str
    base_model: str
    arm: Arm = "champion"
    artifact_name: str = ""
    artifact_digest: str = ""

    @property
    def key(self) -> tuple[str, str, str | None]:
        return (self.tenant_id, self.agent_id, self.version)


def ref_for(manifest: VersionManifest, arm: Arm) -> ModelRef:
    return ModelRef(manifest.tenant_id, manifest.agent_id, manifest.version, manifest.backend,
                    manifest.serve_name or manifest.version, manifest.base_model, arm,
                    manifest.artifact.name, manifest.artifact.digest)


def base_ref(tenant_id: str, agent_id: str, base_model: str, backend: str = "local") -> ModelRef:
    return ModelRef(tenant_id, agent_id, None, backend, base_model, base_model, "base")


def manifest_for(tenant_id: str, agent_id: str, result: Any, *, artifact_name: str = "",
                 artifact_digest: str | None = None, eval_result: dict[str, Any] | None = None,
                 parent: str | None = None, data_digest: str = "", event_range: dict[str, Any] | None = None,
                 hyperparameters: dict[str, Any] | None = None) -> VersionManifest:
    """The manifest of a finished training run (`agent_dpo.training.backend.TrainResult`): local
    trainers produce an adapter in the object store, hosted ones (OpenAI) an `ft:` id to call."""
    hosted = result.backend == "openai"
    digest = artifact_digest or result.artifact_digest or ""
    return VersionManifest(
        tenant_id=tenant_id, agent_id=agent_id, version=result.version, base_model=result.base_model,
        backend="openai" if hosted else "local", serve_name=result.serve_name or "",
        artifact=ArtifactRef(store="none" if hosted else "nats-object", name=artifact_name, digest=digest),
        data_digest=data_digest, event_range=event_range or {}, method=result.method,
        hyperparameters=hyperparameters or {}, eval=eval_result or {}, parent=parent,
    )


# ---- KV keys: one token per tenant and agent keeps every tenant's keys apart. ----

def manifest_key(tenant_id: str, agent_id: str, version: str) -> str:
    return f"manifest.{tenant_id}.{agent_id}.{version}"


def rollout_key(tenant_id: str, agent_id: str) -> str:
    return f"rollout.{tenant_id}.{agent_id}"


def parse_rollout_key(key: str) -> tuple[str, str] | None:
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "rollout":
        return parts[1], parts[2]
    return None


def decision_subject(tenant_id: str, agent_id: str) -> str:
    return f"agentdpo.registry.{tenant_id}.{agent_id}"


# ---- Arm choice: a stable hash, so a call id maps to the same arm in every router process. ----

def call_bucket(tenant_id: str, agent_id: str, call_id: str) -> float:
    """A number in [0, 1) fixed by the call id; below the canary weight means challenger."""
    digest = hashlib.blake2b(f"{tenant_id}/{agent_id}/{call_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def choose_arm(doc: RolloutDoc, bucket: float) -> Arm:
    if doc.state == "canary" and doc.challenger and bucket < doc.canary_weight:
        return "challenger"
    return "champion" if doc.champion else "base"


# ---- Rules that move aliases. Each takes the current document and returns the next one. ----

def new_doc(tenant_id: str, agent_id: str) -> RolloutDoc:
    return RolloutDoc(tenant_id=tenant_id, agent_id=agent_id, reason="created")


def _changed(doc: RolloutDoc, by: str, reason: str, **fields: Any) -> RolloutDoc:
    return doc.model_copy(update={**fields, "changed_by": by, "reason": reason, "changed_at": utc_now()})


def start_canary(doc: RolloutDoc, version: str, weight: float, by: str, reason: str = "") -> RolloutDoc:
    """The version becomes challenger at the first step. With no champion yet, it still only gets
    `weight` of the calls: the rest stay on the base model until it earns promotion."""
    if doc.state == "canary" and doc.challenger != version:
        raise RegistryError(f"{doc.tenant_id}/{doc.agent_id} already has {doc.challenger} in canary")
    if version == doc.champion:
        raise RegistryError(f"{version} is already champion")
    return _changed(doc, by, reason or f"canary started for {version}", challenger=version,
                    canary_weight=weight, step=0, state="canary")


def advance_canary(doc: RolloutDoc, step: int, weight: float, by: str, reason: str) -> RolloutDoc:
    if doc.state != "canary":
        raise RegistryError(f"{doc.tenant_id}/{doc.agent_id} has no canary running")
    return _changed(doc, by, reason, step=step, canary_weight=weight)


def promote(doc: RolloutDoc, by: str, reason: str = "", version: str | None = None) -> RolloutDoc:
    """Challenger (or the named version) becomes champion; the old champion is kept as previous."""
    target = version or doc.challenger
    if not target:
        raise RegistryError(f"{doc.tenant_id}/{doc.agent_id} has no challenger to promote")
    if target == doc.champion:
        raise RegistryError(f"{target} is already champion")
    return _changed(doc, by, reason or f"{target} promoted", champion=target, previous=doc.champion,
                    challenger=None, canary_weight=0.0, step=0, state="stable")


def rollback(doc: RolloutDoc, by: str, reason: str = "") -> RolloutDoc:
    """During a canary: drop the challenger, every call back on the champion. Otherwise: the
    previous version becomes champion again."""
    if doc.state == "canary" and doc.challenger:
        return _changed(doc, by, reason or f"canary of {doc.challenger} rolled back", challenger=None,
                        canary_weight=0.0, step=0, state="rolled_back")
    if not doc.previous:
        raise RegistryError(f"{doc.tenant_id}/{doc.agent_id} has no previous version to roll back to")
    return _changed(doc, by, reason or f"{doc.champion} rolled back to {doc.previous}",
                    champion=doc.previous, previous=None, challenger=None, canary_weight=0.0, step=0,
                    state="rolled_back")
