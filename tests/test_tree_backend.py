# ruff: noqa: F811  (fixtures come from tests/tiny_model.py, imported after the sys.path line)
"""The `fast` backend end to end on a tiny model: SFT then DPO (or KTO) writes the same artifacts as the
TRL backend (one adapter as safetensors with its digest, metrics.jsonl, training.png), reports progress,
and keeps reference log-probs on disk so a grown dataset only scores its new examples."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import smollm2_store, tiny_model_dir  # noqa: F401  (fixtures)

from agent_dpo.training.backend import TrainJob, artifact_digest, get_backend
from agent_dpo.training.config import TrainConfig
from agent_dpo.training.prefix_tree import TreeExample
from agent_dpo.training.refcache import RefCache
from agent_dpo.training.tree_backend import reference_logps

TOOLS = [{"type": "function", "function": {
    "name": "book", "description": "Book a slot",
    "parameters": {"type": "object", "properties": {"day": {"type": "string"}}, "required": ["day"]}}}]
DAYS = ["Monday", "Tuesday", "Friday", "Saturday", "Sunday", "Thursday"]


def pair_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        day = DAYS[i % len(DAYS)]
        prompt = [{"role": "system", "content": "Salon agent. Book with the tool."},
                  {"role": "user", "content": f"Can I come on {day}? ({i})"}]
        chosen = {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "book", "arguments": {"day": day}}}]}
        rejected = {"role": "assistant", "content": "No." if i % 2 else "We are closed."}
        rows.append({"prompt": prompt, "chosen": [chosen], "rejected": [rejected], "tools": TOOLS})
    return rows


def _job(tmp: Path, model_dir: Path, store: Path, rows: list[dict], name: str, **config) -> TrainJob:
    settings = {"backend": "fast", "base_model": str(model_dir), "sft_steps": 1, "max_steps": 2,
                "batch_size": 2, "max_length": 256, "lora_r": 4, "lora_alpha": 8}
    settings.update(config)
    train_file = tmp / f"{name}.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return TrainJob(tenant_id="acme", agent_id="salon", config=TrainConfig(**settings), train_file=train_file,
                    meta={}, output_dir=tmp / name, store_dir=store, version=f"v-{name}")


def test_sft_then_dpo_writes_adapter_metrics_plot_and_progress(tmp_path, tiny_model_dir, smollm2_store):
    progress: list[dict] = []
    job = _job(tmp_path, tiny_model_dir, tmp_path / "store", pair_rows(6), "dpo")
    job.store_dir.mkdir()
    (job.store_dir / "models").symlink_to(smollm2_store / "models")
    result = get_backend("fast").train(job, progress.append)
    assert (result.backend, result.method, result.steps) == ("fast", "dpo", 3)
    assert sorted(p.name for p in result.artifact_dir.iterdir()) == ["adapter_config.json",
                                                                     "adapter_model.safetensors"]
    assert result.artifact_digest == artifact_digest(result.artifact_dir)
    rows = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in rows] == [("sft", 1), ("dpo", 1), ("dpo", 2)]
    assert {"loss", "rewards/margins", "rewards/accuracies", "grad_norm"} <= set(rows[-1])
    assert result.plot_file is not None and result.plot_file.stat().st_size > 0
    assert [p["phase"] for p in progress] == ["sft", "dpo", "dpo"]
    assert list((job.store_dir / "refcache").glob("*.jsonl"))


def test_kto_runs_with_its_kl_term(tmp_path, tiny_model_dir, smollm2_store):
    rows = [{"prompt": r["prompt"], "completion": r["chosen" if i % 2 else "rejected"], "label": bool(i % 2),
             "tools": r["tools"]} for i, r in enumerate(pair_rows(6))]
    job = _job(tmp_path, tiny_model_dir, smollm2_store, rows, "kto", method="kto", base_is_sft=True,
               batch_size=3)
    result = get_backend("fast").train(job, lambda _: None)
    metrics = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    assert [m["phase"] for m in metrics] == ["kto", "kto"]
    assert all(m["kl"] >= 0 for m in metrics)


def test_grown_dataset_scores_only_new_examples(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    prefix = list(range(200, 260))
    examples = [TreeExample(prefix + [300 + i] * (1 + i), [[5, 6, 7], [8, 9]]) for i in range(6)]
    scored: list[int] = []
    first = reference_logps(model, examples[:4], RefCache(tmp_path, "sha256:abc"), batch_size=4,
                            on_batch=scored.append)
    assert scored == [4]
    scored.clear()
    # A new process on the same reference model: the file answers the old examples bit for bit.
    again = reference_logps(model, examples, RefCache(tmp_path, "sha256:abc"), batch_size=4, on_batch=scored.append)
    assert scored == [2]
    assert torch.equal(again[:4], first)
    assert not list(tmp_path.glob("sha256-other*"))


def test_keep_end_keeps_one_window_per_pair(smollm2_store):
    """keep_end drops the oldest context by the same count for chosen and rejected (the same context for
    both, and a history the tree shares); keep_start drops rows whose prompt alone fills the window."""
    from agent_dpo.training.recipes import dpo_rows
    from agent_dpo.training.tree_backend import tokenize_preference
    from agent_dpo_adapters.hf_models import SMOLLM2, load_tokenizer

    tokenizer = load_tokenizer(SMOLLM2, smollm2_store)
    row = dpo_rows(pair_rows(1))[0]
    full = tokenize_preference(tokenizer, row)
    assert len(full.prompt_ids) > 40
    cut = tokenize_preference(tokenizer, row, max_length=40, truncation_mode="keep_end")
    longest = max(len(c) for c in full.completions)
    assert list(cut.prompt_ids) == list(full.prompt_ids)[-(40 - longest):]
    assert [list(c) for c in cut.completions] == [list(c) for c in full.completions]
    assert max(len(cut.prompt_ids) + len(c) for c in cut.completions) == 40
    assert tokenize_preference(tokenizer, row, max_length=40) is None


def test_dpo_trains_on_a_keep_end_window(tmp_path, tiny_model_dir, smollm2_store):
    job = _job(tmp_path, tiny_model_dir, smollm2_store, pair_rows(4), "window", base_is_sft=True, max_steps=1,
               max_length=48, truncation_mode="keep_end")
    result = get_backend("fast").train(job, lambda _: None)
    metrics = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    assert [m["phase"] for m in metrics] == ["dpo"] and metrics[0]["loss"] > 0


def test_rpo_and_bf16_mixed_precision_train_and_log(tmp_path, tiny_model_dir, smollm2_store):
    """sft_weight adds the chosen answers' NLL (logged per step); precision bf16 trains with fp32 weights under
    bf16 autocast: its first-step log-probs agree with fp32 to bf16 accuracy, and its reference cache is its own."""
    runs = {}
    for precision in ("fp32", "bf16"):
        store = tmp_path / f"store-{precision}"
        job = _job(tmp_path, tiny_model_dir, store, pair_rows(4), precision, base_is_sft=True, max_steps=1,
                   sft_weight=0.5, precision=precision, learning_rate=1e-9)
        result = get_backend("fast").train(job, lambda _: None)
        runs[precision] = json.loads(result.metrics_file.read_text().splitlines()[0])
        runs[precision]["cache"] = [p.name for p in (store / "refcache").glob("*.jsonl")]
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert fp32["nll/chosen"] > 0 and bf16["nll/chosen"] > 0
    assert fp32["logps/chosen"] != bf16["logps/chosen"]  # bf16 matmuls really ran
    assert bf16["logps/chosen"] == pytest.approx(fp32["logps/chosen"], rel=0.02)
    assert bf16["cache"] != fp32["cache"] and all(name.endswith("-bf16.jsonl") for name in bf16["cache"])


def test_config_refuses_unknown_precision_and_rpo_without_pairs():
    from agent_dpo.errors import UsageError

    with pytest.raises(UsageError, match="precision must be one of auto, fp32, bf16"):
        TrainConfig(precision="fp8")
    with pytest.raises(UsageError, match="method kto has no chosen answers"):
        TrainConfig(method="kto", sft_weight=1.0)
    with pytest.raises(UsageError, match="sft_weight must be 0 or more"):
        TrainConfig(sft_weight=-1)


def test_refuses_to_run_once_per_process_under_a_multi_process_launcher(tmp_path, monkeypatch):
    from agent_dpo.errors import AgentDpoError
    from agent_dpo.training.tree_backend import TreePhases

    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(AgentDpoError, match="backend trl"):
        TreePhases().load(TrainConfig(), tmp_path)


def test_full_fine_tune_saves_the_model_and_moves_the_weights(tmp_path, tiny_model_dir, smollm2_store):
    from safetensors.torch import load_file

    job = _job(tmp_path, tiny_model_dir, smollm2_store, pair_rows(4), "full", lora=False, base_is_sft=True,
               max_steps=1, learning_rate=1e-3)
    result = get_backend("fast").train(job, lambda _: None)
    names = {p.name for p in result.artifact_dir.iterdir()}
    assert {"config.json", "model.safetensors"} <= names and "adapter_config.json" not in names
    assert "quantization_config" not in json.loads((result.artifact_dir / "config.json").read_text())
    trained = load_file(str(result.artifact_dir / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    moved = [k for k in base if k in trained and not torch.equal(base[k], trained[k])]
    assert moved, "a full fine-tune step changed no weight"
