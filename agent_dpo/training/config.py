"""What a training run is asked to do: one typed config object, read from a TOML/JSON file and overridden
by CLI flags. The recipe and every backend read only this; swapping TRL for the project's own engine or
the local backend for OpenAI's is the one `backend` field.

File (`agent-dpo train --config FILE`), every key optional, top level or under a `[train]` table:

    backend = "fast"           # fast (the prefix-tree engine) | trl | openai
    method = "dpo"             # dpo | kto
    base_model = "smollm2-135m-instruct"
    sft_steps = 60
    max_steps = 100
    learning_rate = 5e-5
    lora = true
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent_dpo.errors import UsageError

BACKENDS = ("trl", "fast", "openai")
PRECISIONS = ("auto", "fp32", "bf16")
METHODS = ("dpo", "kto")
LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    # fast: the project's prefix-tree engine (training/tree_backend.py), exact to TRL and several times
    # faster on agent data; trl: TRL's trainers (and multi-GPU through accelerate); openai: hosted.
    backend: str = "fast"
    method: str = "dpo"
    base_model: str = "smollm2-135m-instruct"
    # DPO assumes its reference is an SFT'd model; unless the base is declared SFT'd, recipes run SFT
    # on the chosen (DPO) or desirable (KTO) completions first.
    base_is_sft: bool = False
    sft_steps: int = 60
    sft_learning_rate: float = 2e-4
    beta: float = 0.1
    loss_type: str = "sigmoid"  # DPO: sigmoid | ipo | hinge ...; KTO: kto | apo_zero_unpaired
    # RPO: the chosen completions' negative log-likelihood, added to the DPO loss with this weight (0: plain
    # DPO). It keeps the likelihood of good answers from falling while their margin grows, which small
    # models otherwise pay for with degenerate generations. TRL: loss_type [..., "sft"], loss_weights [1, w].
    sft_weight: float = 0.0
    learning_rate: float = 5e-5
    max_steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    # Whole agent calls fit (a system prompt with tool schemas is often 2k tokens): the engine computes the
    # shared prefix once per batch, so long contexts cost little more than their histories and completions.
    max_length: int = 4096
    # Rows longer than max_length: keep_start cuts the completion's end (TRL's default); keep_end drops
    # the oldest context instead (system prompt and tools first), which lets long agent calls train on
    # a CPU; evaluation then scores and generates with the same window. (TRL 1.16: SFT and DPO only.)
    truncation_mode: str = "keep_start"
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(LLAMA_LORA_TARGETS))
    seed: int = 0
    # KTO: None means "from the dataset meta's kto_weights, else TRL's ratio rule" (see recipes.py).
    desirable_weight: float | None = None
    undesirable_weight: float | None = None
    device: str | None = None  # None: cuda when available, else cpu
    # Local training arithmetic. auto: bf16 weights on a GPU, fp32 on a CPU. bf16: mixed precision (fp32
    # weights and optimizer state, bf16 autocast for the matmuls), ~1.3x faster on whole agent calls on
    # CPUs with AMX (Sapphire Rapids and newer). fp32: fp32 everywhere.
    precision: str = "auto"
    # The openai backend (adapters/openai_finetune.py) reads these; None leaves the choice to the API.
    openai_model: str | None = None
    openai_provider: str | None = None  # openai | azure
    openai_base_url: str | None = None
    azure_endpoint: str | None = None
    azure_api_version: str | None = None
    openai_n_epochs: int | None = None
    openai_batch_size: int | None = None
    openai_learning_rate_multiplier: float | None = None
    openai_suffix: str | None = None
    openai_poll_s: float | None = None
    openai_poll_max_s: float | None = None
    openai_timeout_s: float | None = None
    supervised_first: bool = False
    allow_unredacted_upload: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> TrainConfig:
        if self.backend not in BACKENDS:
            raise UsageError(f"backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.method not in METHODS:
            raise UsageError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        for name in ("max_steps", "batch_size", "grad_accum", "max_length", "lora_r"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise UsageError(f"truncation_mode must be keep_start or keep_end, not {self.truncation_mode!r}")
        if self.sft_steps < 0:
            raise UsageError(f"sft_steps must be 0 or more, not {self.sft_steps}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if not self.sft_weight >= 0:
            raise UsageError(f"sft_weight must be 0 or more, not {self.sft_weight}")
        if self.sft_weight and self.method != "dpo":
            raise UsageError("sft_weight (RPO) adds the chosen answers' likelihood to the DPO loss; "
                             f"method {self.method} has no chosen answers")
        if not self.beta > 0:
            raise UsageError(f"beta must be positive, not {self.beta}")
        if isinstance(self.lora_targets, str):
            self.lora_targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        return self

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """From a parsed file or a job message; unknown keys are a usage error, not silently ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UsageError(f"unknown training config key(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot read training config {path}: {exc.strerror}") from None
        try:
            values = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"training config {path} does not parse: {exc}") from None
        if not isinstance(values, dict):
            raise UsageError(f"training config {path} must hold a table of keys")
        if isinstance(values.get("train"), dict):
            values = values["train"]
        return cls.from_dict(values)

    def override(self, **flags: Any) -> TrainConfig:
        """A copy with the flags that were given (not None) replacing the file's values."""
        given = {k: v for k, v in flags.items() if v is not None}
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(given) - names)
        if unknown:
            raise UsageError(f"unknown training config key(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **given)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
