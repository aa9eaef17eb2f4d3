"""The HTML report: self-contained, escaped, tables that fit the page, and rendered by a real browser
(headless Chromium) at 1400 px and in print."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from analysis.report import MAX_COLUMNS, Section, built_with, render_html, table_parts
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
    return [("Best trial per loss", comparison), (f"Loss metrics {EVIL}", with_nan), ("Wide", _wide())]


def _wide() -> pd.DataFrame:
    """A final table as In-Shop gives it (six Ks), with long hyperparameter lists: wider than the page."""
    metrics = [f"recall_at_{k}" for k in (1, 10, 20, 30, 40, 50)] + ["nmi", "map_at_r", "r_precision"]
    rows = []
    for i, loss in enumerate(["multi_similarity", "proxy_anchor", "soft_triple"]):
        row = {"loss": loss, "protocol": "all classes", "seeds": 3, "runs": 3}
        row |= {m: f"0.{5000 + 37 * i + j:04d} ± 0.0{123 + j:03d}" for j, m in enumerate(metrics)}
        row |= {"p_vs_best": "" if i == 0 else "0.012 *", "cpu_hours": 1.5 + i, "gpu_hours": 0.25 * i}
        row["hyperparameters"] = ", ".join(f"parameter_{k}={k * 1.2345 + i:.4g}" for k in range(12))
        row["mode"] = "finetune"
        rows.append(row)
    return pd.DataFrame(rows)


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
    page = render_html("Study <tiny>", sections, subtitle=f"subtitle {EVIL}", headline=("significant", f"won {EVIL}"))
    path.write_text(page, encoding="utf-8")
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
    # table cell, table caption, text, subtitle, headline, section title (heading + contents), figure (alt +
    # caption), code
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 10
    assert "<title>Study &lt;tiny&gt;</title>" in page


def test_table_cells(report):
    page = report.read_text(encoding="utf-8")
    # the CI under its mean, in the same bold cell
    assert '<td class="num"><strong>0.5736 <span class="ci">± 0.0123</span></strong></td>' in page
    assert "**" not in page
    assert '<td class="num">0.2123</td>' in page  # 4 decimals, right-aligned
    assert '<td class="num">3.5000</td>' in page
    assert "<td></td>" in page  # NaN shown blank
    assert "<td>multi_similarity</td>" in page
    assert "<th>R@1</th>" in page and "<th>MAP@R</th>" in page and "recall_at_1" not in page  # display names
    assert '<p class="headline significant" role="note">won &lt;script&gt;' in page


def test_wide_tables_are_split_and_constant_columns_named_in_the_caption():
    parts = table_parts("Wide", _wide())
    assert [p["caption"] for p in parts] == ["Wide (part 1 of 2)", "Wide (part 2 of 2)"]
    assert all(len(p["header"]) <= MAX_COLUMNS and p["header"][0] == "loss" for p in parts)
    shown = [h for p in parts for h in p["header"][1:]]
    assert shown == ["seeds", "runs", "R@1", "R@10", "R@20", "R@30", "R@40", "R@50", "NMI", "MAP@R", "R-Precision",
                     "p vs best", "CPU-h", "GPU-h", "hyperparameters"]  # fmt: skip
    assert parts[0]["note"] == "protocol: all classes; mode: finetune" and parts[1]["note"] == ""
    assert [row[0]["main"] for row in parts[1]["rows"]] == ["multi_similarity", "proxy_anchor", "soft_triple"]
    blank = pd.DataFrame({"loss": ["a", "b"], "value": [1.0, 2.0], "loss metrics": ["", np.nan]})
    [part] = table_parts("Blank", blank)
    assert part["header"] == ["loss", "value"]  # a column blank in every row is dropped
    [one] = table_parts("One row", _wide().iloc[:1], max_columns=100)
    assert "protocol" in one["header"] and one["note"] == ""  # one row: nothing is constant "across rows"


def test_table_of_contents(report):
    page = report.read_text(encoding="utf-8")
    for anchor in ("section-1", "section-2"):
        assert f'href="#{anchor}"' in page and f'id="{anchor}"' in page


def test_renders_in_chromium_and_every_table_fits_at_1400_px_and_in_print(report, tables, tmp_path):
    parts = [part for caption, frame in tables for part in table_parts(caption, frame)]
    for print_media, width in ((False, chromium.WIDTH), (True, chromium.PRINT_WIDTH)):
        result = chromium.render(report, tmp_path / str(print_media), width=width, print_media=print_media)
        assert result["tables"] == len(parts) == len(tables) + 1  # the wide one in two parts
        assert result["body_rows"] == [len(part["rows"]) for part in parts]
        assert result["rows"] == sum(len(part["rows"]) + 1 for part in parts)  # plus the header row
        assert result["images"] == 2
        assert result["images_rendered"] == 2
        # no table wider than the page: no column cut off or behind a scrollbar, no page-wide scrollbar
        assert result["too_wide"] == [], result
        assert result["page_width"] <= result["viewport_width"] <= width
        assert max(result["table_widths"]) <= result["viewport_width"]
        with Image.open(result["screenshot"]) as shot:
            shot.verify()
        with Image.open(result["screenshot"]) as shot:
            assert shot.size == (width, 2000)
            colours = shot.convert("RGB").getcolors(maxcolors=1_000_000)
        assert colours is None or len(colours) > 10, "the screenshot is blank"


def test_the_width_check_sees_a_table_wider_than_the_page(tmp_path):
    """The check can fail: a row of 40 cells that may not wrap is wider than 1400 px."""
    wide = pd.DataFrame([{f"c{i}": f"{i}.0000000000" for i in range(40)}])
    path = tmp_path / "wide.html"
    path.write_text(render_html("wide", [Section("Wide", tables=[("Too wide", wide)])]), encoding="utf-8")
    # table_parts splits it; without the split (one part), the browser must report it too wide
    page = path.read_text(encoding="utf-8")
    assert page.count("<table") == 4
    one = tmp_path / "one.html"
    cells = "".join(f"<td style='white-space: nowrap'>{i}.0000000000</td>" for i in range(40))
    one.write_text(
        page.replace("</section>", f"<div class='table-wrap'><table><tr>{cells}</tr></table></div></section>")
    )
    result = chromium.render(one, tmp_path / "one")
    assert (
        result["page_width"] > result["viewport_width"]
        and len(result["too_wide"]) == 1
        and result["too_wide"][0].startswith("(no caption)")
    )


def test_built_with_names_the_reporting_libraries():
    line = built_with()
    assert f"pandas {pd.__version__}" in line and line.startswith("Report built on ")


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
