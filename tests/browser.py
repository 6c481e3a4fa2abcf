"""Headless Chromium (Debian's package) for tests that look at pages the way a person would:
a screenshot, plus every console message the page produced."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--enable-logging=stderr", "--v=0", "--hide-scrollbars"]
_CONSOLE = re.compile(r":CONSOLE:\d+\] (.*)")


@dataclass
class Rendering:
    screenshot: Path
    console: list[str]


def chromium_or_skip() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed (.ci/run installs Debian's chromium package)")
    pytest.skip("chromium is not installed: apt-get install chromium")


def render(page: Path, screenshot: Path, width: int = 1200, height: int = 3000) -> Rendering:
    binary = chromium_or_skip()
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [binary, *_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
             f"--screenshot={screenshot}", page.resolve().as_uri()],
            capture_output=True, text=True, timeout=120, check=False)
    console = [m.group(1) for m in _CONSOLE.finditer(proc.stderr)]
    assert screenshot.exists(), f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return Rendering(screenshot, console)
