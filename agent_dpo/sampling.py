"""Side-by-side candidates from a trained version: it answers each prompt of an export several times
(sampled), so a rater can pick between the version's own answers. The picks come back on the bus as
`feedback.preference` events (spec: one DPO pair each) and become on-policy pairs: what DPO needs once
the SFT'd model no longer makes the mistakes its training transcripts corrected."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_dpo.errors import AgentDpoError, UsageError
from agent_dpo.logs import get_logger

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class SampleSettings:
    samples: int = 2  # answers per prompt
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 192  # a tool call with its arguments needs ~150
    batch_size: int = 16  # generated rows (prompts x samples) per batch
    max_prompts: int | None = None  # a seeded sample of the prompts
    seed: int = 0
    # bf16 casts the weights for generation: on CPU decoding reads the whole KV cache every step, and
    # bf16 halves it (about 2.5x faster here). The candidates are samples anyway; fp32 for exact ones.
    precision: str = "bf16"
    device: str | None = None

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise UsageError(f"samples must be 2 or more (a rater picks between them), not {self.samples}")
        if not self.temperature > 0:
            raise UsageError(f"temperature must be above 0 (greedy answers are all the same), not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise UsageError("max_new_tokens and batch_size must be 1 or more")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise UsageError(f"max_prompts must be 1 or more, not {self.max_prompts}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")


def candidate_prompts(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The distinct (prompt, tools) of exported rows (trl-dpo or trl-kto), each with the call and turn it
    came from (`meta.call_id`, `meta.turn`), which a `feedback.preference` event must name."""
    seen: set[tuple[str, int]] = set()
    out = []
    for row in rows:
        meta = row.get("meta") or {}
        if "prompt" not in row or not meta.get("call_id") or not isinstance(meta.get("turn"), int):
            raise AgentDpoError("a row without prompt, meta.call_id and meta.turn cannot be sent for rating "
                                "(export with `agent-dpo pairs`, which records them)")
        key = (meta["call_id"], meta["turn"])
        if key in seen:
            continue
        seen.add(key)
        out.append({"prompt": row["prompt"], "tools": row.get("tools"),
                    "meta": {"call_id": meta["call_id"], "turn": meta["turn"]}})
    return out


def sample_candidates(prompts: list[dict[str, Any]], policy: Any, store_dir: Path,
                      settings: SampleSettings = SampleSettings()) -> list[dict[str, Any]]:
    """One record per prompt: its prompt, tools and meta, the version that answered, and `samples`
    candidate assistant Messages (parsed back from the tool-aware template)."""
    import torch

    from agent_dpo.evaluation import EvalSettings, _sample, generate_answers, load_policy
    from agent_dpo_adapters.hf_models import load_tokenizer

    if not prompts:
        raise AgentDpoError("no prompts to sample answers for")
    picked = _sample(prompts, settings.max_prompts, settings.seed)
    log = get_logger(component="sample", version=policy.label)
    started = time.monotonic()
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(policy.base_model, store_dir)
    model = load_policy(policy, store_dir, device)
    if settings.precision == "bf16":
        model = model.to(torch.bfloat16)
    answers = generate_answers(model, tokenizer, picked, EvalSettings(seed=settings.seed,
                                                                      max_new_tokens=settings.max_new_tokens,
                                                                      batch_size=settings.batch_size),
                               device, f"candidates {policy.label}", samples=settings.samples,
                               temperature=settings.temperature, top_p=settings.top_p)
    k = settings.samples
    records = [{**p, "version": policy.label, "candidates": answers[i * k:(i + 1) * k]}
               for i, p in enumerate(picked)]
    log.info("candidates_sampled", prompts=len(records), samples=k, wall_s=round(time.monotonic() - started, 1))
    return records


def write_candidates(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_candidates(path: Path) -> list[dict[str, Any]]:
    records = []
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise AgentDpoError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(record.get("candidates"), list) or not isinstance(record.get("meta"), dict):
                raise AgentDpoError(f"{path}:{n}: a candidates record needs `candidates` and `meta`")
            records.append(record)
    return records
