"""The report as Markdown (the table TensorBoard's TEXT panel shows, and ``report.md``) and as one HTML page.

The HTML page is self-contained: its style is inline and the figures the callbacks logged are embedded as
``data:image/png;base64`` URIs read from the event files, so it opens without a network or the log directory.
"""

from __future__ import annotations

import base64
import html as html_lib
import math
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from lt_theory.report.diagnosis import Report

__all__ = ["format_value", "html", "markdown"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 80em; }
table { border-collapse: collapse; width: 100%; }
th, td { border: 1px solid #ccc; padding: 0.35em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.holds { background: #e6f4ea; } td.borderline { background: #fff4d6; }
td.violated { background: #fbe3e4; font-weight: bold; } td.unknown { background: #eef0f3; }
figure { display: inline-block; margin: 0.5em; } figcaption { font-size: 0.9em; color: #555; }
img { max-width: 100%; border: 1px solid #ddd; }
"""


def format_value(value: float) -> str:
    """A finding's value for a table: 4 significant digits, NaN as ``NaN``."""
    return "NaN" if isinstance(value, float) and math.isnan(value) else f"{value:.4g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _summary(report: Report) -> str:
    counts = Counter(f.verdict for f in report.findings)
    said = ", ".join(f"{counts[v]} {v}" for v in ("violated", "borderline", "holds", "unknown") if counts[v])
    runs = len({f.run for f in report.findings})
    return f"{len(report.findings)} findings on {runs} run(s): {said or 'none'}."


def _numbered(items) -> str:
    return " ".join(f"{i}. {item}" for i, item in enumerate(items, start=1))


def markdown(report: Report, details: bool = True) -> str:
    """The report as Markdown: the verdict table, then (with ``details``) what to try and the evidence.

    Args:
        report: a :class:`~lt_theory.report.diagnosis.Report`.
        details: add the ordered advice and each finding's evidence and source below the table.

    Returns:
        Markdown text.
    """
    several = len({f.run for f in report.findings}) > 1
    header = ["run"] * several + ["condition", "value", "reference", "verdict", "advice"]
    lines = [f"# lt_theory report: `{report.source}`", "", _summary(report), ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for f in report.findings:
        verdict = f"**{f.verdict}**" if f.verdict == "violated" else f.verdict
        cells = [f.run] * several + [
            f.condition,
            format_value(f.value),
            f.reference,
            verdict,
            _numbered(f.advice),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if not details:
        return "\n".join(lines)
    advice = report.advice()
    if advice:
        lines += ["", "## What to try, in order", ""] + [f"{i}. {a}" for i, a in enumerate(advice, start=1)]
    lines += ["", "## Evidence", ""]
    for f in report.findings:
        where = f"run `{f.run}`, " if several else ""
        lines.append(
            f"- **{f.condition}** ({where}{f.verdict}, `{f.quantity}`): {f.evidence} "
            f"Reference: {f.reference}. Source: {f.source}."
        )
    if report.skipped:
        lines += ["", f"Runs without lt_theory tags, not diagnosed: {', '.join(report.skipped)}."]
    return "\n".join(lines) + "\n"


def _figures(report: Report) -> list[str]:
    blocks = []
    for run in report.runs:
        for tag, png in run.images.items():
            data = base64.b64encode(png).decode("ascii")
            caption = html_lib.escape(f"{run.name}: {tag}" if len(report.runs) > 1 else tag)
            blocks.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
                f"<figcaption>{caption}</figcaption></figure>"
            )
    return blocks


def html(report: Report) -> str:
    """The report as one self-contained HTML page (inline style, figures as PNG data URIs).

    Args:
        report: a :class:`~lt_theory.report.diagnosis.Report`.

    Returns:
        The page's HTML text.
    """
    e = html_lib.escape
    several = len({f.run for f in report.findings}) > 1
    header = ["run"] * several + [
        "condition",
        "value",
        "reference",
        "verdict",
        "evidence",
        "advice",
        "source",
    ]
    rows = []
    for f in report.findings:
        advice = "".join(f"<li>{e(a)}</li>" for a in f.advice)
        cells = [f"<td>{e(f.run)}</td>"] * several + [
            f"<td>{e(f.condition)}<br><code>{e(f.quantity)}</code></td>",
            f"<td>{e(format_value(f.value))}</td>",
            f"<td>{e(f.reference)}</td>",
            f'<td class="{e(f.verdict)}">{e(f.verdict)}</td>',
            f"<td>{e(f.evidence)}</td>",
            f"<td><ol>{advice}</ol></td>" if advice else "<td></td>",
            f"<td>{e(f.source)}</td>",
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    advice = "".join(f"<li>{e(a)}</li>" for a in report.advice())
    figures = _figures(report)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>lt_theory report</title>',
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>lt_theory report</h1><p><code>{e(str(report.source))}</code>: {e(_summary(report))}</p>",
        "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>" + "".join(rows) + "</table>",
        f"<h2>What to try, in order</h2><ol>{advice}</ol>" if advice else "",
        "<h2>Figures logged by the callbacks</h2>" + "".join(figures) if figures else "",
        "</body></html>",
    ]
    return "\n".join(part for part in parts if part)
