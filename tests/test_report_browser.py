"""The report and compare pages as a browser sees them: headless Chromium, offline, no console errors.

Needs a Chromium binary: `make test` installs Debian's package when run as root; without one the test skips and
says how to get it.
"""
from __future__ import annotations

import base64
import io
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import NO_BROWSER, find_chromium, write_generic
from test_report import N_DATA, write_run

pytestmark = [pytest.mark.slow, pytest.mark.ci]

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--enable-logging=stderr", "--v=0",
         "--host-resolver-rules=MAP * ~NOTFOUND"]  # offline, as the report must work
# The pages have no scripts, so any console line at all is a fault (Chromium logs console.error at INFO level, so
# the level cannot be told apart); plus failed or refused resource loads.
ERROR_PATTERNS = re.compile(r"Uncaught|:CONSOLE[:(]|net::ERR_|Failed to load resource|Refused to (?:load|execute)|"
                            r"Not allowed to load local resource")
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.I)


@pytest.fixture(scope="module")
def browser() -> str:
    exe = find_chromium()
    if exe is None:
        pytest.skip(NO_BROWSER)
    return exe


def _chromium(exe: str, page: Path, tmp: Path, *mode: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    return subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", *mode, page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> tuple[Path, Path]:
    from medtune.reporting import compare_runs, write_report

    root = tmp_path_factory.mktemp("browser")
    data = write_generic(root / "data", n=N_DATA, size=32)
    a = write_run(root / "runs", "run-a", data, better=False, lora_r=8)
    b = write_run(root / "runs", "run-b", data, better=True, lora_r=32, rl=True)
    compare_runs([a, b], out_dir=root / "cmp")
    return write_report(b), root / "cmp" / "compare.html"


def _check_dom(dom: str, n_images: int, tables: int) -> None:
    uris = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', dom)
    assert len(uris) >= n_images
    from PIL import Image

    for uri in uris:  # every embedded figure decodes as a real PNG, nothing is a truncated string
        im = Image.open(io.BytesIO(base64.b64decode(uri)))
        im.verify()
    assert dom.count("<table") >= tables
    assert not EXTERNAL.findall(dom)  # an offline page cannot fetch anything; nothing may need to


def test_report_renders_in_chromium(browser, pages, tmp_path):
    report, _ = pages
    res = _chromium(browser, report, tmp_path, "--dump-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    _check_dom(res.stdout, n_images=12, tables=5)
    assert "Per image, worst first" in res.stdout and "Gradient-flow preflight" in res.stdout
    errors = [ln for ln in res.stderr.splitlines() if ERROR_PATTERNS.search(ln)]
    assert errors == []

    shot = tmp_path / "report.png"
    res = _chromium(browser, report, tmp_path, f"--screenshot={shot}", "--window-size=1200,2400",
                    "--hide-scrollbars")
    assert shot.is_file(), res.stderr[-2000:]
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10  # text, tables and figures were painted, not a blank page


def test_compare_renders_in_chromium(browser, pages, tmp_path):
    _, compare = pages
    res = _chromium(browser, compare, tmp_path, "--dump-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    _check_dom(res.stdout, n_images=2, tables=2)
    assert 'class="better"' in res.stdout
    assert [ln for ln in res.stderr.splitlines() if ERROR_PATTERNS.search(ln)] == []
