"""The whole loop on one machine, on embedded defaults: an embedded nats-server, the example world's
calls published as a runtime would, ingest, pairs, SFT then DPO on SmolLM2, held-out evaluation with
the rubric judge, canary with live calls answered by the served model, promotion, a deliberately bad
version rolled back, and a report. `agent-dpo demo` runs it; every stage uses the product's own parts."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent_dpo.logs import get_logger
from agent_dpo.report import AgentFunnel, ArmPoint, EvalFigures, RunReport, TimelineEntry, write_report

log = get_logger(component="demo")
TUNED_AGENT = ("acme-salons", "salon-rebook")


@dataclass
class DemoSettings:
    """Sized for 2 CPU cores: a SmolLM2 training step over 4 pairs costs tens of seconds there, so the
    demo trains on the newest `max_length` tokens of each context (truncation keep_end) for a few
    steps. Every size is a flag away for machines with a GPU."""

    calls: int = 3000  # simulated calls of both example agents
    seed: int = 7
    malformed: int = 6  # contract-breaking messages among them, to show dead letters
    backend: str = "fast"  # the local training engine (prefix-tree; "trl" for TRL's trainers)
    sft_steps: int = 8
    dpo_steps: int = 24
    batch_size: int = 4
    learning_rate: float = 5e-4
    sft_learning_rate: float = 1e-3
    max_length: int = 256
    truncation_mode: str = "keep_end"
    bad_dpo_steps: int = 8
    eval_pairs: int = 24
    eval_prompts: int = 8
    canary_steps: tuple[float, ...] = (0.5, 1.0)
    canary_min_calls: int = 3
    canary_round_calls: int = 6
    canary_max_rounds: int = 6
    max_new_tokens: int = 32
    store_dir: Path = Path(".agent-dpo/demo")
    report_dir: Path = Path("report")
    quick: bool = False

    @classmethod
    def quick_run(cls, **overrides: Any) -> DemoSettings:
        return replace(cls(calls=600, sft_steps=1, dpo_steps=1, bad_dpo_steps=1, batch_size=2, max_length=128,
                           eval_pairs=4, eval_prompts=2, canary_min_calls=2, canary_round_calls=4,
                           canary_max_rounds=3, max_new_tokens=16, quick=True), **overrides)


@dataclass
class _Run:
    settings: DemoSettings
    started: float = field(default_factory=time.monotonic)
    report: RunReport | None = None
    stage_started: float = 0.0

    def t(self) -> float:
        return time.monotonic() - self.started

    def stage(self, name: str, detail: str = "") -> None:
        self._close_stage()
        self.stage_name = name
        self.stage_started = time.monotonic()
        say(f"\n== {name} ==" + (f"  {detail}" if detail else ""))

    def _close_stage(self) -> None:
        if self.stage_started and self.report is not None:
            self.report.stages.append((self.stage_name, time.monotonic() - self.stage_started))

    def finish(self) -> None:
        self._close_stage()
        self.stage_started = 0.0


def say(line: str) -> None:
    print(line, flush=True)


def run_demo(settings: DemoSettings) -> Path:
    """Run the loop; returns the report's index.html."""
    return asyncio.run(_demo(settings))


async def _demo(s: DemoSettings) -> Path:
    import nats

    from agent_dpo.config import BusConfig
    from agent_dpo_adapters.nats_bus import ensure_bus
    from agent_dpo_adapters.nats_server import EmbeddedNats
    from agent_dpo_adapters.sqlite_store import SqliteStore

    run = _Run(s)
    run.report = RunReport(title="agent-dpo demo" + (" (quick)" if s.quick else ""),
                           started_at=datetime.now(UTC).isoformat(timespec="seconds"))
    work = s.store_dir
    for stale in ("nats", "events", "data", "train", "eval"):
        shutil.rmtree(work / stale, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    run.stage("bus", "embedded nats-server with JetStream")
    server = EmbeddedNats(store_dir=work / "nats").start()
    say(f"nats-server listening on {server.url} (store {work / 'nats'})")
    nc = await nats.connect(server.url, max_reconnect_attempts=-1)
    js = nc.jetstream()
    bus = BusConfig()
    await ensure_bus(js, bus)
    store = SqliteStore(work / "events")
    try:
        await _publish_and_ingest(run, nc, js, store, bus)
        # Blocking work runs in a thread so the event loop keeps answering NATS pings meanwhile.
        data = await asyncio.to_thread(_export, run, store)
        good, bad = await asyncio.to_thread(_train, run, data)
        evals = await asyncio.to_thread(_evaluate, run, data, good, bad)
        await _canary(run, nc, js, store, bus, data, good, bad, evals)
    finally:
        store.close()
        await nc.drain()
        server.stop()
    run.finish()
    run.report.wall_s = run.t()
    index = write_report(run.report, s.report_dir)
    say("\n== summary ==")
    for line in run.report.summary:
        say(f"- {line}")
    say(f"wall time {run.report.wall_s:.0f} s; report: {index}")
    return index


# ---- stages -------------------------------------------------------------------------------------

async def _publish_and_ingest(run: _Run, nc, js, store, bus) -> None:
    from tqdm import tqdm

    from agent_dpo.world.simulator import publish_world
    from agent_dpo_adapters.nats_bus import Ingestor
    from agent_dpo_adapters.sqlite_store import is_transient

    s = run.settings
    run.stage("publish", f"{s.calls} simulated calls of both example agents, through the runtime publisher")
    with tqdm(desc="events published", unit="ev", file=sys.stdout, mininterval=0.5) as bar:
        counts = await publish_world(js, s.calls, s.seed, malformed=s.malformed, on_event=lambda _e: bar.update())
    say("published " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))

    run.stage("ingest", "JetStream pull consumer into the SQLite store")
    stats = await Ingestor(nc, store, bus, is_transient=is_transient).run(until_idle=1.5)
    say("ingested " + ", ".join(f"{k} {v}" for k, v in stats.as_dict().items() if v))
    for st in store.status():
        say(f"  {st.tenant_id}/{st.agent_id}: {st.events} events, {st.calls} calls "
            f"({st.complete_calls} complete), feedback {dict(st.feedback)}, dead letters {st.dead_letters}")


@dataclass
class _Data:
    train: Path
    test: Path
    kto: Path
    meta: dict[str, Any]
    test_rows: list[dict]


def _export(run: _Run, store) -> _Data:
    from agent_dpo.export import export_dataset
    from agent_dpo.toolcheck import store_tool_stats
    from agent_dpo.world.simulator import LABELLED_BY

    run.stage("data", "pairs and KTO examples, tool-call checks, redaction, per-call split")
    out = run.settings.store_dir / "data"
    out.mkdir(parents=True, exist_ok=True)
    status = {(st.tenant_id, st.agent_id): st for st in store.status()}
    data: _Data | None = None
    for (tenant, agent), st in sorted(status.items()):
        if tenant is None or agent is None:
            continue
        base = out / f"{tenant}--{agent}"
        train = export_dataset(store, tenant, agent, "trl-dpo", f"{base}.train.trl-dpo.jsonl",
                               split="train", labelled_by=LABELLED_BY)
        test = export_dataset(store, tenant, agent, "trl-dpo", f"{base}.test.trl-dpo.jsonl",
                              split="test", labelled_by=LABELLED_BY)
        kto = export_dataset(store, tenant, agent, "trl-kto", f"{base}.train.trl-kto.jsonl",
                             split="train", labelled_by=LABELLED_BY)
        export_dataset(store, tenant, agent, "openai-dpo", f"{base}.train.openai-dpo.jsonl",
                       split="train", labelled_by=LABELLED_BY)
        pairs = {k: train.counts_by_signal.get(k, 0) + test.counts_by_signal.get(k, 0)
                 for k in set(train.counts_by_signal) | set(test.counts_by_signal)}
        drops: dict[str, int] = {}
        for summary in (train, test, kto):
            for reason, n in summary.drops.items():
                drops[reason] = drops.get(reason, 0) + n
        run.report.funnels.append(AgentFunnel(
            f"{tenant}/{agent}", st.events, st.calls, st.complete_calls, pairs, dict(kto.counts_by_signal),
            drops, st.dead_letters))
        say(f"  {tenant}/{agent}: DPO pairs train {train.rows} / held out {test.rows} {pairs}; "
            f"KTO {kto.rows}; length ratio {train.meta.get('length', {}).get('ratio', '-')}")
        if (tenant, agent) == TUNED_AGENT:
            rows = [json.loads(line) for line in Path(test.out).read_text().splitlines() if line.strip()]
            data = _Data(Path(train.out), Path(test.out), Path(kto.out), train.meta, rows)
    dead = sum(st.dead_letters for st in status.values())
    if dead:
        run.report.summary.append(f"{dead} contract-breaking messages dead-lettered with their reasons; "
                                  f"nothing else lost")
    tool_stats = store_tool_stats(store)
    for row in tool_stats.rows():
        run.report.tool_failures.setdefault(f"{row['tenant_id']}/{row['agent_id']}", {})[row["tool"]] = (
            row["calls"], row["failures"])
    if data is None:
        raise RuntimeError(f"no data for {TUNED_AGENT[0]}/{TUNED_AGENT[1]}")
    return data


@dataclass
class _Trained:
    version: str
    result: Any
    label: str


def _train(run: _Run, data: _Data) -> tuple[_Trained, _Trained]:
    from tqdm import tqdm

    from agent_dpo.training.backend import TrainJob, get_backend
    from agent_dpo.training.config import TrainConfig

    s = run.settings
    tenant, agent = TUNED_AGENT
    config = TrainConfig(backend=s.backend, method="dpo", sft_steps=s.sft_steps, max_steps=s.dpo_steps,
                         batch_size=s.batch_size, learning_rate=s.learning_rate,
                         sft_learning_rate=s.sft_learning_rate, max_length=s.max_length,
                         truncation_mode=s.truncation_mode, seed=s.seed)
    backend = get_backend(config.backend)

    def train(version: str, train_file: Path, cfg: TrainConfig, title: str) -> Any:
        run.stage(f"train {version}", title)
        total = cfg.sft_steps + cfg.max_steps
        with tqdm(total=total, desc=version, unit="step", file=sys.stdout, mininterval=0.5) as bar:
            last = {"n": 0}

            def on_progress(p: dict) -> None:
                done = int(p.get("global_step", p.get("step", 0)) or 0)
                if p.get("phase") == "dpo" or p.get("phase") == "kto":
                    done += cfg.sft_steps
                if done > last["n"]:
                    bar.update(done - last["n"])
                    last["n"] = done
                if p.get("loss") is not None:
                    bar.set_postfix(phase=p.get("phase", ""), loss=f"{float(p['loss']):.3f}")

            job = TrainJob(tenant_id=tenant, agent_id=agent, config=cfg, train_file=train_file, meta=data.meta,
                           output_dir=s.store_dir / "train" / version, store_dir=s.store_dir.parent,
                           version=version)
            result = backend.train(job, on_progress)
        run.report.training_metrics[version] = Path(result.metrics_file)
        say(f"{version}: {result.steps} steps in {result.wall_s:.0f} s; adapter {result.artifact_digest}")
        return result

    good = train("v1", data.train, config, "SFT on chosen answers, then DPO (beta 0.1, LoRA)")
    flipped = data.train.with_name(data.train.name.replace(".jsonl", ".flipped.jsonl"))
    with data.train.open() as src, flipped.open("w") as dst:
        for line in src:
            row = json.loads(line)
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
            dst.write(json.dumps(row) + "\n")
    bad = train("v2", flipped, replace(config, max_steps=s.bad_dpo_steps),
                "a deliberately bad version: the same recipe on flipped labels")
    return _Trained("v1", good, "v1 (SFT+DPO)"), _Trained("v2", bad, "v2 (flipped labels)")


def _evaluate(run: _Run, data: _Data, good: _Trained, bad: _Trained) -> dict[str, dict]:
    from agent_dpo.evaluation import EvalSettings, Policy, evaluate
    from agent_dpo.world.rubric import RubricJudge

    s = run.settings
    run.stage("eval", f"held-out pairs ({len(data.test_rows)}) and prompts; rubric judge, position-swapped")
    settings = EvalSettings(seed=s.seed, max_pairs=s.eval_pairs, max_prompts=s.eval_prompts,
                            max_new_tokens=s.max_new_tokens,
                            max_length=s.max_length if s.truncation_mode == "keep_end" else None)
    base = Policy("base", good.result.base_model)
    results = {}
    figures = []
    for trained in (good, bad):
        candidate = Policy(trained.version, trained.result.base_model, Path(trained.result.artifact_dir))
        result = evaluate(data.test_rows, candidate, base, RubricJudge(TUNED_AGENT[1]), run.settings.store_dir.parent,
                          settings, meta=data.meta)
        results[trained.version] = result
        figures.append(EvalFigures(trained.label, result["preference_accuracy"], result.get("win_rate"),
                                   tuple(result["win_rate_ci"]) if result.get("win_rate_ci") else None,
                                   result.get("tool_call_validity"), result["n"],
                                   result.get("tool_calls_truncated", 0)))
        say(f"{trained.version} vs base: preference accuracy {result['preference_accuracy']:.3f}, "
            f"win rate {result.get('win_rate')} (95% CI {result.get('win_rate_ci')}), tool-call validity "
            f"{result.get('tool_call_validity')} (base {result.get('baseline_tool_call_validity')}; calls cut off "
            f"by the {s.max_new_tokens}-token limit: {result.get('tool_calls_truncated', 0)}, "
            f"base {result.get('baseline_tool_calls_truncated', 0)})")
    base_fig = EvalFigures("base", None, 0.5, None, results["v1"].get("baseline_tool_call_validity"), 0,
                           results["v1"].get("baseline_tool_calls_truncated", 0))
    run.report.evals[f"{TUNED_AGENT[0]}/{TUNED_AGENT[1]}"] = [base_fig, *figures]
    v1 = results["v1"]
    run.report.summary.append(
        f"v1 (SFT then DPO on {good.result.steps} steps) vs base on held-out data: preference accuracy "
        f"{v1['preference_accuracy']:.2f}, rubric-judge win rate {v1.get('win_rate')}")
    return results


async def _canary(run: _Run, nc, js, store, bus, data: _Data, good: _Trained, bad: _Trained,
                  evals: dict[str, dict]) -> None:
    from agent_dpo.canary import CanaryController, CanaryPolicy, outcome_from_call
    from agent_dpo.registry import manifest_for
    from agent_dpo.router import Router
    from agent_dpo.world.simulator import live_feedback, live_prompts
    from agent_dpo_adapters.local_serving import LocalPeftBackend
    from agent_dpo_adapters.nats_artifacts import put_artifact
    from agent_dpo_adapters.nats_bus import Ingestor
    from agent_dpo_adapters.nats_publisher import EventPublisher
    from agent_dpo_adapters.nats_registry import NatsRegistry
    from agent_dpo_adapters.sqlite_store import is_transient

    s = run.settings
    tenant, agent = TUNED_AGENT
    name = f"{tenant}/{agent}"
    run.stage("registry", "versions into the object store and the KV registry")
    registry = await NatsRegistry.open(nc)
    for trained in (good, bad):
        artifact = f"{tenant}/{agent}/{trained.version}"
        digest = await put_artifact(js, artifact, trained.result.artifact_dir)
        await registry.put_manifest(manifest_for(
            tenant, agent, trained.result, artifact_name=artifact, artifact_digest=digest,
            eval_result=evals[trained.version], data_digest=data.meta.get("sha256", ""),
            event_range=data.meta.get("event_range") or {}, hyperparameters={"demo": True}))
        say(f"{trained.version}: manifest written, artifact {artifact} ({digest[:19]}...)")

    backend = LocalPeftBackend.from_store(
        good.result.base_model, s.store_dir.parent, js=js, max_new_tokens=s.max_new_tokens,
        max_prompt_tokens=s.max_length if s.truncation_mode == "keep_end" else None)
    router = Router(registry, backend, base_model=good.result.base_model)
    await router.start()
    publisher = EventPublisher(js)
    # A demo canary sees a handful of calls per arm, so its limits are wider than production's defaults.
    policy = CanaryPolicy(steps=s.canary_steps, min_calls_per_step=s.canary_min_calls,
                          min_feedback=s.canary_min_calls, max_csat_drop=0.1, max_thumbs_down_increase=0.25,
                          max_tool_error_increase=0.25, max_escalation_increase=0.25)
    controller = CanaryController(registry, policy, actor="demo-canary")
    prompts = live_prompts(agent, 10_000, s.seed + 1000)
    counter = {"n": 0, "switches": 0}

    async def live_round() -> None:
        from tqdm import tqdm

        ids = []
        for _ in tqdm(range(s.canary_round_calls), desc="live calls", unit="call", file=sys.stdout,
                      leave=False):
            prompt = next(prompts)
            ref = router.resolve(tenant, agent, prompt.call_id)
            for env in prompt.envelopes_served_by(ref.serve_name, ref.version):
                await publisher.publish_envelope(env)
            answer = await backend.chat(ref, prompt.messages, prompt.tools, max_tokens=s.max_new_tokens)
            _, envs = live_feedback(prompt, answer.message, s.seed)
            for env in envs:
                await publisher.publish_envelope(env)
            # The call is still live: it must still resolve to the model that answered it.
            if router.resolve(tenant, agent, prompt.call_id) != ref:
                counter["switches"] += 1
            router.release(prompt.call_id, tenant, agent)
            ids.append(prompt.call_id)
            counter["n"] += 1
        # Outcomes come back through the same event stream every other signal takes.
        await Ingestor(nc, store, bus, is_transient=is_transient).run(until_idle=0.5)
        for call_id in ids:
            call = store.call(tenant, agent, call_id)
            outcome = outcome_from_call(call) if call else None
            if outcome is not None:
                controller.record(tenant, agent, outcome)

    async def wait_router() -> None:
        _, rev = await registry.get_rollout(tenant, agent)
        for _ in range(500):
            if router.revision(tenant, agent) >= rev:
                return
            await asyncio.sleep(0.01)

    async def canary(trained: _Trained, force: bool) -> str:
        start = await controller.start(tenant, agent, trained.version, evals[trained.version], force=force)
        run.report.timeline.append(TimelineEntry(run.t(), name, "canary_start" if start.action == "start"
                                                 else start.action, trained.version, start.reason))
        say(f"{trained.version}: {start.action}: {start.reason}")
        if start.action != "start":
            return start.action
        doc = None
        for _ in range(s.canary_max_rounds):
            await wait_router()
            await live_round()
            d = await controller.evaluate(tenant, agent)
            doc, _ = await registry.get_rollout(tenant, agent)
            for version, arm in ((doc.champion, "champion"), (trained.version, "challenger")):
                stats = controller.stats(tenant, agent, version)
                csat, _ = stats.metric("csat")
                thumbs, _ = stats.metric("thumbs_down_rate")
                run.report.arms.append(ArmPoint(run.t(), version or "base", arm, stats.calls, csat, thumbs))
            action = {"advance": "canary_step"}.get(d.action, d.action)
            if d.action != "hold":
                run.report.timeline.append(TimelineEntry(run.t(), name, action, trained.version, d.reason))
            say(f"{trained.version}: {d.action} at {d.weight:.0%}: {d.reason}")
            if d.action in ("promote", "rollback"):
                await wait_router()
                return d.action
        return "hold"

    try:
        run.stage("canary v1", "live calls answered by the served model, pinned per call, scored by the rubric")
        first = await canary(good, force=False)
        run.stage("canary v2", "the flipped-label version: eval gates say no, so an operator forces it in "
                               "to show the live safety net")
        second = await canary(bad, force=True)
        doc, _ = await registry.get_rollout(tenant, agent)
        run.report.summary.append(f"v1 canary: {first}; v2 canary: {second}; champion now {doc.champion}, "
                                  f"state {doc.state} ({doc.reason})")
        run.report.summary.append(f"{counter['n']} live calls answered by the served models through the router; "
                                  f"mid-call model switches: {counter['switches']}")
        if doc.champion == "v1":
            run.report.timeline.append(TimelineEntry(run.t(), name, "swap", "v1", "v1 serves every new call"))
    finally:
        await router.stop()
