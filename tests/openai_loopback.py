"""An OpenAI-compatible HTTP API on 127.0.0.1 for the tests: files, fine-tuning jobs with scripted
state transitions and events, and chat completions, on both the OpenAI (`/v1/...`) and the Azure
(`/openai/...?api-version=`) paths. The real `openai` SDK talks to it; it records what it was sent."""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from agent_dpo.schemas import openai_row_errors

TERMINAL = ("succeeded", "failed", "cancelled")
# The published hyperparameters of each method and the ranges the API accepts.
HYPERPARAMETERS = {
    "supervised": {"batch_size": (int, 1, 256), "learning_rate_multiplier": (float, 0.0, 10.0),
                   "n_epochs": (int, 1, 50)},
    "dpo": {"batch_size": (int, 1, 256), "learning_rate_multiplier": (float, 0.0, 10.0),
            "n_epochs": (int, 1, 50), "beta": (float, 0.0, 2.0)},
}
JOB_KEYS = {"model", "training_file", "validation_file", "hyperparameters", "method", "seed", "suffix",
            "metadata", "integrations"}


@dataclass
class JobPlan:
    """How the next created job behaves: the statuses successive retrieves report, and its end."""

    statuses: list[str] = field(default_factory=lambda: ["validating_files", "queued", "running",
                                                         "running", "running", "succeeded"])
    error: dict[str, Any] | None = None  # for a plan that ends "failed"
    fine_tuned_model: str | None = None  # default: ft:<model>:agent-dpo-loopback:<suffix>:<n>


@dataclass
class Recorded:
    method: str
    path: str  # without the /v1 or /openai prefix
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any  # parsed JSON, or {"fields": {...}, "file": bytes} for multipart


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class LoopbackOpenAI:
    """Start with `with LoopbackOpenAI() as api:`; point clients at `api.base_url` (OpenAI) or
    `api.azure_endpoint` (AzureOpenAI). Script jobs with `api.plans.append(JobPlan(...))` and chat
    answers with `api.chat_replies.append(text)` or `api.chat_reply = callable(body) -> text`."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.files: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.plans: deque[JobPlan] = deque()
        self.chat_replies: deque[str] = deque()
        self.chat_reply: Callable[[dict[str, Any]], str] | None = None
        self.on_status: Callable[[str, str], None] | None = None  # (job_id, status) as a retrieve reports it
        self.fail_retrieves: deque[int] = deque()  # HTTP statuses the next job retrieves answer with
        self._plan_of: dict[str, deque[str]] = {}
        self._events: dict[str, list[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        handler = type("Handler", (_Handler,), {"api": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="openai-loopback", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def azure_endpoint(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def base_url(self) -> str:
        return self.azure_endpoint + "/v1"

    # what tests read back ----------------------------------------------------------------------

    def calls(self, method: str, path_pattern: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and re.fullmatch(path_pattern, r.path)]

    def uploaded_rows(self, file_id: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.files[file_id]["content"].decode().splitlines() if line]

    def created_jobs(self) -> list[dict[str, Any]]:
        return [r.body for r in self.calls("POST", "/fine_tuning/jobs")]

    # routing ---------------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str],
               body: Any) -> tuple[int, Any]:
        with self._lock:
            self.requests.append(Recorded(method, path, query, headers, body))
            if not (headers.get("authorization", "").startswith("Bearer ") or headers.get("api-key")):
                raise ApiError(401, "Missing credentials", code="invalid_api_key")
            routes: list[tuple[str, str, Callable[..., tuple[int, Any]]]] = [
                ("POST", r"/files", self._create_file),
                ("GET", r"/files/([^/]+)", self._get_file),
                ("GET", r"/files/([^/]+)/content", self._file_content),
                ("POST", r"/fine_tuning/jobs", self._create_job),
                ("GET", r"/fine_tuning/jobs", self._list_jobs),
                ("GET", r"/fine_tuning/jobs/([^/]+)", self._retrieve_job),
                ("GET", r"/fine_tuning/jobs/([^/]+)/events", self._job_events),
                ("POST", r"/fine_tuning/jobs/([^/]+)/cancel", self._cancel_job),
                ("POST", r"/chat/completions", self._chat),
                ("POST", r"/deployments/[^/]+/chat/completions", self._chat),
            ]
            for verb, pattern, route in routes:
                match = re.fullmatch(pattern, path)
                if verb == method and match:
                    return route(body, query, *match.groups())
            raise ApiError(404, f"no route {method} {path}")

    # files -----------------------------------------------------------------------------------

    def _create_file(self, body: Any, _query: Any) -> tuple[int, Any]:
        if not isinstance(body, dict) or "file" not in body:
            raise ApiError(400, "expected multipart/form-data with a file", param="file")
        purpose = body["fields"].get("purpose")
        if purpose not in ("fine-tune", "batch", "assistants", "user_data", "vision"):
            raise ApiError(400, f"invalid purpose {purpose!r}", param="purpose")
        file_id = f"file-{next(self._ids)}"
        self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(body["file"]),
                               "created_at": int(time.time()), "filename": body["filename"],
                               "purpose": purpose, "status": "processed", "content": body["file"]}
        return 200, self._file_object(file_id)

    def _file_object(self, file_id: str) -> dict[str, Any]:
        return {k: v for k, v in self.files[file_id].items() if k != "content"}

    def _get_file(self, _body: Any, _query: Any, file_id: str) -> tuple[int, Any]:
        if file_id not in self.files:
            raise ApiError(404, f"No such File object: {file_id}", param="id")
        return 200, self._file_object(file_id)

    def _file_content(self, _body: Any, _query: Any, file_id: str) -> tuple[int, Any]:
        if file_id not in self.files:
            raise ApiError(404, f"No such File object: {file_id}", param="id")
        return 200, self.files[file_id]["content"]

    # fine-tuning jobs ------------------------------------------------------------------------

    def _create_job(self, body: Any, _query: Any) -> tuple[int, Any]:
        if not isinstance(body, dict):
            raise ApiError(400, "expected a JSON object")
        unknown = set(body) - JOB_KEYS
        if unknown:
            raise ApiError(400, f"Unrecognized request argument supplied: {min(unknown)}")
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise ApiError(400, "model is required", param="model")
        training_file = body.get("training_file")
        if training_file not in self.files:
            raise ApiError(400, f"invalid training_file: {training_file}", param="training_file")
        if self.files[training_file]["purpose"] != "fine-tune":
            raise ApiError(400, "training_file must have purpose fine-tune", param="training_file")
        suffix = body.get("suffix")
        if suffix is not None and (not isinstance(suffix, str) or len(suffix) > 64):
            raise ApiError(400, "suffix must be a string of at most 64 characters", param="suffix")
        method = body.get("method") or {"type": "supervised", "supervised": {}}
        _check_method(method)
        job_id = f"ftjob-{next(self._ids)}"
        plan = self.plans.popleft() if self.plans else JobPlan()
        problem = self._file_problem(training_file, method["type"])
        statuses = deque(plan.statuses)
        if problem:  # the real API finds bad rows while validating_files, then fails the job
            statuses = deque(["validating_files", "failed"])
            plan = JobPlan(error={"code": "invalid_training_file", "param": "training_file",
                                  "message": f"The job failed due to an invalid training file. {problem}"})
        n = next(self._ids)
        self.jobs[job_id] = {
            "id": job_id, "object": "fine_tuning.job", "created_at": int(time.time()), "error": None,
            "fine_tuned_model": None, "finished_at": None, "model": body["model"],
            "organization_id": "org-loopback", "result_files": [], "seed": body.get("seed") or 42,
            "status": statuses.popleft(), "trained_tokens": None, "training_file": training_file,
            "validation_file": body.get("validation_file"), "estimated_finish": None,
            "hyperparameters": method.get(method["type"], {}).get("hyperparameters", {}),
            "method": method, "metadata": body.get("metadata"),
            "_plan": plan, "_n": n, "_step": 0, "_rows": len(self._rows(training_file)),
            "_final": plan.fine_tuned_model or f"ft:{body['model']}:agent-dpo-loopback:{suffix or 'none'}:{n}",
        }
        self._plan_of[job_id] = statuses
        self._events[job_id] = []
        self._event(job_id, "info", f"Created fine-tuning job: {job_id}")
        return 200, self._job_object(job_id)

    def _rows(self, file_id: str) -> list[Any]:
        return [json.loads(line) for line in self.files[file_id]["content"].decode().splitlines() if line.strip()]

    def _file_problem(self, file_id: str, method_type: str) -> str | None:
        try:
            rows = self._rows(file_id)
        except ValueError as exc:
            return f"Invalid JSON line: {exc}"
        if not rows:
            return "The file has no examples."
        for number, row in enumerate(rows, start=1):
            if method_type == "dpo":
                errors = openai_row_errors(row)
                if set(row) - {"input", "preferred_output", "non_preferred_output"}:
                    errors.append(f"unexpected keys {sorted(set(row) - {'input', 'preferred_output', 'non_preferred_output'})}")
            else:
                errors = [] if isinstance(row.get("messages"), list) and row["messages"] else ["no messages"]
            if errors:
                return f"Line {number}: {errors[0]}"
        return None

    def _job_object(self, job_id: str) -> dict[str, Any]:
        return {k: v for k, v in self.jobs[job_id].items() if not k.startswith("_")}

    def _event(self, job_id: str, level: str, message: str, data: dict[str, Any] | None = None) -> None:
        events = self._events[job_id]
        events.append({"id": f"ftevent-{job_id}-{len(events) + 1}", "object": "fine_tuning.job.event",
                       "created_at": int(time.time()), "level": level, "message": message,
                       "data": data, "type": "metrics" if data else "message"})

    def _advance(self, job_id: str) -> None:
        job, statuses = self.jobs[job_id], self._plan_of[job_id]
        if job["status"] in TERMINAL or not statuses:
            return
        status = statuses.popleft()
        if status == "running":
            job["_step"] += 1
            step = job["_step"]
            total = step + sum(1 for s in statuses if s == "running")
            loss = round(0.7 / step, 4)
            self._event(job_id, "info", f"Step {step}/{total}: training loss={loss}",
                        {"step": step, "total_steps": total, "train_loss": loss,
                         "train_mean_reward": round(0.1 * step, 4)})
        elif status != job["status"]:
            self._event(job_id, "info", {"validating_files": "Validating training file",
                                         "queued": "Job queued", "running": "Job started",
                                         "succeeded": "The job has successfully completed",
                                         "failed": "The job failed"}.get(status, status))
        job["status"] = status
        if status == "succeeded":
            job["fine_tuned_model"] = job["_final"]
            job["finished_at"] = int(time.time())
            job["trained_tokens"] = 1000 * max(1, job["_rows"])
            result_id = f"file-{next(self._ids)}"
            csv = "step,train_loss,train_accuracy\n" + "".join(
                f"{s},{round(0.7 / s, 4)},{round(min(1.0, 0.5 + 0.1 * s), 4)}\n" for s in range(1, job["_step"] + 1))
            self.files[result_id] = {"id": result_id, "object": "file", "bytes": len(csv),
                                     "created_at": int(time.time()), "filename": "step_metrics.csv",
                                     "purpose": "fine-tune-results", "status": "processed",
                                     "content": csv.encode()}
            job["result_files"] = [result_id]
        elif status == "failed":
            job["error"] = job["_plan"].error or {"code": "server_error", "message": "Fine-tuning failed",
                                                  "param": None}
            job["finished_at"] = int(time.time())
            self._event(job_id, "error", job["error"]["message"])

    def _retrieve_job(self, _body: Any, _query: Any, job_id: str) -> tuple[int, Any]:
        if job_id not in self.jobs:
            raise ApiError(404, f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
        if self.fail_retrieves:
            raise ApiError(self.fail_retrieves.popleft(), "The server had an error processing your request")
        self._advance(job_id)
        if self.on_status:
            self.on_status(job_id, self.jobs[job_id]["status"])
        return 200, self._job_object(job_id)

    def _list_jobs(self, _body: Any, _query: Any) -> tuple[int, Any]:
        data = [self._job_object(j) for j in reversed(list(self.jobs))]
        return 200, {"object": "list", "data": data, "has_more": False}

    def _job_events(self, _body: Any, query: dict[str, list[str]], job_id: str) -> tuple[int, Any]:
        if job_id not in self.jobs:
            raise ApiError(404, f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
        newest_first = list(reversed(self._events[job_id]))
        after = query.get("after", [None])[0]
        if after:  # cursor pagination: events older than `after`
            ids = [e["id"] for e in newest_first]
            newest_first = newest_first[ids.index(after) + 1:] if after in ids else []
        limit = int(query.get("limit", ["20"])[0])
        return 200, {"object": "list", "data": newest_first[:limit], "has_more": len(newest_first) > limit}

    def _cancel_job(self, _body: Any, _query: Any, job_id: str) -> tuple[int, Any]:
        if job_id not in self.jobs:
            raise ApiError(404, f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
        job = self.jobs[job_id]
        if job["status"] in TERMINAL:
            raise ApiError(400, f"Job has already completed: {job_id}", code="invalid_request_error")
        job["status"] = "cancelled"
        job["finished_at"] = int(time.time())
        self._plan_of[job_id].clear()
        self._event(job_id, "info", "Fine-tuning job cancelled")
        return 200, self._job_object(job_id)

    # chat ------------------------------------------------------------------------------------

    def _chat(self, body: Any, _query: Any) -> tuple[int, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            raise ApiError(400, "messages is required", param="messages")
        if self.chat_reply is not None:
            text = self.chat_reply(body)
        elif self.chat_replies:
            text = self.chat_replies.popleft()
        else:
            text = '{"verdict": "tie", "reason": "no scripted reply"}'
        return 200, {"id": f"chatcmpl-{next(self._ids)}", "object": "chat.completion",
                     "created": int(time.time()), "model": body.get("model", "loopback"),
                     "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                  "message": {"role": "assistant", "content": text, "refusal": None}}],
                     "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


def _check_method(method: Any) -> None:
    """Reject a `method` payload the published API would refuse, with its 400 message."""
    if not isinstance(method, dict) or method.get("type") not in ("supervised", "dpo", "reinforcement"):
        raise ApiError(400, "method.type must be one of supervised, dpo, reinforcement", param="method.type")
    kind = method["type"]
    if set(method) - {"type", kind}:
        raise ApiError(400, f"method has keys not valid for type {kind}: {sorted(set(method) - {'type', kind})}",
                       param="method")
    if kind not in HYPERPARAMETERS:
        raise ApiError(400, f"method {kind} is not supported here", param="method.type")
    settings = method.get(kind) or {}
    if set(settings) - {"hyperparameters"}:
        raise ApiError(400, f"method.{kind} has unknown keys {sorted(set(settings) - {'hyperparameters'})}",
                       param=f"method.{kind}")
    for name, value in (settings.get("hyperparameters") or {}).items():
        if name not in HYPERPARAMETERS[kind]:
            raise ApiError(400, f"Unknown hyperparameter {name} for method {kind}",
                           param=f"method.{kind}.hyperparameters.{name}")
        kind_of, low, high = HYPERPARAMETERS[kind][name]
        if value == "auto":
            continue
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and (kind_of is float or isinstance(value, int))
              and (low <= value if kind_of is int else low < value) and value <= high)
        if not ok:
            raise ApiError(400, f"Invalid value for {name}: {value!r}",
                           param=f"method.{kind}.hyperparameters.{name}")


class _Handler(BaseHTTPRequestHandler):
    api: LoopbackOpenAI
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        path = url.path
        headers = {k.lower(): v for k, v in self.headers.items()}
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            if path.startswith("/openai/"):
                if "api-version" not in query:
                    raise ApiError(404, "Resource not found: Azure paths need ?api-version=")
                path = path[len("/openai"):]
            elif path.startswith("/v1/"):
                path = path[len("/v1"):]
            else:
                raise ApiError(404, f"no route {path}")
            status, payload = self.api.handle(method, path, query, headers, _parse_body(headers, raw))
        except ApiError as exc:
            status, payload = exc.status, {"error": {"message": exc.message, "type": "invalid_request_error",
                                                     "param": exc.param, "code": exc.code}}
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if isinstance(payload, bytes)
                         else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _parse_body(headers: dict[str, str], raw: bytes) -> Any:
    content_type = headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
        form: dict[str, Any] = {"fields": {}, "file": None, "filename": None}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if part.get_filename() is not None:
                form["file"], form["filename"] = part.get_payload(decode=True), part.get_filename()
            else:
                form["fields"][name] = part.get_payload(decode=True).decode()
        if form["file"] is None:
            del form["file"]
        return form
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise ApiError(400, "request body is not JSON") from None
