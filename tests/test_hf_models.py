"""Model provisioning: SmolLM2 from the wheel's GGUF becomes a plain safetensors folder once, and later
loads read that folder; local folders load as they are; unusable names fail with one clear line."""

# ruff: noqa: F811  (fixtures come from tests/tiny_model.py, imported after the sys.path line)
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import smollm2_store, tiny_model_dir  # noqa: F401  (pytest fixtures)

from agent_dpo.errors import AgentDpoError
from agent_dpo_adapters import hf_models


@pytest.mark.slow
def test_smollm2_is_converted_once_and_then_read_from_safetensors(tmp_path, monkeypatch):
    target = hf_models.resolve_model("smollm2-135m-instruct", tmp_path)
    assert target == tmp_path / "models" / "smollm2-135m-instruct"
    assert (target / "model.safetensors").is_file() and (target / "config.json").is_file()
    assert "quantization_config" not in (target / "config.json").read_text()
    assert not list(target.parent.glob(".*tmp*")), "temp folder left behind"
    weights_mtime = (target / "model.safetensors").stat().st_mtime_ns

    # The second resolve must not go near the GGUF: make finding it fail loudly.
    def no_gguf():
        raise AssertionError("GGUF touched after provisioning")
    monkeypatch.setattr(hf_models, "smollm2_gguf_path", no_gguf)
    assert hf_models.resolve_model("SmolLM2-135M-Instruct", tmp_path) == target
    model = hf_models.load_model("smollm2-135m-instruct", tmp_path)
    assert (target / "model.safetensors").stat().st_mtime_ns == weights_mtime
    assert getattr(model, "hf_quantizer", None) is None
    assert model.config.num_hidden_layers == 30
    assert next(model.parameters()).dtype.is_floating_point


def test_converted_model_generates_sensible_text(smollm2_store):
    import torch

    tokenizer = hf_models.load_tokenizer("smollm2-135m-instruct", smollm2_store)
    model = hf_models.load_model("smollm2-135m-instruct", smollm2_store)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_local_safetensors_folder_loads_as_is(tiny_model_dir, tmp_path):
    assert hf_models.resolve_model(tiny_model_dir, tmp_path) == tiny_model_dir
    model = hf_models.load_model(str(tiny_model_dir), tmp_path)
    assert model.config.hidden_size == 64
    tokenizer = hf_models.load_tokenizer(tiny_model_dir, tmp_path)
    assert tokenizer.pad_token != tokenizer.eos_token


def test_folder_without_safetensors_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(AgentDpoError, match="safetensors"):
        hf_models.resolve_model(tmp_path / "m", tmp_path)


def test_unusable_name_is_one_clear_error(tmp_path):
    with pytest.raises(AgentDpoError, match="neither"):
        hf_models.resolve_model("not a model", tmp_path)


def test_adapter_folder_is_merged_into_its_base_once(tiny_model_dir, tmp_path, monkeypatch):
    """A LoRA folder (a version's SFT stage) resolves to a plain model: its base with the adapter merged,
    cached by the adapter's digest, so the next run can declare it its SFT'd base."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    base = hf_models.load_model(tiny_model_dir, tmp_path)
    torch.manual_seed(0)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "run" / "sft"
    lora.save_pretrained(str(adapter))
    merged_dir = hf_models.resolve_model(adapter, tmp_path)
    assert merged_dir.parent == tmp_path / "models" / "merged" and (merged_dir / "model.safetensors").is_file()
    assert not (merged_dir / "adapter_config.json").exists()

    ids = torch.tensor([[1, 5, 9, 42, 7]])
    expected = PeftModel.from_pretrained(hf_models.load_model(tiny_model_dir, tmp_path), str(adapter))
    merged = hf_models.load_model(adapter, tmp_path)
    plain = hf_models.load_model(tiny_model_dir, tmp_path)
    with torch.no_grad():
        want, got, before = (m(input_ids=ids).logits for m in (expected.eval(), merged.eval(), plain.eval()))
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(got, before, atol=1e-3)
    assert hf_models.load_tokenizer(adapter, tmp_path).chat_template  # the tool-aware template, as for any model

    monkeypatch.setattr("peft.PeftModel.from_pretrained", lambda *a, **k: pytest.fail("merged twice"))
    assert hf_models.resolve_model(adapter, tmp_path) == merged_dir


def test_adapter_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "adapter_config.json").write_text("{}")
    with pytest.raises(AgentDpoError, match="adapter_model.safetensors"):
        hf_models.resolve_model(tmp_path / "sft", tmp_path)
