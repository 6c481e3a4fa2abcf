"""Train / held-out split by call: a call's side is a pure function of (tenant, agent, call_id), so it
never moves however much data arrives later, and every example of one call lands on the same side.
Pairing tags each example with its side; exports and evaluation pick a side."""

from __future__ import annotations

import hashlib

DEFAULT_TEST_FRACTION = 0.1
SIDES = ("train", "test")


def split_point(tenant_id: str, agent_id: str, call_id: str) -> float:
    """A uniform number in [0, 1) from sha256 of `tenant/agent/call_id` (first 8 bytes)."""
    digest = hashlib.sha256(f"{tenant_id}/{agent_id}/{call_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(tenant_id: str, agent_id: str, call_id: str,
             test_fraction: float = DEFAULT_TEST_FRACTION) -> str:
    """"test" for about `test_fraction` of calls, "train" for the rest. Raising the fraction only
    moves calls from train to test, never the other way."""
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction {test_fraction} is outside [0, 1]")
    return "test" if split_point(tenant_id, agent_id, call_id) < test_fraction else "train"
