"""Bus and NATS auth settings: defaults < TOML file < environment < flags; bad values are one clear
error; the auth options reach a real nats-server that requires them (token, user/password, TLS)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from agent_dpo.config import BusConfig, NatsAuth, load_settings
from agent_dpo.errors import AgentDpoError
from agent_dpo_adapters.nats_bus import connect
from agent_dpo_adapters.nats_server import EmbeddedNats


def test_defaults_are_valid_and_follow_the_contract():
    s = load_settings(env={})
    assert (s.bus.stream, s.bus.subject_prefix, s.bus.subjects) == ("AGENT_EVENTS", "agents", ["agents.>"])
    assert s.bus.duplicate_window_s >= 600 and s.bus.dlq_subjects == ["agentdpo.dlq.>"]
    assert s.nats.describe() == "none"


def test_file_then_env_then_flags(tmp_path):
    conf = tmp_path / "agent-dpo.toml"
    conf.write_text('[bus]\nbatch_size = 500\nmax_deliver = 4\nbackoff_s = [30, 90]\nsubject_prefix = "prod.agents"\n'
                    '[nats]\ntoken = "from-file"\n')
    env = {"AGENT_DPO_CONFIG": str(conf), "AGENT_DPO_BUS_MAX_DELIVER": "6", "AGENT_DPO_NATS_TOKEN": "from-env"}
    s = load_settings(env=env, batch_size=None, duplicate_window_s=900.0)
    assert (s.bus.batch_size, s.bus.max_deliver, s.bus.backoff_s) == (500, 6, (30.0, 90.0))
    assert (s.bus.subjects, s.bus.duplicate_window_s, s.nats.token) == (["prod.agents.>"], 900.0, "from-env")
    assert s.nats.describe() == "token" and "from-env" not in s.nats.describe()


@pytest.mark.parametrize("toml, message", [
    ("[bus]\nbatch_size = 'many'\n", "batch_size"),
    ("[bus]\nduplicate_window_s = 60\n", "at least 600"),
    ("[bus]\nnope = 1\n", "unknown key"),
    ("[other]\n", "unknown section"),
    ("[bus]\nbackoff_s = [1, 2]\n", "backoff_s[0]"),
    ("[bus]\nstream = 'has.dot'\n", "stream"),
    ("[nats]\nuser = 'ingest'\n", "user and password"),
    ("[nats]\ntls_ca = '/no/such/ca.pem'\n", "tls_ca"),
    ("not toml at all = = =\n", "config file"),
])
def test_bad_settings_are_one_clear_error(tmp_path, toml, message):
    conf = tmp_path / "bad.toml"
    conf.write_text(toml)
    with pytest.raises(AgentDpoError) as err:
        load_settings(conf, env={})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_env_values_are_checked_too():
    with pytest.raises(AgentDpoError, match="AGENT_DPO_BUS_MAX_DELIVER"):
        load_settings(env={"AGENT_DPO_BUS_MAX_DELIVER": "lots"})
    with pytest.raises(AgentDpoError, match="finite"):
        load_settings(env={"AGENT_DPO_BUS_ACK_WAIT_S": "nan"})
    assert BusConfig().max_ack_pending >= BusConfig().batch_size


async def _can_publish(url: str, auth: NatsAuth) -> None:
    nc = await connect(url, auth)
    try:
        await nc.publish("agents.t.a.call.turn", b"{}")
        await nc.flush(timeout=5)
    finally:
        await nc.close()


@pytest.mark.parametrize("server_args, good, bad", [
    (["--auth", "s3cret-token"], NatsAuth(token="s3cret-token"), NatsAuth(token="wrong")),
    (["--user", "ingest", "--pass", "pw-123"], NatsAuth(user="ingest", password="pw-123"),
     NatsAuth(user="ingest", password="nope")),
])
async def test_auth_options_reach_the_server(tmp_path, server_args, good, bad):
    with EmbeddedNats(store_dir=tmp_path / "nats", extra_args=server_args) as server:
        await _can_publish(server.url, good)
        with pytest.raises(AgentDpoError) as err:
            await _can_publish(server.url, bad)
        assert "cannot connect" in str(err.value) and "wrong" not in str(err.value) and "nope" not in str(err.value)


def _make_certs(d: Path) -> None:
    """A CA, a server cert for 127.0.0.1 and a client cert, with the openssl command line."""
    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=agent-dpo test CA")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-key.pem", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls_with_a_ca_and_client_certificates(tmp_path):
    await asyncio.to_thread(_make_certs, tmp_path)
    args = ["--tlsverify", "--tlscert", str(tmp_path / "server.pem"), "--tlskey", str(tmp_path / "server-key.pem"),
            "--tlscacert", str(tmp_path / "ca.pem")]
    with EmbeddedNats(store_dir=tmp_path / "nats", extra_args=args) as server:
        tls = NatsAuth(tls_ca=str(tmp_path / "ca.pem"), tls_cert=str(tmp_path / "client.pem"),
                       tls_key=str(tmp_path / "client-key.pem"))
        await _can_publish(server.url.replace("nats://", "tls://"), tls)
        with pytest.raises(AgentDpoError):  # no client certificate: refused
            await _can_publish(server.url.replace("nats://", "tls://"), NatsAuth(tls_ca=str(tmp_path / "ca.pem")))


def test_cli_reads_auth_from_the_environment(tmp_path):
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_DPO_")}
    with EmbeddedNats(store_dir=tmp_path / "nats", extra_args=["--auth", "cli-token"]) as server:
        def bus_init(extra: dict) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "agent_dpo.cli", "--log-format", "json", "bus", "init",
                                   "--nats-url", server.url], env={**env, **extra}, capture_output=True, text=True,
                                  check=False, timeout=60)

        refused = bus_init({})
        assert refused.returncode == 1 and "cannot connect" in refused.stderr
        ok = bus_init({"AGENT_DPO_NATS_TOKEN": "cli-token"})
        assert ok.returncode == 0, ok.stderr
        assert "cli-token" not in ok.stderr + refused.stderr  # secrets never reach the logs
