"""The `openai` training backend: the redacted openai-dpo export goes to OpenAI or Azure OpenAI
fine-tuning (a supervised job on the preferred answers first when asked), the job is followed to its
end with its events in the log, and the resulting `ft:` model id becomes the version's serve name."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

from agent_dpo.errors import AgentDpoError
from agent_dpo.logs import get_logger
from agent_dpo.schemas import openai_row_errors

TERMINAL = ("succeeded", "failed", "cancelled")
ROW_KEYS = ("input", "preferred_output", "non_preferred_output")
INPUT_KEYS = ("messages", "tools", "parallel_tool_calls")
HYPERPARAMETER_NAMES = ("n_epochs", "batch_size", "learning_rate_multiplier")

Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class OpenAISettings:
    """Where jobs go and how they are followed. Credentials are never here: the SDK reads
    OPENAI_API_KEY (OpenAI) or AZURE_OPENAI_API_KEY / AZURE_OPENAI_AD_TOKEN (Azure) itself."""

    provider: str = "openai"  # "openai" or "azure"
    base_url: str | None = None  # None: OPENAI_BASE_URL, else api.openai.com
    azure_endpoint: str | None = None  # None: AZURE_OPENAI_ENDPOINT
    api_version: str | None = None  # None: OPENAI_API_VERSION (Azure only)
    poll_s: float = 5.0  # first wait between polls; grows while nothing changes
    poll_max_s: float = 60.0
    timeout_s: float | None = None  # stop following (the job keeps running) after this long
    max_retries: int = 2  # the SDK's own retries of transient HTTP failures
    poll_failures: int = 8  # consecutive failed polls (after those retries) before giving up

    @classmethod
    def from_env(cls, **overrides: Any) -> OpenAISettings:
        """For verbs with no training config (`train cancel`): Azure when AZURE_OPENAI_ENDPOINT is set."""
        provider = os.environ.get("AGENT_DPO_OPENAI_PROVIDER") or (
            "azure" if os.environ.get("AZURE_OPENAI_ENDPOINT") else "openai")
        return dataclasses.replace(cls(provider=provider), **overrides)

    @classmethod
    def from_config(cls, config: Any) -> OpenAISettings:
        """Read the `openai_*` / `azure_*` fields of a TrainConfig; absent fields keep defaults."""
        def pick(*names: str) -> Any:
            return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)

        azure_endpoint = pick("azure_endpoint")
        provider = pick("openai_provider") or ("azure" if azure_endpoint else None)
        if provider is None:
            provider = cls.from_env().provider
        values = {"provider": provider, "base_url": pick("openai_base_url"), "azure_endpoint": azure_endpoint,
                  "api_version": pick("azure_api_version", "openai_api_version"),
                  "poll_s": pick("openai_poll_s"), "poll_max_s": pick("openai_poll_max_s"),
                  "timeout_s": pick("openai_timeout_s")}
        return cls(**{k: v for k, v in values.items() if v is not None})


def make_client(settings: OpenAISettings) -> openai.OpenAI:
    """An SDK client for OpenAI or Azure OpenAI; missing credentials become one clear line."""
    if settings.provider not in ("openai", "azure"):
        raise AgentDpoError(f"openai provider must be 'openai' or 'azure', not {settings.provider!r}")
    try:
        if settings.provider == "azure":
            # No azure_deployment here: files and fine-tuning jobs are not deployment-scoped paths.
            return openai.AzureOpenAI(azure_endpoint=settings.azure_endpoint, api_version=settings.api_version,
                                      max_retries=settings.max_retries)
        return openai.OpenAI(base_url=settings.base_url, max_retries=settings.max_retries)
    except openai.OpenAIError as exc:
        raise AgentDpoError(f"{settings.provider}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# What leaves the machine


def redaction_state(meta: dict[str, Any]) -> bool | None:
    """True/False when the export's meta says whether it was redacted, None when it does not say."""
    for key in ("redacted", "redaction"):
        value = meta.get(key)
        if isinstance(value, bool):
            return value
        if isinstance(value, dict):
            for inner in ("enabled", "redacted", "on"):
                if isinstance(value.get(inner), bool):
                    return value[inner]
    return None


def check_upload_allowed(meta: dict[str, Any], allow_unredacted: bool) -> None:
    """Nothing leaves for a hosted API unredacted unless `allow_unredacted_upload` says so."""
    state = redaction_state(meta)
    if state is True or allow_unredacted:
        return
    if state is False:
        raise AgentDpoError("refusing to upload an unredacted export (it was made with --no-redact); "
                            "set allow_unredacted_upload: true in the training config to send it anyway")
    raise AgentDpoError("refusing to upload: the export's meta does not say it was redacted "
                        "(expected \"redacted\": true in its .meta.json); re-export, or set "
                        "allow_unredacted_upload: true")


def read_meta(job: Any, data_file: Path) -> dict[str, Any]:
    """The job's meta, else the `.meta.json` written beside the export."""
    if getattr(job, "meta", None):
        return dict(job.meta)
    for candidate in (data_file.with_name(data_file.name + ".meta.json"), data_file.with_suffix(".meta.json")):
        if candidate.is_file():
            return json.loads(candidate.read_text(encoding="utf-8"))
    return {}


def preference_rows(path: Path) -> list[dict[str, Any]]:
    """The export's rows reduced to what OpenAI takes (its `meta` stays home), each checked
    against the preference-row schema so a bad file fails here, not after an upload."""
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"line {number}: not JSON ({exc.msg})")
                continue
            problems.extend(f"line {number}: {p}" for p in openai_row_errors(row))
            if isinstance(row, dict) and isinstance(row.get("input"), dict):
                clean = {k: row[k] for k in ROW_KEYS if k in row}
                clean["input"] = {k: row["input"][k] for k in INPUT_KEYS if k in row["input"]}
                rows.append(clean)
    if problems:
        raise AgentDpoError(f"{path}: {len(problems)} rows are not valid OpenAI preference rows; first: "
                            f"{problems[0]}")
    if not rows:
        raise AgentDpoError(f"{path}: no preference rows to upload")
    return rows


def supervised_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat-format rows for the supervised job: each context followed by its preferred answer, once."""
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for row in rows:
        sft = {"messages": [*row["input"]["messages"], *row["preferred_output"]]}
        for key in ("tools", "parallel_tool_calls"):
            if key in row["input"]:
                sft[key] = row["input"][key]
        key = json.dumps(sft, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(sft)
    return out


def jsonl_bytes(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# Job payloads


def method_payload(config: Any, kind: str) -> dict[str, Any]:
    """`method={"type": kind, kind: {"hyperparameters": {...}}}` as the fine-tuning API takes it;
    hyperparameters the config leaves unset are omitted, so the API picks them ("auto")."""
    # Only the openai_* fields: the shared batch_size and learning_rate are the local engine's.
    hyper = {n: v for n in HYPERPARAMETER_NAMES if (v := getattr(config, f"openai_{n}", None)) is not None}
    if kind == "dpo":
        hyper["beta"] = getattr(config, "beta", None) if getattr(config, "beta", None) is not None else 0.1
    return {"type": kind, kind: {"hyperparameters": hyper}}


def _suffix(config: Any, job: Any) -> str:
    suffix = getattr(config, "openai_suffix", None) or job.agent_id
    return str(suffix)[:64]


def _status_message(exc: openai.APIStatusError) -> str:
    body = exc.body.get("error", exc.body) if isinstance(exc.body, dict) else None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return exc.message


def _transient(exc: openai.OpenAIError) -> bool:
    if isinstance(exc, (openai.APIConnectionError, openai.RateLimitError)):
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code >= 500


def _api_error(action: str, exc: openai.OpenAIError) -> AgentDpoError:
    if isinstance(exc, openai.APIStatusError):
        return AgentDpoError(f"openai {action} refused ({exc.status_code}): {_status_message(exc)}")
    if isinstance(exc, openai.APIConnectionError):
        return AgentDpoError(f"openai {action} failed: cannot reach the API ({exc.message})")
    return AgentDpoError(f"openai {action} failed: {exc}")


# ---------------------------------------------------------------------------------------------
# Following a job


class _Follower:
    """Polls one job with backoff, streams its new events to the log, the metrics file and
    `on_progress`, and returns the job once it reaches a terminal status."""

    def __init__(self, client: openai.OpenAI, settings: OpenAISettings, log: Any, on_progress: Progress,
                 metrics_file: Path, phase: str, sleep: Callable[[float], None]):
        self.client, self.settings, self.log = client, settings, log
        self.on_progress, self.metrics_file, self.phase, self.sleep = on_progress, metrics_file, phase, sleep
        self.seen: set[str] = set()
        self.steps = 0

    def run(self, job_id: str) -> Any:
        delay, started, status, failures = self.settings.poll_s, time.monotonic(), None, 0
        while True:
            try:
                job = self.client.fine_tuning.jobs.retrieve(job_id)
                events = list(self._new_events(job_id))
            except openai.OpenAIError as exc:
                # A job runs for hours; an API hiccup (beyond the SDK's own retries) must not
                # orphan it. Keep polling through a few, give up on anything else.
                failures += 1
                if not _transient(exc) or failures > self.settings.poll_failures:
                    raise _api_error(f"polling of job {job_id}", exc) from None
                self.log.warning("openai_poll_failed", job_id=job_id, error=str(exc), failures=failures)
                delay = min(delay * 2, self.settings.poll_max_s)
                self.sleep(delay)
                continue
            failures = 0
            changed = bool(events) or job.status != status
            for event in events:
                self._emit(job_id, event)
            if job.status != status:
                status = job.status
                self.log.info("openai_job_status", job_id=job_id, status=status, phase=self.phase)
                self.on_progress({"backend": "openai", "phase": self.phase, "job_id": job_id, "status": status})
            if status in TERMINAL:
                return job
            waited = time.monotonic() - started
            if self.settings.timeout_s is not None and waited >= self.settings.timeout_s:
                raise AgentDpoError(f"openai job {job_id} still {status} after {waited:.0f}s; it keeps running "
                                    f"(agent-dpo train cancel {job_id} stops it)")
            # Poll quickly while the job moves, back off while it sits.
            delay = self.settings.poll_s if changed else min(delay * 1.6, self.settings.poll_max_s)
            self.sleep(delay)

    def _new_events(self, job_id: str) -> Iterator[Any]:
        """Unseen events, oldest first. The API lists newest first, so page back to the last seen one."""
        fresh: list[Any] = []
        after = None
        while True:
            page = self.client.fine_tuning.jobs.list_events(job_id, limit=100, **({"after": after} if after else {}))
            for event in page.data:
                if event.id in self.seen:
                    break
                fresh.append(event)
            else:
                if page.has_more and page.data:
                    after = page.data[-1].id
                    continue
            break
        for event in reversed(fresh):
            self.seen.add(event.id)
            yield event

    def _emit(self, job_id: str, event: Any) -> None:
        data = event.data if isinstance(event.data, dict) else None
        level = {"warn": "warning", "error": "error"}.get(event.level, "info")
        getattr(self.log, level)("openai_job_event", job_id=job_id, phase=self.phase, message=event.message,
                                 **({"data": data} if data else {}))
        if event.type == "metrics" and data and "step" in data:
            self.steps = max(self.steps, int(data["step"]))
            metrics = _metric_row(self.phase, data)
            with self.metrics_file.open("a", encoding="utf-8") as out:
                out.write(json.dumps(metrics) + "\n")
            progress = {"backend": "openai", "job_id": job_id, "status": "running", **metrics}
            if "total_steps" in metrics:
                progress["max_steps"] = metrics["total_steps"]
            self.on_progress(progress)


def _metric_row(phase: str, data: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"phase": phase}
    for key, value in data.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            row[key] = value
    # The project's plots and progress bar read `loss`; OpenAI calls it train_loss.
    if "loss" not in row and isinstance(row.get("train_loss"), (int, float)):
        row["loss"] = row["train_loss"]
    return row


def _result_metrics(client: openai.OpenAI, job: Any, phase: str) -> list[dict[str, Any]]:
    """Per-step metrics from the job's result file (a CSV), the fullest record OpenAI keeps."""
    rows: list[dict[str, Any]] = []
    for file_id in job.result_files or []:
        try:
            text = client.files.content(file_id).text
        except openai.OpenAIError:
            continue  # the events already gave what they had; the CSV is a bonus
        for record in csv.DictReader(io.StringIO(text)):
            parsed: dict[str, Any] = {}
            for key, value in record.items():
                if key is None or value in (None, ""):
                    continue
                try:
                    parsed[key] = int(value) if key == "step" else float(value)
                except ValueError:
                    parsed[key] = value
            if "step" in parsed:
                rows.append(_metric_row(phase, parsed))
    return rows


def _cancel_after_interrupt(client: openai.OpenAI, job_id: str, log: Any) -> None:
    try:
        job = client.fine_tuning.jobs.cancel(job_id)
        log.warning("openai_job_cancelled", job_id=job_id, status=job.status, reason="interrupted")
    except openai.OpenAIError as exc:
        log.error("openai_job_cancel_failed", job_id=job_id, error=str(exc))


def cancel(job_id: str, settings: OpenAISettings | None = None, client: openai.OpenAI | None = None) -> str:
    """Cancel a fine-tuning job (`agent-dpo train cancel JOB_ID`); returns its status afterwards."""
    client = client or make_client(settings or OpenAISettings.from_env())
    try:
        job = client.fine_tuning.jobs.cancel(job_id)
    except openai.OpenAIError as exc:
        raise _api_error(f"cancel of {job_id}", exc) from None
    get_logger(backend="openai").info("openai_job_cancelled", job_id=job_id, status=job.status,
                                      reason="requested")
    return job.status


# ---------------------------------------------------------------------------------------------
# The backend


class OpenAIBackend:
    """`TrainingBackend` for OpenAI / Azure OpenAI fine-tuning. Holds the client for one run."""

    name = "openai"

    def __init__(self, settings: OpenAISettings | None = None, client: openai.OpenAI | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self._settings = settings
        self._client = client
        self._sleep = sleep

    def train(self, job: Any, on_progress: Progress) -> Any:
        config = job.config
        method = getattr(config, "method", "dpo")
        if method != "dpo":
            raise AgentDpoError(f"the openai backend trains method dpo only (OpenAI has no {method}); "
                                "use --backend trl for kto")
        started = time.monotonic()
        base_model = _openai_base_model(config)
        settings = self._settings or OpenAISettings.from_config(config)
        data_file = _openai_file(job)
        check_upload_allowed(read_meta(job, data_file), bool(getattr(config, "allow_unredacted_upload", False)))
        rows = preference_rows(data_file)
        client = self._client or make_client(settings)
        output_dir = Path(job.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        metrics_file = output_dir / "metrics.jsonl"
        metrics_file.write_text("", encoding="utf-8")
        log = get_logger(tenant_id=job.tenant_id, agent_id=job.agent_id, backend="openai",
                         provider=settings.provider)
        version = getattr(job, "version", None) or time.strftime("openai-%Y%m%d-%H%M%S", time.gmtime())
        metadata = {"tenant_id": job.tenant_id, "agent_id": job.agent_id, "version": version}

        def run_phase(phase: str, model: str, phase_rows: list[dict[str, Any]]) -> tuple[Any, _Follower]:
            name = f"{job.tenant_id}-{job.agent_id}-{phase}.jsonl"
            payload = jsonl_bytes(phase_rows)
            (output_dir / f"openai_{phase}_upload.jsonl").write_bytes(payload)  # exactly what was sent
            try:
                uploaded = client.files.create(file=(name, payload), purpose="fine-tune")
            except openai.OpenAIError as exc:
                raise _api_error("upload", exc) from None
            log.info("openai_file_uploaded", file_id=uploaded.id, rows=len(phase_rows), bytes=len(payload),
                     phase=phase)
            kind = "supervised" if phase == "sft" else "dpo"
            create: dict[str, Any] = {"model": model, "training_file": uploaded.id,
                                      "method": method_payload(config, kind), "suffix": _suffix(config, job)}
            if getattr(config, "seed", None) is not None:
                create["seed"] = int(config.seed)
            if settings.provider == "openai":  # Azure's fine-tuning API takes no metadata
                create["metadata"] = metadata
            try:
                created = client.fine_tuning.jobs.create(**create)
            except openai.OpenAIError as exc:
                raise _api_error("job creation", exc) from None
            log.info("openai_job_created", job_id=created.id, model=model, phase=phase,
                     method=create["method"])
            on_progress({"backend": "openai", "phase": phase, "job_id": created.id, "status": created.status})
            follower = _Follower(client, settings, log, on_progress, metrics_file, phase, self._sleep)
            try:
                finished = follower.run(created.id)
            except KeyboardInterrupt:
                _cancel_after_interrupt(client, created.id, log)
                raise
            _raise_unless_succeeded(finished)
            from_results = _result_metrics(client, finished, phase)
            if from_results:
                _replace_phase_metrics(metrics_file, phase, from_results)
                follower.steps = max(follower.steps, max(r["step"] for r in from_results))
            log.info("openai_job_succeeded", job_id=finished.id, fine_tuned_model=finished.fine_tuned_model,
                     trained_tokens=finished.trained_tokens, phase=phase)
            return finished, follower

        phases: list[tuple[Any, _Follower]] = []
        model = base_model
        # Hosted chat models are already instruction-tuned, so base_is_sft does not apply here; a
        # supervised job first is an explicit choice (it doubles the jobs and the cost).
        if getattr(config, "supervised_first", False):
            sft_job, sft_follow = run_phase("sft", model, supervised_rows(rows))
            phases.append((sft_job, sft_follow))
            model = sft_job.fine_tuned_model
        dpo_job, dpo_follow = run_phase("dpo", model, rows)
        phases.append((dpo_job, dpo_follow))

        record = {"provider": settings.provider, "jobs": [j.id for j, _ in phases],
                  "base_model": base_model, "fine_tuned_model": dpo_job.fine_tuned_model,
                  "trained_tokens": sum(j.trained_tokens or 0 for j, _ in phases), "rows": len(rows)}
        (output_dir / "openai_job.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
        plot_file = _plot(metrics_file, output_dir / "metrics.png",
                          title=f"{job.tenant_id}/{job.agent_id} {version} (openai {dpo_job.id})")
        return _train_result(
            version=version, method="dpo", backend="openai", base_model=base_model,
            artifact_dir=None, artifact_digest=None, serve_name=dpo_job.fine_tuned_model,
            metrics_file=metrics_file, plot_file=plot_file, steps=sum(f.steps for _, f in phases),
            wall_s=round(time.monotonic() - started, 3), extra=record)


def _openai_base_model(config: Any) -> str:
    """`openai_model`, else `base_model` unless that is still the local engine's default."""
    if getattr(config, "openai_model", None):
        return config.openai_model
    local_default = next((f.default for f in dataclasses.fields(config) if f.name == "base_model"), None) \
        if dataclasses.is_dataclass(config) else None
    if not config.base_model or config.base_model == local_default:
        raise AgentDpoError("the openai backend needs a hosted model to fine-tune: set openai_model "
                            "(for example gpt-4.1-mini-2025-04-14) in the training config")
    return config.base_model


def _openai_file(job: Any) -> Path:
    path = getattr(job, "openai_file", None)
    if path is not None:
        return Path(path)
    train_file = Path(job.train_file)
    with train_file.open(encoding="utf-8") as lines:
        first = next((json.loads(line) for line in lines if line.strip()), {})
    if "preferred_output" in first:
        return train_file
    raise AgentDpoError("the openai backend needs the openai-dpo export "
                        "(agent-dpo pairs --format openai-dpo); the job has none")


def _raise_unless_succeeded(job: Any) -> None:
    if job.status == "succeeded":
        if not job.fine_tuned_model:
            raise AgentDpoError(f"openai job {job.id} succeeded without a fine_tuned_model")
        return
    if job.status == "failed":
        error = job.error
        detail = f"{error.message} (code {error.code}" + (f", param {error.param})" if error.param else ")") \
            if error else "no error message given"
        raise AgentDpoError(f"openai fine-tuning job {job.id} failed: {detail}")
    raise AgentDpoError(f"openai fine-tuning job {job.id} was {job.status}")


def _replace_phase_metrics(metrics_file: Path, phase: str, rows: list[dict[str, Any]]) -> None:
    kept = [line for line in metrics_file.read_text(encoding="utf-8").splitlines()
            if line and json.loads(line).get("phase") != phase]
    metrics_file.write_text("".join(line + "\n" for line in kept)
                            + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _plot(metrics_file: Path, plot_file: Path, title: str) -> Path | None:
    from agent_dpo.training.metrics import plot_metrics

    try:
        return plot_metrics(metrics_file, plot_file, title=title)
    except ImportError:  # matplotlib is optional; the JSONL is the record
        return None


def _train_result(**values: Any) -> Any:
    """Build the project's TrainResult from the fields it declares (extra facts go to its extra/meta)."""
    from agent_dpo.training.backend import TrainResult

    names = {f.name for f in dataclasses.fields(TrainResult)}
    extra = values.pop("extra")
    kwargs = {k: v for k, v in values.items() if k in names}
    for holder in ("extra", "meta", "details"):
        if holder in names:
            kwargs[holder] = extra
            break
    return TrainResult(**kwargs)
