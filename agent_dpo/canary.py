"""The canary: eval gates decide who may enter, then finished calls on each arm (CSAT, thumbs-down,
tool errors, escalations) decide whether the challenger advances a step, holds for more data, is
promoted, or is rolled back. `decide` is a pure function; `CanaryController` applies its answers
to the registry by compare-and-set and publishes every decision on agentdpo.registry.<t>.<a>."""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from agent_dpo.logs import get_logger
from agent_dpo.registry import (
    DEFAULT_STEPS,
    RegistryError,
    RolloutDoc,
    advance_canary,
    promote,
    rollback,
    start_canary,
)

Action = Literal["hold", "advance", "promote", "rollback", "refuse", "start"]
ESCALATED_OUTCOMES = ("escalated", "transferred")
log = get_logger(component="canary")


@dataclass(frozen=True)
class ArmOutcome:
    """One finished call as the canary sees it. `version` is what served it (call.started's
    model.version; None for the base model)."""

    version: str | None
    csat: float | None = None  # score / scale_max, 0..1
    thumbs_down: bool | None = None  # any thumbs-down on the call; None when nobody rated it
    tool_errors: int = 0
    tool_calls: int = 0
    escalated: bool = False


def outcome_from_call(call) -> ArmOutcome | None:
    """An assembled `agent_dpo.calls.Call` -> its outcome, once `call.ended` has arrived."""
    if call.ended is None or call.started is None:
        return None
    csats = call.feedback_of("csat")
    thumbs = call.feedback_of("thumbs")
    csat = None
    if csats:
        latest = max(csats, key=lambda f: f.seq).data
        csat = latest.score / latest.scale_max
    return ArmOutcome(
        version=call.served_version,
        csat=csat,
        thumbs_down=any(not f.data.up for f in thumbs) if thumbs else None,
        tool_errors=sum(1 for tc in call.tool_calls if tc.error),
        tool_calls=len(call.tool_calls),
        escalated=call.ended.outcome in ESCALATED_OUTCOMES,
    )


@dataclass
class ArmStats:
    calls: int = 0
    csat_sum: float = 0.0
    csat_n: int = 0
    thumbs_n: int = 0
    thumbs_down: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    escalations: int = 0

    def add(self, o: ArmOutcome) -> None:
        self.calls += 1
        if o.csat is not None:
            self.csat_sum += o.csat
            self.csat_n += 1
        if o.thumbs_down is not None:
            self.thumbs_n += 1
            self.thumbs_down += int(o.thumbs_down)
        self.tool_calls += o.tool_calls
        self.tool_errors += o.tool_errors
        self.escalations += int(o.escalated)

    def metric(self, name: str) -> tuple[float | None, int]:
        """(value, samples) of one metric."""
        if name == "csat":
            return (self.csat_sum / self.csat_n if self.csat_n else None), self.csat_n
        if name == "thumbs_down_rate":
            return (self.thumbs_down / self.thumbs_n if self.thumbs_n else None), self.thumbs_n
        if name == "tool_error_rate":
            return (self.tool_errors / self.tool_calls if self.tool_calls else 0.0), self.calls
        if name == "escalation_rate":
            return (self.escalations / self.calls if self.calls else None), self.calls
        raise KeyError(name)


@dataclass(frozen=True)
class CanaryPolicy:
    steps: tuple[float, ...] = DEFAULT_STEPS
    min_calls_per_step: int = 50  # finished challenger calls before a step may advance
    min_feedback: int = 20  # CSAT / thumbs samples per arm before that metric is judged
    require_feedback: bool = True  # hold until CSAT or thumbs can be judged, not tool errors alone
    max_csat_drop: float = 0.05  # challenger CSAT may be at most this much below champion's
    max_thumbs_down_increase: float = 0.05
    max_tool_error_increase: float = 0.02
    max_escalation_increase: float = 0.05

    def __post_init__(self) -> None:
        if not self.steps or any(not 0 < s <= 1 for s in self.steps) or list(self.steps) != sorted(self.steps):
            raise ValueError(f"canary steps must be increasing weights in (0, 1], got {self.steps}")


@dataclass(frozen=True)
class EvalGates:
    """Offline results a version must show (from `agent-dpo eval --json`) before any live call."""

    min_preference_accuracy: float = 0.6
    min_win_rate: float = 0.5
    min_win_rate_ci_low: float | None = None
    max_tool_validity_drop: float = 0.0  # vs the baseline's tool-call validity


def gate_failures(eval_result: dict[str, Any] | None, gates: EvalGates) -> list[str]:
    """Why a version may not enter canary; empty when it may."""
    if not eval_result:
        return ["no eval results"]
    out = []
    pa = eval_result.get("preference_accuracy")
    if pa is not None and pa < gates.min_preference_accuracy:
        out.append(f"preference_accuracy {pa:.3f} < {gates.min_preference_accuracy}")
    wr = eval_result.get("win_rate")
    if wr is None:
        out.append("no win_rate")
    elif wr < gates.min_win_rate:
        out.append(f"win_rate {wr:.3f} < {gates.min_win_rate}")
    ci = eval_result.get("win_rate_ci")
    if gates.min_win_rate_ci_low is not None and ci and ci[0] < gates.min_win_rate_ci_low:
        out.append(f"win_rate_ci low {ci[0]:.3f} < {gates.min_win_rate_ci_low}")
    tv, btv = eval_result.get("tool_call_validity"), eval_result.get("baseline_tool_call_validity")
    if tv is not None and btv is not None and tv < btv - gates.max_tool_validity_drop:
        out.append(f"tool_call_validity {tv:.3f} below baseline {btv:.3f}")
    return out


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    step: int
    weight: float
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    champion_calls: int = 0
    challenger_calls: int = 0
    step_calls: int = 0


# metric -> (policy limit attribute, higher is better)
_METRICS = {
    "csat": ("max_csat_drop", True),
    "thumbs_down_rate": ("max_thumbs_down_increase", False),
    "tool_error_rate": ("max_tool_error_increase", False),
    "escalation_rate": ("max_escalation_increase", False),
}


def decide(doc: RolloutDoc, champion: ArmStats, challenger: ArmStats, step_calls: int,
           policy: CanaryPolicy) -> Decision:
    """The next move of a running canary. Stats are cumulative since the canary began;
    `step_calls` counts challenger calls finished during the current step."""
    base = {"step": doc.step, "weight": doc.canary_weight, "champion_calls": champion.calls,
            "challenger_calls": challenger.calls, "step_calls": step_calls}
    if doc.state != "canary" or not doc.challenger:
        return Decision("hold", "no canary running", **base)
    checks: dict[str, dict[str, Any]] = {}
    failed = []
    for name, (limit_attr, higher_better) in _METRICS.items():
        cv, cn = champion.metric(name)
        xv, xn = challenger.metric(name)
        need = policy.min_feedback if name in ("csat", "thumbs_down_rate") else policy.min_calls_per_step
        if cv is None or xv is None or cn < need or xn < need:
            continue
        limit = getattr(policy, limit_attr)
        worse_by = (cv - xv) if higher_better else (xv - cv)
        ok = worse_by <= limit
        checks[name] = {"champion": round(cv, 4), "challenger": round(xv, 4), "worse_by": round(worse_by, 4),
                        "limit": limit, "ok": ok}
        if not ok:
            failed.append(f"{name} {xv:.3f} vs champion {cv:.3f} (limit {limit})")
    if failed:
        return Decision("rollback", "; ".join(failed), checks=checks, **base)
    if step_calls < policy.min_calls_per_step:
        return Decision("hold", f"not enough data: {step_calls}/{policy.min_calls_per_step} calls this step",
                        checks=checks, **base)
    if policy.require_feedback and not ({"csat", "thumbs_down_rate"} & checks.keys()):
        return Decision("hold", f"not enough feedback: CSAT {challenger.csat_n}, thumbs {challenger.thumbs_n} "
                        f"of {policy.min_feedback} needed", checks=checks, **base)
    nxt = doc.step + 1
    if nxt >= len(policy.steps):
        return Decision("promote", f"all checks passed at {doc.canary_weight:.0%}", checks=checks, **base)
    return Decision("advance", f"all checks passed at {doc.canary_weight:.0%}", checks=checks,
                    **{**base, "step": nxt, "weight": policy.steps[nxt]})


class _Stale(Exception):
    """The rollout moved since the decision was made; the decision no longer applies."""


class CanaryController:
    """Owns per-arm stats of running canaries and moves them through the registry. Stats live in
    memory; the step and weight live in the rollout document, so a restarted controller resumes
    at the same step (re-collecting that step's data)."""

    def __init__(self, registry, policy: CanaryPolicy | None = None, gates: EvalGates | None = None,
                 actor: str = "canary"):
        self.registry = registry
        self.policy = policy or CanaryPolicy()
        self.gates = gates or EvalGates()
        self.actor = actor
        self._arms: dict[tuple[str, str, str | None], ArmStats] = {}
        self._step_calls: dict[tuple[str, str, str, int], int] = {}
        self._docs: dict[tuple[str, str], RolloutDoc] = {}
        self.decisions: list[Decision] = []

    def record(self, tenant_id: str, agent_id: str, outcome: ArmOutcome) -> None:
        """Feed one finished call. Outcomes of versions outside the running canary are ignored."""
        doc = self._docs.get((tenant_id, agent_id))
        if doc is None or doc.state != "canary":
            return
        if outcome.version not in (doc.champion, doc.challenger):
            return
        self._arms.setdefault((tenant_id, agent_id, outcome.version), ArmStats()).add(outcome)
        if outcome.version == doc.challenger:
            k = (tenant_id, agent_id, doc.challenger, doc.step)
            self._step_calls[k] = self._step_calls.get(k, 0) + 1

    def record_call(self, call) -> bool:
        """Feed an assembled call (`agent_dpo.calls.Call`); False when it has not ended yet."""
        outcome = outcome_from_call(call)
        if outcome is None:
            return False
        self.record(call.tenant_id, call.agent_id, outcome)
        return True

    def stats(self, tenant_id: str, agent_id: str, version: str | None) -> ArmStats:
        return self._arms.get((tenant_id, agent_id, version), ArmStats())

    async def refresh(self, tenant_id: str, agent_id: str) -> RolloutDoc | None:
        doc, _ = await self.registry.get_rollout(tenant_id, agent_id)
        self._track(tenant_id, agent_id, doc)
        return doc

    def _track(self, tenant_id: str, agent_id: str, doc: RolloutDoc | None) -> None:
        old = self._docs.get((tenant_id, agent_id))
        if doc is None:
            self._docs.pop((tenant_id, agent_id), None)
            return
        if old is not None and (old.challenger != doc.challenger or doc.state != "canary"):
            # A new canary (or none) starts from clean stats for this agent.
            for key in [k for k in self._arms if k[:2] == (tenant_id, agent_id)]:
                del self._arms[key]
        self._docs[(tenant_id, agent_id)] = doc

    async def start(self, tenant_id: str, agent_id: str, version: str,
                    eval_result: dict[str, Any] | None = None, force: bool = False) -> Decision:
        """Let `version` into canary at the first step if its eval results pass the gates
        (`force` skips the gates: an operator's explicit choice, recorded in the reason)."""
        failures = [] if force else gate_failures(eval_result, self.gates)
        if await self.registry.get_manifest(tenant_id, agent_id, version) is None:
            failures = [f"no manifest for {version}"]
        if failures:
            d = Decision("refuse", f"{version} refused: " + "; ".join(failures), 0, 0.0)
            await self._publish(tenant_id, agent_id, version, d)
            return d
        weight = self.policy.steps[0]
        doc = await self.registry.change_rollout(
            tenant_id, agent_id,
            lambda cur: start_canary(cur, version, weight, self.actor,
                                     f"{version} entered canary" + (" (gates skipped)" if force
                                                                     else " after passing eval gates")))
        self._track(tenant_id, agent_id, doc)
        d = Decision("start", doc.reason, 0, weight)
        await self._publish(tenant_id, agent_id, version, d)
        return d

    async def evaluate(self, tenant_id: str, agent_id: str) -> Decision:
        """Decide on the agent's running canary from the stats so far, and apply the decision."""
        doc = await self.refresh(tenant_id, agent_id)
        if doc is None or doc.state != "canary" or not doc.challenger:
            return Decision("hold", "no canary running", 0, 0.0)
        champion = self.stats(tenant_id, agent_id, doc.champion)
        challenger = self.stats(tenant_id, agent_id, doc.challenger)
        step_calls = self._step_calls.get((tenant_id, agent_id, doc.challenger, doc.step), 0)
        d = decide(doc, champion, challenger, step_calls, self.policy)
        if d.action != "hold":
            try:
                new = await self.registry.change_rollout(tenant_id, agent_id, self._rule(doc, d))
            except _Stale:
                return Decision("hold", "rollout changed meanwhile; deciding again next round",
                                doc.step, doc.canary_weight)
            self._track(tenant_id, agent_id, new)
        await self._publish(tenant_id, agent_id, doc.challenger, d)
        return d

    def _rule(self, seen: RolloutDoc, d: Decision):
        def change(cur: RolloutDoc) -> RolloutDoc:
            if (cur.state, cur.challenger, cur.step) != (seen.state, seen.challenger, seen.step):
                raise _Stale()
            if d.action == "advance":
                return advance_canary(cur, d.step, d.weight, self.actor, d.reason)
            if d.action == "promote":
                return promote(cur, self.actor, f"{cur.challenger} promoted: {d.reason}")
            return rollback(cur, self.actor, f"{cur.challenger} rolled back: {d.reason}")
        return change

    async def _publish(self, tenant_id: str, agent_id: str, version: str | None, d: Decision) -> None:
        self.decisions.append(d)
        log.info("canary_decision", tenant_id=tenant_id, agent_id=agent_id, version=version, action=d.action,
                 reason=d.reason, step=d.step, weight=d.weight, challenger_calls=d.challenger_calls,
                 step_calls=d.step_calls)
        await self.registry.announce(tenant_id, agent_id, {"kind": "canary", "version": version, **asdict(d)})

    async def run(self, interval: float = 5.0, stop: asyncio.Event | None = None) -> None:
        """Evaluate every running canary each `interval` seconds until `stop` is set."""
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                for doc, _ in await self.registry.all_rollouts():
                    if doc.state == "canary":
                        await self.evaluate(doc.tenant_id, doc.agent_id)
            except RegistryError as exc:
                log.warning("canary_round_failed", error=str(exc))
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass
