"""The `openai` training backend through the real `openai` SDK against an OpenAI-compatible API on
loopback: what is uploaded, the job's method payload and hyperparameters, the `ft:` serve name,
failed and cancelled jobs, Ctrl-C, supervised-first, Azure, and what is refused before anything leaves."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import structlog

sys.path.insert(0, str(Path(__file__).parent))  # the loopback helper sits beside this file

from openai_loopback import JobPlan, LoopbackOpenAI

from agent_dpo.errors import AgentDpoError
from agent_dpo.training.backend import TrainJob, TrainResult, get_backend
from agent_dpo.training.config import TrainConfig
from agent_dpo_adapters.openai_finetune import OpenAIBackend, OpenAISettings, cancel

TOOLS = [{"type": "function", "function": {
    "name": "book_slot", "description": "Book a slot",
    "parameters": {"type": "object", "properties": {"slot_id": {"type": "string"}}, "required": ["slot_id"],
                   "additionalProperties": False}}}]


def export_row(i: int) -> dict:
    return {
        "input": {"messages": [{"role": "system", "content": "You rebook salon appointments."},
                               {"role": "user", "content": f"Can I move my appointment {i} to Tuesday?"}],
                  "tools": TOOLS},
        "preferred_output": [{"role": "assistant", "content": None, "tool_calls": [
            {"id": f"tc-{i}", "type": "function",
             "function": {"name": "book_slot", "arguments": json.dumps({"slot_id": f"tue-{i}"})}}]}],
        "non_preferred_output": [{"role": "assistant", "content": "Tuesday is busy. Want a premium colour?"}],
        "meta": {"call_id": f"call-{i}", "signal": "preference"},
    }


ROWS = [export_row(i) for i in range(3)]


@pytest.fixture
def api(monkeypatch):
    with LoopbackOpenAI() as server:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-loopback-test")
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        for name in ("AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_AD_TOKEN",
                     "OPENAI_API_VERSION", "AGENT_DPO_OPENAI_PROVIDER"):
            monkeypatch.delenv(name, raising=False)
        yield server


def make_job(tmp_path: Path, rows=ROWS, meta=None, **config) -> TrainJob:
    data = tmp_path / "openai-dpo.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = {"backend": "openai", "openai_model": "gpt-4.1-mini-2025-04-14", "openai_poll_s": 0.001,
                "openai_poll_max_s": 0.005, "seed": 7, **config}
    return TrainJob(tenant_id="acme-salons", agent_id="salon-rebook", config=TrainConfig(**settings),
                    train_file=tmp_path / "trl-dpo.jsonl", meta={"redacted": True} if meta is None else meta,
                    output_dir=tmp_path / "out", store_dir=tmp_path / "store", openai_file=data, version="v7")


def without_meta(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "meta"}


def test_happy_path_uploads_rows_and_method_and_returns_ft_model(api, tmp_path):
    job = make_job(tmp_path, beta=0.25, openai_n_epochs=2, openai_batch_size=1,
                   openai_learning_rate_multiplier=0.5)
    progress: list[dict] = []
    with structlog.testing.capture_logs() as logs:
        result = get_backend("openai").train(job, progress.append)

    # uploaded: the rows as exported, minus the project's meta, purpose fine-tune
    (upload,) = api.calls("POST", "/files")
    assert upload.body["fields"]["purpose"] == "fine-tune"
    file_id = next(iter(api.files))
    assert api.uploaded_rows(file_id) == [without_meta(r) for r in ROWS]
    # the job: DPO method with the configured hyperparameters, on the configured model
    (created,) = api.created_jobs()
    assert created["model"] == "gpt-4.1-mini-2025-04-14"
    assert created["training_file"] == file_id
    assert created["method"] == {"type": "dpo", "dpo": {"hyperparameters": {
        "beta": 0.25, "n_epochs": 2, "batch_size": 1, "learning_rate_multiplier": 0.5}}}
    assert "hyperparameters" not in created  # the deprecated top-level form is not used
    assert created["seed"] == 7 and created["suffix"] == "salon-rebook"
    assert created["metadata"] == {"tenant_id": "acme-salons", "agent_id": "salon-rebook", "version": "v7"}
    # the result: the ft: model is the serve name; no local artifact
    assert isinstance(result, TrainResult)
    assert result.serve_name.startswith("ft:gpt-4.1-mini-2025-04-14:")
    assert result.serve_name == next(iter(api.jobs.values()))["fine_tuned_model"]
    assert (result.backend, result.method, result.version, result.artifact_dir) == ("openai", "dpo", "v7", None)
    assert result.steps == 3
    # progress and log follow the job through its states, with its events and metrics
    statuses = [p["status"] for p in progress if "step" not in p]
    assert statuses == ["validating_files", "queued", "running", "succeeded"]
    assert [p["step"] for p in progress if "step" in p] == [1, 2, 3]
    assert all(p["max_steps"] == 3 for p in progress if "step" in p)
    messages = [e["message"] for e in logs if e["event"] == "openai_job_event"]
    assert "The job has successfully completed" in messages
    assert any(e["event"] == "openai_job_succeeded" and e["fine_tuned_model"] == result.serve_name for e in logs)
    metrics = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all("loss" in m for m in metrics)
    assert result.plot_file is not None and result.plot_file.stat().st_size > 0


def test_unset_hyperparameters_are_left_to_the_api(api, tmp_path):
    OpenAIBackend().train(make_job(tmp_path), lambda _: None)
    (created,) = api.created_jobs()
    assert created["method"] == {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}}


def test_failed_job_surfaces_its_message(api, tmp_path):
    api.plans.append(JobPlan(statuses=["validating_files", "queued", "running", "failed"],
                             error={"code": "quota_exceeded", "param": None,
                                    "message": "Fine-tuning quota exceeded for this organization"}))
    with pytest.raises(AgentDpoError, match=r"failed: Fine-tuning quota exceeded .*code quota_exceeded"):
        OpenAIBackend().train(make_job(tmp_path), lambda _: None)


def test_api_rejecting_the_payload_is_one_clear_error(api, tmp_path):
    with pytest.raises(AgentDpoError, match=r"job creation refused \(400\): Invalid value for beta"):
        OpenAIBackend().train(make_job(tmp_path, beta=5.0), lambda _: None)


def test_ctrl_c_cancels_the_job_then_reraises(api, tmp_path):
    api.plans.append(JobPlan(statuses=["validating_files", "queued"] + ["running"] * 10_000))
    interrupted: list[str] = []

    def press_ctrl_c(progress: dict) -> None:
        # A terminal's SIGINT raises KeyboardInterrupt in the main thread, wherever it is while the job is
        # followed; raised here, in the main thread's progress callback, it lands at the same place every
        # run (a signal simulated from the server's thread arrives whenever the main thread next runs).
        if progress.get("status") == "running" and not interrupted:
            interrupted.append(progress["job_id"])
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        OpenAIBackend().train(make_job(tmp_path), press_ctrl_c)
    (job_id,) = interrupted
    assert [r.path for r in api.calls("POST", r"/fine_tuning/jobs/.*/cancel")] == [f"/fine_tuning/jobs/{job_id}/cancel"]
    assert api.jobs[job_id]["status"] == "cancelled"


def test_cancel_function_stops_a_running_job(api, tmp_path):
    api.plans.append(JobPlan(statuses=["validating_files", "queued"] + ["running"] * 10_000))

    def operator_cancels(progress: dict) -> None:  # `agent-dpo train cancel JOB` while it runs
        if progress.get("status") == "running" and "step" not in progress:
            assert cancel(progress["job_id"]) == "cancelled"

    with pytest.raises(AgentDpoError, match=r"was cancelled"):
        OpenAIBackend().train(make_job(tmp_path), operator_cancels)
    (job_id,) = api.jobs
    with pytest.raises(AgentDpoError, match=r"cancel of .* refused \(400\): Job has already completed"):
        cancel(job_id)


def test_supervised_first_runs_sft_then_dpo_on_its_model(api, tmp_path):
    rows = ROWS + [dict(ROWS[0], non_preferred_output=[{"role": "assistant", "content": "No."}])]
    result = OpenAIBackend().train(make_job(tmp_path, rows=rows, supervised_first=True,
                                            openai_n_epochs=3), lambda _: None)
    sft, dpo = api.created_jobs()
    assert sft["method"] == {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}}
    assert sft["model"] == "gpt-4.1-mini-2025-04-14"
    sft_job, dpo_job = api.jobs.values()
    assert dpo["model"] == sft_job["fine_tuned_model"]
    assert dpo["method"]["type"] == "dpo"
    assert result.serve_name == dpo_job["fine_tuned_model"]
    # SFT rows: context + preferred answer, once per distinct pair of them
    sft_rows = api.uploaded_rows(sft["training_file"])
    assert len(sft_rows) == 3
    assert sft_rows[0] == {"messages": ROWS[0]["input"]["messages"] + ROWS[0]["preferred_output"], "tools": TOOLS}
    assert len(api.uploaded_rows(dpo["training_file"])) == 4
    assert result.extra["jobs"] == [sft_job["id"], dpo_job["id"]]


def test_azure_openai_through_endpoint_and_api_version(api, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-loopback-key")
    job = make_job(tmp_path, openai_provider="azure", azure_endpoint=api.azure_endpoint,
                   azure_api_version="2025-04-01-preview", openai_model="gpt-4o-mini-2024-07-18")
    result = OpenAIBackend().train(job, lambda _: None)
    assert result.serve_name.startswith("ft:gpt-4o-mini-2024-07-18")
    assert api.requests and all(r.query.get("api-version") == ["2025-04-01-preview"] for r in api.requests)
    assert all(r.headers.get("api-key") == "azure-loopback-key" for r in api.requests)
    (created,) = api.created_jobs()
    assert "metadata" not in created and created["method"]["type"] == "dpo"


def test_unredacted_export_is_not_uploaded_without_the_flag(api, tmp_path):
    with pytest.raises(AgentDpoError, match="unredacted"):
        OpenAIBackend().train(make_job(tmp_path, meta={"redacted": False}), lambda _: None)
    with pytest.raises(AgentDpoError, match="does not say it was redacted"):
        OpenAIBackend().train(make_job(tmp_path, meta={"counts": {}}), lambda _: None)
    assert api.requests == []
    result = OpenAIBackend().train(make_job(tmp_path, meta={"redacted": False}, allow_unredacted_upload=True),
                                   lambda _: None)
    assert result.serve_name.startswith("ft:")


def test_invalid_rows_are_refused_before_upload(api, tmp_path):
    bad = export_row(9)
    bad["preferred_output"][0]["tool_calls"][0]["function"]["arguments"] = {"slot_id": "x"}  # object, not text
    with pytest.raises(AgentDpoError, match=r"line 2: /preferred_output/0/tool_calls/0/function/arguments"):
        OpenAIBackend().train(make_job(tmp_path, rows=[ROWS[0], bad]), lambda _: None)
    assert api.requests == []


def test_missing_credentials_and_kto_are_clear_errors(api, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(AgentDpoError, match="OPENAI_API_KEY"):
        OpenAIBackend().train(make_job(tmp_path), lambda _: None)
    with pytest.raises(AgentDpoError, match="dpo only"):
        OpenAIBackend().train(make_job(tmp_path, method="kto"), lambda _: None)
    with pytest.raises(AgentDpoError, match="set openai_model"):
        OpenAIBackend().train(make_job(tmp_path, openai_model=None), lambda _: None)


def test_polling_rides_out_api_hiccups_but_not_refusals(api, tmp_path):
    settings = OpenAISettings(poll_s=0.001, poll_max_s=0.005, max_retries=0, poll_failures=3)
    api.fail_retrieves.extend([503, 500, 503])
    with structlog.testing.capture_logs() as logs:
        result = OpenAIBackend(settings=settings).train(make_job(tmp_path), lambda _: None)
    assert result.serve_name.startswith("ft:")
    assert [e["failures"] for e in logs if e["event"] == "openai_poll_failed"] == [1, 2, 3]
    api.fail_retrieves.extend([503, 503, 503, 503])
    with pytest.raises(AgentDpoError, match=r"polling of job .* refused \(503\)"):
        OpenAIBackend(settings=settings).train(make_job(tmp_path), lambda _: None)
    api.fail_retrieves.append(404)
    with pytest.raises(AgentDpoError, match=r"polling of job .* refused \(404\)"):
        OpenAIBackend(settings=settings).train(make_job(tmp_path), lambda _: None)


def test_a_real_export_goes_up_redacted_and_unchanged_but_for_meta(api, tmp_path):
    from pairing_fixtures import BOOK_OK, CallBuilder, args, assistant

    from agent_dpo.export import export_calls

    calls = []
    for i in range(4):
        b = CallBuilder(call_id=f"call-{i}").basic()
        b.preference(3, assistant(f"Booked for Tuesday at 2pm ({i}).", ("book_slot", args(BOOK_OK))),
                     assistant("Tuesday is taken. Want our premium colour instead?"))
        calls.append(b.ended().call())
    for redact in (True, False):
        out = tmp_path / f"redact-{redact}" / "pairs.openai.jsonl"
        out.parent.mkdir()
        summary = export_calls(calls, "acme-salons", "salon-rebook", "openai-dpo", out, split="all", redact=redact)
        meta = json.loads(summary.meta_path.read_text())
        job = make_job(tmp_path / f"redact-{redact}", meta=meta)
        job.openai_file = out
        if not redact:
            with pytest.raises(AgentDpoError, match="unredacted"):
                OpenAIBackend().train(job, lambda _: None)
            continue
        OpenAIBackend().train(job, lambda _: None)
        exported = [json.loads(line) for line in out.read_text().splitlines()]
        (file_id,) = [f for f, v in api.files.items() if v["purpose"] == "fine-tune"]
        assert api.uploaded_rows(file_id) == [without_meta(r) for r in exported]
        # the caller's details in the booking arguments left masked (the tool schemas are not user data)
        sent = json.dumps([[r["input"]["messages"], r["preferred_output"], r["non_preferred_output"]]
                           for r in api.uploaded_rows(file_id)])
        assert "ana@example.com" not in sent and "4155550123" not in sent
        assert "[EMAIL]" in sent and "[PHONE]" in sent
