"""The two example agents of the world: who they are (tenant, agent id, served model), where they work
(salon locations, clinics), their system prompt, and their tool catalog read from `tools/<agent_id>/`.
The simulator, the demo and the tests all take the agents from here."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Site:
    """A place the agent answers for: a salon location or a clinic."""

    site_id: str  # the tools' location id ("loc-downtown", "clinic-...")
    name: str
    timezone: str


@dataclass(frozen=True)
class ExampleAgent:
    tenant_id: str
    agent_id: str
    model_name: str
    model_version: str
    sites: tuple[Site, ...]
    prompt_template: str = field(repr=False)

    @property
    def key(self) -> str:
        return f"{self.tenant_id}/{self.agent_id}"

    @property
    def tools(self) -> list[dict[str, Any]]:
        """The OpenAI function tools this agent is offered (a shared list: do not mutate)."""
        return load_tools(self.agent_id)

    def system_prompt(self, site: Site, today: date) -> str:
        return self.prompt_template.format(site=site.name, site_id=site.site_id, tz=site.timezone,
                                           weekday=today.strftime("%A"), today=today.isoformat())


_SALON_PROMPT = (
    "You are the phone booking assistant for {site} (location id {site_id}). Callers want to book, "
    "move or cancel salon appointments. Use the tools to look up the calendar and make changes; "
    "never invent appointment times. Speak in short sentences: this is a voice call. "
    "Today is {weekday}, {today}; times are local ({tz})."
)

_RESOLVER_PROMPT = (
    "You are the scheduling assistant of {site} (site id {site_id}). Patients call about appointment "
    "problems: double bookings, a provider who is away, a closed room. Look up the patient's "
    "appointments and the providers' availability with the tools, move appointments when the patient "
    "agrees, and flag the case for staff when you cannot settle it yourself. Do not give medical advice. "
    "Today is {weekday}, {today}; times are local ({tz})."
)

AGENTS: dict[str, ExampleAgent] = {
    "salon-rebook": ExampleAgent(
        tenant_id="acme-salons",
        agent_id="salon-rebook",
        model_name="smollm2-135m-instruct",
        model_version="base",
        sites=(
            Site("loc-downtown", "Acme Salons Downtown", "America/Chicago"),
            Site("loc-riverside", "Acme Salons Riverside", "America/Chicago"),
            Site("loc-north-end", "Acme Salons North End", "America/New_York"),
            Site("loc-eastgate", "Acme Salons Eastgate Mall", "America/Denver"),
        ),
        prompt_template=_SALON_PROMPT,
    ),
    "appointment-resolver": ExampleAgent(
        tenant_id="northside-health",
        agent_id="appointment-resolver",
        model_name="smollm2-135m-instruct",
        model_version="base",
        sites=(
            Site("fac-main-campus", "Northside Health Main Campus", "America/New_York"),
            Site("fac-westpark", "Northside Health Westpark Clinic", "America/New_York"),
            Site("fac-lakeview", "Northside Health Lakeview Family Practice", "America/Chicago"),
        ),
        prompt_template=_RESOLVER_PROMPT,
    ),
}


def example_agent(agent_id: str) -> ExampleAgent:
    """The example agent by agent id (`salon-rebook`) or TENANT/AGENT (`acme-salons/salon-rebook`)."""
    key = agent_id.split("/")[-1]
    if key not in AGENTS:
        raise KeyError(f"unknown example agent {agent_id!r}; known: {', '.join(AGENTS)}")
    agent = AGENTS[key]
    if "/" in agent_id and agent_id != agent.key:
        raise KeyError(f"{agent_id!r} is not an example agent (did you mean {agent.key!r}?)")
    return agent


def tools_dir() -> Path:
    try:
        from agent_dpo.toolcheck import catalog_dir
    except ImportError:  # the toolcheck module is optional for reading the catalog
        return Path(__file__).resolve().parents[2] / "tools"
    return catalog_dir()


_TOOLS: dict[str, list[dict[str, Any]]] = {}


def load_tools(agent_id: str) -> list[dict[str, Any]]:
    """The agent's tools in file-name order; one list object per agent, shared by every call."""
    if agent_id not in _TOOLS:
        folder = tools_dir() / agent_id
        try:
            from agent_dpo.toolcheck import load_tool_catalog
        except ImportError:
            tools = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]
        else:
            tools = load_tool_catalog(folder) if folder.is_dir() else []
        if not tools:
            raise FileNotFoundError(f"no tool definitions for {agent_id!r} under {folder}")
        _TOOLS[agent_id] = tools
    return _TOOLS[agent_id]


_BY_NAME: dict[str, dict[str, dict[str, Any]]] = {}


def tool_by_name(agent_id: str) -> dict[str, dict[str, Any]]:
    if agent_id not in _BY_NAME:
        _BY_NAME[agent_id] = {t["function"]["name"]: t for t in load_tools(agent_id)}
    return _BY_NAME[agent_id]
