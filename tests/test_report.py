"""The HTML report: self-contained, escaped, and rendered by a real browser (headless Chromium)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from analysis.report import PACKAGES, Section, environment_info, render_html
from tests import chromium

EVIL = "<script>alert(1)</script>"


def _line_plot(title: str, slope: float) -> Figure:
    figure = Figure(figsize=(5, 3))  # no pyplot: no global figure state, no GUI backend
    ax = figure.subplots()
    x = np.arange(10)
    ax.plot(x, slope * x, marker="o")
    ax.set(title=title, xlabel="epoch", ylabel="recall@1")
    return figure


@pytest.fixture(scope="module")
def tables() -> list[tuple[str, pd.DataFrame]]:
    comparison = pd.DataFrame(
        {
            "loss": ["multi_similarity", EVIL, "untrained"],
            "trials": [20, 20, 0],
            "recall_at_1": ["**0.5736 ± 0.0123**", "0.5512 ± 0.0101", "0.4012"],
            "map_at_r": [0.21234567, 0.2, 0.1],
        }
    )
    with_nan = pd.DataFrame({"loss": ["soft_triple", "proxy_anchor"], "effective_centers": [3.5, np.nan]})
    return [("Best trial per loss", comparison), (f"Loss metrics {EVIL}", with_nan)]


@pytest.fixture(scope="module")
def report(tables, tmp_path_factory) -> Path:
    sections = [
        Section(
            title="Comparison",
            text=f"Best trial per loss on the validation classes.\n\nA loss named {EVIL} is escaped.",
            tables=tables,
            figures=[("Recall by epoch", _line_plot("recall", 0.05))],
        ),
        Section(
            title=f"Config & {EVIL}",
            figures=[(f"Loss by epoch {EVIL}", _line_plot("loss", -0.1))],
            code=f"name: tiny\nsearch:\n  losses: [multi_similarity]  # {EVIL}\n",
        ),
    ]
    path = tmp_path_factory.mktemp("report") / "report.html"
    path.write_text(render_html("Study <tiny>", sections, subtitle=f"subtitle {EVIL}"), encoding="utf-8")
    return path


def test_self_contained(report):
    page = report.read_text(encoding="utf-8")
    assert "<link" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "@import" not in page and "url(" not in page
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2
    for data in images:
        assert base64.b64decode(data, validate=True).startswith(b"\x89PNG\r\n\x1a\n")


def test_user_text_is_escaped(report):
    page = report.read_text(encoding="utf-8")
    assert EVIL not in page
    assert "alert(1)" in page  # it is there, as text
    # table cell, table caption, text, subtitle, section title (heading + contents), figure (alt + caption), code
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 9
    assert "<title>Study &lt;tiny&gt;</title>" in page


def test_table_cells(report):
    page = report.read_text(encoding="utf-8")
    assert '<td class="num"><strong>0.5736 ± 0.0123</strong></td>' in page
    assert "**" not in page
    assert '<td class="num">0.2123</td>' in page  # 4 decimals, right-aligned
    assert '<td class="num">3.5000</td>' in page
    assert "<td></td>" in page  # NaN shown blank
    assert "<td>multi_similarity</td>" in page


def test_table_of_contents(report):
    page = report.read_text(encoding="utf-8")
    for anchor in ("section-1", "section-2"):
        assert f'href="#{anchor}"' in page and f'id="{anchor}"' in page


def test_renders_in_chromium(report, tables, tmp_path):
    result = chromium.render(report, tmp_path)
    assert result["tables"] == len(tables)
    assert result["body_rows"] == [len(frame) for _, frame in tables]
    assert result["rows"] == sum(len(frame) + 1 for _, frame in tables)  # plus the header row
    assert result["images"] == 2
    assert result["images_rendered"] == 2
    with Image.open(result["screenshot"]) as shot:
        shot.verify()
    with Image.open(result["screenshot"]) as shot:
        assert shot.size == (1280, 2000)
        colours = shot.convert("RGB").getcolors(maxcolors=1_000_000)
    assert colours is None or len(colours) > 10, "the screenshot is blank"


def test_environment_info():
    info = environment_info()
    assert {"python", "platform", "machine", "gpus", *PACKAGES} <= info.keys()
    assert all(isinstance(value, str) and value for value in info.values())
    assert info["pandas"] == pd.__version__
    assert re.search(r"\d+ cores$", info["machine"])


def test_no_chromium_skips_or_fails(monkeypatch, tmp_path):
    """Where Chromium is missing and apt-get cannot run as root: skip, or fail when CI requires it."""
    monkeypatch.setattr(chromium, "_which", lambda: None)
    monkeypatch.setattr(chromium, "_as_root", lambda: None)
    monkeypatch.setattr(chromium, "LOCK", tmp_path / "lock")
    monkeypatch.delenv(chromium.REQUIRE, raising=False)
    with pytest.raises(pytest.skip.Exception, match="cannot run as root"):
        chromium.ensure_chromium()
    monkeypatch.setenv(chromium.REQUIRE, "1")
    with pytest.raises(pytest.fail.Exception, match=chromium.REQUIRE):
        chromium.ensure_chromium()
