"""A self-contained HTML report: titled sections of text, tables, figures and code in one file.

Generic on purpose: callers decide what goes in; this module only lays it out. The page has no
external resources (embedded stylesheet, figures as PNG data URIs) so it can be mailed, archived
or logged to MLflow as a single artifact. Everything the caller provides is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import os
import platform
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # only for the annotation; figures are drawn by the caller
    from matplotlib.figure import Figure

# Distribution names, as pip knows them (faiss ships as faiss-gpu, not faiss).
PACKAGES = ["torch", "torchvision", "timm", "ray", "optuna", "mlflow", "faiss-gpu", "pandas", "numpy", "matplotlib"]

# A cell is bold when its text is wrapped in ** (markdown style), e.g. the best value of a column.
_CELL = re.compile(r"<td>(.*?)</td>", re.S)
_NUMBER = re.compile(r"[-+−]?(\d[\d,]*\.?\d*(e[-+]?\d+)?|\.\d+|inf|nan)%?(\s*±\s*[\d.e+-]+%?)?", re.I)

STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #222; max-width: 1200px; margin: 2em auto; padding: 0 1.5em; }
h1 { margin-bottom: 0.2em; }
h2 { margin-top: 2em; padding-bottom: 0.2em; border-bottom: 1px solid #ccc; }
.subtitle { color: #555; margin-top: 0; }
nav.toc { background: #f6f6f6; border: 1px solid #ddd; padding: 0.5em 1.5em; }
nav.toc ol { margin: 0.3em 0; }
a { color: #0645ad; }
.table-wrap { overflow-x: auto; margin: 1em 0; }
table { border-collapse: collapse; font-size: 0.9em; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: 0.3em 0; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; vertical-align: top; text-align: left; }
th { background: #e9eef5; }
tbody tr:nth-child(even) { background: #f7f7f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; height: auto; }
figcaption { color: #444; font-size: 0.9em; }
pre { background: #f6f6f6; border: 1px solid #ddd; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
@media print {
  body { max-width: none; margin: 0; }
  a { color: inherit; text-decoration: none; }
  .table-wrap, pre { overflow: visible; white-space: pre-wrap; }
  table, figure, pre { break-inside: avoid; }
  h2 { break-after: avoid; }
}
"""


@dataclass
class Section:
    """One titled part of the report, shown in this order: text, tables, figures, code."""

    title: str
    text: str = ""  # plain text; a blank line starts a new paragraph
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)  # (caption, table)
    figures: list[tuple[str, Figure]] = field(default_factory=list)  # (caption, matplotlib figure)
    code: str | None = None  # e.g. the study's YAML config


def render_html(title: str, sections: list[Section], *, subtitle: str = "") -> str:
    """The whole report as one HTML document with a table of contents linking to each section."""
    toc = "\n".join(f'<li><a href="#section-{i}">{html.escape(s.title)}</a></li>' for i, s in enumerate(sections, 1))
    body = "\n".join(_section(i, s) for i, s in enumerate(sections, 1))
    sub = f'<p class="subtitle">{html.escape(subtitle)}</p>\n' if subtitle else ""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n{sub}"
        f'<nav class="toc"><strong>Contents</strong>\n<ol>\n{toc}\n</ol></nav>\n{body}\n</body>\n</html>\n'
    )


def _section(number: int, section: Section) -> str:
    parts = [f'<section id="section-{number}">', f"<h2>{html.escape(section.title)}</h2>"]
    parts += [f"<p>{html.escape(p.strip())}</p>" for p in re.split(r"\n\s*\n", section.text) if p.strip()]
    parts += [_table(caption, frame) for caption, frame in section.tables]
    parts += [_figure(caption, figure) for caption, figure in section.figures]
    if section.code is not None:
        parts.append(f"<pre><code>{html.escape(section.code)}</code></pre>")
    parts.append("</section>")
    return "\n".join(parts)


def _table(caption: str, frame: pd.DataFrame) -> str:
    """Floats to 4 decimals, blanks for missing values, ``**text**`` cells in bold, numbers right-aligned."""
    shown = frame.map(_cell) if len(frame.columns) else frame
    table = shown.to_html(escape=True, index=False, border=0, classes="report")
    table = table.replace(">", f"><caption>{html.escape(caption)}</caption>", 1) if caption else table
    return f'<div class="table-wrap">\n{_CELL.sub(_td, table)}\n</div>'


def _cell(value: object) -> str:
    if pd.api.types.is_scalar(value) and pd.isna(value):
        return ""
    if isinstance(value, float | np.floating):
        return f"{value:.4f}"
    return str(value)


def _td(match: re.Match[str]) -> str:
    text = match.group(1)  # already escaped by to_html
    bold = len(text) > 4 and text.startswith("**") and text.endswith("**")
    text = text[2:-2] if bold else text
    attr = ' class="num"' if _NUMBER.fullmatch(text.strip()) else ""
    return f"<td{attr}><strong>{text}</strong></td>" if bold else f"<td{attr}>{text}</td>"


def _figure(caption: str, figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    alt = html.escape(caption)
    return f'<figure>\n<img src="data:image/png;base64,{data}" alt="{alt}">\n<figcaption>{alt}</figcaption>\n</figure>'


def environment_info() -> dict[str, str]:
    """Versions of Python and the libraries a study depends on, the OS, CPU and GPUs.

    Reads package metadata rather than importing (``analysis`` never imports torch).
    """
    info = {"python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        try:
            info[name] = version(name)
        except PackageNotFoundError:
            info[name] = "not installed"
    info["machine"] = f"{_cpu_model()} ({platform.machine()}), {_cores()} cores"
    info["gpus"] = _gpus()
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cores() -> int:
    # The cores this process may use (a container's cpuset), not the host's count.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def _gpus() -> str:
    if shutil.which("nvidia-smi") is None:
        return "none"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "none"
    counts = Counter(line.strip() for line in out.splitlines() if line.strip())
    return ", ".join(f"{n} × {name}" if n > 1 else name for name, n in counts.items()) or "none"
