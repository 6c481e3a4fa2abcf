"""Training: SFT then DPO or KTO on a tiny model through the `trl` backend writes one adapter over the
base (safetensors, with its digest), per-step metrics and a plot; configs come from files and flags.
One run on the real SmolLM2 checks the same path at full size."""

# ruff: noqa: F811  (fixtures come from tests/tiny_model.py, imported after the sys.path line)
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import smollm2_store, tiny_model_dir  # noqa: F401  (pytest fixtures)

from agent_dpo.errors import AgentDpoError, UsageError
from agent_dpo.training.backend import TrainJob, artifact_digest, get_backend
from agent_dpo.training.config import TrainConfig
from agent_dpo.training.recipes import kto_weights

TOOLS = [{"type": "function", "function": {
    "name": "book", "description": "Book a slot",
    "parameters": {"type": "object", "properties": {"day": {"type": "string"}}, "required": ["day"]}}}]
DAYS = ["Monday", "Tuesday", "Friday", "Saturday"]


def pair_rows(n: int = 8) -> list[dict]:
    """trl-dpo rows as spec/events-v1.md defines them: arguments as objects, tools offered."""
    rows = []
    for i in range(n):
        day = DAYS[i % len(DAYS)]
        prompt = [{"role": "system", "content": "Salon agent."}, {"role": "user", "content": f"{day}?"}]
        if i % 2 == 0:
            chosen = {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "book", "arguments": {"day": day}}}]}
            rejected = {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "book", "arguments": {"when": day}}}]}
        else:
            chosen = {"role": "assistant", "content": f"Booked {day}."}
            rejected = {"role": "assistant", "content": "No."}
        rows.append({"prompt": prompt, "chosen": [chosen], "rejected": [rejected], "tools": TOOLS})
    return rows


def kto_rows(n: int = 6) -> list[dict]:
    out = []
    for i, pair in enumerate(pair_rows(n)):
        out.append({"prompt": pair["prompt"], "completion": pair["chosen" if i % 3 else "rejected"],
                    "label": bool(i % 3), "tools": pair["tools"]})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_job(tmp: Path, model_dir: Path, store: Path, rows: list[dict], **config) -> TrainJob:
    settings = {"base_model": str(model_dir), "sft_steps": 1, "max_steps": 2, "batch_size": 2,
                "max_length": 256, "lora_r": 4, "lora_alpha": 8}
    settings.update(config)
    return TrainJob(tenant_id="acme", agent_id="salon", config=TrainConfig(**settings),
                    train_file=write_jsonl(tmp / "train.jsonl", rows), meta={}, output_dir=tmp / "run",
                    store_dir=store, version="v-test")


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_dir, smollm2_store):
    tmp = tmp_path_factory.mktemp("dpo")
    progress: list[dict] = []
    result = get_backend("trl").train(tiny_job(tmp, tiny_model_dir, smollm2_store, pair_rows()), progress.append)
    return result, progress


def test_sft_then_dpo_writes_adapter_with_digest_metrics_and_plot(dpo_run):
    result, progress = dpo_run
    assert (result.version, result.method, result.backend) == ("v-test", "dpo", "trl")
    files = sorted(p.name for p in result.artifact_dir.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    assert result.artifact_digest == artifact_digest(result.artifact_dir)
    assert result.artifact_digest.startswith("sha256:") and len(result.artifact_digest) == 71
    assert result.sft_artifact_dir is not None and (result.sft_artifact_dir / "adapter_model.safetensors").is_file()
    assert result.steps == 3

    rows = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in rows] == [("sft", 1), ("dpo", 1), ("dpo", 2)]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert all(key in r for r in rows if r["phase"] == "dpo"), key
    assert [p["step"] for p in progress] == [1, 1, 2]
    assert result.plot_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((result.artifact_dir.parent / "result.json").read_text())
    assert record["artifact_digest"] == result.artifact_digest and record["config"]["beta"] == 0.1


def test_digest_is_the_one_serving_checks(dpo_run):
    nats_artifacts = pytest.importorskip("agent_dpo_adapters.nats_artifacts")
    result, _ = dpo_run
    assert nats_artifacts.artifact_digest(result.artifact_dir) == result.artifact_digest


def test_stacked_adapter_equals_sft_merged_then_preference_adapter(dpo_run, tiny_model_dir):
    # What the server loads (one adapter over the base) must be the model DPO actually trained.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result, _ = dpo_run
    run_dir = result.artifact_dir.parent
    ids = torch.tensor([[1, 520, 3012, 28, 44, 19324, 2, 0, 9]])

    def fresh():
        return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), use_safetensors=True)

    stacked = PeftModel.from_pretrained(fresh(), str(result.artifact_dir)).eval()
    sft_merged = PeftModel.from_pretrained(fresh(), str(run_dir / "sft")).merge_and_unload()
    two_step = PeftModel.from_pretrained(sft_merged, str(run_dir / "preference")).eval()
    base = fresh().eval()
    with torch.no_grad():
        got, want, before = stacked(ids).logits, two_step(ids).logits, base(ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, before, atol=1e-4)  # the adapter changed something


def test_sft_then_kto_logs_kl(tmp_path, tiny_model_dir, smollm2_store):
    job = tiny_job(tmp_path, tiny_model_dir, smollm2_store, kto_rows(), method="kto")
    result = get_backend("trl").train(job, lambda _: None)
    rows = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    kto = [r for r in rows if r["phase"] == "kto"]
    assert len(kto) == 2 and all("kl" in r and "loss" in r for r in kto)
    assert result.extra["kto_weights"] == (0.5, 1.0)  # 2 undesirable / 4 desirable, TRL's ratio rule
    assert result.artifact_digest == artifact_digest(result.artifact_dir)


def test_kto_weights_prefer_config_then_meta_then_ratio():
    rows = [{"label": True}] * 3 + [{"label": False}]
    assert kto_weights(rows, {}, TrainConfig()) == (0.33, 1.0)
    assert kto_weights(rows, {"kto_weights": {"desirable": 1.0, "undesirable": 2.5}}, TrainConfig()) == (1.0, 2.5)
    assert kto_weights(rows, {"kto_weights": {"desirable": 1.0, "undesirable": 2.5}},
                       TrainConfig(desirable_weight=0.7)) == (0.7, 1.0)
    assert kto_weights([{"label": True}, {"label": False}], {}, TrainConfig()) == (1.0, 1.0)
    exported = {"format": "trl-kto", "kto": {"desirable_weight": 1.0, "undesirable_weight": 2.5714}}
    assert kto_weights(rows, exported, TrainConfig()) == (1.0, 2.5714)
    assert kto_weights(rows, {**exported, "format": "trl-dpo"}, TrainConfig()) == (0.33, 1.0)


def test_dpo_refuses_kto_rows(tmp_path, tiny_model_dir, smollm2_store):
    job = tiny_job(tmp_path, tiny_model_dir, smollm2_store, kto_rows())
    with pytest.raises(AgentDpoError, match="trl-dpo"):
        get_backend("trl").train(job, lambda _: None)


def test_config_from_toml_file_then_flags(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text('[train]\nmethod = "kto"\nmax_steps = 7\nlora_targets = ["q_proj", "v_proj"]\n')
    config = TrainConfig.from_file(path).override(max_steps=9, beta=None, seed=3)
    assert (config.method, config.max_steps, config.beta, config.seed) == ("kto", 9, 0.1, 3)
    assert config.lora_targets == ["q_proj", "v_proj"]
    assert TrainConfig.from_dict(config.to_dict()) == config
    (tmp_path / "bad.toml").write_text("max_stepz = 3\n")
    with pytest.raises(UsageError, match="max_stepz"):
        TrainConfig.from_file(tmp_path / "bad.toml")
    with pytest.raises(UsageError, match="backend"):
        TrainConfig(backend="tpu")


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(AgentDpoError, match="unknown training backend"):
        get_backend("nope")


@pytest.mark.slow
def test_real_smollm2_sft_then_dpo(tmp_path, smollm2_store):
    # One step of each phase, one pair per step: 135M parameters on a shared CPU take their time.
    job = tiny_job(tmp_path, Path("smollm2-135m-instruct"), smollm2_store, pair_rows(2),
                   base_model="smollm2-135m-instruct", sft_steps=1, max_steps=1, batch_size=1,
                   lora_r=8, lora_alpha=16)
    result = get_backend("trl").train(job, lambda _: None)
    rows = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["sft", "dpo"]
    assert all(r["loss"] == r["loss"] for r in rows)  # finite, logged
    assert result.artifact_digest == artifact_digest(result.artifact_dir)
    config = json.loads((result.artifact_dir / "adapter_config.json").read_text())
    assert config["r"] == 16  # SFT rank 8 + DPO rank 8, stacked


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent_dpo.cli", "--log-format", "json", *args],
                          check=False, capture_output=True, text=True, timeout=600)


def test_train_cli_runs_inline_and_prints_the_result(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(4))
    proc = run_cli("train", "--agent", "acme/salon", "--data", str(data), "--base-model", str(tiny_model_dir),
                   "--base-is-sft", "--max-steps", "1", "--batch-size", "2", "--version", "v1",
                   "--max-length", "48", "--truncation-mode", "keep_end",
                   "--store", str(tmp_path / "store"), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["version"] == "v1" and result["sft_artifact_dir"] is None
    assert Path(result["artifact_dir"]) == tmp_path / "store" / "runs" / "acme" / "salon" / "v1" / "adapter"
    assert result["artifact_digest"] == artifact_digest(Path(result["artifact_dir"]))


def test_train_cli_bad_input_is_one_line():
    for args in (("train", "--max-steps", "2"), ("train", "--agent", "acme/salon", "--max-steps", "0")):
        proc = run_cli(*args)
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert "Traceback" not in proc.stderr


def test_full_fine_tune_saves_the_model_as_the_artifact(tmp_path, tiny_model_dir, smollm2_store):
    job = tiny_job(tmp_path, tiny_model_dir, smollm2_store, pair_rows(4), lora=False, max_steps=1)
    result = get_backend("trl").train(job, lambda _: None)
    names = {p.name for p in result.artifact_dir.iterdir()}
    assert {"config.json", "model.safetensors"} <= names and "adapter_config.json" not in names
    assert result.artifact_digest == artifact_digest(result.artifact_dir)
