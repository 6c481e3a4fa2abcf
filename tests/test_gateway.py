# ruff: noqa: F811  (fixtures come from tests/tiny_model.py and are requested by name)
"""The local OpenAI-compatible gateway, driven by the real `openai` SDK: `model` is tenant/agent, the
X-Call-Id header pins a version for the call's whole life across a promote, answers come back in
OpenAI shape with tool_calls (also streamed), bad requests get OpenAI-shaped errors, and a real
tiny transformers model with a PEFT adapter serves through it."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import nats
import pytest
from openai import AsyncOpenAI, BadRequestError

sys.path.insert(0, str(Path(__file__).parent))
from serving_fixtures import EchoBackend, manifest
from tiny_model import smollm2_store, tiny_model_dir  # noqa: F401  (pytest fixtures)

from agent_dpo.registry import ArtifactRef, promote
from agent_dpo.router import Router
from agent_dpo_adapters.gateway import start_gateway
from agent_dpo_adapters.nats_registry import NatsRegistry

TOOLS = [{"type": "function", "function": {"name": "book_slot", "parameters": {"type": "object"}}}]
HELLO = [{"role": "user", "content": "Can I come Tuesday?"}]


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def registry(nats_url):
    nc = await nats.connect(nats_url)
    reg = await NatsRegistry.open(nc)
    yield reg
    await nc.close()


async def ask(client: AsyncOpenAI, call_id: str | None, tools=None, ended: bool = False, model="acme/rebook"):
    headers = {"X-Call-Id": call_id} if call_id else {}
    if ended:
        headers["X-Call-Ended"] = "true"
    raw = await client.chat.completions.with_raw_response.create(
        model=model, messages=HELLO, tools=tools or None, extra_headers=headers)
    return raw.headers.get("x-model-version"), raw.parse()


async def test_gateway_pins_each_call_across_a_promote(registry):
    for v in ("v1", "v2"):
        await registry.put_manifest(manifest(v))
    await registry.change_rollout("acme", "rebook", lambda d: promote(d, "test", version="v1"))
    backend = EchoBackend()
    router = Router(registry, backend)
    await router.start()
    gateway = await start_gateway(router, backend, "127.0.0.1", 0)
    client = AsyncOpenAI(base_url=gateway.base_url, api_key="unused")
    try:
        version, resp = await ask(client, "call-a")
        assert version == "v1" and resp.choices[0].message.content == "served by v1"
        assert resp.model == "rebook--v1" and resp.object == "chat.completion"

        await registry.change_rollout("acme", "rebook", lambda d: promote(d, "test", version="v2"))
        await wait_for(lambda: router.rollout("acme", "rebook").champion == "v2")
        # Concurrent turns: the old call stays on v1, every new call gets v2.
        answers = await asyncio.gather(*(ask(client, "call-a") for _ in range(5)),
                                       *(ask(client, f"call-new-{i}") for i in range(5)))
        assert [a[0] for a in answers] == ["v1"] * 5 + ["v2"] * 5

        version, resp = await ask(client, "call-a", tools=TOOLS, ended=True)
        call = resp.choices[0].message.tool_calls[0]
        assert version == "v1" and call.function.name == "book_slot" and '"served_by": "v1"' in call.function.arguments
        assert resp.choices[0].finish_reason == "tool_calls"
        await wait_for(lambda: "v1" not in backend.loaded)  # its last call hung up: v1 unloaded
        assert router.pinned("acme", "rebook", "call-a") is None

        version, _ = await ask(client, None)  # no call id: served, nothing stays pinned
        assert version == "v2"

        stream = await client.chat.completions.create(model="acme/rebook", messages=HELLO, stream=True,
                                                      extra_headers={"X-Call-Id": "call-s"})
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        assert text == "served by v2"

        assert [m.id async for m in client.models.list()] == ["acme/rebook"]
        # A runtime asks what serves a call before its first turn, to stamp call.started.
        http = client._client  # the SDK's own httpx client, same base URL
        pin = (await http.get(f"{gateway.base_url}/calls/acme/rebook/call-p")).json()
        assert pin["model"] == {"name": "rebook--v2", "version": "v2"} and pin["arm"] == "champion"
        assert (await ask(client, "call-p"))[0] == "v2"
        assert (await http.delete(f"{gateway.base_url}/calls/acme/rebook/call-p")).json() == {"released": True}
        assert router.pinned("acme", "rebook", "call-p") is None
        with pytest.raises(BadRequestError, match="tenant"):
            await ask(client, "call-x", model="rebook")
        unknown_version, _ = await ask(client, "call-y", model="acme/other-agent")
        assert unknown_version == "base"
    finally:
        await client.close()
        await gateway.close()
        await router.stop()


async def test_gateway_releases_idle_calls(registry):
    await registry.put_manifest(manifest("v1"))
    await registry.change_rollout("acme", "rebook", lambda d: promote(d, "test", version="v1"))
    router = Router(registry, EchoBackend())
    await router.start()
    gateway = await start_gateway(router, router.backend, "127.0.0.1", 0, idle_release_s=0.2)
    client = AsyncOpenAI(base_url=gateway.base_url, api_key="unused")
    try:
        await ask(client, "quiet-call")
        assert router.live_calls("acme", "rebook", "v1") == 1
        await wait_for(lambda: router.live_calls("acme", "rebook", "v1") == 0, timeout=5)
    finally:
        await client.close()
        await gateway.close()
        await router.stop()


@pytest.mark.slow
async def test_a_real_tiny_model_serves_through_the_gateway(registry, nats_url, tiny_model_dir, tmp_path):
    from test_serving import make_adapter

    from agent_dpo_adapters.hf_models import load_model, load_tokenizer
    from agent_dpo_adapters.local_serving import LocalPeftBackend
    from agent_dpo_adapters.nats_artifacts import get_artifact, put_artifact

    nc = await nats.connect(nats_url)
    adapter = make_adapter(tiny_model_dir, tmp_path / "v1", seed=1)
    digest = await put_artifact(nc.jetstream(), "acme.rebook.v1", adapter)
    await registry.put_manifest(manifest("v1", base_model=str(tiny_model_dir),
                                         artifact=ArtifactRef(name="acme.rebook.v1", digest=digest)))

    async def fetch(ref):
        return await get_artifact(nc.jetstream(), ref.artifact_name, ref.artifact_digest, tmp_path / "cache")

    backend = LocalPeftBackend(load_model(str(tiny_model_dir), tmp_path), load_tokenizer(str(tiny_model_dir), tmp_path),
                               fetch, base_model=str(tiny_model_dir), max_new_tokens=6)
    router = Router(registry, backend, base_model=str(tiny_model_dir))
    await router.start()
    gateway = await start_gateway(router, backend, "127.0.0.1", 0)
    client = AsyncOpenAI(base_url=gateway.base_url, api_key="unused")
    try:
        base_version, base_resp = await ask(client, "c1", tools=TOOLS)
        await registry.change_rollout("acme", "rebook", lambda d: promote(d, "test", version="v1"))
        await wait_for(lambda: router.revision("acme", "rebook") >= 1)
        again_version, again = await ask(client, "c1", tools=TOOLS)  # pinned before the promote
        new_version, new = await ask(client, "c2", tools=TOOLS)
        assert (base_version, again_version, new_version) == ("base", "base", "v1")
        assert again.choices[0].message.content == base_resp.choices[0].message.content
        assert new.choices[0].message.content != base_resp.choices[0].message.content
        assert new.usage.completion_tokens > 0 and new.choices[0].message.role == "assistant"
    finally:
        await client.close()
        await gateway.close()
        await router.stop()
        await nc.close()
