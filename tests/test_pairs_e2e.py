"""End to end, as an operator runs it: the example world's simulator publishes to a real nats-server,
`agent-dpo ingest` stores the events in SQLite, and `agent-dpo pairs` exports every format."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
import nats

from agent_dpo.cli import main
from agent_dpo.world.simulator import LABELLED_BY, publish_world

SCHEMA = Path(__file__).resolve().parents[1] / "agent_dpo" / "schemas" / "openai_preference_row.schema.json"
N_CALLS = 120


async def _publish(url: str) -> dict:
    nc = await nats.connect(url)
    try:
        return dict(await publish_world(nc.jetstream(), N_CALLS, seed=11))
    finally:
        await nc.close()


def test_simulator_to_nats_to_ingest_to_pairs_in_every_format(nats_url, tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["bus", "init", "--nats-url", nats_url]) == 0
    published = asyncio.run(_publish(nats_url))
    assert main(["ingest", "--nats-url", nats_url, "--store", str(store), "--until-idle", "1"]) == 0
    capsys.readouterr()

    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    seen_calls: dict[str, set[str]] = {}
    for agent in ("acme-salons/salon-rebook", "northside-health/appointment-resolver"):
        for fmt in ("trl-dpo", "trl-kto", "openai-dpo"):
            out = tmp_path / f"{agent.replace('/', '_')}.{fmt}.jsonl"
            argv = ["pairs", "--agent", agent, "--format", fmt, "--out", str(out), "--store", str(store),
                    "--split", "all", "--labelled-by", LABELLED_BY]
            assert main(argv + (["--include-pairs"] if fmt == "trl-kto" else [])) == 0
            printed = capsys.readouterr().out
            assert printed.startswith("wrote ") and "drop reason" in printed
            rows = [json.loads(line) for line in out.read_text().splitlines()]
            meta = json.loads(Path(f"{out}.meta.json").read_text())
            assert rows and meta["rows"] == len(rows) and meta["labelled_by"] == LABELLED_BY
            assert meta["calls"]["complete"] > 0 and meta["event_range"]["first_seq"] >= 1
            signals = set(meta["counts_by_signal"])
            if fmt == "trl-kto":
                assert {"thumbs", "csat"} <= signals
                assert 1.0 <= (meta["kto"]["desirable_weight"] * meta["kto"]["n_desirable"]
                               / (meta["kto"]["undesirable_weight"] * meta["kto"]["n_undesirable"])) <= 4 / 3
            else:
                assert {"preference", "correction", "schema_retry"} <= signals
            if fmt == "openai-dpo":
                for row in rows:
                    assert not list(validator.iter_errors(row))
            seen_calls.setdefault(agent, set()).update(r["meta"]["call_id"] for r in rows)
    # The simulator mixes both agents into one stream; each export holds only its own agent's calls.
    salon, clinic = seen_calls.values()
    assert salon and clinic and not salon & clinic
    assert published["calls"] == N_CALLS
