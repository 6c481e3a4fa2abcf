"""The ingest verbs from the command line: `bus init` (idempotent, applies changes), publish -> `ingest
--until-idle` -> `status`, `serve` on the embedded default, `bench ingest`, and bad input (exit 2,
one line, no traceback)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import structlog

from agent_dpo.cli import main
from agent_dpo_adapters.nats_server import port_open

sys.path.insert(0, str(Path(__file__).parent))
from ingest_fixtures import count_events

ROOT = Path(__file__).resolve().parents[1]
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_DPO_")}


def run(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 90):
    return subprocess.run([sys.executable, "-m", "agent_dpo.cli", "--log-format", "json", *args],
                          env={**CLEAN_ENV, **(env or {})}, cwd=cwd, capture_output=True, text=True, check=False,
                          timeout=timeout)


def test_bus_init_is_idempotent_and_applies_changed_settings(nats_url):
    first = run("bus", "init", "--nats-url", nats_url)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split("\n")[:3] == ["AGENT_EVENTS: created", "AGENT_DPO_DLQ: created",
                                            "AGENT_EVENTS/agent-dpo-ingest: created"]
    assert "registry KV bucket: ready" in first.stdout  # the other components' resources too
    again = run("bus", "init", "--nats-url", nats_url)
    assert again.stdout.count("unchanged") == 3
    changed = run("bus", "init", "--nats-url", nats_url, "--duplicate-window", "900",
                  env={"AGENT_DPO_BUS_MAX_DELIVER": "7", "AGENT_DPO_BUS_MAX_AGE_S": "604800"})
    assert "AGENT_EVENTS: updated duplicate_window,max_age" in changed.stdout
    assert "AGENT_EVENTS/agent-dpo-ingest: updated max_deliver" in changed.stdout


def test_publish_ingest_status_from_the_command_line(nats_url, tmp_path):
    store = tmp_path / "store"
    pub = subprocess.run([sys.executable, str(ROOT / "examples" / "publish_one_call.py"), "--nats-url", nats_url],
                         env=CLEAN_ENV, capture_output=True, text=True, check=False, timeout=60)
    assert pub.returncode != 0  # no stream yet: the runtime's publish is refused, nothing is lost silently
    assert run("bus", "init", "--nats-url", nats_url).returncode == 0
    pub = subprocess.run([sys.executable, str(ROOT / "examples" / "publish_one_call.py"), "--nats-url", nats_url],
                         env=CLEAN_ENV, capture_output=True, text=True, check=False, timeout=60)
    assert pub.returncode == 0, pub.stderr
    ingest = run("ingest", "--nats-url", nats_url, "--store", str(store), "--until-idle", "0.5")
    assert ingest.returncode == 0, ingest.stderr
    assert ingest.stdout.startswith("ingested 9 messages: 9 new events")
    table = run("status", "--store", str(store))
    assert table.returncode == 0
    header, row = table.stdout.strip().split("\n")
    assert header.split() == ["tenant", "agent", "events", "calls", "complete", "csat", "thumbs", "preference",
                              "correction", "dead_letters"]
    assert row.split() == ["acme-salons", "salon-rebook", "9", "1", "1", "1", "1", "0", "0", "0"]
    as_json = json.loads(run("status", "--store", str(store), "--json").stdout)
    assert as_json["agents"][0]["feedback"] == {"csat": 1, "thumbs": 1}


@pytest.mark.parametrize("argv, message", [
    (["ingest", "--until-idle", "-1"], "must be a positive number"),
    (["ingest", "--until-idle", "soon"], "not a number of seconds"),
    (["ingest", "--batch-size", "0"], "must be at least 1"),
    (["bus"], "bus needs a command"),
    (["bus", "drop"], "invalid choice"),
    (["bench"], "bench needs a NAME"),
    (["status", "--json", "extra"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    # main() configures logging to this test's captured stderr; put the previous set-up back after.
    logging_config = structlog.get_config()
    try:
        _check_one_line_exit_2(argv, message, capsys)
    finally:
        structlog.configure(**logging_config)


def _check_one_line_exit_2(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and "\n" not in err and "Traceback" not in err


def test_errors_a_user_can_fix_are_one_line_exit_1(tmp_path):
    missing = run("status", "--store", str(tmp_path / "none"))
    assert (missing.returncode, missing.stderr.count("\n")) == (1, 1)
    assert "no store at" in missing.stderr
    conf = tmp_path / "bad.toml"
    conf.write_text("[bus]\nbatch_size = 'many'\n")
    bad_conf = run("bus", "init", "--config", str(conf), "--nats-url", "nats://127.0.0.1:1")
    assert bad_conf.returncode == 1 and "batch_size" in bad_conf.stderr and "Traceback" not in bad_conf.stderr
    down = run("ingest", "--nats-url", "nats://127.0.0.1:1", "--store", str(tmp_path / "s"))
    assert down.returncode == 1 and "cannot connect to NATS" in down.stderr and "Traceback" not in down.stderr


@pytest.mark.skipif(port_open("127.0.0.1", 4222), reason="something already listens on the default NATS port")
def test_serve_starts_an_embedded_server_when_nothing_listens(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "agent_dpo.cli", "--log-format", "json", "serve"],
                            env=CLEAN_ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.match(r"embedded nats-server at (nats://\S+) \(JetStream store (\S+)\)", line)
        assert match, line
        assert Path(tmp_path / match.group(2)).resolve() == (tmp_path / ".agent-dpo" / "nats").resolve()
        assert proc.stdout.readline().startswith("serving:")
        pub = subprocess.run([sys.executable, str(ROOT / "examples" / "publish_one_call.py"),
                              "--nats-url", match.group(1)], env=CLEAN_ENV, capture_output=True, text=True, check=False,
                             timeout=60)
        assert pub.returncode == 0, pub.stderr
        deadline = time.monotonic() + 30
        while count_events(tmp_path / ".agent-dpo") < 9 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert count_events(tmp_path / ".agent-dpo") == 9
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    port = int(match.group(1).rsplit(":", 1)[1])
    assert not port_open("127.0.0.1", port)  # the embedded server went with it


def test_bench_ingest_prints_the_ratio_last():
    bench = run("bench", "ingest", "--events", "3000", "--rounds", "1", timeout=120)
    assert bench.returncode == 0, bench.stderr
    assert re.fullmatch(r"ingest: ratio \d+\.\d\d vs raw nats-py", bench.stdout.strip().split("\n")[-1])
