"""Training jobs as messages: what a listener enqueues (agent, config, the exported dataset's object
name and digest) and the status a worker reports back (queued, running, progress, succeeded, failed)."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent_dpo.registry import utc_now

JOBS_STREAM = "AGENT_DPO_TRAIN_JOBS"
JOBS_SUBJECT_PREFIX = "agentdpo.train.jobs"
STATUS_STREAM = "AGENT_DPO_TRAIN_STATUS"
STATUS_SUBJECT_PREFIX = "agentdpo.train.status"
DATASET_BUCKET = "agentdpo-datasets"

JobState = Literal["queued", "running", "progress", "succeeded", "failed"]
TERMINAL_STATES = ("succeeded", "failed")


class TrainJobSpec(BaseModel):
    """Everything a worker on another machine needs: no access to the listener's store."""

    model_config = ConfigDict(extra="forbid")
    schema_: Literal["agent-dpo.train-job.v1"] = Field("agent-dpo.train-job.v1", alias="schema")
    job_id: str = Field(default_factory=lambda: f"job-{uuid.uuid4().hex[:16]}", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    tenant_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    agent_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    version: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    config: dict[str, Any]
    dataset_object: str  # name in the DATASET_BUCKET object store (trl-dpo / trl-kto JSONL)
    dataset_digest: str
    openai_dataset_object: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)  # the export's .meta.json
    parent: str | None = None
    created_at: str = Field(default_factory=utc_now)

    @property
    def subject(self) -> str:
        return f"{JOBS_SUBJECT_PREFIX}.{self.tenant_id}.{self.agent_id}"


class JobStatus(BaseModel):
    model_config = ConfigDict(extra="allow")
    job_id: str
    tenant_id: str
    agent_id: str
    version: str
    state: JobState
    attempt: int = 1
    progress: dict[str, Any] = Field(default_factory=dict)  # step, max_steps, loss, ...
    artifact_name: str | None = None
    artifact_digest: str | None = None
    serve_name: str | None = None
    # succeeded only: version, method, backend, base_model, hyperparameters, data_digest, event_range,
    # parent, steps, wall_s (what the version's manifest records)
    result: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    worker: str | None = None
    at: str = Field(default_factory=utc_now)

    @property
    def subject(self) -> str:
        return f"{STATUS_SUBJECT_PREFIX}.{self.job_id}"
