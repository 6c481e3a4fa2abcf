"""The port every training backend implements: a job (config + exported data) in, a result (adapter
artifact or serve name, metrics) out. `get_backend` maps the config's `backend` field to its module,
imported only when chosen, so the core never pulls in torch or the OpenAI SDK by itself."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent_dpo.digest import folder_digest
from agent_dpo.errors import AgentDpoError
from agent_dpo.training.config import TrainConfig

Progress = Callable[[dict[str, Any]], None]


@dataclass
class TrainJob:
    tenant_id: str
    agent_id: str
    config: TrainConfig
    train_file: Path  # trl-dpo or trl-kto JSONL (spec/events-v1.md "Output formats")
    meta: dict[str, Any]  # the export's .meta.json (counts, kto_weights, labelled_by, ...)
    output_dir: Path
    store_dir: Path
    openai_file: Path | None = None  # openai-dpo JSONL, for the openai backend
    version: str | None = None  # the registry's name for what this job produces; None: made up by the recipe


@dataclass
class TrainResult:
    version: str
    method: str
    backend: str
    base_model: str
    artifact_dir: Path | None  # the adapter (or full model) as safetensors; None for hosted backends
    artifact_digest: str | None  # sha256 over the artifact's safetensors files (see artifact_digest)
    serve_name: str | None  # what a server calls it, e.g. an OpenAI "ft:..." id
    metrics_file: Path
    plot_file: Path | None
    steps: int
    wall_s: float
    sft_artifact_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific facts (job ids, token counts)


class TrainingBackend(Protocol):
    name: str

    def train(self, job: TrainJob, on_progress: Progress) -> TrainResult: ...


# backend name -> (module, attribute holding the backend class; it is built with no arguments)
BACKEND_MODULES: dict[str, tuple[str, str]] = {
    "trl": ("agent_dpo_adapters.trl_trainer", "TrlBackend"),
    "fast": ("agent_dpo.training.tree_backend", "TreeBackend"),
    "openai": ("agent_dpo_adapters.openai_finetune", "OpenAIBackend"),
}


def get_backend(name: str) -> TrainingBackend:
    if name not in BACKEND_MODULES:
        raise AgentDpoError(f"unknown training backend {name!r} (known: {', '.join(BACKEND_MODULES)})")
    module_name, attr = BACKEND_MODULES[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise AgentDpoError(f"training backend {name!r} is not available in this install "
                                f"({module_name} is missing)") from None
        raise AgentDpoError(f"training backend {name!r} needs {exc.name}, which is not installed "
                            f"(pip install 'agent-dpo[train]')") from None
    backend_class = getattr(module, attr, None)
    if backend_class is None:
        raise AgentDpoError(f"training backend {name!r}: {module_name} defines no {attr}")
    return backend_class()


def artifact_digest(path: str | Path) -> str:
    """The artifact's content digest (agent_dpo.digest.folder_digest), refusing a folder with no weights."""
    root = Path(path)
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
    if not any(f.suffix == ".safetensors" for f in files):
        raise AgentDpoError(f"{root} holds no safetensors to digest")
    return folder_digest(root)
