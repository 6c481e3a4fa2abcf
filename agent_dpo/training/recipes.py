"""The training recipe: exported rows in, SFT on the chosen (or desirable) completions, then DPO or KTO,
one adapter out. The steps that touch a trainer are a small `RecipePhases` object a backend provides
(adapters/trl_trainer.py for TRL); everything else (data shaping, KTO weights, the artifact) is here.

Choices, documented once:
- DPO assumes its reference is already a good SFT model, so unless `base_is_sft` the recipe first runs
  SFT with loss on the completion's assistant tokens only (prompt tokens are masked).
- With LoRA, the SFT adapter is merged into the base before DPO/KTO. The preference adapter is then
  trained on the merged weights, and the reference (the adapter-disabled model) is the SFT model, which
  is what DPO's KL anchor should be. The two adapters are stacked into one rank-(r1+r2) LoRA over the
  original base (exactly the same weights: W + s1*B1A1 + s2*B2A2), so a server loads one adapter.
- KTO weights: the dataset meta's `kto_weights` when the exporter recorded them, else TRL's ratio rule
  (desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3]; we take 1).
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from agent_dpo.errors import AgentDpoError
from agent_dpo.logs import get_logger
from agent_dpo.training.backend import Progress, TrainJob, TrainResult, artifact_digest
from agent_dpo.training.config import TrainConfig
from agent_dpo.training.metrics import MetricsLog, plot_metrics


class RecipePhases(Protocol):
    """What a backend does for the recipe; models and tokenizers are the backend's own types."""

    def load(self, config: TrainConfig, store_dir: Path) -> tuple[Any, Any]: ...

    def sft(self, model: Any, tokenizer: Any, rows: list[dict], config: TrainConfig, out_dir: Path,
            metrics: MetricsLog) -> tuple[Any, Path, int]:
        """Train, save the SFT adapter (or full model) to out_dir, return (merged model, out_dir, steps)."""

    def preference(self, model: Any, tokenizer: Any, rows: list[dict], config: TrainConfig,
                   kto_weights: tuple[float, float] | None, out_dir: Path, metrics: MetricsLog) -> tuple[Path, int]:
        """DPO (rows are pairs) or KTO (rows are labelled completions); save to out_dir, return steps."""


# ------------------------------------------------------------------------------------------------
# Data shaping


def read_rows(path: Path) -> list[dict]:
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise AgentDpoError(f"cannot read training data {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise AgentDpoError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), list):
            raise AgentDpoError(f"{path}:{number}: not a trl-dpo or trl-kto row (no prompt list)")
        rows.append(row)
    if not rows:
        raise AgentDpoError(f"training data {path} holds no rows")
    return rows


def dataset_kind(rows: list[dict]) -> str:
    first = rows[0]
    if "chosen" in first and "rejected" in first:
        return "trl-dpo"
    if "completion" in first and "label" in first:
        return "trl-kto"
    raise AgentDpoError("training rows are neither trl-dpo (prompt/chosen/rejected) "
                        "nor trl-kto (prompt/completion/label)")


def _message(message: dict) -> dict:
    """Arguments as JSON text: the template writes text as is, and Arrow (under `datasets`) would
    otherwise unify differently shaped argument objects into one struct, inventing null keys."""
    out = {"role": message["role"], "content": message.get("content")}
    if message.get("tool_calls"):
        out["tool_calls"] = [_tool_call(tc) for tc in message["tool_calls"]]
    if message.get("tool_call_id") is not None:
        out["tool_call_id"] = message["tool_call_id"]
    return out


def _tool_call(call: dict) -> dict:
    from agent_dpo.chat_template import arguments_as_text

    fn = call.get("function", call)
    return {"id": str(call.get("id", "")), "type": "function",
            "function": {"name": fn.get("name", ""), "arguments": arguments_as_text(fn.get("arguments", {}))}}


def template_messages(messages: list[dict]) -> list[dict]:
    return [_message(m) for m in messages]


def _tools(row: dict) -> str | None:
    # As JSON text for the same Arrow reason; TRL's tokenizers json.loads a string `tools` column.
    return json.dumps(row["tools"]) if row.get("tools") else None


def dpo_rows(rows: list[dict]) -> list[dict]:
    return [{"prompt": template_messages(r["prompt"]), "chosen": template_messages(r["chosen"]),
             "rejected": template_messages(r["rejected"]), "tools": _tools(r)} for r in rows]


def kto_rows(rows: list[dict]) -> list[dict]:
    """trl-kto rows as they are; trl-dpo pairs as one desirable and one undesirable example each."""
    if dataset_kind(rows) == "trl-kto":
        return [{"prompt": template_messages(r["prompt"]), "completion": template_messages(r["completion"]),
                 "label": bool(r["label"]), "tools": _tools(r)} for r in rows]
    out = []
    for r in rows:
        for key, label in (("chosen", True), ("rejected", False)):
            out.append({"prompt": template_messages(r["prompt"]), "completion": template_messages(r[key]),
                        "label": label, "tools": _tools(r)})
    return out


def sft_rows(rows: list[dict]) -> list[dict]:
    """Prompt/completion rows on the chosen (DPO) or desirable (KTO) completions, each once."""
    kind = dataset_kind(rows)
    out, seen = [], set()
    for r in rows:
        if kind == "trl-kto" and not r["label"]:
            continue
        completion = r["chosen"] if kind == "trl-dpo" else r["completion"]
        row = {"prompt": template_messages(r["prompt"]), "completion": template_messages(completion), "tools": _tools(r)}
        key = json.dumps(row, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def kto_weights(rows: list[dict], meta: dict, config: TrainConfig) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight): the config's when set, else the meta's, else TRL's rule."""
    if config.desirable_weight is not None or config.undesirable_weight is not None:
        return (float(config.desirable_weight or 1.0), float(config.undesirable_weight or 1.0))
    meta = meta if isinstance(meta, dict) else {}
    # The exporter records its weights under "kto"; they count the trl-kto file's own rows, so they
    # hold only when that is the file being trained on (pairs expanded here are balanced anyway).
    recorded = meta.get("kto_weights") or (meta.get("kto") if meta.get("format") == "trl-kto" else None)
    if isinstance(recorded, dict):
        desirable = recorded.get("desirable", recorded.get("desirable_weight"))
        undesirable = recorded.get("undesirable", recorded.get("undesirable_weight"))
        if desirable is not None and undesirable is not None:
            return float(desirable), float(undesirable)
    labels = [bool(r["label"]) for r in rows]
    n_desirable, n_undesirable = sum(labels), len(labels) - sum(labels)
    if n_desirable == 0 or n_undesirable == 0 or n_desirable == n_undesirable:
        return 1.0, 1.0
    return round(n_undesirable / n_desirable, 2), 1.0


# ------------------------------------------------------------------------------------------------
# The run


def new_version(method: str) -> str:
    return f"{method}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"


def run(job: TrainJob, on_progress: Progress, phases: RecipePhases, backend: str) -> TrainResult:
    """SFT (unless the base is SFT'd) then DPO/KTO; writes under job.output_dir:
    `sft/` (the SFT adapter), `preference/` (the DPO/KTO adapter on the SFT-merged base),
    `adapter/` (the artifact: one adapter over the original base), `metrics.jsonl`, `training.png`
    and `result.json`."""
    config = job.config
    started = time.monotonic()
    version = job.version or new_version(config.method)
    log = get_logger(tenant_id=job.tenant_id, agent_id=job.agent_id, version=version, backend=backend)
    rows = read_rows(job.train_file)
    kind = dataset_kind(rows)
    if config.method == "kto" and config.truncation_mode == "keep_end" and backend == "trl":
        raise AgentDpoError("truncation_mode keep_end is for SFT and DPO on the trl backend (TRL's KTO keeps "
                            "the start only); the fast backend supports it")
    if config.method == "dpo" and kind != "trl-dpo":
        raise AgentDpoError(f"method dpo needs trl-dpo pairs, but {job.train_file} holds {kind} rows")
    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out / "metrics.jsonl", on_progress)
    log.info("training_started", method=config.method, base_model=config.base_model, rows=len(rows),
             lora=config.lora, max_steps=config.max_steps, sft_steps=0 if config.base_is_sft else config.sft_steps)

    model, tokenizer = phases.load(config, Path(job.store_dir))
    steps = 0
    sft_dir: Path | None = None
    if not config.base_is_sft and config.sft_steps > 0:
        model, sft_dir, sft_steps = phases.sft(model, tokenizer, sft_rows(rows), config, out / "sft", metrics)
        steps += sft_steps
        log.info("sft_finished", steps=sft_steps, adapter=str(sft_dir))

    if config.method == "dpo":
        pref_rows, weights = dpo_rows(rows), None
    else:
        pref_rows = kto_rows(rows)
        weights = kto_weights(pref_rows, job.meta, config)
    pref_dir, pref_steps = phases.preference(model, tokenizer, pref_rows, config, weights,
                                             out / "preference", metrics)
    steps += pref_steps

    if not getattr(phases, "is_main", True):
        # Under `accelerate launch`, the other ranks trained their shard; rank 0 writes the run folder.
        return TrainResult(version=version, method=config.method, backend=backend, base_model=config.base_model,
                           artifact_dir=None, artifact_digest=None, serve_name=None, metrics_file=metrics.path,
                           plot_file=None, steps=steps, wall_s=round(time.monotonic() - started, 2),
                           sft_artifact_dir=sft_dir)
    if config.lora and sft_dir is not None:
        artifact = stack_lora_adapters([sft_dir, pref_dir], out / "adapter")
    else:
        artifact = _copy_artifact(pref_dir, out / "adapter")
    digest = artifact_digest(artifact)
    plot = plot_metrics(metrics.path, out / "training.png",
                        title=f"{job.tenant_id}/{job.agent_id} {version} ({config.method}, {backend})")
    result = TrainResult(
        version=version, method=config.method, backend=backend, base_model=config.base_model,
        artifact_dir=artifact, artifact_digest=digest, serve_name=None, metrics_file=metrics.path,
        plot_file=plot, steps=steps, wall_s=round(time.monotonic() - started, 2), sft_artifact_dir=sft_dir,
        extra={"rows": len(rows), "kind": kind, "kto_weights": weights, "lora": config.lora,
               "beta": config.beta})
    write_result(result, out / "result.json", config)
    log.info("training_finished", steps=steps, wall_s=result.wall_s, artifact=str(artifact), digest=digest)
    return result


def write_result(result: TrainResult, path: Path, config: TrainConfig) -> None:
    """result.json next to the artifact: what evaluation and the registry read back."""
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(result).items()}
    record["config"] = config.to_dict()
    path.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")


def _copy_artifact(src: Path, dst: Path) -> Path:
    import shutil

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------------
# The artifact


def stack_lora_adapters(adapter_dirs: list[Path], out_dir: Path) -> Path:
    """Several LoRA adapters trained one on top of the other (each on the previous ones merged) as one
    adapter over the original base: A stacked along the rank, B side by side with each adapter's
    scaling folded in, so W + sum_i s_i B_i A_i is exactly what the server computes with one adapter."""
    import torch
    from safetensors.torch import load_file, save_file

    configs = [json.loads((Path(d) / "adapter_config.json").read_text()) for d in adapter_dirs]
    states = [load_file(str(Path(d) / "adapter_model.safetensors")) for d in adapter_dirs]
    for cfg in configs:
        if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora") or cfg.get("rank_pattern") \
                or cfg.get("alpha_pattern"):
            raise AgentDpoError("only plain LoRA adapters (no DoRA, no per-module ranks) can be stacked")
    ranks = [int(c["r"]) for c in configs]
    scalings = [(float(c["lora_alpha"]) / (r ** 0.5 if c.get("use_rslora") else r)) for c, r in zip(configs, ranks)]
    total = sum(ranks)
    modules = sorted({k[: -len(".lora_A.weight")] for s in states for k in s if k.endswith(".lora_A.weight")})
    stacked: dict[str, torch.Tensor] = {}
    for module in modules:
        a_parts, b_parts = [], []
        shape_a = next(s[f"{module}.lora_A.weight"].shape for s in states if f"{module}.lora_A.weight" in s)
        shape_b = next(s[f"{module}.lora_B.weight"].shape for s in states if f"{module}.lora_B.weight" in s)
        for state, rank, scale in zip(states, ranks, scalings):
            a = state.get(f"{module}.lora_A.weight")
            b = state.get(f"{module}.lora_B.weight")
            if a is None or b is None:  # this adapter did not touch the module
                a = torch.zeros(rank, shape_a[1])
                b = torch.zeros(shape_b[0], rank)
            a_parts.append(a.float())
            b_parts.append(b.float() * scale)
        stacked[f"{module}.lora_A.weight"] = torch.cat(a_parts, dim=0).contiguous()
        stacked[f"{module}.lora_B.weight"] = torch.cat(b_parts, dim=1).contiguous()
    targets = sorted({t for c in configs for t in _as_list(c.get("target_modules"))})
    config = dict(configs[0])
    config.update({"r": total, "lora_alpha": total, "use_rslora": False, "target_modules": targets,
                   "lora_dropout": 0.0, "rank_pattern": {}, "alpha_pattern": {}})
    out_dir = Path(out_dir)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    save_file(stacked, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out_dir


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)
