# ruff: noqa: F811  (fixtures come from tests/tiny_model.py and are requested by name)
"""Serving backends behind the router: a real tiny transformers model with PEFT adapters fetched
from the NATS object store (digest-checked; a tampered one is never served), vLLM's runtime LoRA
endpoints on a loopback server (one immutable name per version, unloaded when nothing holds it),
and OpenAI `ft:` ids through the real SDK."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import nats
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from openai_loopback import LoopbackOpenAI
from serving_fixtures import manifest
from tiny_model import smollm2_store, tiny_model_dir  # noqa: F401  (pytest fixtures)
from vllm_loopback import VllmLoopback

from agent_dpo.registry import ArtifactRef, ModelRef, promote, rollback, start_canary
from agent_dpo.router import Router
from agent_dpo_adapters.nats_artifacts import get_artifact, put_artifact
from agent_dpo_adapters.nats_registry import NatsRegistry
from agent_dpo_adapters.vllm_serving import VllmBackend

TOOLS = [{"type": "function", "function": {"name": "book_slot", "parameters": {"type": "object"}}}]
HELLO = [{"role": "system", "content": "You book salon slots."}, {"role": "user", "content": "Tuesday?"}]


def make_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with random (non-zero) B weights, so each version answers differently."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if (out / "adapter_config.json").is_file():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8,
                                            target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=1.0)
    peft.save_pretrained(str(out), safe_serialization=True)
    return out


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def nc(nats_url):
    conn = await nats.connect(nats_url)
    yield conn
    await conn.close()


@pytest.fixture
async def registry(nc):
    return await NatsRegistry.open(nc)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {v: make_adapter(tiny_model_dir, root / v, seed) for v, seed in (("v1", 1), ("v2", 2))}


async def publish_version(nc, registry, version: str, path: Path, base: str):
    name = f"acme.rebook.{version}"
    digest = await put_artifact(nc.jetstream(), name, path)
    await registry.put_manifest(manifest(version, base_model=base, artifact=ArtifactRef(name=name, digest=digest)))


@pytest.mark.slow
async def test_local_backend_swaps_adapters_per_call_and_unloads_unreferenced(
        nc, registry, tiny_model_dir, adapters, tmp_path):
    from agent_dpo_adapters.hf_models import load_model, load_tokenizer
    from agent_dpo_adapters.local_serving import LocalPeftBackend

    base = str(tiny_model_dir)
    for v, path in adapters.items():
        await publish_version(nc, registry, v, path, base)

    async def fetch(ref: ModelRef) -> Path:
        return await get_artifact(nc.jetstream(), ref.artifact_name, ref.artifact_digest, tmp_path / "cache")

    model = load_model(base, tmp_path)
    model.eval()
    backend = LocalPeftBackend(model, load_tokenizer(base, tmp_path), fetch, base_model=base, max_new_tokens=8)
    router = Router(registry, backend, base_model=base)
    await router.start()

    base_answer = (await backend.chat(router.resolve("acme", "rebook", "c0"), HELLO)).message
    await registry.change_rollout("acme", "rebook", lambda d: promote(d, "test", version="v1"))
    await wait_for(lambda: router.revision("acme", "rebook") >= 1)
    ref1 = router.resolve("acme", "rebook", "c1")
    v1_answer = (await backend.chat(ref1, HELLO)).message
    assert ref1.version == "v1" and v1_answer != base_answer
    assert (await backend.chat(router.resolve("acme", "rebook", "c0"), HELLO)).message == base_answer

    await registry.change_rollout("acme", "rebook", lambda d: promote(d, "test", version="v2"))
    await wait_for(lambda: router.rollout("acme", "rebook").champion == "v2")
    v2_answer = (await backend.chat(router.resolve("acme", "rebook", "c2"), HELLO)).message
    assert v2_answer not in (v1_answer, base_answer)
    # c1 was pinned before the swap: same version, same answer, while v2 serves new calls.
    both = await asyncio.gather(backend.chat(router.resolve("acme", "rebook", "c1"), HELLO),
                                backend.chat(router.resolve("acme", "rebook", "c2"), HELLO))
    assert [r.message for r in both] == [v1_answer, v2_answer]
    assert len(backend.adapters) == 2

    router.release("c1")
    await wait_for(lambda: len(backend.adapters) == 1)
    assert backend.adapters == {"acme__rebook__v2"}
    msg = (await backend.chat(router.resolve("acme", "rebook", "c3"), HELLO, TOOLS)).message
    assert msg["role"] == "assistant" and isinstance(msg["tool_calls"], list)
    await router.stop()


async def test_a_tampered_artifact_is_refused_and_never_served(nc, registry, adapters, tmp_path):
    await publish_version(nc, registry, "v1", adapters["v1"], "smollm2-135m-instruct")
    await publish_version(nc, registry, "v2", adapters["v2"], "smollm2-135m-instruct")
    # Someone overwrites v2's object with other weights; the manifest still holds v2's digest.
    await put_artifact(nc.jetstream(), "acme.rebook.v2", adapters["v1"])
    fetched: list[str] = []

    async def fetch(ref: ModelRef) -> Path:
        path = await get_artifact(nc.jetstream(), ref.artifact_name, ref.artifact_digest, tmp_path / "c")
        fetched.append(ref.version)
        return path

    with VllmLoopback() as vllm:
        router = Router(registry, VllmBackend(vllm.base_url, fetch))
        await router.start()
        await registry.change_rollout("acme", "rebook", lambda d: promote(d, "test", version="v1"))
        await registry.change_rollout("acme", "rebook", lambda d: start_canary(d, "v2", 1.0, "test"))
        await wait_for(lambda: router.revision("acme", "rebook") >= 2 and
                       router.rollout("acme", "rebook").state == "canary")
        assert fetched == ["v1"]
        assert vllm.ops("load") == ["rebook--v1"]
        assert {router.resolve("acme", "rebook", f"c{i}").version for i in range(20)} == {"v1"}
        await router.stop()


async def test_vllm_backend_uses_one_immutable_lora_name_per_version(registry, adapters):
    for v in ("v1", "v2"):
        await registry.put_manifest(manifest(v))

    async def path_of(ref: ModelRef) -> Path:
        return adapters[ref.version]

    with VllmLoopback() as vllm:
        backend = VllmBackend(vllm.base_url, path_of, base_served_name="smollm2-135m-instruct")
        router = Router(registry, backend)
        await router.start()
        await registry.change_rollout("acme", "rebook", lambda d: promote(d, "test", version="v1"))
        await wait_for(lambda: router.revision("acme", "rebook") >= 1)
        pinned = router.resolve("acme", "rebook", "long-call")
        await registry.change_rollout("acme", "rebook", lambda d: start_canary(d, "v2", 0.5, "test"))
        await registry.change_rollout("acme", "rebook", lambda d: promote(d, "test"))
        await wait_for(lambda: router.rollout("acme", "rebook").champion == "v2")

        answer = await backend.chat(pinned, HELLO)
        assert answer.message["content"] == "served by rebook--v1"
        tool_answer = await backend.chat(router.resolve("acme", "rebook", "new"), HELLO, TOOLS)
        assert '"served_by": "rebook--v2"' in tool_answer.message["tool_calls"][0]["function"]["arguments"]
        assert tool_answer.finish_reason == "tool_calls"
        assert set(vllm.loras) == {"rebook--v1", "rebook--v2"}  # v1 still held by the live call

        router.release("long-call")
        router.release("new")
        await wait_for(lambda: set(vllm.loras) == {"rebook--v2"})
        await registry.change_rollout("acme", "rebook", lambda d: rollback(d, "test", "bad"))
        await wait_for(lambda: set(vllm.loras) == {"rebook--v1"})
        base = await backend.chat(ModelRef("acme", "rebook", None, "vllm", "smollm2-135m-instruct",
                                           "smollm2-135m-instruct", "base"), HELLO)
        assert base.message["content"] == "served by smollm2-135m-instruct"
        await router.stop()
    # Each load was of a name not loaded at that moment: never a reload in place.
    assert vllm.ops("load") == ["rebook--v1", "rebook--v2", "rebook--v1"]
    assert vllm.ops("unload") == ["rebook--v1", "rebook--v2"]


async def test_openai_backend_serves_ft_ids_and_loads_nothing():
    from openai import AsyncOpenAI

    from agent_dpo.errors import AgentDpoError
    from agent_dpo_adapters.openai_serving import OpenAIBackend

    with LoopbackOpenAI() as api:
        api.chat_replies.append("Tuesday 2pm is free.")
        backend = OpenAIBackend(AsyncOpenAI(base_url=api.base_url, api_key="test-key"))
        ref = ModelRef("acme", "rebook", "v3", "openai", "ft:gpt-4o-mini:acme:rebook:v3", "gpt-4o-mini")
        await backend.load(ref)
        answer = await backend.chat(ref, HELLO)
        assert answer.message["content"] == "Tuesday 2pm is free."
        assert api.calls("POST", "/chat/completions")[0].body["model"] == "ft:gpt-4o-mini:acme:rebook:v3"
        with pytest.raises(AgentDpoError, match="ft:"):
            await backend.load(ModelRef("acme", "rebook", "v4", "openai", "not-ft", "gpt-4o-mini"))
