"""A self-contained HTML report: titled sections of text, tables, figures and code in one file.

Generic on purpose: callers decide what goes in; this module only lays it out, through the Jinja2
template ``templates/report.html.j2`` (autoescaped: everything the caller provides is escaped). The
page has no external resources (embedded stylesheet, figures as PNG data URIs) so it can be mailed,
archived or logged to MLflow as a single artifact. Tables are made to fit the page: empty columns
dropped, columns with one value in every row moved into the caption, and wider tables split into
parts that repeat the first column.
"""

from __future__ import annotations

import base64
import io
import platform
import re
import socket
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

import jinja2
import numpy as np
import pandas as pd

from analysis.names import column_label

if TYPE_CHECKING:  # only for the annotation; figures are drawn by the caller
    from matplotlib.figure import Figure

MAX_COLUMNS = 12  # a table part's columns, the repeated first one included
REPORT_PACKAGES = ["dml-study", "pandas", "matplotlib", "mlflow", "optuna"]  # what builds a report
_NUMBER = re.compile(r"[-+−]?(\d[\d,]*\.?\d*(e[-+]?\d+)?|\.\d+|inf|nan)%?( \*)?", re.I)
_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("analysis", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


@dataclass
class Section:
    """One titled part of the report, shown in this order: text, tables, figures, code."""

    title: str
    text: str = ""  # plain text; a blank line starts a new paragraph
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)  # (caption, table)
    figures: list[tuple[str, Figure]] = field(default_factory=list)  # (caption, matplotlib figure)
    code: str | None = None  # e.g. the study's YAML config


def render_html(
    title: str, sections: list[Section], *, subtitle: str = "", headline: tuple[str, str] | None = None
) -> str:
    """The whole report as one HTML document with a table of contents linking to each section;
    ``headline``: (kind, sentence) shown above the contents (kind: a CSS class, "significant",
    "inconclusive" or "none")."""
    return _TEMPLATES.get_template("report.html.j2").render(
        title=title,
        subtitle=subtitle,
        headline={"kind": headline[0], "text": headline[1]} if headline else None,
        sections=[_section(s) for s in sections],
    )


def _section(section: Section) -> dict:
    return {
        "title": section.title,
        "paragraphs": [p.strip() for p in re.split(r"\n\s*\n", section.text) if p.strip()],
        "tables": [part for caption, frame in section.tables for part in table_parts(caption, frame)],
        "figures": [{"caption": caption, "png": _png(figure)} for caption, figure in section.figures],
        "code": section.code,
    }


def table_parts(caption: str, frame: pd.DataFrame, max_columns: int = MAX_COLUMNS) -> list[dict]:
    """``frame`` as one or more tables that fit the page: cells as text (floats to 4 decimals, blanks
    for missing values, ``**text**`` in bold, ``mean ± ci`` with the CI under the mean), headers by
    :func:`analysis.names.column_label`; columns blank in every row dropped, columns with the same
    value in every row (of two or more) moved into the caption's note, and more than ``max_columns``
    columns split into parts that each repeat the first column."""
    text = frame.map(_text) if len(frame.columns) else frame
    keep = [c for c in text.columns if (text[c] != "").any() or not len(text)]
    text = text[keep]
    constant = [
        c for c in text.columns[1:] if len(text) > 1 and text[c].nunique() == 1 and not _number(text[c].iloc[0])
    ]
    note = "; ".join(f"{column_label(c)}: {text[c].iloc[0].strip('*')}" for c in constant)
    text = text.drop(columns=constant)
    first, rest = list(text.columns[:1]), list(text.columns[1:])
    step = max(max_columns - 1, 1)
    chunks = [rest[i : i + step] for i in range(0, len(rest), step)] or [[]]
    parts = []
    for i, chunk in enumerate(chunks):
        shown = text[first + chunk]
        label = caption if len(chunks) == 1 else f"{caption} (part {i + 1} of {len(chunks)})"
        parts.append(
            {
                "caption": label,
                "note": note if i == 0 else "",
                "header": [column_label(str(c)) for c in shown.columns],
                "rows": [[_cell(value) for value in row] for row in shown.itertuples(index=False)],
            }
        )
    return parts


def _text(value: object) -> str:
    if pd.api.types.is_scalar(value) and pd.isna(value):
        return ""
    if isinstance(value, float | np.floating):
        return f"{value:.4f}"
    return str(value)


def _number(text: str) -> bool:
    return bool(_NUMBER.fullmatch(text.strip("*").strip()))


def _cell(text: str) -> dict:
    bold = len(text) > 4 and text.startswith("**") and text.endswith("**")
    text = text[2:-2] if bold else text
    main, sep, ci = text.partition(" ± ")
    numeric = _number(main) and (not sep or _number(ci))
    return {"main": main if sep else text, "ci": f"± {ci}" if sep else "", "bold": bold, "num": numeric}


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def built_with() -> str:
    """One line on what built the report (not what trained the study): host, Python and the
    reporting libraries' versions."""
    versions = []
    for name in REPORT_PACKAGES:
        try:
            versions.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            versions.append(f"{name} not installed")
    return f"Report built on {socket.gethostname()} with Python {platform.python_version()}, {', '.join(versions)}."
