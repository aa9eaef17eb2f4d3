"""Open an HTML file in headless Chromium and report what rendered (a test helper, not a product module).

The report itself is never changed for this: ``render`` copies it and injects a script that, once the
page has loaded, writes a JSON summary of the rendered DOM into ``document.title``, which
``--dump-dom`` then hands back. With ``print_media`` the copy's ``@media print`` rules apply on screen
too, so the layout measured is the printed one (at a page's width).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NoReturn

import pytest
from filelock import FileLock

NAMES = ("chromium", "chromium-browser")
# One apt run at a time across pytest workers and parallel sessions on this machine.
LOCK = Path(tempfile.gettempdir()) / "dml-study-chromium.lock"
# Set in CI so that a machine where Chromium cannot be installed fails instead of skipping.
REQUIRE = "DML_STUDY_REQUIRE_CHROMIUM"
MARK = "RENDER-CHECK:"

CHECK = """<script>
window.addEventListener("load", () => {
  const tables = [...document.querySelectorAll("table")];
  const images = [...document.images];
  document.title = "__MARK__" + JSON.stringify({
    tables: tables.length,
    rows: tables.reduce((n, t) => n + t.rows.length, 0),
    body_rows: tables.map(t => [...t.tBodies].reduce((n, b) => n + b.rows.length, 0)),
    images: images.length,
    images_rendered: images.filter(i => i.complete && i.naturalWidth > 0).length,
    svgs: document.querySelectorAll("svg").length,
    viewport_width: document.documentElement.clientWidth,
    page_width: document.documentElement.scrollWidth,
    // tables wider than their box or the window (columns cut off or behind a scrollbar), by caption
    too_wide: tables.filter(t => {
      const box = t.parentElement, right = t.getBoundingClientRect().right;
      return right > document.documentElement.clientWidth + 0.5 || box.scrollWidth > box.clientWidth + 0.5
        || t.scrollWidth > t.clientWidth + 0.5;
    }).map(t => (t.caption ? t.caption.textContent : "(no caption)") + " " + Math.round(t.scrollWidth) + "px"),
    table_widths: tables.map(t => Math.round(t.getBoundingClientRect().width)),
  });
});
</script>
""".replace("__MARK__", MARK)

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]


def ensure_chromium() -> str:
    """The path of a Chromium binary, installing Debian's ``chromium`` package if there is none."""
    if found := _which():
        return found
    with FileLock(LOCK, timeout=900):
        if found := _which():  # another session installed it while we waited
            return found
        prefix = _as_root()
        if prefix is None:
            _unavailable("chromium is not installed and apt-get cannot run as root (not root, no `sudo -n`)")
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        wait = ["-o", "DPkg::Lock::Timeout=300"]  # another apt (not ours) may hold dpkg's lock
        for command in (["apt-get", *wait, "update", "-qq"], ["apt-get", *wait, "install", "-y", "-qq", "chromium"]):
            try:
                done = subprocess.run(prefix + command, env=env, capture_output=True, text=True, timeout=900)
            except (OSError, subprocess.TimeoutExpired) as error:
                _unavailable(f"{' '.join(command)} failed: {error}")
            if done.returncode:
                _unavailable(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return _which() or _unavailable("apt-get installed chromium but it is not on PATH")


def _which() -> str | None:
    return next((path for name in NAMES if (path := shutil.which(name))), None)


def _as_root() -> list[str] | None:
    if shutil.which("apt-get") is None:
        return None
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n"]
    return None


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get(REQUIRE):
        pytest.fail(f"{reason} (and {REQUIRE} is set)")
    pytest.skip(reason)


WIDTH = 1400  # px: the window a report must fit without horizontal scrolling
PRINT_WIDTH = 718  # px: an A4 page's printable width at 96 dpi with Chromium's default 1 cm margins


def render(
    html_path: Path,
    workdir: Path | None = None,
    *,
    chromium: str | None = None,
    width: int = WIDTH,
    print_media: bool = False,
) -> dict:
    """Load ``html_path`` in headless Chromium in a ``width``-pixel window (with ``print_media``: the
    printed layout); return the page's render summary and a screenshot.

    Keys: tables, rows (all ``<tr>``), body_rows (data rows per table, in order), images,
    images_rendered (``complete && naturalWidth > 0``), svgs (inline), viewport_width, page_width
    (the document's scroll width: wider than the viewport means a horizontal scrollbar), too_wide
    (captions of tables wider than their box or the window), table_widths, screenshot (a PNG path).
    """
    chromium = chromium or ensure_chromium()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="render-"))
    workdir.mkdir(parents=True, exist_ok=True)
    page = html_path.read_text(encoding="utf-8")
    if print_media:
        page = page.replace("@media print", "@media all")
    head, sep, tail = page.rpartition("</body>")
    checked = workdir / html_path.name
    checked.write_text(head + CHECK + sep + tail if sep else page + CHECK, encoding="utf-8")
    url = checked.resolve().as_uri()
    profile = f"--user-data-dir={workdir / 'profile'}"  # parallel runs must not share a profile

    window = f"--window-size={width},2000"
    dom = _run([chromium, *FLAGS, profile, window, "--virtual-time-budget=5000", "--dump-dom", url])
    title = re.search(r"<title>(.*?)</title>", dom, re.S)
    text = html.unescape(title.group(1)) if title else ""
    if not text.startswith(MARK):
        raise AssertionError(f"the injected check did not run; title was {text[:200]!r}")
    summary = json.loads(text.removeprefix(MARK))

    screenshot = workdir / "screenshot.png"
    _run([chromium, *FLAGS, profile, f"--screenshot={screenshot}", window, url])
    if not screenshot.is_file():
        raise AssertionError(f"chromium wrote no screenshot to {screenshot}")
    return summary | {"screenshot": screenshot}


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise AssertionError(f"{command[0]} exited {done.returncode}: {done.stderr.strip()[-1000:]}")
    return done.stdout
