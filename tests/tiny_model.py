"""Models for the training and evaluation tests: the real SmolLM2 provisioned once into a store that
persists between test runs, and a tiny Llama (2 layers, hidden 64) built from a config with SmolLM2's
tokenizer, saved as safetensors, so recipes run end to end in seconds.

Import the fixtures into a test module: `from tiny_model import smollm2_store, tiny_model_dir`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Provisioning SmolLM2 from GGUF takes ~20 s; keeping the converted model between runs keeps the suite
# fast. The conversion itself is tested from scratch in test_hf_models.py.
TEST_STORE = Path(os.environ.get("AGENT_DPO_TEST_STORE",
                                 Path(__file__).resolve().parent.parent / ".agent-dpo" / "test-store"))


def build_tiny_model(tokenizer_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama with SmolLM2's vocabulary, as a safetensors folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out_dir / "model.safetensors").is_file():
        return out_dir
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    try:
        os.replace(tmp, out_dir)
    except OSError:
        if not (out_dir / "model.safetensors").is_file():
            raise
    return out_dir


@pytest.fixture(scope="session")
def smollm2_store() -> Path:
    """A store directory holding the provisioned SmolLM2 (converted on first use)."""
    from agent_dpo_adapters.hf_models import SMOLLM2, resolve_model

    resolve_model(SMOLLM2, TEST_STORE)
    return TEST_STORE


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_store) -> Path:
    from agent_dpo_adapters.hf_models import SMOLLM2, resolve_model

    return build_tiny_model(resolve_model(SMOLLM2, smollm2_store), smollm2_store / "models" / "tiny-llama")
