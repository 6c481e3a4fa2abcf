"""The command surface: bad input is one line on stderr and exit 2, never a traceback."""

import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent_dpo.cli", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_unknown_verb_is_one_line_exit_2():
    proc = run_cli("no-such-verb")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "invalid choice" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_verb_prints_help_and_exits_2():
    proc = run_cli()
    assert proc.returncode == 2
    assert "VERB" in proc.stderr
